"""What each SQL statement locks, read from its pglast parse tree: one table for lint and plan.

The modes and the conflict matrix are PostgreSQL's (docs: "Explicit Locking"); what each
statement takes is PostgreSQL 15's (tablecmds.c AlterTableGetLockLevel and friends), and the
tests check every entry against a real server's pg_locks. Only what the SQL text names can be
listed: a lock PostgreSQL takes on a table the statement does not name (the table an index
belongs to, the table a dropped table's foreign key references) is either marked as such
(`TableLock.relkind`) or documented where the statement is handled. Reading a view reads its
tables (ACCESS SHARE), which only the catalog knows: not listed either.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pglast
from pglast import ast
from pglast.enums import ConstrType, ObjectType, ReindexObjectType, TransactionStmtKind
from pglast.parser import ParseError, parse_plpgsql_json

# PostgreSQL's eight table lock modes, weakest first (LOCK TABLE's mode numbers are index + 1).
MODES: tuple[str, ...] = (
    "ACCESS SHARE",
    "ROW SHARE",
    "ROW EXCLUSIVE",
    "SHARE UPDATE EXCLUSIVE",
    "SHARE",
    "SHARE ROW EXCLUSIVE",
    "EXCLUSIVE",
    "ACCESS EXCLUSIVE",
)
_A_S, _R_S, _R_X, _S_U_X, _S, _S_R_X, _X, _A_X = MODES
# Each mode and the modes it conflicts with (the matrix is symmetric; the tests check it).
_CONFLICTS: dict[str, frozenset[str]] = {
    _A_S: frozenset({_A_X}),
    _R_S: frozenset({_X, _A_X}),
    _R_X: frozenset({_S, _S_R_X, _X, _A_X}),
    _S_U_X: frozenset({_S_U_X, _S, _S_R_X, _X, _A_X}),
    _S: frozenset({_R_X, _S_U_X, _S_R_X, _X, _A_X}),
    _S_R_X: frozenset({_R_X, _S_U_X, _S, _S_R_X, _X, _A_X}),
    _X: frozenset({_R_S, _R_X, _S_U_X, _S, _S_R_X, _X, _A_X}),
    _A_X: frozenset(MODES),
}

# What TableLock.table names.
TABLE = "table"  # a table (or a view, a partitioned table): the lock is on it
INDEX = "index"  # an index: the lock is on the index itself
TABLE_OF_INDEX = "table of index"  # an index: the lock is on the table it belongs to
SEQUENCE = "sequence"  # a sequence: the lock is on it (nextval() takes ROW EXCLUSIVE)


def conflicts(a: str, b: str) -> bool:
    """Whether a lock in mode `a` and one in mode `b` on the same table exclude each other."""
    return b in _CONFLICTS[a]


def queues_app(mode: str) -> bool:
    """Whether holding `mode` makes the application's SELECTs or INSERT/UPDATE/DELETEs wait."""
    return conflicts(mode, _R_X) or conflicts(mode, _A_S)


def strongest(modes: Iterable[str]) -> str | None:
    """The strongest of `modes` (None for none): PostgreSQL keeps every lock a transaction took."""
    return max(modes, key=MODES.index, default=None)


@dataclass(frozen=True)
class TableLock:
    """One relation-level lock a statement takes."""

    schema: str | None  # None when the statement does not qualify the name (search_path decides)
    table: str
    mode: str  # one of MODES
    relkind: str = TABLE  # what `table` names: TABLE, INDEX, TABLE_OF_INDEX or SEQUENCE


@dataclass(frozen=True)
class StatementLocks:
    """What one statement locks, and how it relates to transactions."""

    kind: str  # short human name: "CREATE INDEX", "ALTER TABLE ADD COLUMN", "UPDATE", ...
    locks: tuple[TableLock, ...]  # strongest per relation, in the order the SQL names them
    concurrent: bool = False  # a CONCURRENTLY form: no transaction block; blocks no reader/writer
    transaction_control: bool = False  # BEGIN, COMMIT, ROLLBACK, SAVEPOINT, PREPARE, ...
    no_transaction_block: bool = False  # PostgreSQL refuses it inside BEGIN ... COMMIT

    def mode_on(self, schema: str | None, table: str, relkind: str = TABLE) -> str | None:
        """The mode this statement takes on a relation, as the SQL names it (None: no lock)."""
        return strongest(
            lock.mode
            for lock in self.locks
            if (lock.schema, lock.table, lock.relkind) == (schema, table, relkind)
        )


def statement_locks(node: ast.Node) -> StatementLocks:
    """What the statement `node` (a RawStmt's stmt) locks; an unknown one locks nothing listed."""
    handler = _HANDLERS.get(type(node))
    if handler is None:
        return StatementLocks(type(node).__name__, ())
    return handler(node)


# -- building blocks ----------------------------------------------------------------------------


def _lock(relation: Any, mode: str, relkind: str = TABLE) -> TableLock:
    return TableLock(relation.schemaname or None, relation.relname, mode, relkind)


def _named(names: Any, mode: str, relkind: str = TABLE) -> TableLock:
    """A lock on an object named by a list of Strings (DROP's and COMMENT's form)."""
    parts = [str(part.sval) for part in names]
    return TableLock(parts[-2] if len(parts) > 1 else None, parts[-1], mode, relkind)


def _merged(locks: Iterable[TableLock]) -> tuple[TableLock, ...]:
    """One lock per relation, the strongest, in the order the relations first appear."""
    best: dict[tuple[str | None, str, str], TableLock] = {}
    for lock in locks:
        key = (lock.schema, lock.table, lock.relkind)
        held = best.get(key)
        if held is None or MODES.index(lock.mode) > MODES.index(held.mode):
            best[key] = lock  # a dict keeps the position of a key it already has
    return tuple(best.values())


def _walk(root: Any) -> Iterator[Any]:
    """Every node of a tree, without recursion (an expression can nest thousands deep)."""
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, tuple | list):
            stack.extend(reversed(node))
        elif isinstance(node, ast.Node):
            yield node
            stack.extend(reversed([getattr(node, attribute) for attribute in node]))


def _read(statement: Any, *, skip: Any = None) -> list[TableLock]:
    """The tables a statement reads: ACCESS SHARE each, ROW SHARE under FOR UPDATE/SHARE.

    `skip` is the RangeVar the statement writes (or creates), not a read. A name that a WITH
    clause defines is not a table. FOR UPDATE takes ROW SHARE on every table read, not only on
    those of its query level: finer is not needed, since ROW SHARE blocks no read or write.
    """
    nodes = list(_walk(statement))
    ctes = {node.ctename for node in nodes if isinstance(node, ast.CommonTableExpr)}
    locking = any(isinstance(node, ast.LockingClause) for node in nodes)
    # A data-modifying WITH (WITH d AS (DELETE FROM a ...) ...) writes its target: ROW EXCLUSIVE.
    written = {id(node.relation) for node in nodes if isinstance(node, _WRITES)}
    return [
        _lock(node, _R_X if id(node) in written else _R_S if locking else _A_S)
        for node in nodes
        if isinstance(node, ast.RangeVar)
        and node is not skip
        and (node.schemaname or node.relname not in ctes)
    ]


_WRITES = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)


def writing_ctes(node: Any) -> list[str]:
    """The kinds of the data-modifying statements a WITH clause of `node` runs ("UPDATE"...)."""
    names = {ast.InsertStmt: "INSERT", ast.UpdateStmt: "UPDATE", ast.DeleteStmt: "DELETE"}
    found = []
    for each in _walk(getattr(node, "withClause", None)):
        if isinstance(each, _WRITES):
            found.append(names.get(type(each), "MERGE"))
    return found


# -- one handler per statement type ------------------------------------------------------------


def _transaction(node: Any) -> StatementLocks:
    kind = TransactionStmtKind(node.kind).name.removeprefix("TRANS_STMT_").replace("_", " ")
    return StatementLocks(kind, (), transaction_control=True)


def _create_table(node: Any) -> StatementLocks:
    """The new table is locked too, but nobody sees it before COMMIT: not listed.

    PARTITION OF takes ACCESS EXCLUSIVE on the parent, INHERITS SHARE UPDATE EXCLUSIVE, LIKE
    ACCESS SHARE on its source, REFERENCES SHARE ROW EXCLUSIVE on the referenced table.
    """
    parent_mode = _A_X if node.partbound is not None else _S_U_X
    locks = [_lock(parent, parent_mode) for parent in node.inhRelations or ()]
    for element in node.tableElts or ():
        if isinstance(element, ast.TableLikeClause):
            locks.append(_lock(element.relation, _A_S))
        constraints = element.constraints if isinstance(element, ast.ColumnDef) else [element]
        locks.extend(_referenced(constraints or ()))
    kind = "CREATE TABLE PARTITION OF" if node.partbound is not None else "CREATE TABLE"
    return StatementLocks(kind, _merged(locks))


def _referenced(constraints: Iterable[Any]) -> Iterator[TableLock]:
    for constraint in constraints:
        if (
            isinstance(constraint, ast.Constraint)
            and constraint.contype == ConstrType.CONSTR_FOREIGN
        ):
            yield _lock(constraint.pktable, _S_R_X)


def _create_table_as(node: Any) -> StatementLocks:
    kind = "CREATE MATERIALIZED VIEW" if node.objtype == ObjectType.OBJECT_MATVIEW else None
    return StatementLocks(kind or "CREATE TABLE AS", _merged(_read(node.query)))


def _index(node: Any) -> StatementLocks:
    if node.concurrent:
        return StatementLocks(
            "CREATE INDEX CONCURRENTLY",
            (_lock(node.relation, _S_U_X),),
            concurrent=True,
            no_transaction_block=True,
        )
    return StatementLocks("CREATE INDEX", (_lock(node.relation, _S),))


# DROP of each kind of relation: ACCESS EXCLUSIVE on it. DROP TABLE also takes ACCESS EXCLUSIVE
# on every table its foreign keys reference, which the SQL does not name (not listed).
_DROPPED = {
    ObjectType.OBJECT_TABLE: ("DROP TABLE", TABLE),
    ObjectType.OBJECT_VIEW: ("DROP VIEW", TABLE),
    ObjectType.OBJECT_MATVIEW: ("DROP MATERIALIZED VIEW", TABLE),
    ObjectType.OBJECT_FOREIGN_TABLE: ("DROP FOREIGN TABLE", TABLE),
    ObjectType.OBJECT_SEQUENCE: ("DROP SEQUENCE", SEQUENCE),
}


def _drop(node: Any) -> StatementLocks:
    objects = node.objects or ()
    if node.removeType == ObjectType.OBJECT_INDEX:
        # The SQL names the index only: its table is TABLE_OF_INDEX (the catalog knows which).
        if node.concurrent:
            locks = [_named(names, _S_U_X, TABLE_OF_INDEX) for names in objects]
            return StatementLocks(
                "DROP INDEX CONCURRENTLY",
                _merged(locks),
                concurrent=True,
                no_transaction_block=True,
            )
        locks = [
            _named(names, _A_X, relkind) for names in objects for relkind in (TABLE_OF_INDEX, INDEX)
        ]
        return StatementLocks("DROP INDEX", _merged(locks))
    if node.removeType in _DROPPED:
        kind, relkind = _DROPPED[node.removeType]
        return StatementLocks(kind, _merged(_named(names, _A_X, relkind) for names in objects))
    return StatementLocks(f"DROP {_object_name(node.removeType)}", ())


def _object_name(kind: Any) -> str:
    return ObjectType(kind).name.removeprefix("OBJECT_").replace("_", " ")


def _reindex(node: Any) -> StatementLocks:
    """REINDEX TABLE: SHARE on the table, ACCESS EXCLUSIVE on each of its indexes (unnamed).

    REINDEX INDEX: SHARE on the index's table and ACCESS EXCLUSIVE on the index, which also
    stops every SELECT that plans on that table (the planner opens all of a table's indexes).
    CONCURRENTLY: SHARE UPDATE EXCLUSIVE on the table and on the index.
    """
    concurrent = option_on(node.params, "concurrently")
    suffix = " CONCURRENTLY" if concurrent else ""
    if node.kind == ReindexObjectType.REINDEX_OBJECT_TABLE:
        locks = [_lock(node.relation, _S_U_X if concurrent else _S)]
        kind = "REINDEX TABLE"
    elif node.kind == ReindexObjectType.REINDEX_OBJECT_INDEX:
        locks = [
            _lock(node.relation, _S_U_X if concurrent else _S, TABLE_OF_INDEX),
            _lock(node.relation, _S_U_X if concurrent else _A_X, INDEX),
        ]
        kind = "REINDEX INDEX"
    else:  # SCHEMA, DATABASE, SYSTEM: every table in them, one transaction each
        kind = f"REINDEX {ReindexObjectType(node.kind).name.removeprefix('REINDEX_OBJECT_')}"
        return StatementLocks(kind + suffix, (), concurrent, no_transaction_block=True)
    return StatementLocks(kind + suffix, tuple(locks), concurrent, no_transaction_block=concurrent)


# ALTER TABLE subcommands by their lock, PostgreSQL 15's AlterTableGetLockLevel; any other
# subcommand takes ACCESS EXCLUSIVE. ADD CONSTRAINT, SET (options) and DETACH are decided below.
_SUBCOMMAND_MODES = {
    "AT_SetStatistics": _S_U_X,
    "AT_ClusterOn": _S_U_X,
    "AT_DropCluster": _S_U_X,
    "AT_SetOptions": _S_U_X,
    "AT_ResetOptions": _S_U_X,
    "AT_ValidateConstraint": _S_U_X,
    "AT_AttachPartition": _S_U_X,
    "AT_DetachPartitionFinalize": _S_U_X,
    "AT_EnableTrig": _S_R_X,
    "AT_EnableAlwaysTrig": _S_R_X,
    "AT_EnableReplicaTrig": _S_R_X,
    "AT_EnableTrigAll": _S_R_X,
    "AT_EnableTrigUser": _S_R_X,
    "AT_DisableTrig": _S_R_X,
    "AT_DisableTrigAll": _S_R_X,
    "AT_DisableTrigUser": _S_R_X,
}
# Storage parameters whose change takes SHARE UPDATE EXCLUSIVE (AlterTableGetRelOptionsLockLevel).
_LIGHT_OPTIONS = frozenset(
    {
        "fillfactor",
        "parallel_workers",
        "toast_tuple_target",
        "vacuum_index_cleanup",
        "vacuum_truncate",
        "log_autovacuum_min_duration",
    }
)
_SUBCOMMAND_NAMES = {
    "AT_AddColumn": "ADD COLUMN",
    "AT_DropColumn": "DROP COLUMN",
    "AT_AlterColumnType": "ALTER COLUMN TYPE",
    "AT_SetNotNull": "SET NOT NULL",
    "AT_DropNotNull": "DROP NOT NULL",
    "AT_AddConstraint": "ADD CONSTRAINT",
    "AT_ValidateConstraint": "VALIDATE CONSTRAINT",
    "AT_DropConstraint": "DROP CONSTRAINT",
    "AT_AttachPartition": "ATTACH PARTITION",
    "AT_DetachPartition": "DETACH PARTITION",
    "AT_SetStatistics": "SET STATISTICS",
    "AT_SetRelOptions": "SET",
    "AT_ResetRelOptions": "RESET",
    "AT_ChangeOwner": "OWNER TO",
    "AT_AddIdentity": "ADD IDENTITY",
    "AT_ReplicaIdentity": "REPLICA IDENTITY",
}


def _subcommand(command: Any) -> tuple[str, str, list[TableLock]]:
    """A subcommand's name, its mode on the altered table, and its locks on other tables."""
    subtype = command.subtype.name
    name = _SUBCOMMAND_NAMES.get(subtype) or subtype.removeprefix("AT_")
    mode = _SUBCOMMAND_MODES.get(subtype, _A_X)
    others: list[TableLock] = []
    definition = command.def_
    if subtype == "AT_ColumnDefault":
        name = "SET DEFAULT" if definition is not None else "DROP DEFAULT"
    elif subtype == "AT_AddConstraint" and isinstance(definition, ast.Constraint):
        if definition.contype == ConstrType.CONSTR_FOREIGN:
            # Triggers go on both tables: as CREATE TRIGGER, on each.
            mode, name = _S_R_X, "ADD FOREIGN KEY"
        others.extend(_referenced([definition]))
    elif subtype == "AT_AddColumn" and isinstance(definition, ast.ColumnDef):
        others.extend(_referenced(definition.constraints or ()))
    elif subtype in ("AT_SetRelOptions", "AT_ResetRelOptions"):
        options = {str(option.defname) for option in definition or ()}
        if all(o in _LIGHT_OPTIONS or "autovacuum" in o for o in options):
            mode = _S_U_X
    elif subtype == "AT_AttachPartition":
        others.append(_lock(definition.name, _A_X))
    elif subtype == "AT_DetachPartition":
        concurrent = bool(definition.concurrent)
        mode = _S_U_X if concurrent else _A_X
        name += " CONCURRENTLY" if concurrent else ""
        others.append(_lock(definition.name, _S_U_X if concurrent else _A_X))
    return name, mode, others


_ALTERED = {
    ObjectType.OBJECT_TABLE: ("ALTER TABLE", TABLE),
    ObjectType.OBJECT_INDEX: ("ALTER INDEX", INDEX),
    ObjectType.OBJECT_VIEW: ("ALTER VIEW", TABLE),
    ObjectType.OBJECT_MATVIEW: ("ALTER MATERIALIZED VIEW", TABLE),
    ObjectType.OBJECT_SEQUENCE: ("ALTER SEQUENCE", SEQUENCE),
    ObjectType.OBJECT_FOREIGN_TABLE: ("ALTER FOREIGN TABLE", TABLE),
}


def _alter_table(node: Any) -> StatementLocks:
    """The strongest mode of the subcommands on the table (PostgreSQL takes that one lock)."""
    what, relkind = _ALTERED.get(node.objtype, ("ALTER TABLE", TABLE))
    names: list[str] = []
    modes: list[str] = []
    others: list[TableLock] = []
    concurrent = False
    for command in node.cmds or ():
        name, mode, more = _subcommand(command)
        if name not in names:
            names.append(name)
        modes.append(mode)
        others.extend(more)
        concurrent = concurrent or name == "DETACH PARTITION CONCURRENTLY"
    mode = strongest(modes) or _A_X
    locks = _merged([_lock(node.relation, mode, relkind), *others])
    kind = f"{what} {', '.join(names)}".rstrip()
    return StatementLocks(kind, locks, concurrent=concurrent, no_transaction_block=concurrent)


_RENAMED = {
    ObjectType.OBJECT_TABLE: ("RENAME TABLE", TABLE, _A_X),
    ObjectType.OBJECT_COLUMN: ("RENAME COLUMN", TABLE, _A_X),
    ObjectType.OBJECT_TABCONSTRAINT: ("RENAME CONSTRAINT", TABLE, _A_X),
    ObjectType.OBJECT_TRIGGER: ("RENAME TRIGGER", TABLE, _A_X),
    ObjectType.OBJECT_VIEW: ("RENAME VIEW", TABLE, _A_X),
    ObjectType.OBJECT_MATVIEW: ("RENAME MATERIALIZED VIEW", TABLE, _A_X),
    ObjectType.OBJECT_SEQUENCE: ("RENAME SEQUENCE", SEQUENCE, _A_X),
    # Since PostgreSQL 12 renaming an index takes SHARE UPDATE EXCLUSIVE on the index alone.
    ObjectType.OBJECT_INDEX: ("RENAME INDEX", INDEX, _S_U_X),
}


def _rename(node: Any) -> StatementLocks:
    if node.renameType in _RENAMED and node.relation is not None:
        kind, relkind, mode = _RENAMED[node.renameType]
        return StatementLocks(kind, (_lock(node.relation, mode, relkind),))
    return StatementLocks(f"RENAME {_object_name(node.renameType)}", ())


def _truncate(node: Any) -> StatementLocks:
    return StatementLocks("TRUNCATE", _merged(_lock(r, _A_X) for r in node.relations or ()))


def _lock_table(node: Any) -> StatementLocks:
    mode = MODES[int(node.mode) - 1]
    return StatementLocks("LOCK TABLE", _merged(_lock(r, mode) for r in node.relations or ()))


def _vacuum(node: Any) -> StatementLocks:
    """VACUUM and ANALYZE: SHARE UPDATE EXCLUSIVE; VACUUM FULL: ACCESS EXCLUSIVE.

    Without a table they go through every table, each in a transaction of its own: not listed.
    """
    full = node.is_vacuumcmd and option_on(node.options, "full")
    kind = ("VACUUM FULL" if full else "VACUUM") if node.is_vacuumcmd else "ANALYZE"
    mode = _A_X if full else _S_U_X
    locks = _merged(_lock(rel.relation, mode) for rel in node.rels or ())
    return StatementLocks(kind, locks, no_transaction_block=bool(node.is_vacuumcmd))


def _cluster(node: Any) -> StatementLocks:
    locks = (_lock(node.relation, _A_X),) if node.relation is not None else ()
    return StatementLocks("CLUSTER", locks, no_transaction_block=node.relation is None)


def _insert(node: Any) -> StatementLocks:
    query = node.selectStmt
    from_query = isinstance(query, ast.SelectStmt) and query.valuesLists is None
    kind = "INSERT ... SELECT" if from_query else "INSERT"
    return _writes(kind, node)


def _writes(kind: str, node: Any) -> StatementLocks:
    """DML: ROW EXCLUSIVE on the target, ACCESS SHARE on every table it reads."""
    reads = _read(node, skip=node.relation)
    return StatementLocks(kind, _merged([_lock(node.relation, _R_X), *reads]))


def _update(node: Any) -> StatementLocks:
    return _writes("UPDATE", node)


def _delete(node: Any) -> StatementLocks:
    return _writes("DELETE", node)


def _merge(node: Any) -> StatementLocks:
    return _writes("MERGE", node)


def _select(node: Any) -> StatementLocks:
    """A SELECT ... INTO's new table is not listed (nobody sees it before COMMIT)."""
    into = node.intoClause
    reads = _read(node, skip=into.rel if into is not None else None)
    writes = writing_ctes(node)
    kind = "SELECT INTO" if into is not None else "SELECT"
    if writes:
        kind = f"WITH ... {writes[0]} ... {kind}"
    return StatementLocks(kind, _merged(reads))


def _create_trigger(node: Any) -> StatementLocks:
    return StatementLocks("CREATE TRIGGER", (_lock(node.relation, _S_R_X),))


def _comment(node: Any) -> StatementLocks:
    """COMMENT ON TABLE/COLUMN takes SHARE UPDATE EXCLUSIVE on the table (reads, writes go on)."""
    kind = f"COMMENT ON {_object_name(node.objtype)}"
    if node.objtype == ObjectType.OBJECT_TABLE:
        return StatementLocks(kind, (_named(node.object, _S_U_X),))
    if node.objtype == ObjectType.OBJECT_COLUMN:
        return StatementLocks(kind, (_named(node.object[:-1], _S_U_X),))
    return StatementLocks(kind, ())


def _alter_sequence(node: Any) -> StatementLocks:
    """SHARE ROW EXCLUSIVE on the sequence: nextval() (ROW EXCLUSIVE) waits for the COMMIT."""
    return StatementLocks("ALTER SEQUENCE", (_lock(node.sequence, _S_R_X, SEQUENCE),))


def _view(node: Any) -> StatementLocks:
    return StatementLocks("CREATE VIEW", _merged(_read(node.query)))


def _refresh(node: Any) -> StatementLocks:
    """REFRESH: ACCESS EXCLUSIVE on the view; CONCURRENTLY: EXCLUSIVE (reads go on)."""
    mode = _X if node.concurrent else _A_X
    kind = "REFRESH MATERIALIZED VIEW" + (" CONCURRENTLY" if node.concurrent else "")
    return StatementLocks(kind, (_lock(node.relation, mode),))


def plpgsql_statements(node: Any) -> list[str]:
    """The SQL statements a PL/pgSQL DO block runs as written (not what it EXECUTEs)."""
    body = language = None
    for option in node.args or ():
        if option.defname == "as":
            body = str(option.arg.sval)
        elif option.defname == "language":
            language = str(option.arg.sval)
    if body is None or (language or "plpgsql").lower() != "plpgsql":
        return []
    tag = "$prosaas$"
    while tag in body:
        tag = tag[:-1] + "_$"
    source = f"CREATE FUNCTION pg_temp.do_block() RETURNS void LANGUAGE plpgsql AS {tag}{body}{tag}"
    try:
        tree = json.loads(parse_plpgsql_json(source))
    except (ParseError, ValueError, RecursionError):
        return []  # the server rejects it (or it is too deep): nothing to judge here
    found: list[str] = []
    stack: list[Any] = [tree]
    while stack:
        each = stack.pop()
        if isinstance(each, dict):
            executed = each.get("PLpgSQL_stmt_execsql")
            if isinstance(executed, dict):
                found.append(executed["sqlstmt"]["PLpgSQL_expr"]["query"])
            stack.extend(reversed(list(each.values())))
        elif isinstance(each, list):
            stack.extend(reversed(each))
    return found


# ALTER ... SET SCHEMA of each kind of relation: ACCESS EXCLUSIVE on it.
_MOVED = {
    ObjectType.OBJECT_TABLE: ("ALTER TABLE SET SCHEMA", TABLE),
    ObjectType.OBJECT_VIEW: ("ALTER VIEW SET SCHEMA", TABLE),
    ObjectType.OBJECT_MATVIEW: ("ALTER MATERIALIZED VIEW SET SCHEMA", TABLE),
    ObjectType.OBJECT_FOREIGN_TABLE: ("ALTER FOREIGN TABLE SET SCHEMA", TABLE),
    ObjectType.OBJECT_SEQUENCE: ("ALTER SEQUENCE SET SCHEMA", SEQUENCE),
}


def _set_schema(node: Any) -> StatementLocks:
    if node.objectType in _MOVED and node.relation is not None:
        kind, relkind = _MOVED[node.objectType]
        return StatementLocks(kind, (_lock(node.relation, _A_X, relkind),))
    return StatementLocks(f"ALTER {_object_name(node.objectType)} SET SCHEMA", ())


def _rule(node: Any) -> StatementLocks:
    return StatementLocks("CREATE RULE", (_lock(node.relation, _A_X),))


def _policy(node: Any) -> StatementLocks:
    return StatementLocks("CREATE POLICY", (_lock(node.table, _A_X),))


def _statistics(node: Any) -> StatementLocks:
    relations = [rel for rel in node.relations or () if isinstance(rel, ast.RangeVar)]
    return StatementLocks("CREATE STATISTICS", _merged(_lock(rel, _S_U_X) for rel in relations))


def _do(node: Any) -> StatementLocks:
    """A DO block takes what its own statements take (not what it runs through EXECUTE)."""
    taken: list[TableLock] = []
    for text in plpgsql_statements(node):
        try:
            parsed = pglast.parse_sql(text)
        except ParseError:
            continue
        for raw in parsed:
            if raw.stmt is not None and not isinstance(raw.stmt, ast.TransactionStmt | ast.DoStmt):
                taken.extend(statement_locks(raw.stmt).locks)
    return StatementLocks("DO", _merged(taken))


def _no_lock(kind: str) -> Callable[[Any], StatementLocks]:
    def handler(_node: Any) -> StatementLocks:
        return StatementLocks(kind, ())

    return handler


def option_on(options: Any, name: str) -> bool:
    """Whether a (name [value]) option is on, read as PostgreSQL's defGetBoolean reads it."""
    for option in options or ():
        if option.defname != name:
            continue
        value = option.arg
        if isinstance(value, ast.Integer):
            return bool(value.ival != 0)
        if isinstance(value, ast.String):
            return str(value.sval).lower() not in ("false", "off")
        return True  # no value: on
    return False


_HANDLERS: dict[type, Callable[[Any], StatementLocks]] = {
    ast.TransactionStmt: _transaction,
    ast.CreateStmt: _create_table,
    ast.CreateTableAsStmt: _create_table_as,
    ast.IndexStmt: _index,
    ast.DropStmt: _drop,
    ast.ReindexStmt: _reindex,
    ast.AlterTableStmt: _alter_table,
    ast.RenameStmt: _rename,
    ast.TruncateStmt: _truncate,
    ast.LockStmt: _lock_table,
    ast.VacuumStmt: _vacuum,
    ast.ClusterStmt: _cluster,
    ast.InsertStmt: _insert,
    ast.UpdateStmt: _update,
    ast.DeleteStmt: _delete,
    ast.MergeStmt: _merge,
    ast.SelectStmt: _select,
    ast.CreateTrigStmt: _create_trigger,
    ast.CommentStmt: _comment,
    ast.AlterSeqStmt: _alter_sequence,
    ast.ViewStmt: _view,
    ast.RefreshMatViewStmt: _refresh,
    ast.CreateSeqStmt: _no_lock("CREATE SEQUENCE"),
    ast.CompositeTypeStmt: _no_lock("CREATE TYPE"),
    ast.CreateEnumStmt: _no_lock("CREATE TYPE AS ENUM"),
    ast.AlterEnumStmt: _no_lock("ALTER TYPE"),
    ast.CreateSchemaStmt: _no_lock("CREATE SCHEMA"),
    ast.CreateExtensionStmt: _no_lock("CREATE EXTENSION"),
    ast.AlterExtensionStmt: _no_lock("ALTER EXTENSION"),
    ast.CreateFunctionStmt: _no_lock("CREATE FUNCTION"),
    ast.VariableSetStmt: _no_lock("SET"),
    ast.DoStmt: _do,
    ast.AlterObjectSchemaStmt: _set_schema,
    ast.RuleStmt: _rule,
    ast.CreatePolicyStmt: _policy,
    ast.CreateStatsStmt: _statistics,
}
