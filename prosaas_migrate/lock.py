"""The advisory lock: try, poll until a deadline, name the holder, release."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from prosaas_migrate import logs
from prosaas_migrate.errors import Interrupted, LockLost

# Every runner's sessions carry application_name "prosaas-migrate:<hostname>" (database.py).
RUNNER_APP_PREFIX = "prosaas-migrate:"

# A freed lock is taken within a few hundred ms; the jitter keeps many waiters from polling in step.
POLL_INTERVAL = (0.05, 0.15)

# pg_locks shows a bigint advisory key as classid (high 32 bits) and objid (low 32 bits) with
# objsubid 1. Rebuilding the key as bigint on the pg_locks side avoids int4 shifts that wrap.
_HOLDER_SQL = """
SELECT a.pid, a.application_name, host(a.client_addr), a.backend_start,
       extract(epoch FROM now() - a.backend_start)::float8,
       a.state,
       extract(epoch FROM now() - a.query_start)::float8
  FROM pg_locks l
  JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND ((l.classid::int8 << 32) | l.objid::int8) = %s::int8
"""


# Whether the session with this backend pid still holds the lock (same key reconstruction).
HELD_BY_SQL = """
SELECT EXISTS (
  SELECT 1 FROM pg_locks l
   WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.pid = %s
     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
     AND ((l.classid::int8 << 32) | l.objid::int8) = %s::int8)
"""


@dataclass(frozen=True)
class Holder:
    """The session that holds the lock, as pg_stat_activity shows it. For another role's
    session, without pg_read_all_stats, PostgreSQL hides its address, times and state (those
    fields are None), but shows its pid and application_name to everyone."""

    pid: int
    application_name: str | None
    client_addr: str | None
    connected_since: datetime | None
    connected_for: float | None
    state: str | None
    state_for: float | None

    def as_dict(self) -> dict[str, object]:
        """The fields `status --json` and JSON logs show, with stable names."""
        return {
            "pid": self.pid,
            "application_name": self.application_name,
            "client_addr": self.client_addr,
            "connected_since": self.connected_since and self.connected_since.isoformat(),
            "connected_seconds": None
            if self.connected_for is None
            else round(self.connected_for, 1),
            "state": self.state,
            "state_seconds": None if self.state_for is None else round(self.state_for, 1),
        }

    @property
    def is_runner(self) -> bool | None:
        """Whether this is one of our runners (by its application_name, which PostgreSQL shows
        for every session); None: no application_name to tell by."""
        if self.application_name is None:
            return None
        return self.application_name.startswith(RUNNER_APP_PREFIX)

    def describe(self) -> str:
        if self.connected_since is None:
            return (
                f"pid {self.pid} ({self.application_name or 'no application_name'}, another "
                "role's session: its address and times are hidden from this one)"
            )
        where = self.client_addr or "local socket"
        text = (
            f"pid {self.pid} ({self.application_name or 'no application_name'}, {where}), "
            f"connected {self.connected_for or 0:.0f}s"
        )
        if self.state:
            text += f", {self.state}"
            if self.state_for is not None:
                text += f" (last query started {self.state_for:.0f}s ago)"
        return text


def try_acquire(conn: psycopg.Connection[Any], key: int) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s::int8)", [key]).fetchone()
    return bool(row and row[0])


def holder(conn: psycopg.Connection[Any], key: int) -> Holder | None:
    row = conn.execute(_HOLDER_SQL, [key]).fetchone()
    return Holder(*row) if row else None


def acquire_within(
    conn: psycopg.Connection[Any],
    key: int,
    deadline: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    jitter: Callable[[float, float], float] = random.uniform,
) -> tuple[bool, float]:
    """Poll pg_try_advisory_lock until `deadline`; return (acquired, seconds waited).

    Polling in autocommit keeps no transaction (and no snapshot) open while waiting, which a
    blocking pg_advisory_lock would, stalling CREATE INDEX CONCURRENTLY in the holder.
    """
    started = clock()
    next_report = started
    while True:
        if try_acquire(conn, key):
            return True, clock() - started
        now = clock()
        if now >= deadline:
            return False, now - started
        if now >= next_report:
            logs.waiting(key, now - started, holder(conn, key))
            next_report = now + logs.REPORT_EVERY_SECONDS
        sleep(min(jitter(*POLL_INTERVAL), max(deadline - now, 0.0)))


def release(conn: psycopg.Connection[Any], key: int) -> None:
    """Unlock; raise LockLost when the server says the lock was not ours any more."""
    try:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
        conn.autocommit = True
        row = conn.execute("SELECT pg_advisory_unlock(%s::int8)", [key]).fetchone()
    except psycopg.Error as exc:
        reason = f"the lock connection failed at release: {' '.join(str(exc).split())}"
        raise LockLost(key, reason) from exc
    if not (row and row[0]):
        raise LockLost(key, "it was no longer held at release: pg_advisory_unlock returned false")
    logs.lock_released(key)


@contextmanager
def releasing(conn: psycopg.Connection[Any], key: int) -> Iterator[None]:
    """Release the held lock on the way out, without hiding the body's own error."""
    try:
        yield
    except LockLost:
        raise  # already gone: nothing to release, and it is reported once, by the caller
    except Interrupted:
        # On a signal the driver cancels the statement and SQLAlchemy may close the connection
        # to be sure: the session ended, so the server rolled back and freed the lock with it.
        if conn.closed or conn.broken:
            logs.lock_released_with_session(key)
        else:
            _release_reporting_loss(conn, key)
        raise
    except BaseException as exc:
        if _connection_lost(exc):
            # The server went away (a crash, a restart, the network): the migration failed for
            # that, and the lock's session ended with it. One event, reported once, by the
            # caller, not as a lock lost to another runner besides.
            try:
                release(conn, key)
            except LockLost:
                logs.lock_released_with_session(key)
        else:
            _release_reporting_loss(conn, key)
        raise
    release(conn, key)


def _connection_lost(exc: BaseException) -> bool:
    """Whether the error, or what it wraps, is a lost connection (no SQLSTATE: not the server's
    answer to a statement, such as a cancel or a lock timeout)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, psycopg.OperationalError) and current.sqlstate is None:
            return True
        current = (
            getattr(current, "original", None)
            or getattr(current, "orig", None)
            or current.__cause__
        )
    return False


def _release_reporting_loss(conn: psycopg.Connection[Any], key: int) -> None:
    try:
        release(conn, key)
    except LockLost as lost:
        logs.lock_lost(key, lost.reason, lost.consequence)
