"""What this deploy will run against this database, and what each statement will lock.

The database's position is read as `status` reads it (read-only: no lock, no version table
created, nothing written); the pending revisions are rendered offline as `lint` renders them
and each statement is judged by `locks`, the table shared with lint; the catalog, read in the
same bounded read-only transactions `status` uses, tells how big each locked table is, so a
strong lock reads with its cost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from prosaas_migrate import __version__, config, locks
from prosaas_migrate.errors import (
    CheckCode,
    ConfigError,
    MigrateError,
    ProjectBroken,
    RevisionsUnreadable,
    VersionTableBusy,
)

if TYPE_CHECKING:
    import psycopg

    from prosaas_migrate import lint
    from prosaas_migrate.schema import Target

READ_TIMEOUT_MS = 5000  # as status: a plan must never hang on a busy server

# What the table a lock falls on is, as far as this plan can tell.
EXISTING = "existing"
CREATED = "created"  # by a statement of this plan, before (or in) the one that locks it
MISSING = "missing"  # not in the catalog, and nothing before it in the plan creates it
UNKNOWN = "unknown"  # the catalog could not be read

_Name = tuple[str | None, str]  # (schema as written, or None: the search_path; name)
_Lookup = tuple[str | None, str, bool]  # a name, and whether the lock is on its index's table


@dataclass(frozen=True)
class Lock:
    """One table lock a statement takes, and what the catalog says of the table."""

    schema: str | None  # as the SQL names it; None: the search_path decides
    table: str  # as the SQL names it: a table, or an index (relkind "index", "table of index")
    relkind: str  # locks.TABLE, INDEX, TABLE_OF_INDEX (a lock on that index's table), SEQUENCE
    mode: str
    queues_app: bool  # the application's reads or writes wait behind it
    table_state: str  # EXISTING, CREATED, MISSING or UNKNOWN
    created_in: str | None = None  # the revision of this plan that creates it
    on: str | None = None  # the relation the catalog found (for "table of index": the table)
    rows: int | None = None  # pg_class.reltuples; None: never analyzed (-1), or not known
    bytes: int | None = None  # pg_total_relation_size; None: not known


@dataclass(frozen=True)
class PlannedStatement:
    sql: str  # as lint shows statements: comments removed, whitespace collapsed, shortened
    kind: str  # locks.py's name for it ("ALTER TABLE ADD COLUMN"...); "unparsable": no tree
    in_transaction: bool  # False: outside a transaction (an autocommit_block)
    held_until: str | None  # its locks are held until the COMMIT after this revision
    concurrent: bool
    locks: tuple[Lock, ...]


@dataclass
class PlannedRevision:
    revision: str
    message: str | None
    file: str
    error: str | None = None  # why it could not be rendered offline
    statements: list[PlannedStatement] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)  # lint's, for this revision


@dataclass
class Plan:
    """The whole answer; `error` says why it could not be made, `code` is `status --check`'s."""

    code: CheckCode
    url: str | None = None
    current: list[str] | None = None
    heads: list[str] | None = None
    unknown: list[str] = field(default_factory=list)  # recorded revisions the scripts lack
    revisions: list[PlannedRevision] = field(default_factory=list)
    renderer: str | None = None
    renderer_note: str | None = None
    catalog_error: str | None = None  # sizes unknown, and why
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "exit_code": int(self.code),
            "error": self.error,
            "database": {
                "url": self.url,
                "current": self.current,
                "heads": self.heads,
                "unknown": self.unknown,
            },
            "pending": None if self.current is None or self.unknown else len(self.revisions),
            "renderer": self.renderer,
            "renderer_note": self.renderer_note,
            "catalog_error": self.catalog_error,
            "revisions": [asdict(revision) for revision in self.revisions],
        }


def make(environ: Mapping[str, str], *, config_option: str | None) -> Plan:
    """Read the position, render what is pending, judge its locks and size its tables.

    Never raises over what it reports on: a bad configuration, an unreachable database or an
    unreadable position is a Plan with `error` and the code `status --check` would exit with.
    """
    from prosaas_migrate import database, schema

    try:
        settings = config.load(environ, config_option=config_option)
        goal = schema.target(settings)
    except ConfigError as exc:
        return Plan(CheckCode.MISCONFIGURED, error=str(exc))
    assert goal.info is not None  # target() raises ConfigError when there is no URL
    plan = Plan(CheckCode.UNKNOWN, url=goal.info.display)
    try:
        conn = database.connect(goal.info, deadline=time.monotonic())
    except MigrateError as exc:
        plan.error = str(exc)
        return plan
    try:
        _plan_on(conn, goal, _config_variable(settings), plan)
    finally:
        conn.close()
    return plan


def exit_code(plan: Plan) -> CheckCode:
    return plan.code


def _config_variable(settings: config.Settings) -> str:
    """What errors about the project name, as lint names it."""
    from prosaas_migrate import lint

    source = settings.alembic_config_source
    return lint.DEFAULT_CONFIG if source == "default" else source


def _plan_on(conn: psycopg.Connection[Any], goal: Target, variable: str, plan: Plan) -> None:
    import psycopg

    from prosaas_migrate import database, lint, migrations, offline, schema

    try:
        with database.answering_within(READ_TIMEOUT_MS / 1000 + 1):
            position = schema.Reader(goal).position(conn, READ_TIMEOUT_MS)
    except (MigrateError, psycopg.Error, database.NoAnswer) as exc:
        plan.error = f"cannot read where the database stands: {_one_line(exc)}"
        if isinstance(exc, ConfigError | RevisionsUnreadable | ProjectBroken):
            plan.code = CheckCode.MISCONFIGURED
        return
    plan.current, plan.heads = list(position.current), list(position.heads)
    if position.unknown:
        plan.unknown, plan.code = list(position.unknown), CheckCode.AHEAD
        return
    try:
        cfg, script = offline.load_script_directory(goal.project, variable)
        pending = migrations.pending(script, position.current)
    except MigrateError as exc:
        plan.code, plan.error = CheckCode.MISCONFIGURED, str(exc)
        return
    except Exception as exc:  # overlapping version rows, say: Alembic cannot tell either
        plan.error = f"cannot compare with the scripts: {_one_line(exc)}"
        return
    if not pending:
        plan.code = CheckCode.AT_HEAD
        return
    plan.code = CheckCode.PENDING
    rendering = offline.render(cfg, script, pending, starting_heads=position.current)
    plan.renderer = rendering.renderer
    plan.renderer_note = rendering.fallback_reason or rendering.warning
    by_id = {
        r.revision: PlannedRevision(r.revision, r.doc, offline.display_path(r.path))
        for r in pending
    }
    plan.revisions = list(by_id.values())
    for chunk in rendering.chunks:
        if chunk.revision is not None and chunk.error is not None:
            by_id[chunk.revision.revision].error = chunk.error
    # What the applied revisions built (column types, indexes, checks) judges the pending
    # ones, as `lint --since` judges them: replayed, never reported.
    applied = migrations.committed(script, position.current)
    try:
        earlier = [r for r in offline.select(script, None)[0] if r.revision in applied]
    except MigrateError:  # the scripts' order cannot be read: judged without the history
        earlier = []
    history = offline.render(cfg, script, earlier) if earlier else None
    report = lint.check(rendering, revisions_checked=len(pending), history=history)
    for finding in report.findings:
        by_id[finding.revision].findings.append(asdict(finding))
    tables = _Tables()
    judged = tables.judge(lint.statements(rendering))
    try:
        with database.answering_within(READ_TIMEOUT_MS / 1000 + 1):
            tables.read_catalog(conn, READ_TIMEOUT_MS)
    except VersionTableBusy as exc:  # bounded() names the version table: here it is another
        plan.catalog_error = (
            f"a table stayed locked for {exc.waited_ms / 1000:.1f}s (a migration or a long "
            f"transaction holds it): {exc.cause}"
        )
    except (MigrateError, psycopg.Error, database.NoAnswer) as exc:
        plan.catalog_error = _one_line(exc)
    for each in judged:
        by_id[each.revision].statements.append(tables.sized(each))


@dataclass(frozen=True)
class _Origin:
    """Where a relation's rows come from: the catalog (under this name), or this plan."""

    catalog: _Lookup | None  # what to look up (a renamed table's old name); None: created
    created_in: str | None = None  # the revision of this plan that creates it
    if_missing: bool = False  # CREATE ... IF NOT EXISTS: it may be there already, with rows
    table: _Name | None = None  # an index this plan creates: its table


@dataclass(frozen=True)
class _Pending:
    """A lock before the catalog is read."""

    lock: locks.TableLock
    origin: _Origin


@dataclass
class _Judged:
    revision: str
    statement: lint.Statement
    locks: locks.StatementLocks | None  # None: PostgreSQL's parser rejects the statement
    held: tuple[_Pending, ...]
    until: str | None = None  # its locks last until the COMMIT after this revision's statements


class _Tables:
    """Follows the relations the plan creates, renames and drops, and sizes the others."""

    def __init__(self) -> None:
        # by schema-qualified name (unqualified = public, as lint reads names)
        self.state: dict[tuple[str, str], _Origin] = {}
        self.sizes: dict[_Lookup, _Size | None] | None = None  # None: not read
        self.judged: list[_Judged] = []

    def judge(self, statements: Iterable[lint.Statement]) -> list[_Judged]:
        """Each revision's own statements (not the BEGIN/COMMIT around them) with their locks.

        A lock taken in a transaction is held until it ends: the COMMIT may come revisions
        later (one transaction for the whole upgrade is Alembic's default).
        """
        from pglast import ast

        in_transaction: list[_Judged] = []
        last: str | None = None  # the revision of the latest statement
        for statement in statements:
            if not statement.in_transaction:  # a COMMIT, or outside any transaction
                for judged in in_transaction:
                    judged.until = last
                in_transaction.clear()
            if isinstance(statement.node, ast.TransactionStmt):
                continue
            if statement.revision is None:  # Alembic's own: the version table it creates
                if statement.node is not None:
                    self._follow(statement.node, None)
                continue
            last = statement.revision.revision
            judged = self._judged(last, statement)
            self.judged.append(judged)
            if statement.in_transaction:
                in_transaction.append(judged)
        return self.judged

    def _judged(self, revision: str, statement: lint.Statement) -> _Judged:
        if statement.node is None:
            return _Judged(revision, statement, None, ())
        self._follow(statement.node, revision)
        taken = locks.statement_locks(statement.node)
        held = tuple(_Pending(lock, self._origin(lock)) for lock in taken.locks)
        self._after(statement.node)
        return _Judged(revision, statement, taken, held)

    def _origin(self, lock: locks.TableLock) -> _Origin:
        origin = self.state.get(_key(lock.schema, lock.table))
        if origin is None:
            origin = _Origin((lock.schema, lock.table, False))
        if lock.relkind != locks.TABLE_OF_INDEX:
            return origin
        if origin.catalog is not None:  # an index from before the plan: the catalog knows
            schema, name, _ = origin.catalog
            return _Origin((schema, name, True))
        if origin.table is None:  # an index the plan makes, whose table is not followed
            return _Origin(None, origin.created_in)
        schema, table = origin.table
        return self.state.get(_key(schema, table)) or _Origin((schema, table, False))

    def _follow(self, node: Any, revision: str | None) -> None:
        """Note the relations a statement creates, before its own locks are judged."""
        from pglast import ast

        created: Any = None
        if_not_exists = False
        if isinstance(node, ast.CreateStmt):
            created, if_not_exists = node.relation, bool(node.if_not_exists)
        elif isinstance(node, ast.CreateTableAsStmt) and node.into is not None:
            created, if_not_exists = node.into.rel, bool(node.if_not_exists)
        elif isinstance(node, ast.SelectStmt) and node.intoClause is not None:
            created = node.intoClause.rel
        elif isinstance(node, ast.IndexStmt) and node.idxname and not node.if_not_exists:
            table = _name(node.relation)
            self.state[_key(table[0], str(node.idxname))] = _Origin(None, revision, table=table)
        if created is None:
            return
        schema, name = _name(created)
        self.state[_key(schema, name)] = _Origin(
            (schema, name, False) if if_not_exists else None, revision, if_missing=if_not_exists
        )

    def _after(self, node: Any) -> None:
        """Renames carry a relation's rows to its new name; a dropped one has none left."""
        from pglast import ast
        from pglast.enums import ObjectType

        renamed = (ObjectType.OBJECT_TABLE, ObjectType.OBJECT_INDEX)
        if isinstance(node, ast.RenameStmt) and node.renameType in renamed:
            schema, name = _name(node.relation)
            origin = self.state.pop(_key(schema, name), None) or _Origin((schema, name, False))
            self.state[_key(schema, str(node.newname))] = origin
        elif isinstance(node, ast.DropStmt) and node.removeType in _dropped():
            for names in node.objects or ():
                parts = [str(getattr(part, "sval", "")) for part in names]
                self.state.pop(_key(parts[-2] if len(parts) > 1 else None, parts[-1]), None)

    def read_catalog(self, conn: psycopg.Connection[Any], timeout_ms: int) -> None:
        """Rows and size of every relation a lock falls on that the plan does not create."""
        from prosaas_migrate import database

        wanted = sorted(
            {
                pending.origin.catalog
                for judged in self.judged
                for pending in judged.held
                if pending.origin.catalog is not None
            },
            key=lambda lookup: (lookup[0] or "", lookup[1], lookup[2]),
        )
        with database.bounded(conn, timeout_ms):
            self.sizes = _catalog_sizes(conn, wanted)

    def sized(self, judged: _Judged) -> PlannedStatement:
        taken = judged.locks
        return PlannedStatement(
            sql=judged.statement.text,
            kind="unparsable" if taken is None else taken.kind,
            in_transaction=judged.statement.in_transaction,
            concurrent=taken is not None and taken.concurrent,
            held_until=judged.until,
            locks=tuple(self._lock(pending) for pending in judged.held),
        )

    def _lock(self, pending: _Pending) -> Lock:
        lock, origin = pending.lock, pending.origin
        made = partial(
            Lock,
            lock.schema,
            lock.table,
            lock.relkind,
            lock.mode,
            locks.queues_app(lock.mode),
        )
        if origin.catalog is None:
            return made(CREATED, created_in=origin.created_in)
        if self.sizes is None:
            return made(UNKNOWN)
        size = self.sizes.get(origin.catalog)
        if size is None:
            if origin.if_missing:
                return made(CREATED, created_in=origin.created_in)
            return made(MISSING)
        return made(EXISTING, on=size.name, rows=size.rows, bytes=size.bytes)


def _dropped() -> frozenset[Any]:
    from pglast.enums import ObjectType

    return frozenset(
        {
            ObjectType.OBJECT_TABLE,
            ObjectType.OBJECT_INDEX,
            ObjectType.OBJECT_VIEW,
            ObjectType.OBJECT_MATVIEW,
            ObjectType.OBJECT_SEQUENCE,
            ObjectType.OBJECT_FOREIGN_TABLE,
        }
    )


def _name(relation: Any) -> _Name:
    return (relation.schemaname or None, str(relation.relname))


def _key(schema: str | None, table: str) -> tuple[str, str]:
    return (schema or "public", table)


@dataclass(frozen=True)
class _Size:
    name: str  # as the server names it (schema-qualified when off the search_path)
    rows: int | None  # None: never analyzed
    bytes: int


# Rows and bytes of each named relation, resolved by the server as the migration's statements
# will be (search_path included); for an index's table, through pg_index. A partitioned table
# holds nothing itself: its leaves are summed. reltuples is -1 until the first ANALYZE or
# VACUUM: "unknown", never a guessed 0. No lock is taken but pg_total_relation_size's brief
# ACCESS SHARE, bounded by the transaction's lock_timeout.
_SIZES = """
WITH wanted AS (
    SELECT w.n, CASE WHEN w.of_index
        THEN (SELECT i.indrelid FROM pg_index i WHERE i.indexrelid = to_regclass(w.name))
        ELSE to_regclass(w.name)::oid END AS oid
    FROM unnest(%s::text[], %s::bool[]) WITH ORDINALITY AS w(name, of_index, n)
)
SELECT w.n, c.oid IS NOT NULL, c.oid::regclass::text,
       CASE WHEN c.relkind = 'p' THEN (
           SELECT CASE WHEN bool_or(p.reltuples < 0) THEN -1 ELSE sum(p.reltuples) END
           FROM pg_partition_tree(c.oid) t JOIN pg_class p ON p.oid = t.relid WHERE t.isleaf)
       ELSE c.reltuples END::float8,
       CASE WHEN c.relkind = 'p' THEN (
           SELECT sum(pg_total_relation_size(t.relid)) FROM pg_partition_tree(c.oid) t)
       ELSE pg_total_relation_size(c.oid) END::bigint
FROM wanted w LEFT JOIN pg_class c ON c.oid = w.oid
ORDER BY w.n
"""


def _catalog_sizes(
    conn: psycopg.Connection[Any], wanted: list[_Lookup]
) -> dict[_Lookup, _Size | None]:
    from psycopg import sql

    if not wanted:
        return {}
    names = [
        (sql.Identifier(schema, name) if schema else sql.Identifier(name)).as_string(conn)
        for schema, name, _ in wanted
    ]
    rows = conn.execute(_SIZES, [names, [of_index for *_, of_index in wanted]]).fetchall()
    found: dict[_Lookup, _Size | None] = {}
    for lookup, (_, exists, name, tuples, total) in zip(wanted, rows, strict=True):
        estimate = None if tuples is None or tuples < 0 else round(tuples)
        found[lookup] = _Size(str(name), estimate, int(total or 0)) if exists else None
    return found


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, MigrateError):
        return str(exc)
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- rendering --------------------------------------------------------------------------------


def render_json(plan: Plan) -> str:
    return json.dumps(plan.as_dict(), indent=2)


def rows_text(rows: int | None) -> str:
    """12 M rows; "unknown rows" when the table was never analyzed."""
    if rows is None:
        return "unknown rows"
    if rows < 10_000:
        return f"{rows:,} row{'s' * (rows != 1)}"
    return f"{_scaled(rows, 1000, ('k', 'M', 'G', 'T'))} rows"


def bytes_text(size: int) -> str:
    """3.1 GB, as pg_size_pretty counts (1 kB = 1024 bytes), one decimal below 10."""
    if size < 1024:
        return f"{size} bytes"
    return _scaled(size, 1024, ("kB", "MB", "GB", "TB", "PB"))


def _scaled(value: float, step: int, units: tuple[str, ...]) -> str:
    for unit in units:
        value /= step
        if value < step or unit == units[-1]:
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def _display_name(lock: Lock) -> str:
    """The table a lock falls on, as the plan names it (an index's table as the catalog does)."""
    if lock.relkind == locks.TABLE_OF_INDEX and lock.on is not None:
        return lock.on
    return f"{lock.schema}.{lock.table}" if lock.schema else lock.table


def lock_text(lock: Lock) -> str:
    """ACCESS EXCLUSIVE on leads (12 M rows, 3.1 GB)."""
    name = f"{lock.schema}.{lock.table}" if lock.schema else lock.table
    if lock.table_state == EXISTING:
        assert lock.bytes is not None
        if lock.relkind == locks.INDEX:
            return f"{lock.mode} on index {name} ({bytes_text(lock.bytes)})"
        about = f"{rows_text(lock.rows)}, {bytes_text(lock.bytes)}"
        if lock.rows is None:
            about += ", never analyzed"
        if lock.relkind == locks.TABLE_OF_INDEX:
            return f"{lock.mode} on {lock.on}, the table of index {name} ({about})"
        if lock.relkind == locks.SEQUENCE:
            return f"{lock.mode} on sequence {name}"
        return f"{lock.mode} on {name} ({about})"
    what = {
        locks.INDEX: f"index {name}",
        locks.TABLE_OF_INDEX: f"the table of index {name}",
        locks.SEQUENCE: f"sequence {name}",
    }.get(lock.relkind, name)
    if lock.table_state == CREATED:
        about = "created by this plan" + (f" in {lock.created_in}" if lock.created_in else "")
    elif lock.table_state == MISSING:
        about = "does not exist yet"
    else:
        about = "size unknown"
    return f"{lock.mode} on {what} ({about})"


def queues_the_app(plan: Plan) -> list[tuple[Lock, str, str | None]]:
    """The strongest lock on each existing table that makes the application wait: the lock,
    the revision that first takes it, and the revision after which its transaction commits."""
    strongest: dict[str, tuple[Lock, str, str | None]] = {}
    for revision in plan.revisions:
        for statement in revision.statements:
            for lock in statement.locks:
                if not lock.queues_app or lock.table_state != EXISTING:
                    continue
                key = _display_name(lock)
                held = strongest.get(key)
                if held is None or locks.MODES.index(lock.mode) > locks.MODES.index(held[0].mode):
                    strongest[key] = (lock, revision.revision, statement.held_until)
    return list(strongest.values())


def _renderer_note(plan: Plan) -> str:
    from prosaas_migrate import offline

    if plan.renderer == offline.OWN_RENDERER:
        return f"rendered with prosaas-migrate's offline context: {plan.renderer_note}"
    return f"note: {plan.renderer_note}"


def render_text(plan: Plan, *, style: Callable[..., str]) -> str:
    """Revisions in order, each statement with its transaction and locks, then lint's findings.

    `style` is click.style (or a no-op), so colour stays the caller's call.
    """
    if plan.error is not None:
        return style(plan.error, fg="red")
    out = [f"database: {plan.url}"]
    out.append(f"current:  {', '.join(plan.current or []) or 'base (no version table)'}")
    out.append(f"heads:    {', '.join(plan.heads or []) or '-'}")
    if plan.unknown:
        out.append(
            style(
                f"the database is at {', '.join(plan.unknown)}, which these scripts do not "
                "know (a newer image migrated; a rollback deploy?): nothing to plan",
                fg="yellow",
            )
        )
        return "\n".join(out)
    if not plan.revisions:
        out.append(style("nothing to run: the database is at head", fg="green"))
        return "\n".join(out)
    count = len(plan.revisions)
    out.append(style(f"pending:  {count} revision{'s' * (count != 1)}, in this order", fg="yellow"))
    queueing = queues_the_app(plan)
    if queueing:
        out.append("")
        out.append(style("Locks the application's queries will wait for", bold=True))
        for lock, first, until in queueing:
            held = f"held until the COMMIT after {until}" if until else "for the statement"
            out.append(f"  {style(lock_text(lock), fg='red')}: from {first}, {held}")
    # With no BEGIN at all (env.py sets transactional_ddl=False) "outside" is not a block.
    transactions = any(s.in_transaction for r in plan.revisions for s in r.statements)
    for revision in plan.revisions:
        out.append("")
        title = f"{revision.revision}  {revision.message or ''}".rstrip()
        out.append(style(f"{title}  ({revision.file})", bold=True))
        if revision.error:
            out.append(style(f"  cannot be rendered offline: {revision.error}", fg="red"))
        for number, statement in enumerate(revision.statements, 1):
            out.append(f"  {number}. {statement.sql}")
            if not statement.in_transaction:
                where = f"outside a transaction{' (autocommit_block)' if transactions else ''}"
            elif statement.held_until is None:
                where = "in a transaction"
            else:
                where = f"in the transaction committed after {statement.held_until}"
            out.append(f"     {where}")
            if statement.kind == "unparsable":
                out.append("     locks unknown: PostgreSQL's parser rejects it (see lint below)")
            elif not statement.locks:
                out.append("     no table lock")
            for lock in statement.locks:
                text = lock_text(lock)
                strong = lock.queues_app and lock.table_state == EXISTING
                out.append(f"     {style(text, fg='red') if strong else text}")
        if revision.findings:
            out.append(
                f"  lint: {len(revision.findings)} finding{'s' * (len(revision.findings) != 1)}"
            )
            for finding in revision.findings:
                out.append(
                    f"    {style(finding['rule'], fg='red')}: {finding['statement']}".rstrip(": ")
                )
                out.append(f"      fix: {finding['hint']}")
        else:
            out.append("  lint: no findings")
    if plan.catalog_error:
        out.append("")
        out.append(style(f"table sizes unknown: {plan.catalog_error}", fg="yellow"))
    if plan.renderer_note:
        out.append("")
        out.append(f"({_renderer_note(plan)})")
    return "\n".join(out)
