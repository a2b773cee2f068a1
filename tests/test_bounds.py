"""Every number has a bound: a "wait for ever" works, an absurd value is one line, exit 2.

The seed allows any positive integer of seconds; the server takes at most 2^31-1 ms for a time
setting and Python's timers overflow far below what 20 digits say. What reaches either is
clamped; what does not fit a signed 64-bit integer is refused before anything connects.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from prosaas_migrate import config, database
from prosaas_migrate.errors import ConfigError
from tests import project
from tests.conftest import Running, cli, version

pytestmark = pytest.mark.majors  # its database tests run on each --pg-majors major

SERVICE = ["sh", "-c", "echo service-started"]
WHOLE_SETTINGS = [
    s.name for s in config.SETTINGS if getattr(s.parse, "func", None) is config.parse_whole
]
INT64_MAX = 2**63 - 1


def test_the_whole_number_settings_are_the_ones_this_file_covers() -> None:
    assert set(WHOLE_SETTINGS) == {
        "MIGRATION_LOCK_WAIT_SECONDS",
        "MIGRATION_WAIT_FOR_HEAD_SECONDS",
        "MIGRATION_DDL_LOCK_RETRIES",
    }


@pytest.mark.parametrize("name", WHOLE_SETTINGS)
@given(value=st.integers(min_value=0, max_value=INT64_MAX))
def test_any_whole_number_that_fits_64_bits_is_taken_as_it_is(name: str, value: int) -> None:
    assert config.parsed({name: str(value)}, name) == value


@pytest.mark.parametrize("name", WHOLE_SETTINGS)
@pytest.mark.parametrize("value", [str(INT64_MAX + 1), "9" * 20, "1" + "0" * 40])
def test_more_than_fits_is_a_config_error_naming_the_bound(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config.parsed({name: value}, name)
    assert f"0 to {INT64_MAX}" in str(raised.value)
    assert name in str(raised.value)


@pytest.mark.parametrize("name", WHOLE_SETTINGS)
def test_an_absurd_value_exits_2_with_one_line_before_connecting(tmp_path: Path, name: str) -> None:
    project.create(tmp_path, project.linear(1))
    env = {"RUN_MIGRATIONS": "1", "DATABASE_URL": "postgresql://x@127.0.0.1:1/x", name: "9" * 25}
    result = cli(["run", "--", "true"], env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [text for text in result.stderr.splitlines() if name in text]
    assert f"0 to {INT64_MAX}" in line


def test_what_reaches_the_server_and_the_timers_is_clamped() -> None:
    assert database.server_ms(12345678901 * 1000) == 2**31 - 1
    assert database.server_ms(-5) == 0
    assert database.server_ms(1500.7) == 1500
    assert database.timer_seconds(1e30) == database.TIMER_SECONDS_MAX
    import signal
    import threading

    # Both timers really take the clamp (neither raises OverflowError).
    signal.setitimer(signal.ITIMER_REAL, database.TIMER_SECONDS_MAX)
    signal.setitimer(signal.ITIMER_REAL, 0)
    timer = threading.Timer(database.TIMER_SECONDS_MAX, lambda: None)
    timer.start()
    timer.cancel()
    timer.join()
    assert database.TIMER_SECONDS_MAX <= threading.TIMEOUT_MAX


@pytest.fixture
def lock_held(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db_url, autocommit=True, application_name="prosaas-migrate:api-2") as c:
        c.execute("SELECT pg_advisory_lock(%s)", [config.default_lock_key()])
        yield c


@pytest.mark.parametrize("seconds", ["3000000", "12345678901", str(INT64_MAX)])
def test_a_wait_for_ever_waits_then_migrates_when_the_lock_is_free(
    tmp_path: Path, db_url: str, lock_held: psycopg.Connection[Any], seconds: str
) -> None:
    """Issue 16 point 7: 3000000 failed on statement_timeout, 11 digits gave a traceback."""
    project.create(tmp_path, project.linear(2))
    env = {"RUN_MIGRATIONS": "1", "DATABASE_URL": db_url, "MIGRATION_LOCK_WAIT_SECONDS": seconds}
    proc = Running(["run", "--", *SERVICE], env, tmp_path)
    proc.wait_for("Waiting for migration lock")
    lock_held.execute("SELECT pg_advisory_unlock_all()")
    assert proc.finish() == 0, proc.stderr
    assert proc.stdout == "service-started\n"
    assert "Traceback" not in proc.stderr
    assert version(db_url) == ["r002"]


@pytest.mark.parametrize("seconds", ["3000000", "12345678901"])
def test_a_wait_for_ever_for_head_polls_and_starts_at_head(
    tmp_path: Path, db_url: str, seconds: str
) -> None:
    project.create(tmp_path, project.linear(1))
    env = {
        "RUN_MIGRATIONS": "0",
        "DATABASE_URL": db_url,
        "MIGRATION_WAIT_FOR_HEAD_SECONDS": seconds,
    }
    proc = Running(["run", "--", *SERVICE], env, tmp_path)
    proc.wait_for("Waiting for the schema to reach")
    migrate = cli(["run"], {"RUN_MIGRATIONS": "1", "DATABASE_URL": db_url}, tmp_path)
    assert migrate.returncode == 0, migrate.stderr
    assert proc.finish() == 0, proc.stderr
    assert proc.stdout == "service-started\n"
    assert "Traceback" not in proc.stderr
