"""Watches a running upgrade from a second, short-query connection of the migrating container.

Every few tenths of a second it checks that the lock session still holds the advisory lock (if
not, it cancels the migration's statements, so nothing commits after the lock is gone) and
samples what blocks the migration's backends; every few seconds of a long revision it logs what
the revision is doing, who blocks it, and the progress PostgreSQL reports. Its own failures are
logged once and it stops: watching must never fail or slow down the migration.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prosaas_migrate import logs
from prosaas_migrate.conninfo import ConnInfo

SAMPLE_EVERY_SECONDS = 0.2

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
       cl.phase, cl.heap_blks_scanned, cl.heap_blks_total
  FROM pg_stat_activity a
  LEFT JOIN pg_stat_progress_create_index ci ON ci.pid = a.pid
  LEFT JOIN pg_stat_progress_cluster cl ON cl.pid = a.pid
 WHERE a.pid = ANY(%s::int[]) AND a.state = 'active'
 ORDER BY a.query_start
 LIMIT 1
"""


@dataclass(frozen=True)
class Blocker:
    """A session that holds what the migration waits for, as pg_stat_activity shows it."""

    pid: int
    application_name: str | None
    client_addr: str | None
    state: str | None
    transaction_seconds: float | None

    def describe(self) -> str:
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
    revision: str | None = None
    revision_started: float = 0.0
    blockers: list[Blocker] = field(default_factory=list)  # the last non-empty sample
    lock_lost: str | None = None
    _pids: set[int] = field(default_factory=set)  # backends the upgrade's connections use
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def running(self, revision: str | None, now: float) -> None:
        self.revision, self.revision_started = revision, now
        self.blockers = []

    def add_pid(self, pid: int) -> None:
        with self._guard:
            self._pids.add(pid)

    def pids(self) -> list[int]:
        with self._guard:
            return sorted(self._pids | {self.lock_pid})


class Monitor:
    """A daemon thread with its own connection; start() after the lock, stop() after the upgrade."""

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
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            self._conn = self._connect()
            next_report: float | None = None
            reported_revision: str | None = None
            while not self._stop.wait(SAMPLE_EVERY_SECONDS):
                if self._lock_gone():
                    return
                revision = self.watch.revision
                if revision is None:
                    continue
                blockers = self._blockers()
                if blockers:
                    self.watch.blockers = blockers
                now = self._clock()
                if revision != reported_revision:
                    reported_revision = revision
                    next_report = self.watch.revision_started + logs.REPORT_EVERY_SECONDS
                if next_report is not None and now >= next_report:
                    self._report(revision, now - self.watch.revision_started, blockers)
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
            self._conn.execute(
                "SELECT pg_cancel_backend(p) FROM unnest(%s::int[]) AS m(p)", [others]
            )
        return True

    def _blockers(self) -> list[Blocker]:
        rows = self._conn.execute(_BLOCKERS_SQL, [self.watch.pids()]).fetchall()
        return [Blocker(*row) for row in rows]

    def _report(self, revision: str, elapsed: float, blockers: list[Blocker]) -> None:
        row = self._conn.execute(_ACTIVITY_SQL, [self.watch.pids()]).fetchone()
        statement, waiting, progress = None, None, None
        if row:
            _, wait_type, wait_event, statement = row[:4]
            if wait_type:
                waiting = f"{wait_type}:{wait_event}"
            progress = _progress(row[4:])
        logs.revision_progress(
            revision,
            elapsed,
            statement,
            waiting,
            progress,
            [b.describe() for b in blockers],
            [b.as_dict() for b in blockers],
        )


def _progress(row: tuple[Any, ...]) -> str | None:
    """'phase, N% of blocks' from pg_stat_progress_create_index or _cluster, when reported."""
    index_phase, blocks_done, blocks_total, tuples_done, tuples_total = row[:5]
    cluster_phase, heap_done, heap_total = row[5:]
    for phase, done, total in (
        (index_phase, blocks_done, blocks_total),
        (index_phase, tuples_done, tuples_total),
        (cluster_phase, heap_done, heap_total),
    ):
        if phase and total:
            return f"{phase}, {100 * done / total:.0f}% done"
    phase = index_phase or cluster_phase
    return None if phase is None else str(phase)
