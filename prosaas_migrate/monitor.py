"""Watches a running upgrade from a second, short-query connection of the migrating container.

While a revision runs, every tenth of a second it checks that the lock session
still holds the advisory lock (if not, it cancels the migration's statements, so nothing
commits after the lock is gone) and samples what blocks the migration's backends; every 5 s of
a long revision it logs what the revision is doing, who blocks it, and the progress PostgreSQL
reports. Its own failures are logged once and it stops: watching must never fail or slow down
the migration.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prosaas_migrate import logs
from prosaas_migrate.conninfo import ConnInfo

SAMPLE_EVERY_SECONDS = 0.1  # short lock timeouts need fast samples to catch the blocker
CONNECT_AFTER_SECONDS = 0.0  # once a revision runs: env.py's own sessions exist by then
MAX_BLOCKERS_SHOWN = 3

_BLOCKERS_SQL = """
SELECT b.pid, b.application_name, host(b.client_addr), b.state,
       extract(epoch FROM now() - b.xact_start)::float8
  FROM pg_stat_activity b
 WHERE b.pid IN (SELECT unnest(pg_blocking_pids(p)) FROM unnest(%s::int[]) AS m(p))
 ORDER BY b.xact_start
"""
_ACTIVITY_SQL = r"""
SELECT a.pid, a.wait_event_type, a.wait_event,
       left(regexp_replace(a.query, '\s+', ' ', 'g'), 160),
       ci.phase, ci.blocks_done, ci.blocks_total, ci.tuples_done, ci.tuples_total,
       cl.phase, cl.heap_blks_scanned, cl.heap_blks_total,
       ci.lockers_done, ci.lockers_total, a.pid
  FROM pg_stat_activity a
  LEFT JOIN pg_stat_progress_create_index ci ON ci.pid = a.pid
  LEFT JOIN pg_stat_progress_cluster cl ON cl.pid = a.pid
 WHERE a.pid = ANY(%s::int[]) AND a.state = 'active' AND a.application_name = %s
 ORDER BY a.query_start
 LIMIT 1
"""

# What a concurrent form waits for once it waits on a virtualxid: every transaction of this
# database whose snapshot is older than the statement (a report, pg_dump, one of our own).
_OLD_SNAPSHOTS_SQL = """
SELECT b.pid, b.application_name, host(b.client_addr), b.state,
       extract(epoch FROM now() - b.xact_start)::float8
  FROM pg_stat_activity b, pg_stat_activity m
 WHERE m.pid = %s AND b.pid <> m.pid AND b.datid = m.datid
   AND b.backend_xmin IS NOT NULL AND b.xact_start < m.query_start
 ORDER BY b.xact_start
"""
OLD_SNAPSHOT_WAIT = "Lock:virtualxid"


@dataclass(frozen=True)
class Blocker:
    """A session that holds what the migration waits for, as pg_stat_activity shows it."""

    pid: int
    application_name: str | None
    client_addr: str | None
    state: str | None
    transaction_seconds: float | None

    def describe(self) -> str:
        if self.state is None and self.client_addr is None:
            return (
                f"pid {self.pid} ({self.application_name or 'no application_name'}, another "
                "role's session: its address and state are hidden from ours)"
            )
        age = (
            ""
            if self.transaction_seconds is None
            else f", transaction open {self.transaction_seconds:.0f}s"
        )
        return (
            f"pid {self.pid} ({self.application_name or 'no application_name'}, "
            f"{self.client_addr or 'local socket'}, {self.state or 'unknown state'}{age})"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "application_name": self.application_name,
            "client_addr": self.client_addr,
            "state": self.state,
            "transaction_seconds": None
            if self.transaction_seconds is None
            else round(self.transaction_seconds, 1),
        }


@dataclass
class Watch:
    """Shared between the upgrade (which says what runs) and the monitor (what it saw)."""

    lock_pid: int
    key: int
    app_name: str  # our sessions' application_name: only those are ever cancelled
    revision: str | None = None
    revision_started: float = 0.0
    generation: int = 0  # a new one each time a revision starts (again, on a retry)
    blockers: list[Blocker] = field(default_factory=list)  # the last non-empty sample
    lock_lost: str | None = None
    autocommitted: set[str] = field(default_factory=set)  # revisions with autocommit work
    _pids: dict[int, int] = field(default_factory=dict)  # id(connection) -> backend pid
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def running(self, revision: str | None, now: float) -> None:
        self.revision, self.revision_started = revision, now
        self.generation += 1
        self.blockers = []

    def opened(self, connection: object, pid: int) -> None:
        with self._guard:
            self._pids[id(connection)] = pid

    def closed(self, connection: object) -> None:
        # A closed session's pid may soon be someone else's (a pooler's server, a new backend).
        with self._guard:
            self._pids.pop(id(connection), None)

    def pids(self) -> list[int]:
        with self._guard:
            return sorted({*self._pids.values(), self.lock_pid})


class Monitor:
    """A daemon thread with its own connection, opened only once a revision runs (where a role
    may have only a few connections, env.py's own are made by then; if none is left, watching
    stops with one line and the migration goes on). start() after the lock, stop() after."""

    def __init__(
        self,
        info: ConnInfo,
        watch: Watch,
        *,
        connect: Callable[[], Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.info = info
        self.watch = watch
        self._connect = connect
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prosaas-monitor", daemon=True)
        self._conn: Any = None

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)  # a daemon: a connect still under way is not waited for

    def _run(self) -> None:
        try:
            generation, next_report = -1, 0.0
            while not self._stop.wait(SAMPLE_EVERY_SECONDS):
                watch = self.watch
                revision, started = watch.revision, watch.revision_started
                now = self._clock()
                if revision is None or now - started < CONNECT_AFTER_SECONDS:
                    continue
                if self._conn is None:
                    self._conn = self._connect()
                if self._lock_gone():
                    return
                blockers = self._blockers()
                if blockers:
                    watch.blockers = blockers
                if watch.generation != generation:
                    generation = watch.generation
                    next_report = started + logs.REPORT_EVERY_SECONDS
                if now >= next_report:
                    self._report(revision, now - started, blockers)
                    next_report = now + logs.REPORT_EVERY_SECONDS
        except Exception as exc:
            if not self._stop.is_set():
                from prosaas_migrate.database import one_line

                logs.monitor_stopped(one_line(exc, self.info))
        finally:
            if self._conn is not None:
                self._conn.close()

    def _lock_gone(self) -> bool:
        """True (and the migration's statements cancelled) when the lock session lost the lock."""
        from prosaas_migrate.lock import HELD_BY_SQL

        watch = self.watch
        row = self._conn.execute(HELD_BY_SQL, [watch.lock_pid, watch.key]).fetchone()
        if row and row[0]:
            return False
        watch.lock_lost = f"the lock session (pid {watch.lock_pid}) no longer holds it"
        others = [pid for pid in watch.pids() if pid != watch.lock_pid]
        if others:
            # Only sessions still carrying our name: a pid can be reused by another client.
            self._conn.execute(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                " WHERE pid = ANY(%s::int[]) AND application_name = %s",
                [others, watch.app_name],
            )
        return True

    def _blockers(self) -> list[Blocker]:
        rows = self._conn.execute(_BLOCKERS_SQL, [self.watch.pids()]).fetchall()
        return [Blocker(*row) for row in rows]

    def _report(self, revision: str, elapsed: float, blockers: list[Blocker]) -> None:
        row = self._conn.execute(_ACTIVITY_SQL, [self.watch.pids(), self.watch.app_name]).fetchone()
        statement, waiting, progress = None, None, None
        if row:
            _, wait_type, wait_event, text = row[:4]
            statement = without_literals(text)
            if wait_type:
                waiting = f"{wait_type}:{wait_event}"
            progress = _progress(row[4:12])
            lockers_done, lockers_total, pid = row[12:15]
            if waiting == OLD_SNAPSHOT_WAIT:
                # pg_blocking_pids names the one transaction waited for now; these are all
                # it still has to wait for.
                rows = self._conn.execute(_OLD_SNAPSHOTS_SQL, [pid]).fetchall()
                blockers = [Blocker(*found) for found in rows] or blockers
                if lockers_total:
                    progress = f"{progress or 'waiting'}: {lockers_done} of {lockers_total} ended"
        if self._stop.is_set() or self.watch.revision != revision:
            return  # the revision ended while we asked: a line now would follow its outcome
        logs.revision_progress(
            revision,
            elapsed,
            statement,
            waiting,
            progress,
            describe_blockers(blockers),
            [b.as_dict() for b in blockers[:MAX_BLOCKERS_SHOWN]],
        )


def without_literals(statement: str | None) -> str | None:
    """The statement up to its first quoted literal: a revision's SQL may hold a secret
    (ALTER ROLE ... PASSWORD '...'), and the log must not."""
    if statement is None:
        return None
    cut = min((i for i in (statement.find("'"), statement.find("$")) if i >= 0), default=-1)
    return statement if cut < 0 else statement[:cut].rstrip() + " …"


def describe_blockers(blockers: list[Blocker]) -> list[str]:
    shown = [b.describe() for b in blockers[:MAX_BLOCKERS_SHOWN]]
    if len(blockers) > MAX_BLOCKERS_SHOWN:
        shown.append(f"and {len(blockers) - MAX_BLOCKERS_SHOWN} more")
    return shown


def _progress(row: tuple[Any, ...]) -> str | None:
    """'phase, N% of blocks' from pg_stat_progress_create_index or _cluster, when reported."""
    index_phase, blocks_done, blocks_total, tuples_done, tuples_total = row[:5]
    cluster_phase, heap_done, heap_total = row[5:]
    if index_phase and str(index_phase).startswith("waiting for"):
        return str(index_phase)  # the block counts are the last phase's, not this wait's
    for phase, done, total in (
        (index_phase, blocks_done, blocks_total),
        (index_phase, tuples_done, tuples_total),
        (cluster_phase, heap_done, heap_total),
    ):
        if phase and total:
            return f"{phase}, {100 * done / total:.0f}% done"
    phase = index_phase or cluster_phase
    return None if phase is None else str(phase)
