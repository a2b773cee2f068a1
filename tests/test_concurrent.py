"""Concurrent index builds under the runner: the README's own recipe for a busy table, with the
runner's own sessions and others' old snapshots around. Real PostgreSQL, the real command."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from prosaas_migrate.concurrent import concurrent_form
from tests import project
from tests.conftest import Running, cli, query, version

SERVICE = ["sh", "-c", "echo service-started"]
BLOCK = "with op.get_context().autocommit_block():\n"


def enabled(url: str, **extra: str) -> dict[str, str]:
    return {"RUN_MIGRATIONS": "1", "DATABASE_URL": url, **extra}


@pytest.fixture
def leads(db_url: str) -> str:
    query(db_url, "CREATE TABLE leads (id int, email text)")
    query(db_url, "INSERT INTO leads SELECT n, 'x' || n FROM generate_series(1, 1000) AS n")
    return db_url


def recipe(*, if_not_exists: bool = False) -> list[project.Revision]:
    """The README's recipe: CREATE INDEX CONCURRENTLY in an autocommit_block, then more work."""
    create = (
        f"op.create_index('ix_leads_email', 'leads', ['email'], postgresql_concurrently=True"
        f"{', if_not_exists=True' if if_not_exists else ''})"
    )
    return [
        project.Revision("r001", sql=["CREATE TABLE t001 (id int)"]),
        project.Revision("r002", python=f"{BLOCK}    {create}\n"),
        project.Revision("r003", sql=["CREATE TABLE t003 (id int)"]),
    ]


def index_state(url: str, name: str) -> list[tuple[object, ...]]:
    """[(indisvalid,)] for the index, [] when there is none."""
    return query(
        url,
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relname = %s",
        [name],
    )


@pytest.fixture
def old_snapshot(leads: str) -> Iterator[psycopg.Connection[object]]:
    """A pg_dump-like session: a repeatable-read transaction with a snapshot, on no table of
    the migration's."""
    conn = psycopg.connect(leads, application_name="nightly-dump")
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    conn.execute("SELECT 1")
    yield conn
    conn.close()


@pytest.mark.parametrize("env_style", ["cookbook", "stock"])
def test_the_readme_recipe_builds_the_index(tmp_path: Path, leads: str, env_style: str) -> None:
    project.create(tmp_path, recipe(), env=env_style)
    result = cli(["run", "--", *SERVICE], enabled(leads), tmp_path, timeout=90)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "service-started\n"
    assert index_state(leads, "ix_leads_email") == [(True,)]
    assert version(leads) == ["r003"]


@pytest.mark.parametrize("env_style", ["cookbook", "stock"])
def test_a_concurrent_build_waits_out_an_old_snapshot(
    tmp_path: Path, leads: str, old_snapshot: psycopg.Connection[object], env_style: str
) -> None:
    project.create(tmp_path, recipe(), env=env_style)
    runner = Running(["run", "--", *SERVICE], enabled(leads), tmp_path)
    # Older than the 2 s DDL lock timeout: a lock_timeout on the build would cancel it.
    runner.wait_for("Applying revision r002")
    time.sleep(6)
    old_snapshot.rollback()
    assert runner.finish(timeout=90) == 0, runner.stderr
    assert index_state(leads, "ix_leads_email") == [(True,)]
    assert version(leads) == ["r003"]
    # Every 5 s the monitor names what the build waits for: the old snapshot's session.
    assert any(
        "CREATE INDEX CONCURRENTLY ix_leads_email ON leads (email) (waiting for old snapshots"
        in line
        for line in runner.lines
    ), runner.stderr
    waiting = [line for line in runner.lines if "Waiting for older transactions to end" in line]
    assert waiting, runner.stderr
    assert f"pid {old_snapshot.info.backend_pid} (nightly-dump, " in waiting[0]
    assert "prosaas-migrate" not in waiting[0]  # none of our own sessions holds it up


@pytest.mark.parametrize("env_style", ["cookbook", "stock"])
def test_a_cancelled_build_drops_its_invalid_index_and_the_next_start_builds_it(
    tmp_path: Path, leads: str, old_snapshot: psycopg.Connection[object], env_style: str
) -> None:
    project.create(tmp_path, recipe(), env=env_style)
    env = enabled(leads, MIGRATION_CONCURRENT_STATEMENT_TIMEOUT="1s")
    first = cli(["run", "--", *SERVICE], env, tmp_path, timeout=90)
    assert first.returncode == 1, first.stderr
    assert "❌ MIGRATION FAILED in revision r002: QueryCanceled" in first.stderr
    assert (
        "dropped the invalid index ix_leads_email the failed build left (DROP INDEX "
        "CONCURRENTLY), so the next start builds it again" in first.stderr
    )
    assert index_state(leads, "ix_leads_email") == []
    old_snapshot.rollback()
    # Before, this start failed with DuplicateTable: relation "ix_leads_email" already exists.
    second = cli(["run", "--", *SERVICE], env, tmp_path, timeout=90)
    assert second.returncode == 0, second.stderr
    assert index_state(leads, "ix_leads_email") == [(True,)]
    assert version(leads) == ["r003"]


def leave_an_invalid_index(url: str) -> None:
    """What a build killed with its container leaves: an INVALID ix_leads_email."""
    query(url, "UPDATE leads SET email = 'same' WHERE id <= 2")
    with pytest.raises(psycopg.errors.UniqueViolation):
        query(url, "CREATE UNIQUE INDEX CONCURRENTLY ix_leads_email ON leads (email)")
    query(url, "UPDATE leads SET email = 'x' || id WHERE id <= 2")
    assert index_state(url, "ix_leads_email") == [(False,)]


@pytest.mark.parametrize("env_style", ["cookbook", "stock"])
@pytest.mark.parametrize("if_not_exists", [False, True])
def test_an_invalid_index_from_an_earlier_start_is_built_again_not_kept(
    tmp_path: Path, leads: str, env_style: str, if_not_exists: bool
) -> None:
    leave_an_invalid_index(leads)
    project.create(tmp_path, recipe(if_not_exists=if_not_exists), env=env_style)
    # Before: DuplicateTable at every start (a crash loop), or with IF NOT EXISTS "Migrations
    # complete" with the index still invalid.
    result = cli(["run", "--", *SERVICE], enabled(leads), tmp_path, timeout=90)
    assert result.returncode == 0, result.stderr
    assert (
        "🧹 Dropped the invalid index ix_leads_email an earlier failed build left, before "
        "building it again (revision r002) (DROP INDEX CONCURRENTLY)" in result.stderr
    )
    assert index_state(leads, "ix_leads_email") == [(True,)]


@pytest.mark.parametrize("env_style", ["cookbook", "stock"])
def test_the_ddl_lock_timeout_is_back_after_a_concurrent_statement(
    tmp_path: Path, leads: str, env_style: str
) -> None:
    python = (
        f"{BLOCK}"
        "    op.execute('CREATE INDEX CONCURRENTLY ix_leads_id ON leads (id)')\n"
        "    op.execute(\"CREATE TABLE seen AS SELECT current_setting('lock_timeout') AS lt,"
        " current_setting('statement_timeout') AS st\")\n"
    )
    project.create(tmp_path, [project.Revision("r001", python=python)], env=env_style)
    env = enabled(leads, MIGRATION_DDL_LOCK_TIMEOUT="750ms", MIGRATION_STATEMENT_TIMEOUT="90s")
    result = cli(["run"], env, tmp_path, timeout=90)
    assert result.returncode == 0, result.stderr
    assert query(leads, "SELECT lt, st FROM seen") == [("750ms", "90s")]


@pytest.mark.parametrize("env_style", ["cookbook", "stock"])
def test_no_session_of_ours_sits_idle_in_a_transaction(
    tmp_path: Path, leads: str, old_snapshot: psycopg.Connection[object], env_style: str
) -> None:
    revisions = recipe()
    revisions[1].python += f"{BLOCK}    op.execute('SELECT pg_sleep(1)')\n"
    project.create(tmp_path, revisions, env=env_style)
    stop = threading.Event()
    seen: list[tuple[object, ...]] = []
    samples = [0, 0]  # all samples, samples while a concurrent build ran
    sampler = threading.Thread(target=sample_ours, args=(leads, stop, seen, samples))
    sampler.start()
    # The build waits for this snapshot for a while: a session of ours with one would be
    # waited for as well, until the end.
    release = threading.Timer(3.0, old_snapshot.rollback)
    release.start()
    try:
        result = cli(["run", "--", *SERVICE], enabled(leads), tmp_path, timeout=90)
    finally:
        release.join()
        stop.set()
        sampler.join()
    assert result.returncode == 0, result.stderr
    assert samples[0] > 50 and samples[1] > 0, samples
    # A transaction of the upgrade's own is idle in transaction for the instant between two of
    # its statements; never longer, and no session of ours is while a concurrent build runs.
    assert [row for row in seen if row[3] or float(str(row[2])) > 0.2] == []


def sample_ours(
    url: str, stop: threading.Event, seen: list[tuple[object, ...]], samples: list[int]
) -> None:
    """Every 20 ms: our sessions idle in a transaction, and whether a build was running."""
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            rows = conn.execute(
                "SELECT pid, left(query, 80), extract(epoch FROM now() - state_change)::float8,"
                "       EXISTS (SELECT 1 FROM pg_stat_activity b"
                "                WHERE b.application_name LIKE 'prosaas-migrate:%%'"
                "                  AND b.state = 'active' AND b.query ILIKE '%%concurrently%%')"
                "  FROM pg_stat_activity a"
                " WHERE a.application_name LIKE 'prosaas-migrate:%%'"
                "   AND a.state = 'idle in transaction'"
            ).fetchall()
            building = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name LIKE 'prosaas-migrate:%%' AND state = 'active'"
                "   AND query ILIKE '%%concurrently%%'"
            ).fetchone()
            seen.extend(rows)
            samples[0] += 1
            samples[1] += bool(building and building[0])
            time.sleep(0.02)


# -- which statements are concurrent forms (the parse tree, via locks.statement_locks) ---------


@pytest.mark.parametrize(
    ("statement", "kind", "build"),
    [
        ("CREATE INDEX CONCURRENTLY ix_a ON t (a)", "CREATE INDEX CONCURRENTLY", ('"t"', "ix_a")),
        (
            'create unique index concurrently if not exists "Ix" on s."T" (a)',
            "CREATE INDEX CONCURRENTLY",
            ('"s"."T"', "Ix"),
        ),
        ("CREATE INDEX CONCURRENTLY ON t (a)", "CREATE INDEX CONCURRENTLY", None),
        ("DROP INDEX CONCURRENTLY IF EXISTS ix_a", "DROP INDEX CONCURRENTLY", None),
        ("REINDEX INDEX CONCURRENTLY ix_a", "REINDEX INDEX CONCURRENTLY", None),
        ("REINDEX (CONCURRENTLY) TABLE t", "REINDEX TABLE CONCURRENTLY", None),
        (
            "ALTER TABLE p DETACH PARTITION p1 CONCURRENTLY",
            "ALTER TABLE DETACH PARTITION CONCURRENTLY",
            None,
        ),
    ],
)
def test_the_concurrent_forms_are_known_by_their_parse_tree(
    statement: str, kind: str, build: tuple[str, str] | None
) -> None:
    found = concurrent_form(statement)
    assert found is not None and found.kind == kind
    assert (found.build and (found.build.table, found.build.name)) == build


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE INDEX ix_a ON t (a)",
        "REINDEX (CONCURRENTLY false) INDEX ix_a",
        "ALTER TABLE p DETACH PARTITION p1",
        "INSERT INTO notes VALUES ('build it concurrently')",  # the word, in a literal
        'CREATE TABLE "concurrently" (id int)',
        "SELECT * FROM t WHERE a = %(a)s AND b = 'concurrently'",  # not SQL pglast reads
        "SELECT 1",
    ],
)
def test_other_statements_are_not(statement: str) -> None:
    assert concurrent_form(statement) is None


@pytest.mark.parametrize("env_style", ["cookbook", "stock"])
def test_an_interrupted_build_leaves_no_invalid_index(
    tmp_path: Path, leads: str, old_snapshot: psycopg.Connection[object], env_style: str
) -> None:
    project.create(tmp_path, recipe(), env=env_style)
    runner = Running(["run", "--", *SERVICE], enabled(leads), tmp_path)
    runner.wait_for("Applying revision r002")
    deadline = time.monotonic() + 10
    while not query(leads, "SELECT 1 FROM pg_stat_progress_create_index"):
        assert time.monotonic() < deadline, runner.stderr
        time.sleep(0.05)
    runner.proc.send_signal(signal.SIGTERM)
    # Issue 16 point 4: 143 with the interruption line in both styles. Alembic's commit in a
    # `finally:` after the block (a PendingRollbackError with the stock env.py, the lock-held
    # veto on a closed lock session with the cookbook one) must not replace the interruption.
    assert runner.finish(timeout=30) == 143, runner.stderr
    assert "service-started" not in runner.stdout
    assert index_state(leads, "ix_leads_email") == [], runner.stderr
    assert "🧹 After the interruption: dropped the invalid index ix_leads_email" in runner.stderr
    assert "🛑 Interrupted by SIGTERM before the service started: rolled back, exiting" in (
        runner.lines
    )
    for false_verdict in ("MIGRATION LOCK LOST", "MIGRATION FAILED", "PendingRollbackError"):
        assert false_verdict not in runner.stderr
