"""Connecting and session settings against a real server."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from prosaas_migrate import config, conninfo, database
from prosaas_migrate.errors import ConfigError, DatabaseUnreachable, SessionSettingRejected
from tests.pgcluster import free_port

# Values around every edge of PostgreSQL's grammar for time settings.
DURATIONS = [
    "120s", "2min", "0.5h", "1500ms", "10", "0", "1d", "24d", "30d", " 120 s ", "120S",
    "120 sec", "-5s", "500us", "600us", "1500us", "0.5ms", "2.5ms", ".5s", "5.", "1e3", "0x10",
    "2147483647", "2147483648", "abc", "1s'; DROP TABLE x; --", "010", "08", "0.1d", "0.7d",
]  # fmt: skip


@pytest.mark.parametrize("value", DURATIONS)
def test_duration_parser_never_accepts_what_postgresql_rejects(db_url: str, value: str) -> None:
    """Each value we accept means the same milliseconds to the server; we may refuse more."""
    try:
        ours: int | None = config.parse_duration_ms("MIGRATION_STATEMENT_TIMEOUT", value)
    except ConfigError:
        ours = None
    with psycopg.connect(db_url, autocommit=True) as conn:
        try:
            # set_config returns the value as SHOW prints it (2min, 1ms...); nothing runs after it,
            # since a 1 ms timeout would cancel the next statement.
            row = conn.execute(
                "SELECT set_config('statement_timeout', %s, false)", [value]
            ).fetchone()
            assert row is not None
            theirs: int | None = config.parse_duration_ms("SHOW", str(row[0]))
        except psycopg.errors.InvalidParameterValue:
            theirs = None
    if ours is not None:
        assert theirs == ours
    if theirs == 0 and value.strip() not in ("0",):
        assert ours is None, "a value that silently disables the timeout must be refused"


def test_unreachable_server_fails_within_the_budget_without_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"postgresql://app:s3cr3t-pw@127.0.0.1:{free_port()}/app"
    started = time.monotonic()
    with pytest.raises(DatabaseUnreachable) as caught:
        database.connect(conninfo.parse("DATABASE_URL", url), deadline=started + 1.5)
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 4
    assert caught.value.attempts >= 3
    assert "app:***@127.0.0.1" in str(caught.value)
    assert "s3cr3t-pw" not in str(caught.value) + capsys.readouterr().err


def test_application_name_and_statement_timeout_survive_a_rollback(db_url: str) -> None:
    info = conninfo.parse("DATABASE_URL", db_url)
    conn = database.connect(info, deadline=time.monotonic())
    with conn:
        database.set_session(
            conn, {"statement_timeout": "120000", "application_name": "prosaas-migrate:box"}
        )
        conn.autocommit = False
        conn.execute("SELECT 1")
        conn.rollback()
        database.verify_durations(conn, {"statement_timeout": ("120s", 120_000)})
        row = conn.execute("SHOW application_name").fetchone()
        assert row == ("prosaas-migrate:box",)


def test_a_timeout_the_server_does_not_hold_is_reported(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SET statement_timeout = '5s'")
        with pytest.raises(SessionSettingRejected, match="'5s' on the server, not '120s'"):
            database.verify_durations(conn, {"statement_timeout": ("120s", 120_000)})


def test_set_session_settings_restores_a_non_autocommit_connection(db_url: str) -> None:
    conn: psycopg.Connection[Any]
    with psycopg.connect(db_url) as conn:
        database.set_session(conn, {"statement_timeout": "1500", "application_name": "x"})
        assert conn.autocommit is False
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1500ms",)
