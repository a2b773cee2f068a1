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

ensure_venv() {
  local python="${PYTHON:-python3}"
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "prosaas-migrate needs Python 3.11 or newer; $python is $("$python" --version 2>&1)" >&2
    exit 1
  fi
  if [ ! -x .venv/bin/python ]; then
    step "creating .venv"
    "$python" -m venv .venv
  fi
  # A stamp keeps a second run fast; it changes whenever pyproject.toml does.
  local stamp
  stamp=.venv/.installed-$(cksum < pyproject.toml | cut -d' ' -f1)
  if [ ! -f "$stamp" ]; then
    step "installing prosaas-migrate and its test tools into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
    rm -f .venv/.installed-*
    touch "$stamp"
  fi
}
