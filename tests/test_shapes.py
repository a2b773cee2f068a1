"""Real shapes that broke the tool once: a version table locked by another migrator, a role
without privileges, a broken revision file, PgBouncer in every pool mode and server-choice
order, a signal mid-migration, and a failure that rolls several revisions back."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from prosaas_migrate import config
from tests import project
from tests.conftest import Running, applied_revisions, cli, lock_holders, query, version
from tests.pgcluster import PgBouncer

SERVICE = ["sh", "-c", "echo service-started"]


def enabled(url: str, **extra: str) -> dict[str, str]:
    return {"RUN_MIGRATIONS": "1", "DATABASE_URL": url, **extra}


@pytest.fixture
def app(tmp_path: Path) -> Path:
    project.create(tmp_path, project.linear(3))
    return tmp_path


# -- waits that keep their promise ----------------------------------------------------------


@pytest.fixture
def migrator_holding_the_version_table(app: Path, db_url: str) -> Iterator[None]:
    """Another runner mid-revision: it holds the advisory lock and ACCESS EXCLUSIVE on the
    version table (an ALTER TABLE alembic_version ... in its open transaction)."""
    assert cli(["run"], enabled(db_url), app).returncode == 0
    project.write_revisions(app, project.linear(4))
    with psycopg.connect(db_url, application_name="prosaas-migrate:api-2") as other:
        other.execute("SELECT pg_advisory_lock(%s)", [config.DEFAULT_LOCK_KEY])
        other.execute("ALTER TABLE alembic_version ALTER COLUMN version_num TYPE varchar(64)")
        yield
        other.rollback()


@pytest.mark.usefixtures("migrator_holding_the_version_table")
def test_run_skips_within_the_budget_when_the_version_table_is_locked(
    app: Path, db_url: str
) -> None:
    started = time.monotonic()
    result = cli(["run", "--", *SERVICE], enabled(db_url, MIGRATION_LOCK_WAIT_SECONDS="2"), app)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout == "service-started\n"
    assert "⏳ The version table stayed locked" in result.stderr
    assert "⚠️ MIGRATION CHECKPOINT: Could not acquire lock in time -> skipping migrations" in (
        result.stderr
    )
    assert elapsed < 10, elapsed  # 2 s of budget, plus start-up; it used to hang for minutes


@pytest.mark.usefixtures("migrator_holding_the_version_table")
def test_status_check_says_it_could_not_tell_when_the_version_table_is_locked(
    app: Path, db_url: str
) -> None:
    started = time.monotonic()
    result = cli(["status", "--json", "--check"], {"DATABASE_URL": db_url}, app)
    assert time.monotonic() - started < 15
    assert result.returncode == 3, result.stdout + result.stderr  # never 1, "pending"
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert "version table stayed locked" in report["revisions"]["error"]
    assert report["lock"]["held"] is True


@pytest.mark.usefixtures("migrator_holding_the_version_table")
def test_wait_for_head_exits_4_in_time_when_the_version_table_is_locked(
    app: Path, db_url: str
) -> None:
    env = {"DATABASE_URL": db_url, "MIGRATION_WAIT_FOR_HEAD_SECONDS": "2"}
    started = time.monotonic()
    result = cli(["run", "--", "touch", "started"], env, app)
    assert time.monotonic() - started < 12
    assert result.returncode == 4, result.stderr
    assert "Last problem reading it: the version table is locked by a running migration" in (
        result.stderr
    )
    assert not (app / "started").exists()


# -- a role without privileges -----------------------------------------------------------------


@pytest.fixture
def unprivileged(app: Path, db_url: str) -> str:
    """A URL for a role that may connect but not read the version table."""
    assert cli(["run"], enabled(db_url), app).returncode == 0
    project.write_revisions(app, project.linear(4))
    query(db_url, "DROP ROLE IF EXISTS nopriv")
    query(db_url, "CREATE ROLE nopriv LOGIN")
    query(db_url, "REVOKE ALL ON alembic_version FROM PUBLIC")
    return db_url.replace("postgresql://postgres@", "postgresql://nopriv@")


def test_status_check_without_privilege_is_one_line_and_could_not_tell(
    app: Path, unprivileged: str
) -> None:
    result = cli(["status", "--check"], {"DATABASE_URL": unprivileged}, app)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "permission denied for table alembic_version" in result.stdout


def test_wait_for_head_without_privilege_names_the_problem_and_exits_4(
    app: Path, unprivileged: str
) -> None:
    env = {"DATABASE_URL": unprivileged, "MIGRATION_WAIT_FOR_HEAD_SECONDS": "1"}
    result = cli(["run", "--", "touch", "started"], env, app)
    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("permission denied for table alembic_version") == 2  # warn, end
    assert not (app / "started").exists()


def test_run_without_privilege_is_one_line_and_no_exec(app: Path, unprivileged: str) -> None:
    result = cli(["run", "--", "touch", "started"], enabled(unprivileged), app)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "❌ prosaas-migrate: database error while " in result.stderr
    assert "permission denied for table alembic_version" in result.stderr
    assert not (app / "started").exists()


# -- a broken revision file ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "body", "expected"),
    [
        ("r004.py", "revision = 'r004'\ndown_revision = (\n", "SyntaxError"),
        ("helpers.py", "def shared():\n    return 1\n", "Could not determine revision id"),
        ("r005.py", "import no_such_module\n", "No module named 'no_such_module'"),
    ],
)
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_broken_revision_file_is_one_line_naming_it(
    app: Path, db_url: str, name: str, body: str, expected: str, log_format: str
) -> None:
    (app / "migrations" / "versions" / name).write_text(body)
    env = enabled(db_url, MIGRATION_LOG_FORMAT=log_format)
    result = cli(["run", "--", "touch", "started"], env, app)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"cannot load the migration scripts: migrations/versions/{name}" in result.stderr
    assert expected in result.stderr
    if log_format == "json":
        for line in result.stderr.splitlines():
            json.loads(line)  # one object a line, the error included
    assert not (app / "started").exists()
    assert lock_holders(db_url) == []


# -- PgBouncer ----------------------------------------------------------------------------------


POOLERS = [
    ("transaction", False),
    ("transaction", True),
    ("statement", False),
    ("statement", True),
]


@pytest.mark.parametrize("bouncer", POOLERS, indirect=True, ids=lambda p: f"{p[0]}-rr{p[1]:d}")
@pytest.mark.parametrize("attempt", range(3))
def test_a_pooler_that_does_not_keep_sessions_is_refused_and_nothing_leaks(
    app: Path, db_url: str, bouncer: PgBouncer, attempt: int
) -> None:
    url = bouncer.url(db_url.rsplit("/", 1)[1])
    if attempt and bouncer_mode(bouncer) == "transaction":
        # Several idle server sessions, so that FIFO and LIFO choose differently.
        clients = [psycopg.connect(url) for _ in range(attempt + 2)]
        for client in clients:
            client.execute("SELECT 1")  # each holds a transaction, so each its own server
        for client in clients:
            client.close()
    result = cli(["run", "--", "touch", "started"], enabled(url), app)
    assert result.returncode == 2, result.stderr
    assert "❌ Refusing to migrate through this connection pooler" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (app / "started").exists()
    assert version(db_url) == [] and lock_holders(db_url) == []
    # Every server session the pool hands out is as it was: none of our settings stayed.
    for _ in range(6):
        with psycopg.connect(url, autocommit=True) as client:
            row = client.execute(
                "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'),"
                " current_setting('application_name')"
            ).fetchone()
            assert row == ("0", "0", ""), row


def bouncer_mode(bouncer: PgBouncer) -> str:
    return (bouncer.base / "pgbouncer.ini").read_text().split("pool_mode = ")[1].split()[0]


@pytest.mark.parametrize("bouncer", [("session", False), ("session", True)], indirect=True)
def test_session_pooling_works_in_both_server_choice_orders(
    app: Path, db_url: str, bouncer: PgBouncer
) -> None:
    url = bouncer.url(db_url.rsplit("/", 1)[1])
    result = cli(["run", "--", *SERVICE], enabled(url), app)
    assert result.returncode == 0, result.stderr
    assert version(db_url) == ["r003"] and lock_holders(db_url) == []


# -- honest logs ----------------------------------------------------------------------------


@pytest.mark.parametrize("env_style", ["cookbook", "stock"])
def test_sigterm_mid_migration_says_what_happened(
    tmp_path: Path, db_url: str, env_style: str
) -> None:
    project.create(tmp_path, [project.Revision("r001", sql=["SELECT pg_sleep(30)"])], env=env_style)
    runner = Running(["run", "--", "touch", "started"], enabled(db_url), tmp_path)
    runner.wait_for("Applying revision r001")
    time.sleep(0.5)
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.finish(timeout=15) == 143, runner.stderr
    assert "LOCK LOST" not in runner.stderr  # nothing was lost: the session ended
    assert "🛑 Interrupted by SIGTERM" in runner.stderr
    released = "Migration lock" in runner.stderr and "released with its session" in runner.stderr
    assert released or "✅ Released migration lock" in runner.stderr, runner.stderr
    assert version(db_url) == [] and lock_holders(db_url) == []
    assert not (tmp_path / "started").exists()


FAILING = project.Revision("r003", sql=["SELECT 1/0"])


@pytest.mark.parametrize("per_migration", [False, True])
def test_a_failure_names_what_was_rolled_back_and_what_stayed(
    tmp_path: Path, db_url: str, per_migration: bool
) -> None:
    project.create(tmp_path, [*project.linear(2), FAILING])
    if per_migration:
        env_py = tmp_path / "migrations" / "env.py"
        env_py.write_text(
            env_py.read_text().replace(
                "target_metadata=None)", "target_metadata=None, transaction_per_migration=True)"
            )
        )
    result = cli(["run", "--", "touch", "started"], enabled(db_url), tmp_path)
    assert result.returncode == 1, result.stderr
    assert "❌ MIGRATION FAILED in revision r003: DivisionByZero" in result.stderr
    assert "✅ Applied" not in result.stderr  # nothing is called applied before it committed
    if per_migration:
        assert "   Rolled back: r003 (nothing of them is in the database)" in result.stderr
        assert "   Committed before the failure, and kept: r001, r002" in result.stderr
        assert version(db_url) == ["r002"] and applied_revisions(db_url) == ["r001", "r002"]
    else:
        assert "   Rolled back: r001, r002, r003" in result.stderr
        assert "Committed before the failure" not in result.stderr
        assert version(db_url) == [] and applied_revisions(db_url) == []
    assert not (tmp_path / "started").exists()


# -- more shapes a hostile review found --------------------------------------------------------


def test_a_revision_cycle_is_never_taken_for_head(tmp_path: Path, db_url: str) -> None:
    project.create(tmp_path, project.linear(2))
    path = tmp_path / "migrations" / "versions" / "r001.py"
    path.write_text(path.read_text().replace("down_revision = None", "down_revision = 'r002'"))
    result = cli(["run", "--", "touch", "started"], enabled(db_url), tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Schema is current" not in result.stderr
    assert "Cycle" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "started").exists()


@pytest.mark.parametrize("code", ["0", "3"])
def test_an_env_py_that_exits_is_a_failure_not_a_way_out(
    tmp_path: Path, db_url: str, code: str
) -> None:
    project.create(tmp_path, project.linear(1))
    env_py = tmp_path / "migrations" / "env.py"
    env_py.write_text("import sys\nsys.exit(" + code + ")\n" + env_py.read_text())
    result = cli(["run", "--", "touch", "started"], enabled(db_url), tmp_path)
    assert result.returncode == 1, result.stderr
    assert "SystemExit" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "started").exists()


def test_status_without_schema_usage_could_not_tell(app: Path, db_url: str) -> None:
    assert cli(["run"], enabled(db_url), app).returncode == 0
    project.write_revisions(app, project.linear(4))
    query(db_url, "DROP ROLE IF EXISTS blind")
    query(db_url, "CREATE ROLE blind LOGIN")
    query(db_url, "REVOKE ALL ON SCHEMA public FROM PUBLIC")
    url = db_url.replace("postgresql://postgres@", "postgresql://blind@")
    result = cli(["status", "--check"], {"DATABASE_URL": url}, app)
    assert result.returncode == 3, result.stdout  # not 1: it cannot see the version table
    assert "no schema on the search_path is usable" in result.stdout


def test_an_empty_command_name_is_127_in_one_line(tmp_path: Path) -> None:
    result = cli(["run", "--", ""], {"RUN_MIGRATIONS": "0"}, tmp_path)
    assert result.returncode == 127, result.stderr
    assert "Traceback" not in result.stderr and "empty command name" in result.stderr


@pytest.mark.parametrize("bouncer", [("session", False)], indirect=True)
def test_a_session_pool_with_no_room_is_refused_within_the_budget(
    app: Path, db_url: str, bouncer: PgBouncer
) -> None:
    url = bouncer.url(db_url.rsplit("/", 1)[1])
    # Every server session of the pool is taken by the app.
    hogs = [psycopg.connect(url, autocommit=True) for _ in range(20)]
    try:
        for hog in hogs:
            hog.execute("SELECT 1")
        started = time.monotonic()
        result = cli(["run", "--", *SERVICE], enabled(url, MIGRATION_LOCK_WAIT_SECONDS="3"), app)
        elapsed = time.monotonic() - started
    finally:
        for hog in hogs:
            hog.close()
    assert elapsed < 15, elapsed  # not PgBouncer's 120 s query_wait_timeout
    assert result.returncode == 0, result.stderr
    assert "did not answer" in result.stderr
    # Nobody was seen holding the lock, let alone migrating: the skip must not say otherwise.
    assert "another process is running migrations" not in result.stderr
    assert "This is SAFE" not in result.stderr
    assert "Migrations did NOT run here" in result.stderr
    assert result.stdout == "service-started\n"
