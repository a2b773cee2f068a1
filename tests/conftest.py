"""Shared fixtures: a throwaway PostgreSQL (or PROSAAS_TEST_DATABASE_URL), scrubbed env, the CLI."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest

from prosaas_migrate.config import KNOWN_VARIABLES
from tests.pgcluster import DEFAULT_MAJOR, PGBOUNCER, Cluster, PgBouncer

# Our variables, and the ones that would change the tool's behaviour if the developer's shell
# happened to set them (a password from the shell would let a password test pass).
OWN_VARIABLES = (*KNOWN_VARIABLES, "PGOPTIONS", "PGAPPNAME", "PGPASSWORD", "PGPASSFILE")
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


MAJORS_VARIABLE = "PROSAAS_PG_MAJORS"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pg-majors",
        default=os.environ.get(MAJORS_VARIABLE, str(DEFAULT_MAJOR)),
        help=f"PostgreSQL majors for the tests marked `majors`, comma-separated (default "
        f"${MAJORS_VARIABLE}, else {DEFAULT_MAJOR}); every other test runs on {DEFAULT_MAJOR}",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "majors: the database tests run once per --pg-majors major, ids [pgNN]"
    )


def requested_majors(config: pytest.Config) -> list[int]:
    words = [w.strip() for w in str(config.getoption("--pg-majors")).split(",") if w.strip()]
    if not words or not all(w.isdigit() for w in words):
        raise pytest.UsageError(f"--pg-majors: majors like 15,16,18, not {words!r}")
    return sorted({int(w) for w in words})


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A `majors` test that reaches the server runs once per major; an external server is one."""
    if "pg_major" not in metafunc.fixturenames or not metafunc.definition.get_closest_marker(
        "majors"
    ):
        return
    if os.environ.get(EXTERNAL_URL_VARIABLE):
        return
    metafunc.parametrize(
        "pg_major",
        requested_majors(metafunc.config),
        indirect=True,
        scope="session",
        ids=lambda major: f"pg{major}",
    )


@pytest.fixture(scope="session")
def pg_major(request: pytest.FixtureRequest) -> int:
    """The major this test runs on: its [pgNN] parameter, else the suite's default."""
    return int(getattr(request, "param", DEFAULT_MAJOR))


class Servers:
    """One cluster per major, started on first use and kept for the session: switching between
    majors (pytest groups the tests of each) costs nothing after the first start."""

    def __init__(self) -> None:
        self._started: dict[int, Server | str] = {}

    def get(self, major: int) -> Server:
        if major not in self._started:
            try:
                cluster = Cluster(major=major)
                cluster.start()
                self._started[major] = Server(cluster.url(), cluster)
            except (RuntimeError, OSError) as error:
                self._started[major] = f"no PostgreSQL {major} server: {error}"
        found = self._started[major]
        if isinstance(found, str):
            skip_outside_ci(found)
        return found

    def destroy(self) -> None:
        for found in self._started.values():
            if isinstance(found, Server) and found.cluster is not None:
                found.cluster.destroy()


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    pool = Servers()
    try:
        yield pool
    finally:
        pool.destroy()


@pytest.fixture(scope="session")
def server(servers: Servers, pg_major: int) -> Server:
    external = os.environ.get(EXTERNAL_URL_VARIABLE)
    if external:
        return Server(external, None)
    return servers.get(pg_major)


def skip_outside_ci(reason: str) -> NoReturn:
    """Skip on a developer's machine; in CI (CI set) the check must run, so fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"would skip in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
def own_cluster(server: Server) -> Cluster:
    """For tests that stop, restart or kill the server: only a cluster the suite started."""
    if server.cluster is None:
        skip_outside_ci(f"stops the server: not run against {EXTERNAL_URL_VARIABLE}")
    return server.cluster


@pytest.fixture
def bouncer(own_cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[PgBouncer]:
    """A real PgBouncer in front of the suite's cluster: `mode` or `(mode, server_round_robin)`."""
    if not PGBOUNCER.exists():
        skip_outside_ci(f"no PgBouncer at {PGBOUNCER} (scripts/test installs it when root)")
    mode, round_robin = (request.param, False) if isinstance(request.param, str) else request.param
    pooler = PgBouncer(own_cluster, mode, round_robin=round_robin)
    yield pooler
    pooler.stop()


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


class Running:
    """A live `prosaas-migrate` process whose stderr is collected as it comes."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [str(BIN), *args],
            env=clean_env(env),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stdout = ""

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if time.monotonic() > deadline or (
                self.proc.poll() is not None and not any(text in line for line in self.lines)
            ):
                time.sleep(0.1)  # let the reader catch up before judging
                if any(text in line for line in self.lines):
                    return
                raise AssertionError(f"{text!r} never appeared in:\n{self.stderr}")
            time.sleep(0.02)

    def finish(self, timeout: float = 60) -> int:
        self.proc.wait(timeout=timeout)
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()
        self._reader.join(timeout=5)
        return self.proc.returncode

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)


def query(url: str, sql: str, params: Sequence[object] | None = None) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


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


def lock_holders(url: str) -> list[int]:
    """Backend pids holding any advisory lock in the database at `url`."""
    rows = query(url, "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted")
    return [int(str(row[0])) for row in rows]


def on_a_terminal(
    args: Sequence[str], env: Mapping[str, str], cwd: Path, timeout: float = 60
) -> tuple[int, str]:
    """Run the command with stdout on a pseudo-terminal; (exit code, what it wrote there)."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [str(BIN), *args], env=dict(env), cwd=cwd, stdout=follower, stderr=subprocess.PIPE
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO once the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(timeout=timeout), b"".join(chunks).decode()
