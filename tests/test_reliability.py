"""Fleet-grade behaviour against real servers: wait-for-head, PgBouncer, dead runners, lost locks,
restarts, JSON logs and the typo guard."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg
import pytest

from prosaas_migrate import config
from tests import project
from tests.conftest import Running, Server, applied_revisions, cli, lock_holders, query, version
from tests.pgcluster import Cluster, PgBouncer

SERVICE = ["sh", "-c", "echo service-started"]


def enabled(url: str, **extra: str) -> dict[str, str]:
    return {"RUN_MIGRATIONS": "1", "DATABASE_URL": url, **extra}


# -- 1. wait for head ------------------------------------------------------------------------


def test_a_waiting_container_starts_once_a_concurrent_migrator_reaches_head(
    tmp_path: Path, db_url: str
) -> None:
    revisions = [project.Revision("r001"), project.Revision("r002", sql=["SELECT pg_sleep(3)"])]
    project.create(tmp_path, revisions)
    migrator = Running(["run"], enabled(db_url), tmp_path)
    migrator.wait_for("Applying revision r002")
    waiter = Running(
        ["run", "--", *SERVICE],
        {"RUN_MIGRATIONS": "0", "DATABASE_URL": db_url, "MIGRATION_WAIT_FOR_HEAD_SECONDS": "30"},
        tmp_path,
    )
    waiter.wait_for("Waiting for the schema to reach r002")
    assert version(db_url) == []  # the migrator is still in r002's transaction
    assert waiter.finish() == 0, waiter.stderr
    assert migrator.finish() == 0, migrator.stderr
    assert waiter.stdout == "service-started\n"
    assert "✅ Schema is at r002" in waiter.stderr
    assert "lock" not in waiter.stderr.lower()  # read-only: it never asked for the lock
    assert applied_revisions(db_url) == ["r001", "r002"]


def test_head_not_reached_in_time_exits_4_without_exec(app: Path, db_url: str) -> None:
    env = {"RUN_MIGRATIONS": "0", "DATABASE_URL": db_url, "MIGRATION_WAIT_FOR_HEAD_SECONDS": "2"}
    result = cli(["run", "--", "touch", "started"], env, app)
    assert result.returncode == 4, result.stderr
    assert "❌ The schema did not reach r003 within 2s (still at base (no revisions))" in (
        result.stderr
    )
    assert not (app / "started").exists()


@pytest.fixture
def app(tmp_path: Path) -> Path:
    project.create(tmp_path, project.linear(3))
    return tmp_path


# -- 2. PgBouncer ----------------------------------------------------------------------------


@pytest.mark.parametrize("bouncer", ["transaction"], indirect=True)
def test_transaction_pooling_is_refused_and_nothing_is_stranded(
    app: Path, db_url: str, bouncer: PgBouncer
) -> None:
    url = bouncer.url(db_url.rsplit("/", 1)[1])
    result = cli(["run", "--", "touch", "started"], enabled(url), app)
    assert result.returncode == 2, result.stderr
    assert "❌ Refusing to migrate through this connection pooler" in result.stderr
    assert "MIGRATION_DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (app / "started").exists()
    assert version(db_url) == []
    assert lock_holders(db_url) == []


@pytest.mark.parametrize("bouncer", ["transaction"], indirect=True)
def test_migration_database_url_bypasses_the_pooler(
    app: Path, db_url: str, bouncer: PgBouncer
) -> None:
    env = enabled(bouncer.url(db_url.rsplit("/", 1)[1]), MIGRATION_DATABASE_URL=db_url)
    result = cli(["run", "--", *SERVICE], env, app)
    assert result.returncode == 0, result.stderr
    assert version(db_url) == ["r003"]


@pytest.mark.parametrize("bouncer", ["session"], indirect=True)
def test_session_pooling_works(app: Path, db_url: str, bouncer: PgBouncer) -> None:
    url = bouncer.url(db_url.rsplit("/", 1)[1])
    result = cli(["run", "--", *SERVICE], enabled(url, MIGRATION_STATEMENT_TIMEOUT="90s"), app)
    assert result.returncode == 0, result.stderr
    assert "✅ Set statement_timeout to 90s" in result.stderr
    assert version(db_url) == ["r003"]
    assert lock_holders(db_url) == []


# -- 3. dead-runner abort --------------------------------------------------------------------


def test_a_killed_runner_frees_the_lock_long_before_its_statement_ends(
    tmp_path: Path, db_url: str
) -> None:
    revisions = [project.Revision("r001", sql=["SELECT pg_sleep(60)"])]
    project.create(tmp_path, revisions)
    victim = Running(["run"], enabled(db_url), tmp_path)
    victim.wait_for("Applying revision r001")
    time.sleep(0.5)
    assert lock_holders(db_url)
    victim.proc.kill()
    killed = time.monotonic()
    victim.finish()
    while lock_holders(db_url) and time.monotonic() - killed < 30:
        time.sleep(0.05)
    freed_after = time.monotonic() - killed
    # Without client_connection_check_interval the backend would hold it for the full 60 s.
    assert freed_after < 10, freed_after
    assert version(db_url) == [] and applied_revisions(db_url) == []


# -- 4. lock loss ----------------------------------------------------------------------------


@pytest.mark.parametrize("env_style", ["cookbook", "stock"])
def test_a_terminated_lock_connection_exits_non_zero_without_exec(
    tmp_path: Path, db_url: str, env_style: str
) -> None:
    revisions = [project.Revision("r001", sql=["SELECT pg_sleep(2)"])]
    project.create(tmp_path, revisions, env=env_style)
    runner = Running(["run", "--", "touch", "started"], enabled(db_url), tmp_path)
    runner.wait_for("Applying revision r001")
    holders = lock_holders(db_url)
    assert len(holders) == 1
    query(db_url, "SELECT pg_terminate_backend(%s)", [holders[0]])
    code = runner.finish()
    assert code != 0, runner.stderr
    assert "❌ MIGRATION LOCK LOST" in runner.stderr
    assert "Traceback" not in runner.stderr
    assert not (tmp_path / "started").exists()


# -- 5. database restart while waiting --------------------------------------------------------


def test_a_restart_while_waiting_reconnects_and_migrates(
    app: Path, db_url: str, own_cluster: Cluster
) -> None:
    holder = psycopg.connect(db_url, autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", [config.DEFAULT_LOCK_KEY])
    runner = Running(
        ["run", "--", *SERVICE], enabled(db_url, MIGRATION_LOCK_WAIT_SECONDS="40"), app
    )
    runner.wait_for("Waiting for migration lock")
    own_cluster.stop()  # the outside holder's session dies with the server
    time.sleep(1)
    own_cluster.start()
    holder.close()
    assert runner.finish() == 0, runner.stderr
    assert "⚠️ Lost the database connection" in runner.stderr
    assert runner.stdout == "service-started\n"
    assert version(db_url) == ["r003"]


def test_a_server_down_past_the_budget_fails_cleanly_without_exec(
    app: Path, db_url: str, own_cluster: Cluster
) -> None:
    holder = psycopg.connect(db_url, autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", [config.DEFAULT_LOCK_KEY])
    runner = Running(
        ["run", "--", "touch", "started"], enabled(db_url, MIGRATION_LOCK_WAIT_SECONDS="4"), app
    )
    runner.wait_for("Waiting for migration lock")
    own_cluster.stop()
    try:
        code = runner.finish()
    finally:
        own_cluster.start()
        holder.close()
    assert code == 3, runner.stderr
    assert "database unreachable" in runner.stderr
    assert "Traceback" not in runner.stderr
    assert not (app / "started").exists()


# -- 6. JSON logs ----------------------------------------------------------------------------


def events(stderr: str) -> list[dict[str, object]]:
    records = [json.loads(line) for line in stderr.splitlines()]
    for record in records:
        assert {"ts", "level", "event", "message"} <= set(record), record
    return records


def test_json_logs_are_one_object_a_line_with_the_same_events_as_text(
    tmp_path: Path, server: Server
) -> None:
    runs = {}
    for log_format in ("text", "json"):
        url = server.new_database()
        project.create(tmp_path / log_format, project.linear(2))
        result = cli(
            ["run", "--", *SERVICE],
            enabled(url, MIGRATION_LOG_FORMAT=log_format),
            tmp_path / log_format,
        )
        assert result.returncode == 0, result.stderr
        runs[log_format] = result.stderr
    every = events(runs["json"])
    # The project's own logging (alembic.ini's handlers) arrives as `output` events.
    foreign = [r for r in every if r["event"] == "output"]
    assert any("Running upgrade" in str(r["message"]) for r in foreign)
    assert all(r["source"] == "env.py" for r in foreign)
    records = [r for r in every if r["event"] != "output"]
    names = [str(r["event"]) for r in records]
    assert names == [
        "migration_checkpoint", "statement_timeout_set", "lock_timeout_set", "lock_acquired",
        "revision_applying", "revision_ran", "revision_applying", "revision_ran",
        "migrations_complete", "lock_released", "service_exec",
    ]  # fmt: skip
    # The same events, in the same order, as the text lines that start each event.
    starters = [
        line
        for line in runs["text"].splitlines()
        if not line.startswith(("   ", "INFO ", "WARNI"))  # details, and Alembic's own lines
    ]
    assert len(starters) == len(records)
    for line, record in zip(starters, records, strict=True):
        assert str(record["message"]).startswith(line.strip())
    ran = [r for r in records if r["event"] == "revision_ran"]
    assert [r["revision"] for r in ran] == ["r001", "r002"]
    assert records[-3]["revisions"] == ["r001", "r002"]  # migrations_complete: what committed
    # A 64-bit key is a string in JSON: jq and JavaScript would round it as a number.
    acquired = next(r for r in records if r["event"] == "lock_acquired")
    assert acquired["key"] == str(config.DEFAULT_LOCK_KEY)


def test_json_lock_wait_carries_the_holder(app: Path, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True, application_name="other") as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [config.DEFAULT_LOCK_KEY])
        env = enabled(db_url, MIGRATION_LOG_FORMAT="json", MIGRATION_LOCK_WAIT_SECONDS="1")
        result = cli(["run"], env, app)
        pid = holder.info.backend_pid
    assert result.returncode == 0, result.stderr
    records = events(result.stderr)
    waiting = next(r for r in records if r["event"] == "lock_waiting")
    assert isinstance(waiting["holder"], dict)
    assert waiting["holder"]["pid"] == pid
    assert waiting["holder"]["application_name"] == "other"
    timeout = next(r for r in records if r["event"] == "lock_timeout")
    assert timeout["level"] == "warning" and timeout["waited_seconds"] >= 1  # type: ignore[operator]


def test_json_config_errors_and_invalid_format(tmp_path: Path) -> None:
    result = cli(["run"], {"MIGRATION_LOG_FORMAT": "json", "RUN_MIGRATIONS": "maybe"}, tmp_path)
    assert result.returncode == 2
    (record,) = events(result.stderr)
    assert record["event"] == "error" and "RUN_MIGRATIONS" in str(record["error"])
    result = cli(["run"], {"MIGRATION_LOG_FORMAT": "yaml"}, tmp_path)
    assert result.returncode == 2
    assert "MIGRATION_LOG_FORMAT: 'yaml' is invalid; expected text or json" in result.stderr


def test_json_lines_survive_an_ascii_stream(tmp_path: Path) -> None:
    env = {"MIGRATION_LOG_FORMAT": "json", "PYTHONIOENCODING": "ascii"}
    result = cli(["run", "--", *SERVICE], env, tmp_path)
    assert result.returncode == 0, result.stderr
    message = str(events(result.stderr)[0]["message"])
    assert message.startswith("🚫 MIGRATIONS_DISABLED")  # intact, not replaced by '?'


# -- 7. typo guard ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typo", "known"),
    [
        ("MIGRATION_LOCK_WAIT_SECOND", "MIGRATION_LOCK_WAIT_SECONDS"),
        ("RUN_MIGRATION", "RUN_MIGRATIONS"),
        ("MIGRATION_STATEMENT_TIMEOUTS", "MIGRATION_STATEMENT_TIMEOUT"),
        ("MIGRATION_DB_URL", "MIGRATION_DATABASE_URL"),
    ],
)
def test_a_variable_that_looks_like_ours_gets_a_suggestion(
    tmp_path: Path, typo: str, known: str
) -> None:
    assert config.unknown_variables({typo: "1", "PATH": "/bin"}) == [(typo, known)]
    result = cli(["run", "--", *SERVICE], {typo: "5"}, tmp_path)
    assert result.returncode == 0
    assert f"⚠️ Unknown variable {typo}: did you mean {known}? (it is ignored)" in result.stderr


def test_known_and_unrelated_variables_get_no_warning() -> None:
    environ = {name: "1" for name in config.KNOWN_VARIABLES} | {"MIGRATE": "1", "PATH": "/"}
    assert config.unknown_variables(environ) == []
