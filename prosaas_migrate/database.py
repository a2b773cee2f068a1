"""Connecting: retries within the wait budget, application_name, verified session settings,
bounded reads of the version table, and telling a transaction-pooling pooler from a session."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
from psycopg import sql

from prosaas_migrate import logs
from prosaas_migrate.config import parse_duration_ms
from prosaas_migrate.conninfo import ConnInfo, scrub
from prosaas_migrate.errors import (
    ConnectionRejected,
    DatabaseError,
    DatabaseUnreachable,
    ServerTooOld,
    SessionSettingRejected,
    TransactionPooling,
    VersionTableBusy,
)

# libpq's connect_timeout: at least 2 s (it treats less as 2), and short, so that one attempt
# never eats the whole wait budget while the server is still starting.
_ATTEMPT_TIMEOUT_SECONDS = 3
SERVER_MS_MAX = 2**31 - 1  # PostgreSQL's upper bound for a time setting, in milliseconds
TIMER_SECONDS_MAX = float(2**31)  # 68 years: setitimer and threading both take it
_MIN_ATTEMPT_SECONDS = 0.5  # even with no budget left: one real try
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
PEER_CHECKS = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "client_connection_check_interval": "1s",  # PostgreSQL 14+; skipped where unknown
}
# The lock session idles for the whole upgrade when env.py migrates on its own connection:
# a server-side idle timeout (managed providers' hardening guides set one) must not end it,
# nor any other session of the upgrade between its statements.
OURS_WHILE_MIGRATING = {"idle_session_timeout": "0", "idle_in_transaction_session_timeout": "0"}
# Sessions of our own that read the version table must never sit in its lock queue past
# the wait budget (another migrator may hold ACCESS EXCLUSIVE on it for minutes).
MIN_READ_TIMEOUT_MS = 50

# Refusals no retry can change, by the words PostgreSQL (FATAL, with its SQLSTATE) and libpq
# write them in: psycopg gives a failed connection no SQLSTATE, only libpq's message. A server
# whose lc_messages is not English words them otherwise: those are retried, as before.
_PERMANENT_REFUSALS = (
    ("password authentication failed", "a wrong password (28P01)"),
    ("no pg_hba.conf entry", "pg_hba.conf has no line for this host, user and database (28000)"),
    ("pg_hba.conf rejects connection", "pg_hba.conf rejects this host, user or database (28000)"),
    ("is not permitted to log in", "the role has NOLOGIN (28000)"),
    ("does not exist", "no such database or role (3D000, 28000)"),
    ("permission denied for database", "the role lacks CONNECT on the database (42501)"),
    ("no password supplied", "the server asks for a password and none is given"),
    ("SSL was required", "sslmode requires SSL, which the server does not offer"),
    ("certificate verify failed", "the server's certificate does not verify (sslrootcert)"),
    ("server does not support SSL", "sslmode requires SSL, which the server does not offer"),
)

VersionTable = tuple[str | None, str]  # (schema or None = search_path, table)
DEFAULT_TABLE: VersionTable = (None, "alembic_version")


class NoAnswer(Exception):
    """The server (or a pooler in front of it) did not answer within the time it was given."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"no answer within {seconds:.1f}s")


@contextmanager
def answering_within(seconds: float) -> Iterator[None]:
    """Raise NoAnswer if the block is still waiting on the network after `seconds`.

    Server-side timeouts cannot bound everything: a query queued in PgBouncer for a free server,
    or a server that accepts a connection and never answers. A real-time timer interrupts the
    wait (psycopg waits in Python, so the signal's exception surfaces there); the connection
    is then unusable and must be closed. Main thread only; elsewhere it does nothing.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: object) -> None:
        raise NoAnswer(seconds)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timer_seconds(max(seconds, 0.01)))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def server_ms(ms: float) -> int:
    """A time setting as the server takes it: whole milliseconds, at most its int32 limit.

    A budget of years ("wait for ever") is still a wait of 24.8 days per statement there.
    """
    return int(min(max(ms, 0), SERVER_MS_MAX))


def timer_seconds(seconds: float) -> float:
    """A wait for Python's timers (setitimer, threading): at most TIMER_SECONDS_MAX."""
    return min(seconds, TIMER_SECONDS_MAX)


def application_name(hostname: str) -> str:
    """The name every connection carries, so a waiting container can say who holds the lock."""
    from prosaas_migrate.lock import RUNNER_APP_PREFIX

    return f"{RUNNER_APP_PREFIX}{hostname}"


def connect(
    info: ConnInfo,
    *,
    deadline: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> psycopg.Connection[Any]:
    """An autocommit connection, retrying a refused or failed attempt until `deadline`.

    It carries no application_name yet: a transaction-pooling PgBouncer would keep a startup
    parameter on the server session and hand it to the next client that sets none. The runner
    sets it with the session settings, once the connection is known to be a session.
    """
    started = clock()
    attempt = 0
    while True:
        attempt += 1
        # Each attempt ends with the budget (libpq's own connect_timeout is at least 2 s).
        allowed = min(max(deadline - clock(), _MIN_ATTEMPT_SECONDS), _ATTEMPT_TIMEOUT_SECONDS)
        try:
            with answering_within(allowed):
                conn = psycopg.connect(
                    info.text,
                    autocommit=True,
                    connect_timeout=_ATTEMPT_TIMEOUT_SECONDS,
                    **_KEEPALIVES,
                )
            # libpq has the version from the startup reply: no query. 0 means it was not said.
            server_version = conn.info.server_version
            if 0 < server_version < ServerTooOld.OLDEST:
                conn.close()
                raise ServerTooOld(info.variable or "DATABASE_URL", info.display, server_version)
            return conn
        except (psycopg.OperationalError, NoAnswer) as exc:
            reason = one_line(exc, info)
            if (meaning := permanent_refusal(exc)) is not None:
                raise ConnectionRejected(
                    info.variable or "DATABASE_URL", info.display, reason, meaning
                ) from None
            remaining = deadline - clock()
            if remaining <= 0:
                raise DatabaseUnreachable(
                    info.display, clock() - started, attempt, reason
                ) from None
            logs.connect_retry(info.display, attempt, reason, remaining)
            sleep(min(_RETRY_DELAYS[min(attempt, len(_RETRY_DELAYS)) - 1], remaining))


def permanent_refusal(exc: BaseException) -> str | None:
    """What a refused connection means when no retry can change it; None when it may pass
    (refused, starting up, too many clients, a timeout, a name not resolved yet)."""
    if not isinstance(exc, psycopg.OperationalError):
        return None
    text = str(exc)
    return next((meaning for words, meaning in _PERMANENT_REFUSALS if words in text), None)


def set_session(dbapi_connection: Any, settings: Mapping[str, str]) -> tuple[int, Identity]:
    """set_config() each setting for the session, outside any transaction, as bound parameters;
    return the session's server pid and which server and database it is in.

    Works on a psycopg connection and on the adapted one of SQLAlchemy's asyncio engine alike
    (plain DB-API calls). Unlike libpq's `options` startup parameter, this survives PgBouncer,
    and in autocommit no rollback undoes it. Settings this server does not know are skipped.
    The pid is asked of the server: behind PgBouncer the one libpq reports is the pooler's.
    """
    previous = dbapi_connection.autocommit
    if not previous:
        dbapi_connection.rollback()
        dbapi_connection.autocommit = True
    try:
        cursor = dbapi_connection.cursor()
        try:
            if "statement_timeout" in settings:
                # First and alone: a tiny statement_timeout set on the database or role (1ms)
                # must not cancel the statement that sets ours.
                cursor.execute(
                    "SELECT set_config('statement_timeout', %s, false)",
                    [settings["statement_timeout"]],
                )
                cursor.fetchall()
            cursor.execute(
                "SELECT set_config(s.name, s.value, false)"
                " FROM unnest(%s::text[], %s::text[]) AS s(name, value)"
                " WHERE s.name IN (SELECT name FROM pg_settings)",
                [list(settings), list(settings.values())],
            )
            cursor.fetchall()
            # Which server: over a Unix socket the address is NULL, so the start time of the
            # postmaster tells two servers apart.
            cursor.execute(
                "SELECT pg_backend_pid(), current_database(), host(inet_server_addr()),"
                " inet_server_port(), current_setting('port'), pg_postmaster_start_time()"
            )
            row = cursor.fetchone()
        finally:
            cursor.close()
    finally:
        dbapi_connection.autocommit = previous
    return int(row[0]), tuple(row[1:])


Identity = tuple[object, ...]  # which server and database a session is in


def verify_durations(conn: psycopg.Connection[Any], wanted: Mapping[str, tuple[str, int]]) -> None:
    """Check that the server kept each time setting; it may print 2min for 120s."""
    for name, (text, ms) in wanted.items():
        row = conn.execute("SELECT current_setting(%s, true)", [name]).fetchone()
        shown = str(row[0]) if row and row[0] is not None else ""
        if not shown and name in PEER_CHECKS | OURS_WHILE_MIGRATING:
            continue  # an older server without this setting
        try:
            kept = parse_duration_ms(name, shown) == ms
        except Exception:
            kept = False
        if not kept:
            raise SessionSettingRejected(name, text, shown)


@contextmanager
def bounded(conn: psycopg.Connection[Any], timeout_ms: int) -> Iterator[psycopg.Connection[Any]]:
    """A read-only transaction whose statements and lock waits end within `timeout_ms`.

    The limits are transaction-local (set_config(..., true)), so nothing of them can stay on a
    server session that a pooler hands to another client afterwards. A statement or lock wait
    that runs out raises VersionTableBusy.
    """
    limit = str(server_ms(max(timeout_ms, MIN_READ_TIMEOUT_MS)))
    try:
        conn.execute("BEGIN")
        try:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, true),"
                " set_config('lock_timeout', %s, true),"
                " set_config('transaction_read_only', 'on', true)",
                [limit, limit],
            )
            yield conn
        except NoAnswer:
            raise  # the connection is mid-query: unusable, the caller closes it
        except BaseException:
            if not conn.broken:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
        raise VersionTableBusy(int(limit), one_line(exc)) from None
    except psycopg.OperationalError as exc:
        if _STATEMENT_POOLING in str(exc):
            raise TransactionPooling(
                "", f"it refused a transaction block: {one_line(exc)}"
            ) from None
        raise


# PgBouncer's answer to BEGIN in statement pooling mode (it then closes the connection).
_STATEMENT_POOLING = "not allowed in statement pooling mode"


def current_revisions(
    conn: psycopg.Connection[Any], table: VersionTable = DEFAULT_TABLE
) -> tuple[str, ...]:
    """The revisions recorded in a version table (by default Alembic's, through search_path, as
    Alembic finds it); none when there is no version table yet."""
    schema, name = table
    qualified = sql.Identifier(schema, name) if schema else sql.Identifier(name)
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL, current_schema() IS NOT NULL",
        [qualified.as_string(conn)],
    ).fetchone()
    if row and not row[0] and not schema and not row[1]:
        # No schema on the search_path is usable (USAGE revoked): the table may well exist,
        # unseen; "no version table" would be a guess, and a wrong one says "pending".
        raise DatabaseError(
            f"reading {name}", "no schema on the search_path is usable (no USAGE privilege)"
        )
    if not (row and row[0]):
        return ()
    try:
        rows = conn.execute(sql.SQL("SELECT version_num FROM {}").format(qualified)).fetchall()
    except psycopg.errors.InsufficientPrivilege as exc:
        raise DatabaseError(f"reading {qualified.as_string(conn)}", one_line(exc)) from None
    return tuple(sorted(str(r[0]) for r in rows))


def table_name(table: VersionTable) -> str:
    """schema.table, with the schema Alembic uses when env.py names none."""
    schema, name = table
    return f"{schema or 'public'}.{name}"


def transaction_pooling(
    conn: psycopg.Connection[Any], info: ConnInfo, *, timeout: float
) -> str | None:
    """Why `conn` goes through a pooler that does not keep one server session, or None.

    A session advisory lock needs one server session from lock to unlock. A direct TCP
    connection reaches the server at the address and port it dialled; anything else (a pooler,
    a proxy, NAT, a Unix socket) gets the real probe: `conn` holds a transaction on server
    session X while a second client holds one on Y; both end, in one order and then the other.
    A session pooler gives `conn` X again every time. A transaction pooler gives it whichever
    server is free: with most-recently-freed first (PgBouncer's default) Y when Y was freed
    last, with least-recently-freed first (server_round_robin) Y when X was freed last. Nothing
    is set for the session here, so nothing can leak to another client of a pool.
    """
    if _dialled_server(conn):
        return None
    other = psycopg.connect(info.text, connect_timeout=_ATTEMPT_TIMEOUT_SECONDS, autocommit=True)
    abandoned = False
    try:
        for mine_frees_first in (True, False):
            answer, abandoned = _probe_round(
                conn, other, mine_frees_first=mine_frees_first, timeout=timeout
            )
            if answer is not None:
                return answer
    except psycopg.Error as exc:
        # PgBouncer in statement mode refuses transaction blocks outright.
        if isinstance(exc, psycopg.OperationalError) and _STATEMENT_POOLING not in str(exc):
            raise
        return f"it refused a transaction block: {one_line(exc, info)}"
    finally:
        with suppress(psycopg.Error):  # an interrupted probe leaves conn mid-query: closed later
            if conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
                conn.execute("ROLLBACK")
        if not abandoned:  # else another thread still waits in it: left to the process's end
            with suppress(psycopg.Error):
                if other.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
                    other.execute("ROLLBACK")
            other.close()
    return None


def _probe_round(
    conn: psycopg.Connection[Any],
    other: psycopg.Connection[Any],
    *,
    mine_frees_first: bool,
    timeout: float,
) -> tuple[str | None, bool]:
    """(why it is not a session, or None; whether `other` had to be abandoned)."""
    import threading

    conn.execute("BEGIN READ ONLY")  # nothing to write: status probes too
    before = _backend_pid(conn)
    failure: list[BaseException] = []

    def second_client() -> None:
        try:
            other.execute("BEGIN READ ONLY")
            _backend_pid(other)
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=second_client, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        # No second server session for it while we hold one: a pool too small or too busy
        # (a session pool waits for a client to leave, up to PgBouncer's query_wait_timeout).
        # env.py's engine and the monitor need sessions of their own, so it cannot work here.
        # The waiting client is left to its thread: closing it under that thread is unsafe.
        conn.execute("COMMIT")
        return (
            f"a second connection got no server session within {timeout:.0f}s while this one "
            "held one: the pool is too small or too busy to migrate through",
            True,
        )
    if failure:
        raise failure[0]
    first, last = (conn, other) if mine_frees_first else (other, conn)
    first.execute("COMMIT")
    last.execute("COMMIT")
    after = _backend_pid(conn)  # a transaction of its own (autocommit)
    if after != before:
        return (
            f"consecutive transactions of one client ran in different server sessions "
            f"(pid {before}, then {after})",
            False,
        )
    return None, False


def _backend_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def _dialled_server(conn: psycopg.Connection[Any]) -> bool:
    """True when the server is the very TCP endpoint we dialled (so no pooler in between)."""
    row = conn.execute("SELECT host(inet_server_addr()), inet_server_port()").fetchone()
    if not row or row[0] is None or not conn.info.hostaddr:
        return False  # a Unix socket: a pooler can listen on one too, so probe
    return (_address(row[0]), row[1]) == (_address(conn.info.hostaddr), conn.info.port)


def _address(text: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def one_line(exc: BaseException, info: ConnInfo | None = None) -> str:
    """The useful part of a driver error, on one line, with no chance of echoing a password."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = "; ".join(lines) or type(exc).__name__
    return scrub(text, info.secrets) if info else text
