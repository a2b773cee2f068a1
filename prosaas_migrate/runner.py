"""The run flow: decide -> connect -> lock -> upgrade -> release -> exec."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

from prosaas_migrate import logs
from prosaas_migrate.config import Settings, migration_url
from prosaas_migrate.errors import ExecFailed, ExitCode, Interrupted

if TYPE_CHECKING:
    from prosaas_migrate.revisions import AlembicIni


def run(
    settings: Settings,
    command: Sequence[str],
    *,
    hostname: str,
    clock: Callable[[], float] = time.monotonic,
) -> ExitCode:
    """Migrate when this container is the designated one, then exec `command` (or return 0)."""
    if not settings.run:
        # This path opens no connection and imports nothing from SQLAlchemy, Alembic or psycopg.
        logs.disabled(settings.decided_by, settings.decided_value)
    else:
        logs.checkpoint(settings.decided_by, settings.decided_value)
        with interruptible():
            migrate(settings, hostname=hostname, clock=clock)
    return start_service(command)


def migrate(settings: Settings, *, hostname: str, clock: Callable[[], float]) -> None:
    """Connect, take the lock within the wait budget, upgrade to head, release; or skip."""
    from prosaas_migrate import database, lock, revisions

    deadline = clock() + settings.lock_wait_seconds
    ini = revisions.read_ini(settings.alembic_config, settings.alembic_config_source)
    url = migration_url(settings, ini.url)
    # Known before waiting, so that a freed lock is followed by one query, not file reading.
    target = revisions.heads(ini) or _alembic_heads(ini)
    app_name = database.application_name(hostname)

    def session_setup(connection: Any) -> None:
        database.set_session_settings(connection, settings.statement_timeout_ms, app_name)

    with database.connect(url, app_name=app_name, deadline=deadline, clock=clock) as conn:
        # Routine restarts on an unchanged schema must not queue on the lock behind a migrator.
        if database.current_revisions(conn) == target:
            logs.at_head(target, locked=False)
            return
        session_setup(conn)
        database.verify_statement_timeout(
            conn, settings.statement_timeout, settings.statement_timeout_ms
        )
        logs.statement_timeout_set(settings.statement_timeout)
        with lock.held(conn, settings.lock_key, deadline, clock=clock) as (acquired, waited):
            if not acquired:
                logs.lock_timeout(waited)
                return
            # Re-read under the lock: whoever held it before us may have just migrated.
            if database.current_revisions(conn) == target:
                logs.at_head(target, locked=True)
                return
            from prosaas_migrate import migrations

            cfg = migrations.load_config(ini)
            script = migrations.script_directory(cfg)
            target = migrations.heads(script)
            count = migrations.upgrade_to_head(conn, cfg, script, url, session_setup)
            logs.migrations_done(count, target)


def _alembic_heads(ini: AlembicIni) -> tuple[str, ...]:
    from prosaas_migrate import migrations

    return migrations.heads(migrations.script_directory(migrations.load_config(ini)))


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
