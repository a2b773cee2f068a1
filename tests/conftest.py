"""Shared fixtures: a throwaway PostgreSQL (or PROSAAS_TEST_DATABASE_URL), scrubbed env, the CLI."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.pgcluster import Cluster

# Our variables, and the ones that would change the tool's behaviour if the developer's shell
# happened to set them.
OWN_VARIABLES = (
    "RUN_MIGRATIONS",
    "RUN_MIGRATIONS_ON_START",
    "SERVICE_ROLE",
    "MIGRATION_LOCK_WAIT_SECONDS",
    "MIGRATION_STATEMENT_TIMEOUT",
    "MIGRATION_LOCK_KEY",
    "DATABASE_URL",
    "MIGRATION_DATABASE_URL",
    "ALEMBIC_CONFIG",
    "PGOPTIONS",
    "PGAPPNAME",
)
EXTERNAL_URL_VARIABLE = "PROSAAS_TEST_DATABASE_URL"
BIN = Path(sys.executable).parent / "prosaas-migrate"


@dataclass
class Server:
    """The admin side of the test server; `cluster` is None for an external server."""

    admin_url: str
    cluster: Cluster | None
    _names = itertools.count(1)

    def url(self, dbname: str) -> str:
        base, _, _ = self.admin_url.rpartition("/")
        return f"{base}/{dbname}"

    def new_database(self) -> str:
        name = f"t_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    external = os.environ.get(EXTERNAL_URL_VARIABLE)
    if external:
        yield Server(external, None)
        return
    cluster = Cluster()
    cluster.start()
    try:
        yield Server(cluster.url(), cluster)
    finally:
        cluster.destroy()


@pytest.fixture
def own_cluster(server: Server) -> Cluster:
    """For tests that stop, restart or kill the server: only a cluster the suite started."""
    if server.cluster is None:
        pytest.skip(f"stops the server: not run against {EXTERNAL_URL_VARIABLE}")
    return server.cluster


@pytest.fixture
def db_url(server: Server) -> str:
    return server.new_database()


@pytest.fixture(autouse=True)
def scrubbed_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OWN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OWN_VARIABLES}
    env.update({"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    env.update(extra or {})
    return env


def cli(
    args: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run the installed console script as a real process."""
    return subprocess.run(
        [str(BIN), *args],
        env=clean_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def spawn(args: Sequence[str], env: Mapping[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN), *args],
        env=clean_env(env),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def query(url: str, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def applied_revisions(url: str) -> list[str]:
    """revision_log in order of application, or [] when no revision ran."""
    if not query(url, "SELECT to_regclass('revision_log') IS NOT NULL")[0][0]:
        return []
    rows = query(url, "SELECT revision FROM revision_log ORDER BY applied_at, revision")
    return [str(r[0]) for r in rows]


def version(url: str) -> list[str]:
    if not query(url, "SELECT to_regclass('alembic_version') IS NOT NULL")[0][0]:
        return []
    return [str(r[0]) for r in query(url, "SELECT version_num FROM alembic_version")]
