"""Where the schema stands: the project and its URLs checked before anything connects, and the
database's position against the scripts, read by the fast path or by asking env.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prosaas_migrate import logs
from prosaas_migrate.config import Settings, migration_conninfo

if TYPE_CHECKING:
    import psycopg

    from prosaas_migrate.conninfo import ConnInfo
    from prosaas_migrate.database import VersionTable
    from prosaas_migrate.migrations import VersionState
    from prosaas_migrate.revisions import Graph, Project


@dataclass(frozen=True)
class Target:
    """What the project says, read before anything connects."""

    project: Project
    info: ConnInfo | None  # the database to lock (and, unless multidb, to migrate); None: no URL
    engines: dict[str, ConnInfo]  # multidb: each engine's database
    graph: Graph | None  # None: only Alembic can tell the revisions


@dataclass(frozen=True)
class Position:
    """Where the database stands against the scripts."""

    current: tuple[str, ...]
    heads: tuple[str, ...]
    at_head: bool
    unknown: tuple[str, ...] = ()  # recorded revisions these scripts do not have
    table: VersionTable | None = None  # the one version table, when Alembic named it


def target(settings: Settings) -> Target:
    """The project and the URL(s), checked before anything connects; ConfigError if unusable."""
    from prosaas_migrate import conninfo, revisions
    from prosaas_migrate.errors import ConfigError

    project = revisions.read_project(settings.alembic_config, settings.alembic_config_source)
    info = migration_conninfo(settings, project.url)
    engines = {}
    for name, url in project.engines.items():
        variable = f"sqlalchemy.url in [{name}] of {project.path}"
        if url is None or conninfo.split_scheme(url.strip())[0].lower() not in conninfo.URL_SCHEMES:
            raise ConfigError(
                variable,
                None if url is None else conninfo.redact(url),
                f"{conninfo.GRAMMAR}: a real URL for each database of a multidb project",
            )
        engines[name] = conninfo.parse(variable, url)
    logs.hide([secret for each in (info, *engines.values()) for secret in each.secrets])
    return Target(project, info, engines, revisions.read_graph(project))


class Reader:
    """Reads where the database stands: from the files and one bounded query where the fast path
    can, else by asking the project's env.py (Alembic loaded once, on first need)."""

    def __init__(self, goal: Target) -> None:
        self.goal = goal
        self._alembic: Any = None

    @property
    def alembic(self) -> Any:
        if self._alembic is None:
            from prosaas_migrate import migrations

            cfg = migrations.load_config(self.goal.project, self.goal.info, self.goal.engines)
            script = migrations.script_directory(cfg)
            self._alembic = (cfg, script, migrations.heads(script))
        return self._alembic

    def position(self, conn: psycopg.Connection[Any], timeout_ms: int) -> Position:
        """Read-only; every statement and lock wait ends within `timeout_ms` (VersionTableBusy)."""
        from prosaas_migrate import database

        graph = self.goal.graph
        if graph is not None:  # the fast path: no Alembic, no SQLAlchemy
            with database.bounded(conn, timeout_ms):
                current = database.current_revisions(conn)
            unknown = tuple(r for r in current if r not in graph.revisions)
            # Alembic also takes a unique prefix of an id for the id: its call, not ours.
            if not any(known.startswith(r) for r in unknown for known in graph.revisions):
                return Position(current, graph.heads, current == graph.heads, unknown)
        from prosaas_migrate import migrations

        cfg, script, _ = self.alembic
        states = migrations.read_versions(
            cfg, script, conn, self.goal.info, timeout=max(timeout_ms, 50) / 1000
        )
        return self.position_of(states)

    def position_of(self, states: Sequence[VersionState]) -> Position:
        from prosaas_migrate import migrations

        _, script, heads = self.alembic
        states = [
            type(state)(state.table, migrations.resolved(script, state.current)) for state in states
        ]
        current = tuple(sorted({revision for state in states for revision in state.current}))
        unknown = tuple(r for r in current if not migrations.known(script, r))
        at_head = not unknown and all(state.current == heads for state in states)
        table = states[0].table if len(states) == 1 else None
        return Position(current, heads, at_head, unknown, table)

    def committed(self, conn: psycopg.Connection[Any], states: Sequence[VersionState]) -> Position:
        """Read the version table(s) an upgrade used, after it: what is really committed."""
        from prosaas_migrate import database, migrations

        if self.goal.engines or not states:
            cfg, script, _ = self.alembic
            return self.position_of(
                migrations.read_versions(cfg, script, conn, self.goal.info, timeout=30)
            )
        return self.position_of(
            [
                migrations.VersionState(s.table, database.current_revisions(conn, s.table))
                for s in states
            ]
        )
