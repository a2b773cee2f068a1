"""Concurrent index builds under the runner: the README's own recipe for a busy table, with the
runner's own sessions and others' old snapshots around. Real PostgreSQL, the real command."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

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
    # The monitor names what the build waits for: the old snapshot's session.
    waiting = [line for line in runner.lines if "old snapshot" in line or "nightly-dump" in line]
    assert any(f"pid {old_snapshot.info.backend_pid}" in line for line in waiting), runner.stderr


def idle_in_transaction_sampler(
    url: str, stop: threading.Event, seen: list[tuple[object, ...]], samples: list[int]
) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            rows = conn.execute(
                "SELECT pid, state, backend_xmin IS NOT NULL, left(query, 120)"
                "  FROM pg_stat_activity"
                " WHERE application_name LIKE 'prosaas-migrate:%%'"
                "   AND state = 'idle in transaction'"
            ).fetchall()
            seen.extend(rows)
            samples[0] += 1
            time.sleep(0.02)
