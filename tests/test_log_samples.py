"""Every log sample in the README is what a real run prints.

An alert written from the README must fire: each sample block (marked `<!-- log sample: NAME -->`
just above its fence) is compared line by line with the stderr of a real `prosaas-migrate run`
against a real PostgreSQL, built to produce that situation. Only numbers may differ (pids,
seconds, addresses, keys); every other character must be the tool's own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from prosaas_migrate import config
from tests import project
from tests.conftest import Running, cli

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
MARKER = re.compile(r"^<!-- log sample: ([\w-]+) -->\n```\n(.*?)\n```", re.MULTILINE | re.DOTALL)
REVISION = project.Revision("3f2a1c", sql=["ALTER TABLE leads ADD COLUMN source text"],
                            message="add leads.source")  # fmt: skip
OTHER_RUNNER = "prosaas-migrate:api-2"  # how another container's runner names its sessions


def samples() -> dict[str, list[str]]:
    return {name: block.splitlines() for name, block in MARKER.findall(README)}


def shape(line: str) -> str:
    """The line with its numbers (pids, seconds, addresses, keys) made alike."""
    return re.sub(r"[0-9]+(?:\.[0-9]+)?", "N", line)


def tool_lines(stderr: str) -> list[str]:
    """The runner's own lines: an event starts with its marker, its details with 3 blanks."""
    return [line for line in stderr.splitlines() if line[:1] > "\x7f" or line.startswith("   ")]


def assert_shown_by(sample: list[str], stderr: str) -> None:
    """The sample is a contiguous run of the real output's lines, numbers aside."""
    real = [shape(line) for line in tool_lines(stderr)]
    wanted = [shape(line) for line in sample]
    starts = [i for i, line in enumerate(real) if line == wanted[0]]
    assert starts, f"{sample[0]!r} is not printed by the tool; it printed:\n{stderr}"
    best = max(
        (sum(1 for _ in _common(real[i:], wanted)) for i in starts), default=0
    )  # how far the closest run agrees, to name the first line that differs
    assert best == len(wanted), (
        f"README line {sample[best]!r} is not what the tool printed next; it printed:\n{stderr}"
    )


def _common(real: list[str], wanted: list[str]) -> Iterator[None]:
    for got, want in zip(real, wanted, strict=False):
        if got != want:
            return
        yield None


@pytest.fixture
def app(tmp_path: Path, db_url: str) -> Path:
    """The README's example: a `leads` table, and revision 3f2a1c adding a column to it."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE leads (id int)")
    project.create(tmp_path, [REVISION])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gunicorn = bin_dir / "gunicorn"  # the README's service, a stand-in that exits at once
    gunicorn.write_text("#!/bin/sh\nexit 0\n")
    gunicorn.chmod(0o755)
    return tmp_path


def env(app: Path, db_url: str, **extra: str) -> dict[str, str]:
    return {
        "RUN_MIGRATIONS": "1",
        "DATABASE_URL": db_url,
        "PATH": f"{app / 'bin'}{os.pathsep}{os.environ['PATH']}",
        **extra,
    }


def holding_the_lock(db_url: str, application_name: str) -> psycopg.Connection[object]:
    conn: psycopg.Connection[object] = psycopg.connect(
        db_url, autocommit=True, application_name=application_name
    )
    conn.execute("SELECT pg_advisory_lock(%s)", [config.default_lock_key()])
    return conn


def migrate_after_a_wait(app: Path, db_url: str) -> str:
    with holding_the_lock(db_url, OTHER_RUNNER) as other:
        proc = Running(["run", "--", "gunicorn", "app:app"], env(app, db_url), app)
        proc.wait_for("Waiting for migration lock")
        other.execute("SELECT pg_advisory_unlock_all()")
        assert proc.finish() == 0, proc.stderr
    return proc.stderr


def skip_behind_a_runner(app: Path, db_url: str) -> str:
    with holding_the_lock(db_url, OTHER_RUNNER):
        result = cli(["run", "--", "gunicorn", "app:app"],
                     env(app, db_url, MIGRATION_LOCK_WAIT_SECONDS="1"), app)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stderr


def skip_behind_psql(app: Path, db_url: str) -> str:
    with holding_the_lock(db_url, "psql"):
        result = cli(["run", "--", "gunicorn", "app:app"],
                     env(app, db_url, MIGRATION_LOCK_WAIT_SECONDS="1"), app)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stderr


def disabled(app: Path, db_url: str) -> str:
    result = cli(["run", "--", "gunicorn", "app:app"], env(app, db_url, RUN_MIGRATIONS="0"), app)
    assert result.returncode == 0, result.stderr
    return result.stderr


def retry_behind_a_report(app: Path, db_url: str) -> str:
    """A report's open transaction holds `leads`; the ALTER waits (the monitor names the
    blocker after 5 s), gives up at the lock timeout, and the retry goes through once the
    report has ended."""
    with psycopg.connect(db_url, application_name="metabase") as report:
        report.execute("SELECT count(*) FROM leads")  # ACCESS SHARE until the transaction ends
        extra = {"MIGRATION_DDL_LOCK_TIMEOUT": "6s", "MIGRATION_DDL_LOCK_RETRIES": "10"}
        proc = Running(["run", "--", "gunicorn", "app:app"], env(app, db_url, **extra), app)
        proc.wait_for("Lock timeout in revision 3f2a1c", timeout=30)
        report.rollback()
        assert proc.finish() == 0, proc.stderr
    return proc.stderr


def concurrent_build_behind_a_dump(app: Path, db_url: str) -> str:
    """The README's recipe for a busy table, while a pg_dump's snapshot is 6 s old: the build
    waits for it (with no lock_timeout: nobody waits for the build), the monitor names it."""
    python = (
        "with op.get_context().autocommit_block():\n"
        "    op.create_index('ix_leads_id', 'leads', ['id'], postgresql_concurrently=True)\n"
    )
    folder = app / "indexed"
    project.create(folder, [project.Revision("7b1d9e", python=python, message="index leads.id")])
    with psycopg.connect(db_url, application_name="pg_dump") as dump:
        dump.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        dump.execute("SELECT 1")
        proc = Running(["run", "--", "gunicorn", "app:app"], env(app, db_url), folder)
        proc.wait_for("Waiting for older transactions to end", timeout=30)
        dump.rollback()
        assert proc.finish() == 0, proc.stderr
    return proc.stderr


def fail_when_told(app: Path, db_url: str) -> str:
    with holding_the_lock(db_url, OTHER_RUNNER):
        extra = {"MIGRATION_LOCK_WAIT_SECONDS": "1", "MIGRATION_ON_LOCK_TIMEOUT": "fail"}
        result = cli(["run", "--", "gunicorn", "app:app"], env(app, db_url, **extra), app)
    assert result.returncode == 1, result.stderr
    return result.stderr


def worker_events(_app: Path, _db_url: str) -> str:
    """The README's own worker example, run as it stands there."""
    code = README.split("```python\nfrom prosaas_migrate import worker_events", 1)[1]
    code = "from prosaas_migrate import worker_events" + code.split("```", 1)[0]
    prelude = 'call_sid, business_id = "CA123", 42\nevents.configure_logging()\n'
    first, rest = code.split("\n", 1)
    result = subprocess.run([sys.executable, "-c", f"{first}\n{prelude}{rest}"],
                            capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stderr


SCENARIOS: dict[str, Callable[[Path, str], str]] = {
    "migrate": migrate_after_a_wait,
    "skip": skip_behind_a_runner,
    "skip-not-a-runner": skip_behind_psql,
    "skip-fail": fail_when_told,
    "disabled": disabled,
    "lock-timeout-retry": retry_behind_a_report,
    "concurrent-build": concurrent_build_behind_a_dump,
    "worker-events": worker_events,
}


def test_every_sample_in_the_readme_has_a_scenario() -> None:
    found = samples()
    assert set(found) == set(SCENARIOS)
    # A block of log lines without a marker would escape the check: there must be none.
    logs_like = [block for block in fenced_blocks(README) if block and block[0][:1] > "\x7f"]
    assert len(logs_like) >= len(found) > 4  # the parser sees the samples themselves
    assert sorted(logs_like) == sorted(found.values()), [b[0] for b in logs_like]


def fenced_blocks(text: str) -> list[list[str]]:
    """The lines of every fenced code block, in order."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_the_readme_sample_is_what_a_run_prints(name: str, app: Path, db_url: str) -> None:
    assert_shown_by(samples()[name], SCENARIOS[name](app, db_url))


def test_the_comparison_catches_a_line_the_tool_never_prints() -> None:
    printed = "✅ Acquired migration lock (key 1, after 2.4s)\n☑️ Ran revision 3f2a1c: ...\n"
    with pytest.raises(AssertionError, match="Applied revision"):
        assert_shown_by(["✅ Acquired migration lock (key 9, after 0.1s)",
                         "✅ Applied revision 3f2a1c"], printed)  # fmt: skip
    assert_shown_by(["✅ Acquired migration lock (key 9, after 0.1s)"], printed)
