"""Migrating a busy database: DDL lock timeouts with retries, progress and blockers, rollback
deploys, and no commit once the lock is lost. Real PostgreSQL, real processes."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from prosaas_migrate import config
from prosaas_migrate.monitor import _progress
from tests import project
from tests.conftest import Running, cli, lock_holders, query, version

pytestmark = pytest.mark.majors  # its database tests run on each --pg-majors major

SERVICE = ["sh", "-c", "echo service-started"]


def enabled(url: str, **extra: str) -> dict[str, str]:
    return {"RUN_MIGRATIONS": "1", "DATABASE_URL": url, **extra}


def counted(revision: str) -> str:
    """SQL for a data-only revision that counts its runs: the sequence (made beforehand) is not
    transactional, so a rolled-back run still counts; the row is, so only a committed run
    leaves one."""
    return f"INSERT INTO revision_runs SELECT '{revision}', nextval('runs_{revision}')"


@pytest.fixture
def leads(db_url: str) -> str:
    query(db_url, "CREATE TABLE leads (id int)")
    query(db_url, "INSERT INTO leads SELECT generate_series(1, 100)")
    query(db_url, "CREATE TABLE revision_runs (revision text, run bigint)")
    query(db_url, "CREATE SEQUENCE IF NOT EXISTS runs_r001")
    return db_url


@pytest.fixture
def report(leads: str) -> Iterator[psycopg.Connection[object]]:
    """A long report: ACCESS SHARE on leads, held in an open transaction."""
    conn = psycopg.connect(leads, application_name="long-report")
    conn.execute("SELECT count(*) FROM leads")
    yield conn
    conn.close()


def alter_project(root: Path, env_style: str, *, per_migration: bool = False) -> None:
    revisions = [
        project.Revision("r001", sql=[counted("r001")]),
        project.Revision("r002", sql=["ALTER TABLE leads ADD COLUMN source text"]),
    ]
    project.create(root, revisions, env=env_style)
    if per_migration:
        env_py = root / "migrations" / "env.py"
        text = env_py.read_text()
        text = re.sub(
            r"connection=(connection|connectable), target_metadata=(None|target_metadata)",
            r"connection=\1, target_metadata=\2, transaction_per_migration=True",
            text,
        )
        env_py.write_text(text)
        assert text.count("transaction_per_migration=True") == 2 - (env_style == "stock")


@pytest.mark.parametrize("env_style", ["cookbook", "stock"])
@pytest.mark.parametrize("per_migration", [False, True])
def test_a_queued_alter_gives_way_to_the_app_then_completes(
    tmp_path: Path,
    leads: str,
    report: psycopg.Connection[object],
    env_style: str,
    per_migration: bool,
) -> None:
    alter_project(tmp_path, env_style, per_migration=per_migration)
    env = enabled(leads, MIGRATION_DDL_LOCK_TIMEOUT="500ms")
    runner = Running(["run", "--", *SERVICE], env, tmp_path)
    runner.wait_for("Applying revision r002")
    # While the migrator waits for its lock, the app's queries on leads do not queue behind it.
    slowest = 0.0
    for _ in range(6):
        started = time.monotonic()
        with psycopg.connect(leads) as app:
            app.execute("SELECT count(*) FROM leads").fetchone()
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.15)
    assert slowest < 0.6, slowest
    runner.wait_for("⏳ Lock timeout in revision r002")
    report.commit()  # the report ends; the next attempt gets the lock
    assert runner.finish(timeout=60) == 0, runner.stderr
    assert runner.stdout == "service-started\n"
    retry = next(line for line in runner.lines if "⏳ Lock timeout in revision r002" in line)
    assert f"blocked by pid {report.info.backend_pid} (long-report" in retry, retry
    assert "idle in transaction" in retry
    assert query(leads, "SELECT count(*) FROM information_schema.columns "
                 "WHERE table_name = 'leads' AND column_name = 'source'") == [(1,)]  # fmt: skip
    # r001 is in the database exactly once, whatever the transaction layout.
    assert query(leads, "SELECT revision FROM revision_runs") == [("r001",)]
    runs = int(str(query(leads, "SELECT last_value FROM runs_r001")[0][0]))
    applying_r001 = sum("Applying revision r001" in line for line in runner.lines)
    assert runs == applying_r001  # every run is one attempt: counted by the sequence
    if per_migration:
        assert runs == 1  # committed on its own: retries start after it
    else:
        assert runs >= 2  # one transaction: rolled back with r002, run again


def test_the_last_retry_fails_naming_the_blocker(
    tmp_path: Path, leads: str, report: psycopg.Connection[object]
) -> None:
    alter_project(tmp_path, "cookbook")
    env = enabled(leads, MIGRATION_DDL_LOCK_TIMEOUT="200ms", MIGRATION_DDL_LOCK_RETRIES="1")
    result = cli(["run", "--", "touch", "started"], env, tmp_path, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("⏳ Lock timeout in revision r002 (attempt 1 of 2)") == 1
    failed = next(line for line in result.stderr.splitlines() if "MIGRATION FAILED" in line)
    assert "LockNotAvailable" in failed
    assert f"blocked by pid {report.info.backend_pid} (long-report" in failed
    assert not (tmp_path / "started").exists()
    assert version(leads) == [] and lock_holders(leads) == []


def test_other_errors_are_not_retried(tmp_path: Path, db_url: str) -> None:
    project.create(tmp_path, [project.Revision("r001", sql=["SELECT 1/0"])])
    result = cli(["run"], enabled(db_url), tmp_path)
    assert result.returncode == 1
    assert "Lock timeout" not in result.stderr
    assert result.stderr.count("Applying revision r001") == 1


@pytest.mark.parametrize("env_style", ["cookbook", "stock"])
def test_lock_timeout_reaches_every_connection_of_the_upgrade(
    tmp_path: Path, db_url: str, env_style: str, pg_major: int
) -> None:
    seen = project.Revision(
        "r001", sql=["CREATE TABLE seen AS SELECT current_setting('lock_timeout') AS lt,"
                     " current_setting('idle_session_timeout', true) AS ist"]
    )  # fmt: skip
    project.create(tmp_path, [seen], env=env_style)
    result = cli(["run"], enabled(db_url, MIGRATION_DDL_LOCK_TIMEOUT="750ms"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "✅ Set lock_timeout to 750ms for migration connections" in result.stderr
    idle_session_timeout = "0" if pg_major >= 14 else None  # PostgreSQL 13 has none
    assert query(db_url, "SELECT lt, ist FROM seen") == [("750ms", idle_session_timeout)]


def test_a_lock_timeout_of_0_is_off(tmp_path: Path, db_url: str) -> None:
    project.create(tmp_path, project.linear(1))
    result = cli(["run"], enabled(db_url, MIGRATION_DDL_LOCK_TIMEOUT="0"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lock_timeout is off" in result.stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MIGRATION_DDL_LOCK_TIMEOUT", "2 seconds"),
        ("MIGRATION_DDL_LOCK_TIMEOUT", "-1s"),
        ("MIGRATION_DDL_LOCK_RETRIES", "-1"),
        ("MIGRATION_DDL_LOCK_RETRIES", "ten"),
        ("MIGRATION_UNKNOWN_REVISION", "ignore"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(tmp_path: Path, variable: str, value: str) -> None:
    result = cli(["run", "--", "true"], {"RUN_MIGRATIONS": "1", variable: value}, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # checked before anything else
    assert f"{variable}: {value!r} is invalid" in result.stderr


# -- progress and blockers ----------------------------------------------------------------------


@pytest.mark.parametrize("env_style", ["cookbook", "stock"])
def test_a_long_revision_reports_what_it_does_and_who_blocks_it(
    tmp_path: Path, leads: str, report: psycopg.Connection[object], env_style: str
) -> None:
    revisions = [project.Revision("r001", sql=["ALTER TABLE leads ADD COLUMN source text"])]
    project.create(tmp_path, revisions, env=env_style)
    env = enabled(leads, MIGRATION_DDL_LOCK_TIMEOUT="0", MIGRATION_LOG_FORMAT="json")
    runner = Running(["run", "--", *SERVICE], env, tmp_path)
    runner.wait_for('"revision_progress"', timeout=20)
    report.commit()
    assert runner.finish() == 0, runner.stderr
    records = [json.loads(line) for line in runner.lines]
    progress = [r for r in records if r["event"] == "revision_progress"]
    first = progress[0]
    assert first["revision"] == "r001" and 5 <= first["elapsed_seconds"] < 8
    assert first["statement"].startswith("ALTER TABLE leads ADD COLUMN source text")
    assert first["waiting_for"] == "Lock:relation"
    assert [b["pid"] for b in first["blockers"]] == [report.info.backend_pid]
    assert first["blockers"][0]["application_name"] == "long-report"
    assert first["blockers"][0]["state"] == "idle in transaction"
    assert "blocked by pid" in first["message"]


def test_progress_is_quiet_for_short_revisions(tmp_path: Path, db_url: str) -> None:
    project.create(tmp_path, project.linear(3))
    result = cli(["run"], enabled(db_url), tmp_path)
    assert result.returncode == 0
    assert "running for" not in result.stderr and "Stopped watching" not in result.stderr


def test_a_text_progress_line_for_a_long_statement(tmp_path: Path, db_url: str) -> None:
    project.create(tmp_path, [project.Revision("r001", sql=["SELECT pg_sleep(6)"])])
    result = cli(["run"], enabled(db_url), tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.search(r"⏳ Revision r001 running for [56]s: SELECT pg_sleep\(6\)", result.stderr)


def test_progress_phases_read_as_postgresql_reports_them() -> None:
    # (create_index phase, blocks done/total, tuples done/total, cluster phase, heap done/total)
    index = ("building index: scanning table", 250, 1000, 0, 0, None, None, None)
    assert _progress(index) == "building index: scanning table, 25% done"
    loading = ("building index: loading tuples in tree", 0, 0, 30, 40, None, None, None)
    assert _progress(loading) == "building index: loading tuples in tree, 75% done"
    cluster = (None, None, None, None, None, "seq scanning heap", 5, 10)
    assert _progress(cluster) == "seq scanning heap, 50% done"
    assert _progress(("waiting for writers before build", 0, 0, 0, 0, None, None, None)) == (
        "waiting for writers before build"
    )
    assert _progress((None,) * 8) is None


def test_a_broken_monitor_never_fails_the_migration(tmp_path: Path, db_url: str) -> None:
    project.create(tmp_path, [project.Revision("r001", sql=["SELECT pg_sleep(3)"])], env="stock")
    runner = Running(["run", "--", *SERVICE], enabled(db_url), tmp_path)
    runner.wait_for("Applying revision r001")
    time.sleep(0.5)
    # The monitor is the one session of ours that neither holds the lock nor runs the revision.
    rows = query(
        db_url,
        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'prosaas-migrate:%%'"
        " AND pid NOT IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory')"
        " AND query NOT LIKE '%%pg_sleep%%'",
    )
    assert len(rows) == 1, rows
    query(db_url, "SELECT pg_terminate_backend(%s)", [rows[0][0]])
    assert runner.finish() == 0, runner.stderr
    assert runner.stderr.count("⚠️ Stopped watching the migration's progress") == 1
    assert version(db_url) == ["r001"]


# -- rollback deploys ---------------------------------------------------------------------------


@pytest.fixture
def ahead(tmp_path: Path, db_url: str) -> Path:
    """The database was migrated by a newer image: it is at r004, which these scripts lack."""
    project.create(tmp_path, project.linear(4))
    assert cli(["run"], enabled(db_url), tmp_path).returncode == 0
    (tmp_path / "migrations" / "versions" / "r004.py").unlink()
    return tmp_path


def test_a_rollback_deploy_starts_without_the_lock(ahead: Path, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [config.DEFAULT_LOCK_KEY])
        started = time.monotonic()
        result = cli(["run", "--", *SERVICE], enabled(db_url), ahead)
        assert time.monotonic() - started < 10  # never waited for the busy lock
    assert result.returncode == 0, result.stderr
    assert result.stdout == "service-started\n"
    assert (
        "⚠️ The database is ahead of this image: it is at r004, which these scripts do not "
        "know (their head: r003). A rollback deploy?"
    ) in result.stderr
    assert "Waiting for migration lock" not in result.stderr
    assert version(db_url) == ["r004"]  # nothing downgraded, nothing stamped


def test_a_rollback_deploy_can_be_told_to_fail(ahead: Path, db_url: str) -> None:
    env = enabled(db_url, MIGRATION_UNKNOWN_REVISION="fail", MIGRATION_LOG_FORMAT="json")
    result = cli(["run", "--", "touch", "started"], env, ahead)
    assert result.returncode == 1, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert [r["event"] for r in records] == ["migration_checkpoint", "database_ahead"]
    assert records[1]["unknown"] == ["r004"] and records[1]["level"] == "error"
    assert not (ahead / "started").exists()


def test_a_worker_of_the_old_image_waiting_for_head_starts(ahead: Path, db_url: str) -> None:
    env = {"DATABASE_URL": db_url, "MIGRATION_WAIT_FOR_HEAD_SECONDS": "10"}
    result = cli(["run", "--", *SERVICE], env, ahead)
    assert result.returncode == 0, result.stderr
    assert "The database is ahead of this image" in result.stderr


def test_status_names_the_rollback_case(ahead: Path, db_url: str) -> None:
    result = cli(["status", "--json", "--check"], {"DATABASE_URL": db_url}, ahead)
    assert result.returncode == 5
    assert json.loads(result.stdout)["revisions"]["unknown"] == ["r004"]


# -- the lock lost mid-revision ---------------------------------------------------------------


@pytest.mark.parametrize("env_style", ["cookbook", "stock"])
def test_a_lost_lock_cancels_the_revision_and_nothing_commits(
    tmp_path: Path, db_url: str, env_style: str
) -> None:
    revisions = [
        project.Revision("r001", sql=["CREATE TABLE made (id int)", "SELECT pg_sleep(20)"])
    ]
    project.create(tmp_path, revisions, env=env_style)
    runner = Running(["run", "--", "touch", "started"], enabled(db_url), tmp_path)
    runner.wait_for("Applying revision r001")
    time.sleep(0.5)
    holders = lock_holders(db_url)
    assert len(holders) == 1
    query(db_url, "SELECT pg_terminate_backend(%s)", [holders[0]])
    terminated = time.monotonic()
    code = runner.finish(timeout=30)
    assert time.monotonic() - terminated < 5  # cancelled within about a second, not after 20 s
    assert code == 1, runner.stderr
    assert runner.stderr.count("❌ MIGRATION LOCK LOST") == 1
    assert "database unreachable" not in runner.stderr
    assert "Traceback" not in runner.stderr
    assert version(db_url) == []
    assert query(db_url, "SELECT to_regclass('made')") == [(None,)]  # nothing of r001 is left
    assert not (tmp_path / "started").exists()


def test_a_server_idle_session_timeout_does_not_end_the_lock_session(
    tmp_path: Path, db_url: str, pg_major: int
) -> None:
    if pg_major < 14:
        pytest.skip("idle_session_timeout came in PostgreSQL 14")
    name = db_url.rsplit("/", 1)[1]
    query(db_url, f"ALTER DATABASE \"{name}\" SET idle_session_timeout = '1s'")
    revisions = [project.Revision("r001", sql=["SELECT pg_sleep(3)"]), *project.linear(3)[1:]]
    project.create(tmp_path, revisions, env="stock")  # the lock session idles meanwhile
    first = Running(["run", "--", *SERVICE], enabled(db_url), tmp_path)
    first.wait_for("Applying revision r001")
    second = Running(
        ["run", "--", *SERVICE], enabled(db_url, MIGRATION_LOCK_WAIT_SECONDS="20"), tmp_path
    )
    assert first.finish() == 0, first.stderr
    assert second.finish() == 0, second.stderr
    assert "LOCK LOST" not in first.stderr + second.stderr
    assert "Migrations complete" not in second.stderr  # it never got to run r001 again
    assert [r[0] for r in query(db_url, "SELECT revision FROM revision_log")] == [
        "r001",
        "r002",
        "r003",
    ]


def test_the_retry_delay_grows_and_is_capped() -> None:
    from prosaas_migrate.runner import _retry_delay

    delays = [[_retry_delay(attempt) for attempt in range(1, 9)] for _ in range(50)]
    for series in delays:
        assert 0.75 <= series[0] <= 1.25
        assert all(d <= 30 for d in series)
        assert series[5] >= 22.5  # 32 s capped at 30, jittered down by at most a quarter
    assert len({round(series[0], 3) for series in delays}) > 10  # jittered, not in step


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "prosaas-app"


def test_a_rollback_of_the_example_app_starts_every_replica(db_url: str) -> None:
    env = {"DATABASE_URL": db_url, "PYTHONPATH": str(EXAMPLE)}
    assert cli(["run"], {**env, "RUN_MIGRATIONS": "1"}, EXAMPLE).returncode == 0
    query(db_url, "UPDATE alembic_version SET version_num = '0004'")  # a newer image's revision
    replicas = [
        Running(["run", "--", *SERVICE], {**env, "RUN_MIGRATIONS": "1"}, EXAMPLE) for _ in range(3)
    ]
    others = [
        Running(
            ["run", "--", *SERVICE],
            {**env, "RUN_MIGRATIONS": "0", "MIGRATION_WAIT_FOR_HEAD_SECONDS": "10"},
            EXAMPLE,
        )
        for _ in range(2)
    ]
    for runner in replicas + others:
        assert runner.finish() == 0, runner.stderr
        assert runner.stdout == "service-started\n"
        assert "The database is ahead of this image: it is at 0004" in runner.stderr
    assert version(db_url) == ["0004"] and lock_holders(db_url) == []


# -- found by a hostile review ----------------------------------------------------------------


def test_a_revision_with_autocommit_work_is_not_retried_as_a_whole(
    tmp_path: Path, leads: str, report: psycopg.Connection[object]
) -> None:
    python = (
        "with op.get_context().autocommit_block():\n"
        "    op.execute(\"INSERT INTO revision_runs VALUES ('backfill', 1)\")\n"
        "op.execute('ALTER TABLE leads ADD COLUMN source text')\n"
    )
    project.create(tmp_path, [project.Revision("r001", python=python)])
    env = enabled(leads, MIGRATION_DDL_LOCK_TIMEOUT="300ms")
    result = cli(["run", "--", "touch", "started"], env, tmp_path, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Lock timeout in revision r001 (attempt" not in result.stderr  # never retried
    assert "not retried: r001 committed work outside a transaction" in result.stderr
    assert "Except what r001 ran outside a transaction (autocommit_block)" in result.stderr
    # Once, not twice: a retry would have run the backfill again.
    assert query(leads, "SELECT count(*) FROM revision_runs WHERE revision = 'backfill'") == [(1,)]
    assert not (tmp_path / "started").exists()


def test_a_role_with_few_connections_still_migrates(tmp_path: Path, db_url: str) -> None:
    # The monitor's session must never take the one env.py's own engine needs.
    query(db_url, "DROP ROLE IF EXISTS few")
    query(db_url, "CREATE ROLE few LOGIN CONNECTION LIMIT 2")
    query(db_url, "GRANT ALL ON SCHEMA public TO few")
    url = db_url.replace("postgresql://postgres@", "postgresql://few@")
    revisions = [project.Revision("r001", sql=["SELECT pg_sleep(1.5)"])]
    project.create(tmp_path, revisions, env="stock")
    result = cli(["run", "--", *SERVICE], enabled(url), tmp_path)
    assert result.returncode == 0, result.stderr
    assert version(db_url) == ["r001"]
    assert result.stderr.count("Stopped watching") <= 1
    assert "Database not reachable yet" not in result.stderr


def test_the_holder_of_another_role_is_named_without_a_traceback(
    tmp_path: Path, db_url: str
) -> None:
    query(db_url, "DROP ROLE IF EXISTS weak")
    query(db_url, "CREATE ROLE weak LOGIN")
    query(db_url, "GRANT ALL ON SCHEMA public TO weak")
    project.create(tmp_path, project.linear(1))
    url = db_url.replace("postgresql://postgres@", "postgresql://weak@")
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute("SELECT pg_advisory_lock(%s)", [config.DEFAULT_LOCK_KEY])
        result = cli(["run"], enabled(url, MIGRATION_LOCK_WAIT_SECONDS="1"), tmp_path)
        status = cli(["status", "--json"], {"DATABASE_URL": url}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "another role's session" in result.stderr
    assert status.returncode == 0 and "Traceback" not in status.stderr
    assert json.loads(status.stdout)["lock"]["holder"]["connected_since"] is None


@pytest.mark.parametrize(
    ("app_name", "said"),
    [
        ("prosaas-migrate:api-2", "This is SAFE - migrations will run in another container"),
        ("psql", "which is not a prosaas-migrate runner"),
    ],
)
def test_another_roles_holder_is_judged_by_the_application_name_it_still_shows(
    tmp_path: Path, db_url: str, app_name: str, said: str
) -> None:
    """PostgreSQL hides another role's address and times, never its application_name: a runner
    of another role is a runner (the seed's skip), a psql session is not."""
    role = f"weak_{db_url.rsplit('/', 1)[1]}"  # roles are the cluster's: one per database
    query(db_url, f'CREATE ROLE "{role}" LOGIN')
    query(db_url, f'GRANT ALL ON SCHEMA public TO "{role}"')
    project.create(tmp_path, project.linear(1))
    url = db_url.replace("postgresql://postgres@", f"postgresql://{role}@")
    with psycopg.connect(db_url, autocommit=True, application_name=app_name) as admin:
        admin.execute("SELECT pg_advisory_lock(%s)", [config.DEFAULT_LOCK_KEY])
        env = enabled(url, MIGRATION_LOCK_WAIT_SECONDS="1", MIGRATION_LOG_FORMAT="json")
        result = cli(["run"], env, tmp_path)
        text = cli(["run"], enabled(url, MIGRATION_LOCK_WAIT_SECONDS="1"), tmp_path)
    assert result.returncode == 0 and text.returncode == 0, result.stderr + text.stderr
    assert said in text.stderr and f"({app_name}, another role's session" in text.stderr
    assert "may not be a runner" not in text.stderr
    (event,) = [
        e for e in map(json.loads, result.stderr.splitlines()) if e["event"] == "lock_timeout"
    ]
    assert event["holder_is_runner"] is app_name.startswith("prosaas-migrate:")
    assert event["holder"]["application_name"] == app_name


def test_a_revision_secret_never_reaches_a_progress_line() -> None:
    from prosaas_migrate.monitor import without_literals

    shown = without_literals("ALTER ROLE reporting PASSWORD 'Hunter2-Secret!'")
    assert shown == "ALTER ROLE reporting PASSWORD …"
    assert without_literals("SELECT $$x$$") == "SELECT …"
    assert without_literals("ALTER TABLE leads ADD COLUMN source text") == (
        "ALTER TABLE leads ADD COLUMN source text"
    )
