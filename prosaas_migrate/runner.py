"""The run flow: decide -> connect -> where is the schema? -> lock -> upgrade -> release -> exec."""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from prosaas_migrate import logs
from prosaas_migrate.config import Settings, lock_key
from prosaas_migrate.errors import (
    DatabaseAhead,
    DatabaseUnreachable,
    ExecFailed,
    ExitCode,
    HeadNotReached,
    Interrupted,
    LockLost,
    LockTimeout,
    MigrateError,
    MigrationFailed,
    TransactionPooling,
    VersionTableBusy,
)

if TYPE_CHECKING:
    import psycopg

    from prosaas_migrate.conninfo import ConnInfo
    from prosaas_migrate.lock import Holder
    from prosaas_migrate.migrations import Upgrade
    from prosaas_migrate.monitor import Watch
    from prosaas_migrate.schema import Position, Reader

HEAD_POLL_INTERVAL = (0.2, 0.5)  # read-only polls of the version table, jittered
PROBE_SECONDS = (2.0, 5.0)  # the pooler probe's wait for a second server session: min, max


@dataclass
class RunState:
    """What an interruption needs to say truthfully."""

    committed: bool = False  # the upgrade committed (a signal now ends nothing half-done)


def run(
    settings: Settings,
    command: Sequence[str],
    *,
    hostname: str,
    clock: Callable[[], float] = time.monotonic,
) -> ExitCode:
    """Migrate when this container is the designated one, then exec `command` (or return 0)."""
    if not settings.run:
        # Unless told to wait for head, this path opens no connection and imports nothing from
        # SQLAlchemy, Alembic or psycopg.
        logs.disabled(settings.decided_by, settings.decided_value)
        if not settings.wait_for_head_seconds:
            return start_service(command)
    else:
        logs.checkpoint(settings.decided_by, settings.decided_value)
    state = RunState()
    try:
        # Signals stay ours until the exec itself, so that none lands unreported.
        with interruptible():
            skipped = settings.run and not migrate(
                settings, hostname=hostname, clock=clock, state=state
            )
            if not settings.run or (skipped and settings.wait_for_head_seconds):
                # A skip means another session holds the lock: with a wait for head, the
                # service starts only once that migration has really reached head.
                wait_for_head(settings, clock=clock)
            return start_service(command)
    except Interrupted as interrupted:
        interrupted.after_commit = state.committed
        raise


def migrate(
    settings: Settings,
    *,
    hostname: str,
    clock: Callable[[], float],
    state: RunState,
) -> bool:
    """Connect, see whether anything is pending, take the lock within the wait budget, upgrade
    to head and release; or start at once (at head), or skip (lock or version table busy).

    False when it skipped (the lock, the version table or the server stayed busy), else True;
    with MIGRATION_ON_LOCK_TIMEOUT=fail a skip raises LockTimeout instead."""
    import psycopg

    from prosaas_migrate import database
    from prosaas_migrate.errors import DatabaseError
    from prosaas_migrate.schema import Reader, target

    started = clock()
    deadline = started + settings.lock_wait_seconds
    goal = target(settings)
    info = goal.info
    assert info is not None  # target() always resolves one
    reader = Reader(goal)
    app_name = database.application_name(hostname)

    def remaining_ms() -> int:
        return database.server_ms((deadline - clock()) * 1000)

    def read_ms() -> int:
        # The server's own timeouts end a little before the client's, so the log says what
        # waited (a locked version table) rather than just "no answer".
        return max(remaining_ms() - 300, database.MIN_READ_TIMEOUT_MS)

    def connect() -> psycopg.Connection[Any]:
        return database.connect(info, deadline=deadline, clock=clock)

    if goal.graph is None:
        # Only Alembic can read this project: load it before connecting, so that a slow import
        # of the app's models never leaves a fresh session idle (idle_session_timeout).
        reader.alembic  # noqa: B018
    conn = connect()
    try:
        try:
            # Everything before the lock ends with the budget, whatever waits: the server, a
            # lock on the version table, or a pooler's queue for a free server.
            with database.answering_within(max(deadline - clock(), 1.0)):
                position = reader.position(conn, read_ms()) if goal.graph else None
                if position is not None and _settled(position, settings, locked=False):
                    return True
                probe = min(max(remaining_ms() / 1000, PROBE_SECONDS[0]), PROBE_SECONDS[1])
                pooled = database.transaction_pooling(conn, info, timeout=probe)
                if pooled:
                    logs.pooler_refused(pooled)
                    raise TransactionPooling(settings.database_url_source or "DATABASE_URL", pooled)
                if position is None:
                    position = reader.position(conn, read_ms())
                    if _settled(position, settings, locked=False):
                        return True
        except (VersionTableBusy, database.NoAnswer) as busy:
            if isinstance(busy, VersionTableBusy):
                logs.version_table_busy(clock() - started, busy.cause)
                return _skip(settings, clock() - started, None)
            logs.no_answer(clock() - started)
            # The lock was never tried: nothing shows that anyone else is migrating.
            return _skip(settings, clock() - started, None, answered=False)
        except TransactionPooling as refused:
            if refused.variable:
                raise
            logs.pooler_refused(refused.reason)
            raise TransactionPooling(
                settings.database_url_source or "DATABASE_URL", refused.reason
            ) from None
        key = lock_key(settings, database.table_name(position.table or database.DEFAULT_TABLE))
        session = {
            "statement_timeout": str(settings.statement_timeout_ms),
            "lock_timeout": str(settings.ddl_lock_timeout_ms),
            "application_name": app_name,
            **database.PEER_CHECKS,
            # Ours for the whole upgrade, idle or not: a server-side idle timeout must not end it.
            **database.OURS_WHILE_MIGRATING,
        }
        database.set_session(conn, session)
        database.verify_durations(
            conn,
            {
                "statement_timeout": (settings.statement_timeout, settings.statement_timeout_ms),
                "lock_timeout": (settings.ddl_lock_timeout, settings.ddl_lock_timeout_ms),
                "idle_session_timeout": ("0", 0),
                "idle_in_transaction_session_timeout": ("0", 0),
            },
        )
        logs.statement_timeout_set(settings.statement_timeout)
        logs.ddl_lock_timeout_set(
            settings.ddl_lock_timeout, settings.ddl_lock_timeout_ms, settings.ddl_lock_retries
        )
        holding = _acquire(conn, key, started, deadline, clock, connect, session, info)
        if isinstance(holding, Skipped):
            return _skip(settings, clock() - started, holding.holder)  # connecting counts too
        conn = holding
        _under_lock(conn, key, reader, session, settings, clock, state)
        return True
    except psycopg.errors.QueryCanceled as exc:
        # Not a lost server: a statement_timeout set on the database or role, say.
        raise DatabaseError(
            "preparing the migration session",
            f"{database.one_line(exc, info)} (a statement_timeout set on the database or role?)",
        ) from None
    except psycopg.OperationalError as exc:
        raise DatabaseUnreachable(
            info.display, clock() - started, 1, database.one_line(exc, info)
        ) from None
    except psycopg.Error as exc:
        raise DatabaseError("checking the schema", database.one_line(exc, info)) from None
    finally:
        conn.close()


def _acquire(
    conn: psycopg.Connection[Any],
    key: int,
    started: float,
    deadline: float,
    clock: Callable[[], float],
    connect: Callable[[], psycopg.Connection[Any]],
    session: dict[str, str],
    info: ConnInfo,
) -> psycopg.Connection[Any] | Skipped:
    """Poll for the lock until the deadline; the (possibly new) connection holding it, or
    Skipped with whoever held it at the end."""
    import psycopg

    from prosaas_migrate import database, lock

    waiting_since = clock()
    while True:
        try:
            acquired, _ = lock.acquire_within(conn, key, deadline, clock=clock)
            break
        except psycopg.OperationalError as exc:
            # A restarted server or a dropped connection: reconnect within the same budget.
            logs.connection_lost(info.display, database.one_line(exc, info))
            conn.close()
            conn = connect()
            database.set_session(conn, session)
    if not acquired:
        try:
            holder = lock.holder(conn, key)  # who is blocking us, now: a runner or not?
        except psycopg.Error:
            holder = None
        conn.close()
        return Skipped(holder)
    logs.lock_acquired(key, clock() - waiting_since)
    return conn


@dataclass(frozen=True)
class Skipped:
    """The lock stayed busy for the whole wait."""

    holder: Holder | None


def _skip(
    settings: Settings, waited: float, holder: Holder | None, *, answered: bool = True
) -> bool:
    """Log the skip (or the failure MIGRATION_ON_LOCK_TIMEOUT=fail asks for); False: skipped.
    `answered` False: the database never answered in time, so the lock was not even tried."""
    fail = settings.on_lock_timeout == "fail"
    logs.lock_timeout(waited, holder, fail=fail, answered=answered)
    if fail:
        raise LockTimeout(waited, holder.describe() if holder else None)
    return False


def _settled(position: Position, settings: Settings, *, locked: bool) -> bool:
    """True when there is nothing to migrate here: at head, or the database is ahead of these
    scripts (a rollback deploy: start, or with MIGRATION_UNKNOWN_REVISION=fail, exit 1)."""
    if position.unknown:
        fail = settings.unknown_revision == "fail"
        logs.database_ahead(position.unknown, position.heads, fail=fail)
        if fail:
            raise DatabaseAhead(position.unknown, position.heads)
        return True
    if position.at_head:
        logs.at_head(position.heads, locked=locked)
        return True
    return False


def _under_lock(
    conn: psycopg.Connection[Any],
    key: int,
    reader: Reader,
    session: dict[str, str],
    settings: Settings,
    clock: Callable[[], float],
    state: RunState,
) -> None:
    """Holding the lock: read the version again, and upgrade if anything is still pending."""
    from prosaas_migrate import lock

    with lock.releasing(conn, key):
        # Whoever held the lock before us may have just migrated. On the fast path this costs
        # one query, and a restart that finds the schema current never imports Alembic.
        if reader.goal.graph is not None:
            position = reader.position(conn, 10_000)
            if _settled(position, settings, locked=True):
                return
        _upgrade_under_lock(conn, key, reader, session, settings, clock, state)


def _upgrade_under_lock(
    conn: psycopg.Connection[Any],
    key: int,
    reader: Reader,
    session: dict[str, str],
    settings: Settings,
    clock: Callable[[], float],
    state: RunState,
) -> None:
    """Upgrade to head while holding the lock: retry lock timeouts, watch the lock, verify."""
    import psycopg

    from prosaas_migrate import concurrent, database, migrations
    from prosaas_migrate.monitor import Monitor, Watch, describe_blockers

    goal = reader.goal
    info = goal.info
    assert info is not None
    lock_pid, lock_identity = database.set_session(conn, session)
    watch = Watch(lock_pid=lock_pid, key=key, app_name=session["application_name"])

    def on_connect(dbapi_connection: Any) -> None:
        pid, identity = database.set_session(dbapi_connection, session)
        if identity == lock_identity:  # the lock's server and database: the monitor's to watch
            watch.opened(dbapi_connection, pid)

    policy = concurrent.Policy(
        session,
        settings.concurrent_statement_timeout_ms,
        on_dropped=lambda build, why: logs.invalid_index_dropped(
            watch.revision, build.display, why
        ),
    )

    def on_statement(dbapi_connection: Any, statement: str) -> None:
        # Work done in autocommit (autocommit_block) is committed as it runs: no rollback
        # undoes it, so a revision that did some must never be retried as a whole.
        if watch.revision is not None and getattr(dbapi_connection, "autocommit", False):
            watch.autocommitted.add(watch.revision)
        policy.before(dbapi_connection, statement)

    def before_commit(_connection: Any) -> None:
        # Asked of the lock session itself (idle, or the very connection committing), so it
        # holds for env.py's own engines and for every database of a multidb project.
        try:
            with database.answering_within(5):  # a frozen lock backend must not hang the commit
                row = _held_by(conn, watch.lock_pid, key)
        except (psycopg.Error, database.NoAnswer):
            row = None
        if not (row and row[0]):
            raise migrations.LockGoneBeforeCommit(watch.lock_pid)

    def monitor_connection() -> Any:
        extra = psycopg.connect(info.text, autocommit=True, connect_timeout=2)
        database.set_session(extra, {**session, "statement_timeout": "2000"})
        return extra

    hooks = migrations.Hooks(
        on_connect=on_connect,
        on_close=watch.closed,
        on_statement=on_statement,
        after_statement=policy.after,
        before_commit=before_commit,
        on_step=lambda revision: watch.running(revision, clock()),
    )
    monitor = Monitor(info, watch, connect=monitor_connection, clock=clock).start()
    try:
        cfg, script, heads = reader.alembic
        ran: list[str] = []  # every revision whose upgrade() completed, all attempts
        attempt = 0
        while True:
            done = migrations.Upgrade()
            try:
                migrations.upgrade(conn, cfg, script, info, done, hooks)
                ran += [r for r in done.ran if r not in ran]
                state.committed = bool(ran)  # a signal from now on ends nothing half-done
                break
            except MigrationFailed as failure:
                ran += [r for r in done.ran if r not in ran]
                blockers = list(watch.blockers)  # what the monitor last saw blocking it
                watch.running(None, clock())
                if (signum := pending_interruption()) is not None:
                    # A signal cancelled the statement, and Alembic's clean-up (its commit in a
                    # `finally:` after an autocommit_block, a rollback) failed in its place: the
                    # interruption is what happened, not a failed migration or a lost lock.
                    if builds := policy.take_failed():
                        logs.invalid_index_cleanup(_drop_invalid(conn, info, session, builds))
                    tried = {*done.ran, *([failure.revision] if failure.revision else [])}
                    interrupted = Interrupted(signum)
                    interrupted.partly = tuple(sorted(watch.autocommitted & tried))
                    raise interrupted from failure
                if builds := policy.take_failed():
                    failure.cause += "; " + _drop_invalid(conn, info, session, builds)
                _raise_if_lock_lost(failure, conn, watch)
                tried = {*done.ran, *([failure.revision] if failure.revision else [])}
                partly = sorted(watch.autocommitted & tried)
                lock_timeout = migrations.sqlstate(failure.original) == "55P03"
                if lock_timeout:
                    failure.cause += "; blocked by " + (
                        "; ".join(describe_blockers(blockers)) or _UNSEEN_BLOCKER
                    )
                if not lock_timeout or attempt >= settings.ddl_lock_retries or partly:
                    if lock_timeout and partly:
                        failure.cause += (
                            f"; not retried: {', '.join(partly)} committed work outside a "
                            "transaction (autocommit_block) that a retry would run again"
                        )
                    raise _accounted(failure, conn, reader, done, partly) from failure.original
                attempt += 1
                delay = _retry_delay(attempt)
                logs.ddl_lock_retry(
                    failure.revision,
                    attempt,
                    settings.ddl_lock_retries,
                    delay,
                    describe_blockers(blockers) or [_UNSEEN_BLOCKER],
                    [b.as_dict() for b in blockers[:10]],
                )
                time.sleep(delay)
            except Interrupted:
                if builds := policy.take_failed():
                    # Before the interruption is reported: no invalid index may crash-loop
                    # the next start (that one also drops it before building it again).
                    logs.invalid_index_cleanup(_drop_invalid(conn, info, session, builds))
                raise
        # The upgrade is over: nothing is running any more, so the monitor has nothing left to
        # report, and no progress line may follow the outcome.
        watch.running(None, clock())
        monitor.stop()
        try:
            with database.answering_within(30):
                now = reader.committed(conn, done.states)
        except (psycopg.OperationalError, database.NoAnswer) as exc:
            raise LockLost(
                key,
                f"the lock session stopped answering after the upgrade "
                f"({database.one_line(exc, info)})",
                consequence="The upgrade itself had finished; check where the schema stands "
                "with `prosaas-migrate status` before trusting it",
            ) from None
        _, script, _ = reader.alembic
        kept = migrations.committed(script, now.current)
        if not now.at_head:
            raise MigrationFailed(
                None,
                f"the upgrade ended at {list(now.current) or 'base'}, not head "
                f"{list(heads)}: it was not committed",
                rolled_back=[r for r in ran if r not in kept],
                committed=[r for r in ran if r in kept],
            )
        if ran:
            logs.migrations_done([r for r in ran if r in kept], heads)
        else:
            logs.at_head(heads, locked=True)
    finally:
        monitor.stop()


def _held_by(conn: psycopg.Connection[Any], lock_pid: int, key: int) -> Any:
    """Whether the lock session still holds the lock, asked on that session without leaving
    it in a transaction: an idle session of ours with a snapshot would stall every concurrent
    build until the DDL lock timeout cancelled it."""
    import psycopg

    from prosaas_migrate.lock import HELD_BY_SQL

    idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    row = conn.execute(HELD_BY_SQL, [lock_pid, key]).fetchone()
    if idle and not conn.autocommit:
        conn.rollback()  # the transaction this read opened, and nothing else
    return row


CLEANUP_TIMEOUT_MS = 30_000  # how long dropping an invalid index may wait for its table's users


def _drop_invalid(
    conn: psycopg.Connection[Any],
    info: ConnInfo,
    session: dict[str, str],
    builds: Sequence[Any],
) -> str:
    """Drop each invalid index a failed concurrent build left; say what was done, per index."""
    import psycopg

    from prosaas_migrate import concurrent, database

    said: list[str] = []
    extra = None
    try:
        target = conn
        if conn.closed or conn.broken:
            extra = psycopg.connect(info.text, autocommit=True, connect_timeout=5)
            target = extra
        else:
            if target.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                target.rollback()
            target.autocommit = True
        database.set_session(
            target,
            {
                "application_name": session["application_name"],
                "lock_timeout": "0",
                "statement_timeout": str(CLEANUP_TIMEOUT_MS),
            },
        )
        for build in builds:
            try:
                if concurrent.drop_if_invalid(target, build):
                    said.append(
                        f"dropped the invalid index {build.display} the failed build left "
                        "(DROP INDEX CONCURRENTLY), so the next start builds it again"
                    )
                else:
                    said.append(f"the failed build left no invalid index {build.display}")
            except psycopg.Error as exc:
                said.append(
                    f"could not drop the invalid index {build.display} "
                    f"({database.one_line(exc, info)}): the next start drops it before "
                    "building it again"
                )
        if target is conn:
            database.set_session(conn, session)
    except psycopg.Error as exc:
        names = ", ".join(build.display for build in builds)
        said.append(
            f"could not drop the invalid index(es) {names} ({database.one_line(exc, info)}): "
            "the next start drops them before building them again"
        )
    finally:
        if extra is not None:
            extra.close()
    return "; ".join(said)


_UNSEEN_BLOCKER = "a session that ended (or was not caught) before it could be named"
RETRY_DELAY = (1.0, 30.0)  # the first retry's delay, and the cap, in seconds


def _retry_delay(attempt: int) -> float:
    """About 1 s, doubling with each attempt, at most 30 s; jittered so runners spread out."""
    base = min(RETRY_DELAY[0] * 2.0 ** min(attempt - 1, 10), RETRY_DELAY[1])
    return float(min(base * random.uniform(0.75, 1.25), RETRY_DELAY[1]))


def _raise_if_lock_lost(
    failure: MigrationFailed, conn: psycopg.Connection[Any], watch: Watch
) -> None:
    """A failure caused by the lock session's end is one thing to report: the lost lock."""
    from prosaas_migrate.migrations import LockGoneBeforeCommit

    gone = conn.closed or conn.broken
    vetoed = isinstance(failure.original, LockGoneBeforeCommit)
    if not (gone or vetoed or watch.lock_lost):
        return
    reason = watch.lock_lost or f"the lock session (pid {watch.lock_pid}) no longer holds it"
    where = f"revision {failure.revision}" if failure.revision else "the upgrade"
    if watch.lock_lost and not vetoed:
        what = "the running revision was cancelled and rolled back"
    elif vetoed:
        what = "its commit was vetoed and it was rolled back"
    else:
        what = "it ran on the lock session and was rolled back with it"
    partly = sorted(watch.autocommitted)
    consequence = f"Nothing was committed after the lock was lost: {what}"
    if partly:
        consequence += (
            f"; but {', '.join(partly)} had committed work outside a transaction "
            "(autocommit_block) before that, which stays"
        )
    raise LockLost(
        watch.key,
        f"{reason}, during {where} ({failure.cause})",
        consequence=consequence + ". Another runner may be migrating now",
    ) from None


def _accounted(
    failure: MigrationFailed,
    conn: psycopg.Connection[Any],
    reader: Reader,
    done: Upgrade,
    partly: Sequence[str] = (),
) -> MigrationFailed:
    """The failure, saying which revisions that ran are rolled back and which stayed committed
    (with transaction_per_migration, those before the failing one commit one by one)."""
    from prosaas_migrate import migrations

    ran = [*done.ran, *([failure.revision] if failure.revision else [])]
    try:
        if conn.closed or conn.broken:
            raise ValueError("the lock connection is gone")
        position = reader.committed(conn, done.states)
        _, script, _ = reader.alembic
        kept = migrations.committed(script, position.current)
    except Exception:
        return MigrationFailed(failure.revision, failure.cause, rolled_back=ran, partly=partly)
    revision, cause = failure.revision, failure.cause
    if revision is not None and revision in kept:
        # It committed: what failed came after it (env.py's own code, say), not the revision.
        revision, cause = None, f"after revision {revision} committed: {cause}"
    return MigrationFailed(
        revision,
        cause,
        rolled_back=[r for r in ran if r not in kept],
        committed=[r for r in ran if r in kept],
        partly=partly,
    )


def wait_for_head(
    settings: Settings,
    *,
    clock: Callable[[], float],
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll, read-only and without the lock, until the database is at the scripts' head."""
    import psycopg

    from prosaas_migrate import database
    from prosaas_migrate.errors import DatabaseError
    from prosaas_migrate.schema import Reader, target

    started = clock()
    deadline = started + settings.wait_for_head_seconds
    goal = target(settings)
    info = goal.info
    assert info is not None  # target() always resolves one
    reader = Reader(goal)
    if goal.graph is None:
        reader.alembic  # noqa: B018 - loaded before connecting, as in migrate()
    conn: psycopg.Connection[Any] | None = None
    current: tuple[str, ...] = ()
    heads: tuple[str, ...] = goal.graph.heads if goal.graph else ()
    problem: str | None = None
    next_report = started
    try:
        while True:
            try:
                if conn is None:
                    conn = database.connect(info, deadline=deadline, clock=clock)
                remaining = min(max(int((deadline - clock()) * 1000), 0), 5000)
                with database.answering_within(remaining / 1000 + 0.5):
                    position = reader.position(conn, remaining)
                current, heads, problem = position.current, position.heads, None
                if position.unknown:
                    # A worker of the old image must not refuse to start because the schema
                    # is ahead of it: the same rule as the migrating container.
                    _settled(position, settings, locked=False)
                    return
                if position.at_head:
                    logs.head_reached(heads, clock() - started)
                    return
            except VersionTableBusy:
                problem = "the version table is locked by a running migration"
            except database.NoAnswer as exc:
                problem = f"the database did not answer ({exc})"
                if conn is not None:
                    conn.close()  # mid-query: unusable
                conn = None
            except TransactionPooling as refused:
                variable = settings.database_url_source or "DATABASE_URL"
                failure = TransactionPooling(variable, refused.reason)
                logs.error(f"{failure}; the version cannot be read through it")
                raise failure from None
            except psycopg.OperationalError as exc:
                logs.connection_lost(info.display, database.one_line(exc, info))
                if conn is not None:
                    conn.close()
                conn = None
            except (psycopg.Error, DatabaseError) as exc:
                # No privilege yet, say: it may be granted (or the table created) in time.
                text = str(exc) if isinstance(exc, DatabaseError) else database.one_line(exc)
                if text != problem:
                    logs.read_problem(text)
                problem = text
            now = clock()
            if now >= deadline:
                logs.head_not_reached(heads, current, now - started, problem)
                raise HeadNotReached(heads, current, now - started)
            if now >= next_report:
                logs.waiting_for_head(heads, current, now - started)
                next_report = now + logs.REPORT_EVERY_SECONDS
            sleep(min(random.uniform(*HEAD_POLL_INTERVAL), deadline - now))
    finally:
        if conn is not None:
            conn.close()


def start_service(command: Sequence[str]) -> ExitCode:
    """Replace this process with `command` (same PID); with no command, report and return 0."""
    if not command:
        logs.no_command()
        return ExitCode.OK
    if not command[0]:
        raise ExecFailed("''", "ENOENT", "an empty command name", not_found=True)
    logs.exec_service(command)
    for stream in (sys.stdout, sys.stderr):
        # A closed or full stream (`>&-`, /dev/full) must not keep the service from starting.
        with suppress(OSError, ValueError, AttributeError):
            stream.flush()
    # Python ignores SIGPIPE and SIGXFSZ; an ignored signal stays ignored across exec.
    for signum in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    try:
        os.execvp(command[0], list(command))
    except OSError as exc:
        raise ExecFailed(
            command[0],
            _errno_name(exc.errno),
            exc.strerror or str(exc),
            not_found=isinstance(exc, FileNotFoundError),
        ) from None
    raise AssertionError("os.execvp returned")  # pragma: no cover


_INTERRUPTED: list[int] = []  # the signal that interrupted this run, once one did


def pending_interruption() -> int | None:
    """The signal that interrupted the run, if one did (its Interrupted may have been replaced
    by what a clean-up raised on the way out)."""
    return _INTERRUPTED[0] if _INTERRUPTED else None


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn the first SIGTERM/SIGINT into Interrupted; later ones wait for the clean-up to end.

    Whatever a clean-up raises in the interruption's place on the way out (Alembic commits in
    a `finally:`) does not replace it: the run exits 128+N with the interruption line.
    """
    _INTERRUPTED.clear()

    def handle(signum: int, _frame: FrameType | None) -> None:
        if not _INTERRUPTED:
            _INTERRUPTED.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        in_flight = sys.exc_info()[1]
        # A signal that landed during clean-up still means: do not start the service.
        if _INTERRUPTED and in_flight is None:
            raise Interrupted(_INTERRUPTED[0])
        if _INTERRUPTED and isinstance(in_flight, MigrateError):
            raise Interrupted(_INTERRUPTED[0]) from in_flight


def _errno_name(number: int | None) -> str:
    import errno

    return errno.errorcode.get(number or 0, "EUNKNOWN")
