"""The statement policy for the concurrent forms, decided from each statement's parse tree.

The DDL lock_timeout is for statements whose lock queues the app. The concurrent forms (CREATE
and DROP INDEX CONCURRENTLY, REINDEX ... CONCURRENTLY, DETACH PARTITION ... CONCURRENTLY) block
no reader or writer while they wait, and they do wait: for old snapshots anywhere in the
database, which is a lock wait that a lock_timeout would cancel, leaving an invalid index. So
each one runs with lock_timeout 0 and its own statement_timeout, restored after it; an invalid
index one leaves (failed, cancelled, or IF NOT EXISTS over an invalid one) is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pglast import ast, parse_sql
from pglast.parser import ParseError

from prosaas_migrate import locks

# A concurrent form cannot run in a transaction block, and its keyword is in the text as typed:
# only a statement in autocommit that holds the word is parsed (a substring test is no SQL
# grammar: it only rules out, and pglast decides).
_KEYWORD = "concurrently"

# Whether the index is there and invalid (and not being built by someone right now), with its
# name quoted by the server for the DROP.
_INVALID_SQL = """
SELECT format('%%I.%%I', n.nspname, c.relname)
  FROM pg_index i
  JOIN pg_class c ON c.oid = i.indexrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE i.indrelid = to_regclass(%s) AND c.relname = %s AND NOT i.indisvalid
   AND NOT EXISTS (SELECT 1 FROM pg_stat_progress_create_index p
                    WHERE p.index_relid = i.indexrelid AND p.pid <> pg_backend_pid())
"""


@dataclass(frozen=True)
class Build:
    """The index a CREATE INDEX CONCURRENTLY builds, as its parse tree names it."""

    table: str  # quoted, schema-qualified when the SQL qualifies it: to_regclass() reads it
    name: str  # the index's own name (PostgreSQL puts it in the table's schema)

    @property
    def display(self) -> str:
        schema = self.table.rsplit(".", 1)[0] + "." if "." in self.table else ""
        return schema.replace('"', "") + self.name


@dataclass(frozen=True)
class Concurrent:
    """A statement that is a concurrent form."""

    kind: str  # "CREATE INDEX CONCURRENTLY", ...
    build: Build | None  # what it builds, when it is a named CREATE INDEX CONCURRENTLY


class InvalidIndexLeft(Exception):
    """A concurrent build ended without error but the index it names is invalid (IF NOT EXISTS
    over an invalid one left by an earlier failed build)."""

    def __init__(self, build: Build) -> None:
        self.build = build
        super().__init__(
            f"CREATE INDEX CONCURRENTLY left the index {build.display} INVALID (IF NOT EXISTS "
            "found an invalid one of that name, left by an earlier failed build)"
        )


def concurrent_form(statement: str) -> Concurrent | None:
    """The concurrent form `statement` is, or None (not one, or not SQL pglast can parse)."""
    if _KEYWORD not in statement.lower():
        return None
    try:
        parsed = parse_sql(statement)
    except ParseError:
        return None  # a placeholder or a dialect pglast does not read: the server decides
    for raw in parsed:
        if raw.stmt is None:
            continue
        found = locks.statement_locks(raw.stmt)
        if found.concurrent:
            return Concurrent(found.kind, _build(raw.stmt))
    return None


def _build(node: Any) -> Build | None:
    if not isinstance(node, ast.IndexStmt) or not node.idxname or node.relation is None:
        return None
    relation = node.relation
    table = _quoted(str(relation.relname))
    if relation.schemaname:
        table = f"{_quoted(relation.schemaname)}.{table}"
    return Build(table, str(node.idxname))


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


@dataclass
class Policy:
    """Applied around every statement of the upgrade, on whichever connection runs it."""

    session: Mapping[str, str]  # the upgrade's own settings, restored after a concurrent form
    concurrent_timeout_ms: int
    on_dropped: Any = None  # Callable[[Build, str], None]: an invalid index dropped (and why)
    failed: list[Build] = field(default_factory=list)  # builds that failed or left it invalid
    _running: dict[int, tuple[Any, Concurrent]] = field(default_factory=dict)

    def before(self, dbapi_connection: Any, statement: str) -> None:
        key = id(dbapi_connection)
        if key in self._running:
            # The last concurrent form on this connection raised: its build failed.
            _, previous = self._running.pop(key)
            if previous.build is not None:
                self.failed.append(previous.build)
            self._restore(dbapi_connection)
        if not getattr(dbapi_connection, "autocommit", False):
            return
        found = concurrent_form(statement)
        if found is None:
            return
        _set(
            dbapi_connection,
            {"lock_timeout": "0", "statement_timeout": str(self.concurrent_timeout_ms)},
        )
        self._running[key] = (dbapi_connection, found)
        if found.build is not None and drop_if_invalid(dbapi_connection, found.build):
            self._dropped(found.build, "before building it again")

    def after(self, dbapi_connection: Any) -> None:
        running = self._running.pop(id(dbapi_connection), None)
        if running is None:
            return
        self._restore(dbapi_connection)
        build = running[1].build
        if build is not None and invalid(dbapi_connection, build):
            self.failed.append(build)
            raise InvalidIndexLeft(build)

    def take_failed(self) -> list[Build]:
        """Every build that failed so far, once: those that raised (still marked running, when
        no statement followed on their connection) and those that left an invalid index."""
        for _, found in self._running.values():
            if found.build is not None:
                self.failed.append(found.build)
        self._running.clear()
        builds, self.failed = list(dict.fromkeys(self.failed)), []
        return builds

    def _restore(self, dbapi_connection: Any) -> None:
        keys = ("lock_timeout", "statement_timeout")
        _set(dbapi_connection, {k: self.session[k] for k in keys if k in self.session})

    def _dropped(self, build: Build, why: str) -> None:
        if self.on_dropped is not None:
            self.on_dropped(build, why)


def _set(dbapi_connection: Any, settings: Mapping[str, str]) -> None:
    """Session settings as bound parameters (in autocommit: nothing to roll them back)."""
    _run(
        dbapi_connection,
        "SELECT set_config(s.name, s.value, false)"
        " FROM unnest(%s::text[], %s::text[]) AS s(name, value)",
        [list(settings), list(settings.values())],
    )


def _run(dbapi_connection: Any, sql: str, params: list[Any] | None) -> list[Any]:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql, params)
        return list(cursor.fetchall()) if cursor.description else []
    finally:
        cursor.close()


def invalid(dbapi_connection: Any, build: Build) -> str | None:
    """The quoted name of the invalid index `build` names, or None (valid, absent, building)."""
    rows = _run(dbapi_connection, _INVALID_SQL, [build.table, build.name])
    return str(rows[0][0]) if rows else None


def drop_if_invalid(dbapi_connection: Any, build: Build) -> bool:
    """DROP INDEX CONCURRENTLY the index `build` names if it is invalid; whether it was.

    The connection must be in autocommit, with the timeouts wanted for the drop already set.
    """
    name = invalid(dbapi_connection, build)
    if name is None:
        return False
    # The name is the server's own format('%I.%I'), and no parameters: nothing is interpolated.
    _run(dbapi_connection, f"DROP INDEX CONCURRENTLY IF EXISTS {name}", None)
    return True
