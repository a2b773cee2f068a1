"""The only module that imports Alembic (online): load the project, read versions, upgrade.

env.py always runs as the project wrote it. The locked connection is offered as
config.attributes["connection"] (Alembic's cookbook); an env.py that builds its own engine (the
stock `alembic init` templates, sync or asyncio) gets the URL through sqlalchemy.url, and hooks
on every SQLAlchemy pool and engine apply our session settings to each connection it opens.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, MigrationStep
from alembic.script import Script, ScriptDirectory
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import Pool, StaticPool

from prosaas_migrate import compat, database, logs
from prosaas_migrate.conninfo import ConnInfo, scrub, sqlalchemy_url
from prosaas_migrate.errors import (
    ConfigError,
    DatabaseError,
    MigrationFailed,
    ProjectBroken,
    VersionTableBusy,
)

if TYPE_CHECKING:
    from prosaas_migrate.database import VersionTable
    from prosaas_migrate.revisions import Project

OnConnect = Callable[[Any], None]  # a DB-API connection any engine has just opened
OnStep = Callable[[str | None], None]  # the revision now running (None: between revisions)


def _nothing(*_args: Any) -> None:
    return None


@dataclass(frozen=True)
class Hooks:
    """What the runner wants to hear from every SQLAlchemy engine env.py uses."""

    on_connect: OnConnect = _nothing  # a DB-API connection was opened
    on_close: Callable[[Any], None] = _nothing  # ... was closed
    on_statement: Callable[[Any, str], None] = _nothing  # ... is about to run a statement
    after_statement: Callable[[Any], None] = _nothing  # ... ran it without error
    before_commit: BeforeCommit | None = None  # raise to veto the commit
    on_step: OnStep = _nothing


class LockGoneBeforeCommit(Exception):
    """Raised from the commit hook to veto a commit once the lock session lost the lock."""

    def __init__(self, lock_pid: int) -> None:
        super().__init__(f"the lock session (pid {lock_pid}) no longer holds the lock at commit")


BeforeCommit = Callable[[Connection], None]  # raise to veto a commit


@dataclass(frozen=True)
class VersionState:
    """One version table as a MigrationContext of the project's env.py sees it."""

    table: VersionTable  # (schema or None, name)
    current: tuple[str, ...]


@dataclass
class Upgrade:
    """What an upgrade did: revisions whose upgrade() completed, in order, and where."""

    ran: list[str] = field(default_factory=list)
    running: str | None = None
    states: list[VersionState] = field(default_factory=list)


def load_config(project: Project, info: ConnInfo | None, engines: dict[str, ConnInfo]) -> Config:
    """Alembic's Config for the project, with the URL(s) to migrate with, in psycopg 3 form."""
    ini = project.ini_path if os.path.isfile(project.ini_path) else None
    cfg = compat.new_config(ini, project.toml_path)
    if info is not None:
        cfg.set_main_option("sqlalchemy.url", _ini_escape(sqlalchemy_url(info)))
    for name, engine in engines.items():
        cfg.set_section_option(name, "sqlalchemy.url", _ini_escape(sqlalchemy_url(engine)))
    return cfg


def _ini_escape(url: str) -> str:
    return url.replace("%", "%%")  # configparser interpolation


def script_directory(cfg: Config) -> ScriptDirectory:
    """The scripts, every revision file loaded now, so that a broken one is named here."""
    try:
        script = ScriptDirectory.from_config(cfg)
    except Exception as exc:  # CommandError, or a malformed [tool.alembic] value (TypeError)
        where = compat.config_file_name(cfg)
        raise ConfigError(
            "ALEMBIC_CONFIG", where, f"a usable Alembic config ({describe(exc)})"
        ) from None
    try:
        # Loading runs the revision modules: what they print is the project's output too.
        with logs.foreign_output_as_events("revisions"):
            script.revision_map.heads  # noqa: B018 - loads (and so checks) every revision file
    except (Exception, SystemExit) as exc:
        raise ProjectBroken(_where(exc, script), describe(exc)) from None
    return script


def heads(script: ScriptDirectory) -> tuple[str, ...]:
    return tuple(sorted(script.get_heads()))


def known(script: ScriptDirectory, revision: str) -> bool:
    """Whether these scripts have `revision` (a database ahead of them has others)."""
    try:
        return script.revision_map.get_revision(revision) is not None
    except Exception:
        return False


def resolved(script: ScriptDirectory, current: tuple[str, ...]) -> tuple[str, ...]:
    """The recorded ids as Alembic reads them (a unique prefix stands for the whole id)."""
    full = []
    for revision in current:
        try:
            found = script.revision_map.get_revision(revision)
        except Exception:
            found = None
        full.append(found.revision if found is not None else revision)
    return tuple(sorted(full))


def pending(script: ScriptDirectory, current: tuple[str, ...]) -> list[Script]:
    """The revisions an upgrade to head would apply, in order; CommandError for unknown ones."""
    found = script.iterate_revisions("heads", current, implicit_base=True)
    return [revision for revision in reversed(list(found)) if isinstance(revision, Script)]


def committed(script: ScriptDirectory, current: tuple[str, ...]) -> set[str]:
    """Every revision at or below `current`: what the database really has."""
    if not current:
        return set()
    try:
        found = script.iterate_revisions(current, "base")
    except Exception:
        return set(current)
    return {revision.revision for revision in found if isinstance(revision, Script)}


@contextmanager
def _session(
    conn: psycopg.Connection[Any], info: ConnInfo | None, hooks: Hooks
) -> Iterator[Connection]:
    """A SQLAlchemy Connection over `conn`, with hooks on every engine env.py may create."""
    conn.autocommit = False
    url = sqlalchemy_url(info) if info is not None else "postgresql+psycopg://"
    engine = create_engine(url, creator=lambda: conn, poolclass=StaticPool)

    def opened(dbapi_connection: Any, _record: Any) -> None:
        hooks.on_connect(dbapi_connection)

    def closed(dbapi_connection: Any, _record: Any) -> None:
        hooks.on_close(dbapi_connection)

    def statement(connection: Connection, _cursor: Any, text: str, *_args: Any) -> None:
        hooks.on_statement(connection.connection.dbapi_connection, text)

    def statement_ran(connection: Connection, *_args: Any) -> None:
        hooks.after_statement(connection.connection.dbapi_connection)

    def commit_guard(connection: Connection) -> None:
        if hooks.before_commit is not None:
            hooks.before_commit(connection)

    listeners: list[tuple[Any, str, Callable[..., None]]] = [
        (Pool, "connect", opened),
        (Pool, "close", closed),
        (Engine, "before_cursor_execute", statement),
        (Engine, "after_cursor_execute", statement_ran),
        (Engine, "commit", commit_guard),
    ]
    for target, name, listener in listeners:
        event.listen(target, name, listener)
    try:
        with engine.connect() as connection:
            yield connection
            # The cookbook's caller commits (engine.begin()); an env.py that left a transaction
            # open would otherwise be rolled back silently when the connection closes.
            if connection.in_transaction():
                connection.commit()
    finally:
        for target, name, listener in listeners:
            event.remove(target, name, listener)
        if not conn.closed:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()
            conn.autocommit = True


def read_versions(
    cfg: Config,
    script: ScriptDirectory,
    conn: psycopg.Connection[Any],
    info: ConnInfo | None,
    *,
    timeout: float,
) -> list[VersionState]:
    """Each version table env.py uses and what it holds, read-only (Alembic's `current`).

    Nothing is set on the sessions env.py opens (they may go through a pooler that would hand
    a setting on to another client); instead every statement still running after `timeout`
    seconds is cancelled, which a blocked lock wait is too, and VersionTableBusy is raised.
    """
    import threading

    states: list[VersionState] = []
    opened: list[Any] = [conn]

    def record(rev: Any, context: MigrationContext) -> list[MigrationStep]:
        table = (context.version_table_schema, context.version_table)
        states.append(VersionState(table, tuple(sorted(context.get_current_heads()))))
        return []

    def cancel_all() -> None:
        for connection in opened:
            _cancel(connection)

    watchdog = threading.Timer(database.timer_seconds(max(timeout, 0.05)), cancel_all)
    watchdog.daemon = True
    watchdog.start()
    try:
        with (
            logs.foreign_output_as_events("env.py"),
            _session(conn, info, Hooks(on_connect=opened.append)) as connection,
        ):
            cfg.attributes["connection"] = connection
            with EnvironmentContext(cfg, script, fn=record, as_sql=False, dont_mutate=True):
                script.run_env()
            connection.rollback()
    except (Exception, SystemExit) as exc:
        cause = getattr(exc, "orig", None) or exc
        if isinstance(cause, psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled):
            raise VersionTableBusy(int(timeout * 1000), describe(exc, info)) from None
        if isinstance(cause, psycopg.OperationalError):
            raise cause from None  # the connection failed: the caller knows what that means
        if isinstance(cause, psycopg.Error):
            raise DatabaseError("reading the version table", describe(exc, info)) from None
        raise ProjectBroken(_where(exc, script), describe(exc, info)) from None
    finally:
        watchdog.cancel()
        cfg.attributes.pop("connection", None)
    return states


def _cancel(dbapi_connection: Any) -> None:
    """Cancel whatever `dbapi_connection` (psycopg, or SQLAlchemy's asyncio adapter of it) runs."""
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    with suppress(Exception):  # closed meanwhile: nothing left to cancel
        driver.pgconn.get_cancel().cancel()


def upgrade(
    conn: psycopg.Connection[Any],
    cfg: Config,
    script: ScriptDirectory,
    info: ConnInfo | None,
    done: Upgrade,
    hooks: Hooks,
) -> None:
    """Run `alembic upgrade head` with `conn` (the locked connection) offered to env.py.

    `done` records what ran, as it runs; MigrationFailed names the revision that failed. An
    env.py that calls sys.exit() is a failure too, never a way out of the runner.
    """
    tracker = _StepTracker(script, done, hooks.on_step)
    try:
        with (
            logs.foreign_output_as_events("env.py"),
            _session(conn, info, hooks) as connection,
        ):
            cfg.attributes["connection"] = connection
            with EnvironmentContext(
                cfg, script, fn=tracker.steps, destination_rev="heads", as_sql=False
            ):
                script.run_env()
        tracker.finish()
    except (Exception, SystemExit) as exc:
        cause = describe(exc, info)
        if line := _project_line(exc, _project_folders(script)):
            cause += f" (at {line})"  # a Python error in a revision, or the statement's call
        raise MigrationFailed(done.running, cause, original=exc) from exc
    finally:
        cfg.attributes.pop("connection", None)


class _StepTracker:
    """Hands Alembic its upgrade steps one at a time, to log each and name the one that fails."""

    def __init__(self, script: ScriptDirectory, done: Upgrade, on_step: OnStep) -> None:
        self.script = script
        self.done = done
        self.on_step = on_step
        self._doc: str | None = None
        self._context: MigrationContext | None = None

    def steps(self, rev: Any, context: MigrationContext) -> Iterator[MigrationStep]:
        self._context = context
        table = (context.version_table_schema, context.version_table)
        self.done.states.append(VersionState(table, tuple(sorted(rev))))
        # Alembic pulls the next step only once the previous one ran without error.
        for revision in pending(self.script, tuple(rev)):
            self.finish()
            self.done.running, self._doc = revision.revision, revision.doc
            logs.applying(revision.revision, revision.doc)
            self.on_step(revision.revision)
            yield MigrationStep.upgrade_from_script(self.script.revision_map, revision)

    def finish(self) -> None:
        if self.done.running is not None:
            logs.ran(self.done.running, self._doc, committed=self._committed())
            self.done.ran.append(self.done.running)
            self.done.running = None
            self.on_step(None)

    def _committed(self) -> bool:
        """Whether the step that just ran is committed: Alembic pulls the next step only after
        the step's own transaction block ended, and with transaction_per_migration that block
        committed it. Asked of the connection, not of the option: an env.py transaction around
        the run (connection.begin()) keeps the per-migration blocks from committing."""
        context = self._context
        if context is None or context.as_sql or not context.opts.get("transaction_per_migration"):
            return False
        connection = context.connection
        return connection is not None and not connection.in_transaction()


def describe(exc: BaseException, info: ConnInfo | None = None) -> str:
    """One line of the error: the original driver error when SQLAlchemy wrapped it."""
    cause = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    text = f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return scrub(text, info.secrets) if info else text


def sqlstate(exc: BaseException | None) -> str | None:
    """The SQLSTATE behind a (possibly SQLAlchemy-wrapped) driver error."""
    cause = getattr(exc, "orig", None) or exc
    return getattr(cause, "sqlstate", None)


def _project_folders(script: ScriptDirectory) -> list[str]:
    """The folders of the project's own scripts: env.py's, and every version location (which
    `version_locations` may put anywhere, env.py too, as it runs)."""
    from alembic.util import coerce_resource_to_filename  # "package:folder" too, as Alembic

    folders = [script.dir]
    for location in script.version_locations or [script.versions]:  # None before Alembic 1.16
        try:
            folders.append(os.fspath(coerce_resource_to_filename(location)))
        except Exception:  # what Alembic itself could not resolve cannot hold a revision
            continue
    return folders


def _where(exc: BaseException, script: ScriptDirectory) -> str:
    """The file (and line) of the project that the error comes from."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{os.path.relpath(exc.filename)}:{exc.lineno}"
    folders = _project_folders(script)
    # Alembic names a file without `revision` in its message only ("... from filename x.py").
    named = re.search(r"from filename (\S+\.py)\b", str(exc))
    if named:
        found = sorted(path for folder in folders for path in Path(folder).rglob(named.group(1)))
        if found:
            return os.path.relpath(found[0])
    return _project_line(exc, folders) or os.path.relpath(script.dir)


def _project_line(exc: BaseException, folders: list[str]) -> str | None:
    """file:line of the innermost frame of the project's scripts (a revision, env.py) that the
    error passed through, or None."""
    roots = tuple(os.path.abspath(folder) + os.sep for folder in folders)
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if os.path.abspath(frame.filename).startswith(roots)
    ]
    if frames:
        return f"{os.path.relpath(frames[-1].filename)}:{frames[-1].lineno}"
    return None
