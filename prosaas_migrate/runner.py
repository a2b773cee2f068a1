"""The run flow: decide -> connect -> lock -> upgrade -> release -> exec."""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

from prosaas_migrate import logs
from prosaas_migrate.config import Settings, migration_url, redact_url
from prosaas_migrate.errors import (
    DatabaseUnreachable,
    ExecFailed,
    ExitCode,
    HeadNotReached,
    Interrupted,
    TransactionPooling,
)

if TYPE_CHECKING:
    from prosaas_migrate.revisions import AlembicIni

HEAD_POLL_INTERVAL = (0.2, 0.5)  # read-only polls of the version table, jittered


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
        if settings.wait_for_head_seconds:
            with interruptible():
                wait_for_head(settings, hostname=hostname, clock=clock)
    else:
        logs.checkpoint(settings.decided_by, settings.decided_value)
        with interruptible():
            migrate(settings, hostname=hostname, clock=clock)
    return start_service(command)


def migrate(settings: Settings, *, hostname: str, clock: Callable[[], float]) -> None:
    """Connect, take the lock within the wait budget, upgrade to head, release; or skip."""
    import psycopg

    from prosaas_migrate import database, lock

    started = clock()
    deadline = started + settings.lock_wait_seconds
    ini, url, target = _project(settings)
    app_name = database.application_name(hostname)

    def session_setup(connection: Any) -> None:
        database.set_session_settings(connection, settings.statement_timeout_ms, app_name)

    def connect() -> Any:
        return database.connect(url, app_name=app_name, deadline=deadline, clock=clock)

    conn = connect()
    try:
        # Routine restarts on an unchanged schema must not queue on the lock behind a migrator.
        if database.current_revisions(conn) == target:
            logs.at_head(target, locked=False)
            return
        pooled = database.transaction_pooling(conn, url)
        if pooled:
            logs.pooler_refused(pooled)
            raise TransactionPooling(settings.database_url_source or "DATABASE_URL", pooled)
        session_setup(conn)
        database.verify_statement_timeout(
            conn, settings.statement_timeout, settings.statement_timeout_ms
        )
        logs.statement_timeout_set(settings.statement_timeout)
        waiting_since = clock()
        while True:
            try:
                acquired, _ = lock.acquire_within(conn, settings.lock_key, deadline, clock=clock)
                break
            except psycopg.OperationalError as exc:
                # A restarted server or a dropped connection: reconnect within the same budget.
                logs.connection_lost(redact_url(url), _one_line(exc))
                conn.close()
                conn = connect()
                session_setup(conn)
        waited = clock() - waiting_since
        if not acquired:
            logs.lock_timeout(waited)
            return
        logs.lock_acquired(settings.lock_key, waited)
        with lock.releasing(conn, settings.lock_key):
            # Re-read under the lock: whoever held it before us may have just migrated.
            if database.current_revisions(conn) == target:
                logs.at_head(target, locked=True)
                return
            from prosaas_migrate import migrations

            cfg = migrations.load_config(ini)
            script = migrations.script_directory(cfg)
            count = migrations.upgrade_to_head(conn, cfg, script, url, session_setup)
            logs.migrations_done(count, migrations.heads(script))
    except psycopg.OperationalError as exc:
        raise DatabaseUnreachable(redact_url(url), clock() - started, 1, _one_line(exc)) from None
    finally:
        conn.close()


def wait_for_head(
    settings: Settings,
    *,
    hostname: str,
    clock: Callable[[], float],
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll, read-only and without the lock, until the database is at the scripts' head."""
    import psycopg

    from prosaas_migrate import database

    started = clock()
    deadline = started + settings.wait_for_head_seconds
    _, url, target = _project(settings)
    app_name = database.application_name(hostname)
    conn = None
    current: tuple[str, ...] = ()
    next_report = started
    try:
        while True:
            try:
                if conn is None:
                    conn = database.connect(url, app_name=app_name, deadline=deadline, clock=clock)
                current = database.current_revisions(conn)
            except psycopg.OperationalError as exc:
                logs.connection_lost(redact_url(url), _one_line(exc))
                if conn is not None:
                    conn.close()
                conn = None
            now = clock()
            if current == target:
                logs.head_reached(target, now - started)
                return
            if now >= deadline:
                logs.head_not_reached(target, current, now - started)
                raise HeadNotReached(target, current, now - started)
            if now >= next_report:
                logs.waiting_for_head(target, current, now - started)
                next_report = now + logs.REPORT_EVERY_SECONDS
            sleep(min(random.uniform(*HEAD_POLL_INTERVAL), deadline - now))
    finally:
        if conn is not None:
            conn.close()


def _project(settings: Settings) -> tuple[AlembicIni, str, tuple[str, ...]]:
    """The ini, the URL to use and the scripts' heads, read before anything connects."""
    from prosaas_migrate import revisions

    ini = revisions.read_ini(settings.alembic_config, settings.alembic_config_source)
    url = migration_url(settings, ini.url)
    # Known before waiting, so that a freed lock is followed by one query, not file reading.
    return ini, url, revisions.heads(ini) or _alembic_heads(ini)


def _alembic_heads(ini: AlembicIni) -> tuple[str, ...]:
    from prosaas_migrate import migrations

    return migrations.heads(migrations.script_directory(migrations.load_config(ini)))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def start_service(command: Sequence[str]) -> ExitCode:
    """Replace this process with `command` (same PID); with no command, report and return 0."""
    if not command:
        logs.no_command()
        return ExitCode.OK
    logs.exec_service(command)
    sys.stdout.flush()
    sys.stderr.flush()
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


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn the first SIGTERM/SIGINT into Interrupted; later ones wait for the clean-up to end."""
    interrupted: list[int] = []

    def handle(signum: int, _frame: FrameType | None) -> None:
        if not interrupted:
            interrupted.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        # A signal that landed during clean-up still means: do not start the service.
        if interrupted and sys.exc_info()[0] is None:
            raise Interrupted(interrupted[0])


def _errno_name(number: int | None) -> str:
    import errno

    return errno.errorcode.get(number or 0, "EUNKNOWN")
