# prosaas-migrate in front of the example application: one image for every service.
#   docker build -t prosaas-migrate-example .
# Offline (no registry, no PyPI): put wheels in ./wheels and pass --build-arg OFFLINE=1, and a
# locally built base with --build-arg BASE_IMAGE=... (see tests/compose_smoke.py).
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
ARG OFFLINE=
WORKDIR /src
COPY wheels/ /wheels/
COPY pyproject.toml README.md ./
COPY prosaas_migrate/ prosaas_migrate/
RUN python3 -m venv /opt/venv \
    && if [ -n "$OFFLINE" ]; then set -- --no-index; fi \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        --find-links /wheels "$@" .

FROM ${BASE_IMAGE}
# tini, for runtimes with no init of their own (Kubernetes): ENTRYPOINT ["/usr/bin/tini", "--",
# "/entrypoint.sh"] forwards signals and reaps zombies (docs/kubernetes.md). Installed only when
# the base lacks it: the offline build's base has it already, and cannot reach a mirror.
# Unpinned on purpose: the base image's Debian release decides which tini there is.
# hadolint ignore=DL3008
RUN if ! command -v tini >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends tini \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && test -x /usr/bin/tini
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
COPY entrypoint.sh /entrypoint.sh
# The whole folder: .dockerignore keeps a developer's .env, bytecode and caches out of it.
COPY --chown=root:root examples/prosaas-app/ /app/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
USER 10001
ENTRYPOINT ["/entrypoint.sh"]
CMD ["python", "-m", "example_services", "api"]
