"""The only module that imports Alembic: read the project, compare revisions, upgrade to head."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, MigrationStep
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import create_engine, event
from sqlalchemy.pool import Pool, StaticPool

from prosaas_migrate import logs
from prosaas_migrate.database import current_revisions
from prosaas_migrate.errors import ConfigError, MigrationFailed
from prosaas_migrate.revisions import AlembicIni


def load_config(ini: AlembicIni) -> Config:
    return Config(ini.path)


def script_directory(cfg: Config) -> ScriptDirectory:
    try:
        return ScriptDirectory.from_config(cfg)
    except CommandError as exc:
        raise ConfigError("ALEMBIC_CONFIG", cfg.config_file_name, str(exc)) from None


def heads(script: ScriptDirectory) -> tuple[str, ...]:
    return tuple(sorted(script.get_heads()))


def pending(script: ScriptDirectory, current: tuple[str, ...]) -> list[Script]:
    """The revisions an upgrade to head would apply, in order; CommandError for unknown ones."""
    found = script.iterate_revisions("heads", current, implicit_base=True)
    return [revision for revision in reversed(list(found)) if isinstance(revision, Script)]


def sqlalchemy_url(url: str) -> str:
    """Name the psycopg 3 driver explicitly, so SQLAlchemy never falls back to psycopg2."""
    return "postgresql+psycopg://" + url.partition("://")[2]


def upgrade_to_head(
    conn: psycopg.Connection[Any],
    cfg: Config,
    script: ScriptDirectory,
    url: str,
    on_connect: Callable[[psycopg.Connection[Any]], None],
) -> int:
    """Run `alembic upgrade head` on `conn` (the locked connection); return revisions applied.

    env.py gets the connection as config.attributes["connection"] (Alembic's cookbook); a stock
    env.py that builds its own engine gets the URL through sqlalchemy.url, and `on_connect` runs
    on every connection any engine opens meanwhile, so statement_timeout holds there too.
    """
    conn.autocommit = False
    engine = create_engine(sqlalchemy_url(url), creator=lambda: conn, poolclass=StaticPool)
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    tracker = _StepTracker(script)

    def session_setup(dbapi_connection: Any, _record: Any) -> None:
        on_connect(dbapi_connection)

    event.listen(Pool, "connect", session_setup)
    try:
        with logs.foreign_output_as_events("env.py"), engine.connect() as connection:
            cfg.attributes["connection"] = connection
            with EnvironmentContext(
                cfg, script, fn=tracker.steps, destination_rev="heads", as_sql=False
            ):
                script.run_env()
            # The cookbook's caller commits (engine.begin()); an env.py that left a transaction
            # open would otherwise be rolled back silently when the connection closes.
            if connection.in_transaction():
                connection.commit()
    except Exception as exc:
        raise MigrationFailed(tracker.running, _describe(exc)) from exc
    finally:
        event.remove(Pool, "connect", session_setup)
        cfg.attributes.pop("connection", None)
    tracker.finish()
    now = current_revisions(conn)
    conn.commit()
    if now != heads(script):
        raise MigrationFailed(
            None,
            f"the upgrade ended at {list(now) or 'base'}, not head {list(heads(script))}: "
            "it was not committed",
        )
    return len(tracker.applied)


class _StepTracker:
    """Hands Alembic its upgrade steps one at a time, to log each and name the one that fails."""

    def __init__(self, script: ScriptDirectory) -> None:
        self.script = script
        self.running: str | None = None
        self._running_doc: str | None = None
        self.applied: list[str] = []

    def steps(self, rev: Any, context: MigrationContext) -> Iterator[MigrationStep]:
        # Alembic pulls the next step only once the previous one ran without error.
        for revision in pending(self.script, rev):
            self.finish()
            self.running, self._running_doc = revision.revision, revision.doc
            logs.applying(revision.revision, revision.doc)
            yield MigrationStep.upgrade_from_script(self.script.revision_map, revision)

    def finish(self) -> None:
        if self.running is not None:
            logs.applied(self.running, self._running_doc)
            self.applied.append(self.running)
            self.running = None


def _describe(exc: BaseException) -> str:
    """One line of the error: the original driver error when SQLAlchemy wrapped it."""
    cause = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")
