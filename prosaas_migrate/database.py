"""Connecting: retries within the wait budget, application_name, a verified statement_timeout."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg

from prosaas_migrate import logs
from prosaas_migrate.config import parse_duration_ms, redact_url
from prosaas_migrate.errors import DatabaseUnreachable, SessionSettingRejected

# libpq's connect_timeout: at least 2 s (it treats less as 2), and short, so that one attempt
# never eats the whole wait budget while the server is still starting.
_ATTEMPT_TIMEOUT_SECONDS = 3
_RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0)
# Notice a vanished peer within seconds, both ways: libpq's keepalives tell us the server is
# gone; the server's (tcp_keepalives_*) and client_connection_check_interval tell it that a
# killed runner is gone, even in the middle of a long statement, so its lock is freed at once.
_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}
_SERVER_SETTINGS = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
}
_CLIENT_CHECK = ("client_connection_check_interval", "1s", 140000)  # PostgreSQL 14+


def application_name(hostname: str) -> str:
    """The name every connection carries, so a waiting container can say who holds the lock."""
    return f"prosaas-migrate:{hostname}"


def connect(
    url: str,
    *,
    app_name: str,
    deadline: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> psycopg.Connection[Any]:
    """An autocommit connection, retrying a refused or failed attempt until `deadline`."""
    started = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return psycopg.connect(
                url,
                autocommit=True,
                application_name=app_name,
                connect_timeout=_ATTEMPT_TIMEOUT_SECONDS,
                **_KEEPALIVES,
            )
        except psycopg.OperationalError as exc:
            reason = _first_line(str(exc), url)
            remaining = deadline - clock()
            if remaining <= 0:
                raise DatabaseUnreachable(
                    redact_url(url), clock() - started, attempt, reason
                ) from None
            logs.connect_retry(redact_url(url), attempt, reason, remaining)
            sleep(min(_RETRY_DELAYS[min(attempt, len(_RETRY_DELAYS)) - 1], remaining))


def set_session_settings(
    dbapi_connection: psycopg.Connection[Any], statement_timeout_ms: int, app_name: str
) -> None:
    """Set statement_timeout and application_name for the session, outside any transaction.

    Run on every new connection (ours and any engine a project's env.py builds): unlike libpq's
    `options` startup parameter, this survives PgBouncer, and in autocommit no rollback undoes it.
    """
    settings = {
        "statement_timeout": str(statement_timeout_ms),
        "application_name": app_name,
        **_SERVER_SETTINGS,
    }
    name, value, since = _CLIENT_CHECK
    if dbapi_connection.info.server_version >= since:
        settings[name] = value
    previous = dbapi_connection.autocommit
    if not previous:
        dbapi_connection.rollback()
        dbapi_connection.autocommit = True
    try:
        # Names and values are bound parameters: nothing configured is pasted into SQL text.
        dbapi_connection.execute(
            "SELECT set_config(name, value, false) FROM unnest(%s::text[], %s::text[])"
            " AS s(name, value)",
            [list(settings), list(settings.values())],
        )
    finally:
        dbapi_connection.autocommit = previous


def verify_statement_timeout(conn: psycopg.Connection[Any], wanted: str, wanted_ms: int) -> None:
    """Check with SHOW that the server kept the timeout; it may print 2min for 120s."""
    row = conn.execute("SHOW statement_timeout").fetchone()
    shown = str(row[0]) if row else ""
    if parse_duration_ms("statement_timeout", shown) != wanted_ms:
        raise SessionSettingRejected("statement_timeout", wanted, shown)


def transaction_pooling(conn: psycopg.Connection[Any], url: str) -> str | None:
    """Why `conn` looks like it goes through a transaction-pooling pooler, or None.

    A session advisory lock needs one server session from lock to unlock. A direct connection
    reaches the server at the address and port it dialled, so only a mismatch (a pooler, a
    proxy, a NAT) pays for the real probe: while a second connection holds a transaction open,
    `conn` gets some server session; once that transaction ends, a transaction pooler hands
    `conn` the freed one on its next statement, while a session pooler never changes it.
    """
    row = conn.execute("SELECT host(inet_server_addr()), inet_server_port()").fetchone()
    server = (_address(row[0]), row[1]) if row else (None, None)
    dialled = (_address(conn.info.hostaddr or None), conn.info.port if row and row[1] else None)
    if server == dialled:
        return None
    other = psycopg.connect(url, connect_timeout=_ATTEMPT_TIMEOUT_SECONDS)
    try:
        other.execute("SELECT 1")  # opens a transaction, pinning a server connection
        before = conn.execute("SELECT pg_backend_pid()").fetchone()
        other.commit()
        after = conn.execute("SELECT pg_backend_pid()").fetchone()
    finally:
        other.close()
    if before != after:
        return (
            f"consecutive statements ran in different server sessions "
            f"(pid {before[0] if before else '?'}, then {after[0] if after else '?'})"
        )
    return None


def _address(text: str | None) -> str | None:
    if not text:
        return None
    import ipaddress

    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def current_revisions(conn: psycopg.Connection[Any]) -> tuple[str, ...]:
    """The revisions recorded in Alembic's default version table (found through search_path, as
    Alembic does); none when there is no version table yet."""
    row = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
    if not (row and row[0]):
        return ()
    rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    return tuple(sorted(str(r[0]) for r in rows))


def _first_line(message: str, url: str) -> str:
    """The useful part of a libpq error, with no chance of echoing the URL's password."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    text = "; ".join(lines) or "unknown error"
    password = _password(url)
    return text.replace(password, "***") if password else text


def _password(url: str) -> str | None:
    userinfo, at, _ = url.partition("://")[2].rpartition("@")
    return userinfo.split(":", 1)[1] if at and ":" in userinfo else None
