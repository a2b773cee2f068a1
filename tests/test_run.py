"""`prosaas-migrate run` as a real process against a real PostgreSQL."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from prosaas_migrate import config
from tests import project
from tests.conftest import (
    BIN,
    Running,
    applied_revisions,
    clean_env,
    cli,
    lock_holders,
    query,
    version,
)
from tests.pgcluster import Cluster

pytestmark = pytest.mark.majors  # its database tests run on each --pg-majors major

SERVICE = ["sh", "-c", "echo service-started pid=$$"]


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A port that accepts TCP connections, to prove nothing ever connected to it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    url = f"postgresql://app:s3cr3t-pw@127.0.0.1:{sock.getsockname()[1]}/app"
    yield sock, url
    sock.close()


def nobody_connected(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return True
    return False


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """A cookbook-style project with three quick revisions."""
    project.create(tmp_path, project.linear(3))
    return tmp_path


def enabled(db_url: str, **extra: str) -> dict[str, str]:
    return {"RUN_MIGRATIONS": "1", "DATABASE_URL": db_url, **extra}


# -- disabled path ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "decided"),
    [
        ({"RUN_MIGRATIONS": "0"}, "Decided by: RUN_MIGRATIONS=0"),
        ({}, "Decided by: default"),
        ({"RUN_MIGRATIONS_ON_START": "false"}, "Decided by: RUN_MIGRATIONS_ON_START=false"),
        ({"SERVICE_ROLE": "worker"}, "Decided by: SERVICE_ROLE=worker"),
    ],
)
def test_disabled_path_execs_at_once_without_connecting_or_importing_drivers(
    tmp_path: Path,
    listener: tuple[socket.socket, str],
    environ: dict[str, str],
    decided: str,
) -> None:
    sock, url = listener
    env = {**environ, "DATABASE_URL": url, "PYTHONPROFILEIMPORTTIME": "1"}
    result = cli(["run", "--", *SERVICE], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("service-started")
    assert "🚫 MIGRATIONS_DISABLED: RUN_MIGRATIONS is not set to '1'" in result.stderr
    assert "   Migrations are disabled for this service" in result.stderr
    assert decided in result.stderr
    imported = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert any("prosaas_migrate.runner" in line for line in imported)  # the profile is real
    for heavy in ("sqlalchemy", "alembic", "psycopg"):
        assert not [line for line in imported if f" {heavy}" in line], heavy
    assert nobody_connected(sock)


def test_a_restart_at_head_imports_neither_alembic_nor_sqlalchemy(app: Path, db_url: str) -> None:
    # The fast path exists for restarts on a current schema: importing Alembic costs ~350 ms.
    assert cli(["run"], enabled(db_url), app).returncode == 0
    result = cli(["run", "--", *SERVICE], enabled(db_url, PYTHONPROFILEIMPORTTIME="1"), app)
    assert result.returncode == 0, result.stderr
    assert "Schema is current at r003: nothing to migrate (lock not needed)" in result.stderr
    imported = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert any(" psycopg" in line for line in imported)  # the profile is real
    for heavy in ("sqlalchemy", "alembic", "pglast"):
        assert not [line for line in imported if f" {heavy}" in line], heavy


def test_a_runner_that_finds_head_under_the_lock_imports_no_alembic(app: Path, db_url: str) -> None:
    # In a race of replicas, every loser takes the lock in turn only to find the schema
    # current: importing Alembic there cost each of them 0.35 s, one after another.
    assert cli(["run"], enabled(db_url), app).returncode == 0
    query(db_url, "UPDATE alembic_version SET version_num = 'r002'")
    with psycopg.connect(db_url, autocommit=True) as winner:
        winner.execute("SELECT pg_advisory_lock(%s)", [config.DEFAULT_LOCK_KEY])
        loser = Running(["run"], enabled(db_url, PYTHONPROFILEIMPORTTIME="1"), app)
        loser.wait_for("Waiting for migration lock")
        winner.execute("UPDATE alembic_version SET version_num = 'r003'")
    assert loser.finish() == 0, loser.stderr
    assert "Schema is current at r003: nothing to migrate (checked again under the lock)" in (
        loser.stderr
    )
    imported = [line for line in loser.lines if line.startswith("import time:")]
    assert any(" psycopg" in line for line in imported)
    assert not [line for line in imported if " alembic" in line or " sqlalchemy" in line]


# -- configuration errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RUN_MIGRATIONS", "maybe"),
        ("MIGRATION_LOCK_WAIT_SECONDS", "abc"),
        ("MIGRATION_LOCK_WAIT_SECONDS", "-5"),
        ("MIGRATION_STATEMENT_TIMEOUT", "abc"),
        ("MIGRATION_STATEMENT_TIMEOUT", "-5s"),
        ("MIGRATION_STATEMENT_TIMEOUT", "1s'; DROP TABLE x; --"),
        ("MIGRATION_LOCK_KEY", str(2**63)),
    ],
)
def test_invalid_value_exits_2_with_one_line_and_nothing_started(
    app: Path, listener: tuple[socket.socket, str], variable: str, value: str
) -> None:
    sock, url = listener
    env = {"RUN_MIGRATIONS": "1", "DATABASE_URL": url, variable: value}
    result = cli(["run", "--", "touch", "started"], env, app)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0] and repr(value) in lines[0] and "expected" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (app / "started").exists()
    assert nobody_connected(sock)


@pytest.mark.parametrize("ini_url", [None, "driver://user:pass@localhost/dbname"])
def test_migrating_without_a_usable_url_is_a_config_error(
    tmp_path: Path, ini_url: str | None
) -> None:
    project.create(tmp_path, project.linear(1), env="stock")
    if ini_url is None:
        ini = tmp_path / "alembic.ini"
        ini.write_text(ini.read_text().replace("sqlalchemy.url = driver://", "# was: driver://"))
    result = cli(["run", "--", "touch", "started"], {"RUN_MIGRATIONS": "1"}, tmp_path)
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if "❌" in line]
    assert len(error) == 1 and "DATABASE_URL" in error[0]
    assert "pass@" not in result.stderr
    assert not (tmp_path / "started").exists()


def test_missing_alembic_ini_names_the_variable(tmp_path: Path, db_url: str) -> None:
    result = cli(["run"], enabled(db_url, ALEMBIC_CONFIG="nope.ini"), tmp_path)
    assert result.returncode == 2
    assert "ALEMBIC_CONFIG: 'nope.ini' is invalid" in result.stderr
    result = cli(["run", "--config", "other.ini"], enabled(db_url), tmp_path)
    assert result.returncode == 2
    assert "--config: 'other.ini' is invalid" in result.stderr


def test_unreachable_exits_3_within_the_budget_without_the_password(
    app: Path,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://app:s3cr3t-pw@127.0.0.1:{port}/app"
    started = time.monotonic()
    result = cli(
        ["run", "--", "touch", "started"],
        enabled(url, MIGRATION_LOCK_WAIT_SECONDS="2"),
        app,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 3, result.stderr
    assert elapsed < 2 + 5
    assert "database unreachable at postgresql://app:***@127.0.0.1" in result.stderr
    assert "s3cr3t-pw" not in result.stderr + result.stdout
    assert not (app / "started").exists()


# -- enabled path ----------------------------------------------------------------------------

SPY = project.Revision(
    "r000",
    sql=[
        "CREATE TABLE session_seen AS SELECT current_setting('statement_timeout') AS timeout,"
        " current_setting('application_name') AS app,"
        " EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
        "         AND pid = pg_backend_pid()) AS on_locked_connection,"
        " EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted) AS lock_held"
    ],
)


@pytest.mark.parametrize("env_style", ["cookbook", "stock"])
def test_enabled_path_migrates_under_the_lock_then_execs(
    tmp_path: Path, db_url: str, env_style: str
) -> None:
    revisions = [SPY, *project.linear(2)]
    project.create(tmp_path, revisions, env=env_style)
    proc = Running(
        ["run", "--", *SERVICE], enabled(db_url, MIGRATION_STATEMENT_TIMEOUT="90s"), tmp_path
    )
    assert proc.finish() == 0, proc.stderr
    assert proc.stdout == f"service-started pid={proc.pid}\n"
    expected = [
        "🔧 MIGRATION CHECKPOINT: Starting apply_migrations()",
        "✅ Set statement_timeout to 90s for migration connection",
        "✅ Acquired migration lock",
        "🔧 Applying revision r000",
        "☑️ Ran revision r000",
        "☑️ Ran revision r001 (create t001): not committed yet",
        "☑️ Ran revision r002 (create t002): not committed yet",
        "✅ Migrations complete: 3 revision(s) applied, now at r002 (committed: r000, r001, r002)",
        "✅ Released migration lock",
        "🚀 Starting service: sh -c",
    ]
    positions = [
        next((i for i, line in enumerate(proc.lines) if line.startswith(want)), -1)
        for want in expected
    ]
    assert -1 not in positions and positions == sorted(positions), proc.stderr
    assert version(db_url) == ["r002"]
    assert applied_revisions(db_url) == ["r000", "r001", "r002"]
    # statement_timeout and application_name reached the connection the revisions ran on,
    # even when a stock env.py built its own engine.
    timeout, app_name, on_locked_connection, lock_held = query(
        db_url, "SELECT * FROM session_seen"
    )[0]
    assert timeout == "90s"
    assert app_name == f"prosaas-migrate:{socket.gethostname()}"
    assert lock_held is True
    # The cookbook env.py runs on the very connection that holds the lock; a stock one cannot.
    assert on_locked_connection is (env_style == "cookbook")


def test_every_connection_is_closed_before_the_service_starts(app: Path, db_url: str) -> None:
    count_ours = (
        "import psycopg, sys; c = psycopg.connect(sys.argv[1]); print(c.execute("
        "\"SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'prosaas-migrate:%'"
        ' AND pid <> pg_backend_pid()").fetchone()[0])'
    )
    result = cli(["run", "--", sys.executable, "-c", count_ours, db_url], enabled(db_url), app)
    assert result.returncode == 0, result.stderr
    assert version(db_url) == ["r003"]
    assert result.stdout.strip() == "0"


def test_connect_retries_until_a_late_server_is_up(
    app: Path, db_url: str, own_cluster: Cluster
) -> None:
    own_cluster.stop()
    try:
        proc = Running(["run"], enabled(db_url, MIGRATION_LOCK_WAIT_SECONDS="30"), app)
        proc.wait_for("Database not reachable yet")
        time.sleep(1)
    finally:
        own_cluster.start()
    assert proc.finish() == 0, proc.stderr
    assert "app:***@" not in proc.stderr  # no password in this URL, and none invented
    assert version(db_url) == ["r003"]


def test_a_second_run_finds_the_schema_current(app: Path, db_url: str) -> None:
    assert cli(["run"], enabled(db_url), app).returncode == 0
    result = cli(["run"], enabled(db_url), app)
    assert result.returncode == 0, result.stderr
    assert "✅ Schema is current at r003: nothing to migrate" in result.stderr
    assert "✅ No service command given: exiting 0" in result.stderr
    assert applied_revisions(db_url) == ["r001", "r002", "r003"]


def test_dotenv_is_read_and_the_real_environment_wins(app: Path, db_url: str) -> None:
    (app / ".env").write_text(f"RUN_MIGRATIONS=1\nDATABASE_URL={db_url}\n")
    result = cli(["run"], {"RUN_MIGRATIONS": "0"}, app)
    assert "MIGRATIONS_DISABLED" in result.stderr and "RUN_MIGRATIONS=0" in result.stderr
    assert version(db_url) == []
    result = cli(["run"], {}, app)
    assert result.returncode == 0, result.stderr
    assert version(db_url) == ["r003"]


def test_an_unreadable_dotenv_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(b"RUN_MIGRATIONS=\xff\xfe0\n")
    result = cli(["run", "--", *SERVICE], {}, tmp_path)
    assert result.returncode == 2
    assert ".env" in result.stderr and "Traceback" not in result.stderr


def test_config_option_wins_over_alembic_config(tmp_path: Path, db_url: str) -> None:
    project.create(tmp_path / "a", project.linear(1))
    project.create(tmp_path / "b", project.linear(2))
    env = enabled(db_url, ALEMBIC_CONFIG=str(tmp_path / "a" / "alembic.ini"))
    result = cli(["run", "--config", str(tmp_path / "b" / "alembic.ini")], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert version(db_url) == ["r002"]


def test_migration_database_url_wins(app: Path, db_url: str) -> None:
    env = enabled("postgresql://nobody@127.0.0.1:1/none", MIGRATION_DATABASE_URL=db_url)
    assert cli(["run"], env, app).returncode == 0
    assert version(db_url) == ["r003"]


# -- lock busy -------------------------------------------------------------------------------


RUNNER_NAME = "prosaas-migrate:api-2"  # what another container's runner calls its sessions


@pytest.fixture
def holder(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """Another container's runner holding the default lock, as a slow migrator would."""
    with psycopg.connect(db_url, autocommit=True, application_name=RUNNER_NAME) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", [config.default_lock_key()])
        yield conn


@pytest.fixture
def psql_holder(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A person's psql session holding the key: no migrator at all."""
    with psycopg.connect(db_url, autocommit=True, application_name="psql") as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", [config.default_lock_key()])
        yield conn


def test_busy_lock_is_skipped_gracefully_and_the_service_starts(
    app: Path, db_url: str, holder: psycopg.Connection[Any]
) -> None:
    proc = Running(["run", "--", *SERVICE], enabled(db_url, MIGRATION_LOCK_WAIT_SECONDS="6"), app)
    proc.wait_for("Waiting for migration lock")
    apps = query(db_url, "SELECT application_name FROM pg_stat_activity WHERE pid <> %s",
                 [holder.info.backend_pid])  # fmt: skip
    assert (f"prosaas-migrate:{socket.gethostname()}",) in apps
    assert proc.finish() == 0, proc.stderr
    assert proc.stdout == f"service-started pid={proc.pid}\n"
    assert "⚠️ MIGRATION CHECKPOINT: Could not acquire lock in time -> skipping migrations" in (
        proc.lines
    )
    assert "   Waited 6s but another process is running migrations" in proc.lines
    assert "   This is SAFE - migrations will run in another container" in proc.lines
    waits = [line for line in proc.lines if "Waiting for migration lock" in line]
    assert len(waits) == 2  # at once, then every 5 s
    assert all(f"pid {holder.info.backend_pid} ({RUNNER_NAME}, 127.0.0.1)" in w for w in waits)
    assert version(db_url) == []


def test_a_holder_that_is_no_runner_is_not_called_safe(
    app: Path, db_url: str, psql_holder: psycopg.Connection[Any]
) -> None:
    pid = psql_holder.info.backend_pid
    result = cli(["run", "--", *SERVICE], enabled(db_url, MIGRATION_LOCK_WAIT_SECONDS="1"), app)
    assert result.returncode == 0, result.stderr  # skip is still the default: the service runs
    assert "service-started" in result.stdout
    lines = result.stderr.splitlines()
    first = lines.index(
        "⚠️ MIGRATION CHECKPOINT: Could not acquire lock in time -> skipping migrations"
    )
    said = lines[first + 1 : first + 4]
    assert said[0].startswith(f"   Waited 1s; the lock is held by pid {pid} (psql, 127.0.0.1)")
    assert said[0].endswith("which is not a prosaas-migrate runner")
    assert said[1] == (
        "   Migrations did NOT run here, and nothing shows that another container is running them"
    )
    assert f"SELECT pg_terminate_backend({pid})" in said[2]
    assert "SAFE" not in result.stderr and "another process is running" not in result.stderr
    assert version(db_url) == []


@pytest.mark.parametrize("holder_kind", ["runner", "psql"])
def test_on_lock_timeout_fail_exits_1_without_starting(
    app: Path, db_url: str, holder_kind: str, request: pytest.FixtureRequest
) -> None:
    held = request.getfixturevalue("holder" if holder_kind == "runner" else "psql_holder")
    env = enabled(db_url, MIGRATION_LOCK_WAIT_SECONDS="1", MIGRATION_ON_LOCK_TIMEOUT="FAIL")
    result = cli(["run", "--", "touch", "started"], env, app)
    assert result.returncode == 1, result.stderr
    assert not (app / "started").exists()
    assert (
        "❌ MIGRATION CHECKPOINT: Could not acquire lock in time -> not starting the service "
        "(MIGRATION_ON_LOCK_TIMEOUT=fail)"
    ) in result.stderr.splitlines()
    assert f"pid {held.info.backend_pid}" in result.stderr
    assert "SAFE" not in result.stderr and "Traceback" not in result.stderr
    assert "Starting service" not in result.stderr
    assert version(db_url) == []


def test_wait_for_head_is_honoured_after_a_skip(
    app: Path, db_url: str, holder: psycopg.Connection[Any]
) -> None:
    """The designated container skipped: with a wait for head it starts only at head, and
    exits 4 when the holder never gets there."""
    env = enabled(db_url, MIGRATION_LOCK_WAIT_SECONDS="1", MIGRATION_WAIT_FOR_HEAD_SECONDS="2")
    result = cli(["run", "--", "touch", "started"], env, app)
    assert result.returncode == 4, result.stderr
    assert "Could not acquire lock in time" in result.stderr
    assert "❌ The schema did not reach r003 within 2s" in result.stderr
    assert not (app / "started").exists()
    # Now the holder's migration lands while the skipped container waits for head.
    proc = Running(["run", "--", *SERVICE], {**env, "MIGRATION_WAIT_FOR_HEAD_SECONDS": "30"}, app)
    proc.wait_for("Waiting for the schema to reach r003")
    holder.execute("SELECT pg_advisory_unlock_all()")
    other = cli(["run"], enabled(db_url, MIGRATION_LOCK_KEY="1"), app)  # another key: not blocked
    assert other.returncode == 0, other.stderr
    assert proc.finish() == 0, proc.stderr
    assert "✅ Schema is at r003" in proc.stderr
    assert proc.stdout == f"service-started pid={proc.pid}\n"


def test_at_head_the_lock_is_not_even_asked_for(
    app: Path, db_url: str, holder: psycopg.Connection[Any]
) -> None:
    holder.execute("SELECT pg_advisory_unlock_all()")
    assert cli(["run"], enabled(db_url), app).returncode == 0
    holder.execute("SELECT pg_advisory_lock(%s)", [config.default_lock_key()])
    started = time.monotonic()
    result = cli(["run", "--", *SERVICE], enabled(db_url, MIGRATION_LOCK_WAIT_SECONDS="30"), app)
    assert result.returncode == 0, result.stderr
    assert "service-started" in result.stdout
    # Queueing behind the holder would have taken the whole 30 s budget.
    assert time.monotonic() - started < 10
    assert "✅ Schema is current at r003: nothing to migrate (lock not needed)" in result.stderr
    assert "Waiting" not in result.stderr and "Acquired" not in result.stderr
    assert lock_holders(db_url) == [holder.info.backend_pid]


def test_pending_migrations_still_wait_for_the_lock(
    app: Path, db_url: str, holder: psycopg.Connection[Any]
) -> None:
    result = cli(["run"], enabled(db_url, MIGRATION_LOCK_WAIT_SECONDS="1"), app)
    assert result.returncode == 0, result.stderr
    assert "Could not acquire lock in time" in result.stderr
    assert version(db_url) == []


# -- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("env_style", ["cookbook", "stock"])
@pytest.mark.parametrize(
    ("failing", "timeout", "error"),
    [
        (project.Revision("r002", python="raise ValueError('boom in r002')"), "120s", "boom"),
        (project.Revision("r002", sql=["SELECT pg_sleep(5)"]), "300ms", "statement timeout"),
    ],
)
def test_a_failing_revision_is_rolled_back_and_the_service_not_started(
    tmp_path: Path,
    db_url: str,
    env_style: str,
    failing: project.Revision,
    timeout: str,
    error: str,
) -> None:
    project.create(tmp_path, [project.Revision("r001"), failing], env=env_style, url=None)
    env = enabled(db_url, MIGRATION_STATEMENT_TIMEOUT=timeout)
    result = cli(["run", "--", "touch", "started"], env, tmp_path)
    assert result.returncode == 1, result.stderr
    failed = [line for line in result.stderr.splitlines() if "MIGRATION FAILED" in line]
    assert len(failed) == 1 and "revision r002" in failed[0] and error in failed[0]
    # The line of the revision it came from: the raise, or the op.execute of the statement.
    line = next(n for n, text in enumerate(revision_source(tmp_path, "r002"), 1)
                if "raise ValueError" in text or "pg_sleep" in text)  # fmt: skip
    assert failed[0].endswith(f"(at migrations/versions/r002.py:{line})"), failed[0]
    assert "Traceback" not in result.stderr
    assert "✅ Released migration lock" in result.stderr
    assert not (tmp_path / "started").exists()
    assert version(db_url) == [] and applied_revisions(db_url) == []
    assert not query(db_url, "SELECT 1 FROM pg_locks WHERE locktype = 'advisory'")


def test_a_failing_revision_outside_the_script_folder_is_named_by_its_own_line(
    tmp_path: Path, db_url: str
) -> None:
    """version_locations may point anywhere (a shared folder, a package): the failure names the
    revision's own file and line, not the env.py line that ran the upgrade."""
    failing = project.Revision("r002", python="raise ValueError('boom in r002')")
    ini = project.create(tmp_path, [project.Revision("r001"), failing])
    elsewhere = tmp_path / "revisions"
    (tmp_path / "migrations" / "versions").rename(elsewhere)
    text = ini.read_text().replace(
        "[alembic]\n", "[alembic]\nversion_locations = %(here)s/revisions\n", 1
    )
    # Before 1.15 the template put a comment after the value, and Alembic read it as the value.
    text = re.sub(r"(?m)^(version_path_separator = os)\s+#.*$", r"\1", text)
    ini.write_text(text)
    result = cli(["run", "--", "true"], enabled(db_url), tmp_path)
    assert result.returncode == 1, result.stderr
    (failed,) = [line for line in result.stderr.splitlines() if "MIGRATION FAILED" in line]
    source = (elsewhere / "r002.py").read_text().splitlines()
    line = next(n for n, text in enumerate(source, 1) if "raise ValueError" in text)
    assert failed.endswith(f"(at revisions/r002.py:{line})"), failed
    assert version(db_url) == []


def revision_source(root: Path, revision: str) -> list[str]:
    return (root / "migrations" / "versions" / f"{revision}.py").read_text().splitlines()


def test_sigkill_mid_migration_leaves_nothing_half_applied(tmp_path: Path, db_url: str) -> None:
    revisions = [project.Revision("r001"), project.Revision("r002", sql=["SELECT pg_sleep(2)"])]
    project.create(tmp_path, revisions)
    proc = Running(["run"], enabled(db_url), tmp_path)
    proc.wait_for("Applying revision r002")
    proc.proc.kill()
    proc.finish()
    assert version(db_url) == [] and applied_revisions(db_url) == []
    result = cli(["run"], enabled(db_url, MIGRATION_LOCK_WAIT_SECONDS="20"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert version(db_url) == ["r002"] and applied_revisions(db_url) == ["r001", "r002"]


# -- exec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("environ", [{"RUN_MIGRATIONS": "0"}, {"RUN_MIGRATIONS": "1"}])
@pytest.mark.parametrize("status", [0, 3, 42])
def test_the_service_is_this_process_and_its_exit_code_passes_through(
    app: Path, db_url: str, environ: dict[str, str], status: int
) -> None:
    proc = Running(
        ["run", "--", "sh", "-c", f"echo $$; exit {status}"],
        {**environ, "DATABASE_URL": db_url},
        app,
    )
    assert proc.finish() == status, proc.stderr
    assert proc.stdout.strip() == str(proc.pid)


def test_arguments_reach_the_service_untouched(tmp_path: Path) -> None:
    result = cli(["run", "printf", "%s|", "--help", "-x", "a b"], {}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "--help|-x|a b|"


def test_no_command_exits_0_after_migrating(app: Path, db_url: str) -> None:
    result = cli(["run"], enabled(db_url), app)
    assert result.returncode == 0, result.stderr
    assert version(db_url) == ["r003"]


def test_command_not_found_is_127_and_not_executable_is_126(tmp_path: Path) -> None:
    result = cli(["run", "--", "no-such-service-xyz"], {}, tmp_path)
    assert result.returncode == 127
    assert "cannot exec no-such-service-xyz" in result.stderr
    script = tmp_path / "service.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    result = cli(["run", "--", str(script)], {}, tmp_path)
    assert result.returncode == 126
    assert f"cannot exec {script}: Permission denied" in result.stderr


def test_the_service_gets_default_signal_dispositions(tmp_path: Path) -> None:
    # Python ignores SIGPIPE; an ignored signal would stay ignored in the service.
    result = cli(["run", "--", "grep", "SigIgn", "/proc/self/status"], {}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SigIgn:", "0000000000000000"]


# -- signals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_while_waiting_exits_without_exec(
    app: Path,
    db_url: str,
    holder: psycopg.Connection[Any],
    signum: signal.Signals,
    code: int,
) -> None:
    proc = Running(
        ["run", "--", "touch", "started"], enabled(db_url, MIGRATION_LOCK_WAIT_SECONDS="60"), app
    )
    proc.wait_for("Waiting for migration lock")
    sent = time.monotonic()
    proc.proc.send_signal(signum)
    assert proc.finish(timeout=10) == code, proc.stderr
    assert time.monotonic() - sent < 2
    assert f"🛑 Interrupted by {signum.name}" in proc.stderr
    assert not (app / "started").exists()


def test_sigterm_while_migrating_cancels_and_rolls_back(tmp_path: Path, db_url: str) -> None:
    revisions = [project.Revision("r001"), project.Revision("r002", sql=["SELECT pg_sleep(60)"])]
    project.create(tmp_path, revisions)
    proc = Running(["run", "--", "touch", "started"], enabled(db_url), tmp_path)
    proc.wait_for("Applying revision r002")
    time.sleep(0.3)  # let the statement reach the server
    sent = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.finish(timeout=10) == 143, proc.stderr
    assert time.monotonic() - sent < 2
    assert not (tmp_path / "started").exists()
    assert version(db_url) == [] and applied_revisions(db_url) == []
    # The statement was cancelled on the server, not left running with the lock.
    assert not query(db_url, "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%'"
                     " AND pid <> pg_backend_pid()")  # fmt: skip
    assert not query(db_url, "SELECT 1 FROM pg_locks WHERE locktype = 'advisory'")


# -- races -----------------------------------------------------------------------------------


def test_eight_runners_at_once_apply_each_revision_exactly_once(
    tmp_path: Path, db_url: str
) -> None:
    project.create(tmp_path, project.linear(4, slow_seconds=1.5))
    env = enabled(db_url, MIGRATION_LOCK_WAIT_SECONDS="60")
    runners = [Running(["run", "--", *SERVICE], env, tmp_path) for _ in range(8)]
    codes = [r.finish() for r in runners]
    assert codes == [0] * 8, "\n\n".join(r.stderr for r in runners)
    for runner in runners:
        assert runner.stdout == f"service-started pid={runner.pid}\n"
    assert applied_revisions(db_url) == ["r001", "r002", "r003", "r004"]
    migrators = [r for r in runners if any("Migrations complete" in x for x in r.lines)]
    assert len(migrators) == 1
    assert sum("Schema is current" in r.stderr for r in runners) == 7


# -- streams ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding_env", "marker"),
    [
        ({"PYTHONIOENCODING": "ascii"}, "?"),  # cannot encode emoji: '?' instead, as documented
        ({"PYTHONIOENCODING": "latin-1"}, "?"),
        # The C locale makes Python switch to UTF-8 (PEP 538/540): the emoji come out whole.
        ({"LC_ALL": "C", "LANG": "C", "PYTHONIOENCODING": ""}, None),
    ],
)
@pytest.mark.parametrize("run_value", ["0", "1"])
def test_streams_that_cannot_encode_emoji_do_not_crash(
    app: Path, db_url: str, encoding_env: dict[str, str], marker: str | None, run_value: str
) -> None:
    env = {**encoding_env, "RUN_MIGRATIONS": run_value, "DATABASE_URL": db_url}
    result = cli(["run", "--", *SERVICE], env, app)
    assert result.returncode == 0, result.stderr
    assert "service-started" in result.stdout
    assert "Traceback" not in result.stderr
    first = result.stderr.splitlines()[0]
    emoji = "🚫" if run_value == "0" else "🔧"
    assert first.startswith(f"{marker or emoji} MIGRATION"), first


def test_an_emoji_with_a_variation_selector_becomes_two_question_marks(tmp_path: Path) -> None:
    # What the README tells an operator to grep for under PYTHONIOENCODING=ascii.
    env = {"PYTHONIOENCODING": "ascii", "RUN_MIGRATIONS": "0", "MIGRATION_LOCK_WAIT_SECOND": "1"}
    result = cli(["run", "--", "true"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    warning, disabled = result.stderr.splitlines()[:2]
    assert warning.startswith("?? Unknown variable"), warning  # ⚠️ is U+26A0 U+FE0F
    assert disabled.startswith("? MIGRATIONS_DISABLED"), disabled  # 🚫 is one code point


# -- entrypoint.sh ---------------------------------------------------------------------------


def test_entrypoint_execs_through_to_the_service(tmp_path: Path) -> None:
    entrypoint = Path(__file__).resolve().parent.parent / "entrypoint.sh"
    env = clean_env({"PATH": f"{BIN.parent}:{os.environ['PATH']}", "RUN_MIGRATIONS": "0"})
    child = subprocess.Popen(
        [str(entrypoint), "sh", "-c", "echo $$"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert out.strip() == str(child.pid)  # sh -> prosaas-migrate -> sh, one PID throughout
    assert "MIGRATIONS_DISABLED" in err


def test_a_lock_lost_before_release_is_said_loudly_and_nothing_starts(
    tmp_path: Path, db_url: str
) -> None:
    # The revision gives the session's lock away itself, so pg_advisory_unlock returns false.
    thief = project.Revision(
        "r001", sql=[f"SELECT pg_advisory_unlock({config.default_lock_key()})"]
    )
    project.create(tmp_path, [thief])
    result = cli(["run", "--", "touch", "started"], enabled(db_url), tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("❌ MIGRATION LOCK LOST") == 1
    assert "no longer holds" in result.stderr
    assert "Released migration lock" not in result.stderr
    # The commit was vetoed: nothing of a revision that ran without the lock is kept.
    assert version(db_url) == [] and applied_revisions(db_url) == []
    assert not (tmp_path / "started").exists()
