"""Messages that say what is true (issue 16, point 11)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests import project
from tests.conftest import Running, cli, query, version
from tests.pgcluster import Cluster


@pytest.mark.parametrize("service", [["-x"], ["--help"], ["-", "a"]])
def test_a_service_after_dashdash_that_starts_with_a_dash_is_execd_not_refused(
    tmp_path: Path, service: list[str]
) -> None:
    result = cli(["run", "--", *service], {}, tmp_path)
    assert result.returncode == 127, result.stderr
    assert "put the service after --" not in result.stderr
    assert f"cannot exec {service[0]}: No such file or directory (ENOENT)" in result.stderr


@pytest.mark.parametrize(
    "args", [["-x"], ["-x", "--", "gunicorn"], ["--config", "alembic.ini", "--bogus", "x"]]
)
def test_an_unknown_option_before_dashdash_is_a_usage_error(
    tmp_path: Path, args: list[str]
) -> None:
    result = cli(["run", *args], {}, tmp_path)
    assert result.returncode == 2, result.stderr
    bad = next(arg for arg in args if arg.startswith("-") and arg != "--config")
    assert f"no such option: {bad} (put the service after --)" in result.stderr


def test_a_dash_service_after_dashdash_with_options_before_it(tmp_path: Path) -> None:
    (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = migrations\n")
    result = cli(["run", "--config", "alembic.ini", "--", "-x"], {}, tmp_path)
    assert result.returncode == 127, result.stderr


def test_no_progress_line_follows_the_outcome(tmp_path: Path, db_url: str) -> None:
    """The monitor reports a running revision every 5 s; once the upgrade is over it says
    nothing more: it is stopped before the outcome is logged."""

    project.create(tmp_path, project.linear(2, slow_seconds=5.6))
    env = {"RUN_MIGRATIONS": "1", "DATABASE_URL": db_url, "MIGRATION_LOG_FORMAT": "json"}
    result = cli(["run"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line)["event"] for line in result.stderr.splitlines() if line]
    assert "revision_progress" in events  # the guard: the monitor did report
    done = events.index("migrations_complete")
    assert "revision_progress" not in events[done:]


@pytest.mark.parametrize("env", ["stock", "cookbook"])
def test_a_server_crash_mid_revision_is_one_verdict(tmp_path: Path, env: str) -> None:
    """The crash fails the migration and ends the lock's session with it: one event. Before,
    the stock env.py printed MIGRATION LOCK LOST ("another runner may have migrated") and then
    MIGRATION FAILED ("nothing of them is in the database")."""

    server = Cluster()
    try:
        server.start()
        project.create(tmp_path, project.linear(2, slow_seconds=30), env=env, url=server.url())
        proc = Running(["run"], {"RUN_MIGRATIONS": "1", "DATABASE_URL": server.url()}, tmp_path)
        proc.wait_for("Applying revision r001")
        server.kill()
        assert proc.finish() == 1, proc.stderr
    finally:
        server.destroy()
    headlines = [line for line in proc.lines if line.startswith("❌")]
    assert len(headlines) == 1, headlines
    if env == "stock":  # env.py's own connection failed: the migration's verdict
        assert headlines[0].startswith("❌ MIGRATION FAILED in revision r001:")
        assert "released with its session" in proc.stderr
    else:  # the migration ran on the lock's session: losing it is the verdict
        assert headlines[0].startswith("❌ MIGRATION LOCK LOST:")
        assert "nothing of them is in the database" not in proc.stderr


@pytest.mark.parametrize("env", ["stock", "cookbook"])
def test_sigterm_in_an_autocommit_block_is_the_interruption(
    tmp_path: Path, db_url: str, env: str
) -> None:
    """Issue 16 point 4: Alembic commits in a `finally:` after the block; that commit failing
    (PendingRollbackError, or the lock-held veto on a session SQLAlchemy closed) must not
    replace the interruption: exit 143, the interruption line, no false verdict."""

    block = (
        "op.execute('CREATE TABLE done (id int)')\n"
        "with op.get_context().autocommit_block():\n"
        "    op.execute('CREATE TABLE early (id int)')\n"
        "    op.execute('SELECT pg_sleep(30)')\n"
    )
    project.create(tmp_path, [project.Revision("r001", python=block)], env=env)
    proc = Running(["run", "--", "true"], {"RUN_MIGRATIONS": "1", "DATABASE_URL": db_url}, tmp_path)
    proc.wait_for("Applying revision r001")
    deadline = time.monotonic() + 10
    while not query(db_url, "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"):
        assert time.monotonic() < deadline, proc.stderr
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.finish(timeout=30) == 143, proc.stderr
    assert "🛑 Interrupted by SIGTERM before the service started: rolled back, exiting" in (
        proc.lines
    )
    assert "   Except what r001 ran outside a transaction (autocommit_block): that was " in (
        proc.stderr
    )
    for false_verdict in ("MIGRATION LOCK LOST", "MIGRATION FAILED", "PendingRollbackError"):
        assert false_verdict not in proc.stderr
    assert version(db_url) == []  # the revision did not complete
    # what ran in the block committed as it ran; what ran before it, in the transaction, did
    # not: Alembic committed that at the block's start, so it stays too
    assert query(db_url, "SELECT to_regclass('early') IS NOT NULL")[0][0] is True


@pytest.mark.parametrize("env", ["stock", "cookbook"])
@pytest.mark.parametrize("per_migration", [True, False])
def test_ran_says_committed_exactly_when_the_server_has_committed(
    tmp_path: Path, db_url: str, env: str, per_migration: bool
) -> None:
    """Issue 15 point 13: with transaction_per_migration each revision commits before the next
    starts; the line said "not committed yet" for it. Checked against the server: while r002
    runs, r001's table is visible from another session exactly when the line says committed."""
    import re

    revisions = [
        project.Revision("r001", sql=["CREATE TABLE first_one (id int)"]),
        project.Revision("r002", sql=["SELECT pg_sleep(3)"]),
    ]
    project.create(tmp_path, revisions, env=env)
    if per_migration:
        env_py = tmp_path / "migrations" / "env.py"
        text = re.sub(
            r"connection=(connection|connectable), target_metadata=(None|target_metadata)",
            r"connection=\1, target_metadata=\2, transaction_per_migration=True",
            env_py.read_text(),
        )
        assert "transaction_per_migration=True" in text
        env_py.write_text(text)
    proc = Running(["run"], {"RUN_MIGRATIONS": "1", "DATABASE_URL": db_url}, tmp_path)
    proc.wait_for("Applying revision r002")
    visible = query(db_url, "SELECT to_regclass('first_one') IS NOT NULL")[0][0]
    assert proc.finish() == 0, proc.stderr
    (line,) = [text for text in proc.lines if text.startswith("☑️ Ran revision r001")]
    assert visible is per_migration
    state = "committed (transaction_per_migration)" if per_migration else "not committed yet"
    assert line == f"☑️ Ran revision r001 (r001): {state}"
