"""The schema as the revisions build it, replayed from their parse trees: column types, indexes.

The offline SQL of `ALTER COLUMN ... TYPE` names the new type only; the history names the old
one. lint replays every revision in upgrade order (those before `--since` too) into a Schema
and asks `rewrites()` whether a type change makes PostgreSQL rewrite the table. The answers are
PostgreSQL 15's (ATColumnChangeRequiresRewrite and the length-coercion support functions), and
the tests check each "no rewrite" against a real server's pg_class.relfilenode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pglast import ast
from pglast.enums import ObjectType

# Unqualified names resolve through the default search_path ("$user", public): public.
DEFAULT_SCHEMA = "public"
Table = tuple[str, str]  # (schema, name)


@dataclass(frozen=True)
class ColumnType:
    """A type as PostgreSQL's grammar names it: pg_catalog's name, its modifiers, array depth."""

    name: str  # "varchar", "int4", "numeric", "text", or a user type's (last) name
    modifiers: tuple[int, ...] = ()  # varchar(100): (100,); numeric(10, 2): (10, 2)
    array: int = 0  # dimensions: text[] is 1
    # The column's COLLATE, when it names one other than "default" (not part of the type: an
    # ALTER ... TYPE without COLLATE resets it to the default, and rebuilds the indexes).
    collation: str | None = field(default=None, compare=False)

    def __str__(self) -> str:
        shown = _SHOWN.get(self.name, self.name)
        mods = f"({', '.join(map(str, self.modifiers))})" if self.modifiers else ""
        return f"{shown}{mods}{'[]' * self.array}"


_SHOWN = {
    "int2": "smallint",
    "int4": "integer",
    "int8": "bigint",
    "float4": "real",
    "float8": "double precision",
    "bool": "boolean",
    "bpchar": "char",
    "timestamptz": "timestamp with time zone",
    "timetz": "time with time zone",
}
# What the grammar leaves as written: serials are integers with a sequence; `decimal` is numeric.
_ALIASES = {
    "serial": "int4",
    "serial4": "int4",
    "bigserial": "int8",
    "serial8": "int8",
    "smallserial": "int2",
    "serial2": "int2",
    "integer": "int4",
    "int": "int4",
    "bigint": "int8",
    "smallint": "int2",
    "boolean": "bool",
    "decimal": "numeric",
}


def column_type(type_name: Any, collate: Any = None) -> ColumnType | None:
    """The ColumnType of a pglast TypeName (and a column's CollateClause); None when a modifier
    is not a plain number."""
    if type_name is None or not type_name.names or type_name.pct_type:
        return None
    name = str(type_name.names[-1].sval).lower()
    modifiers: list[int] = []
    for modifier in type_name.typmods or ():
        value = getattr(modifier, "val", None)
        if not isinstance(value, ast.Integer):
            return None  # interval's field names, a parameter: not judged
        modifiers.append(int(value.ival or 0))
    collation = str(collate.collname[-1].sval) if collate is not None else None
    return ColumnType(
        _ALIASES.get(name, name),
        tuple(modifiers),
        len(type_name.arrayBounds or ()),
        None if collation == "default" else collation,
    )


# Types of one binary representation that PostgreSQL casts by relabelling (no rewrite).
_TEXT_LIKE = frozenset({"text", "varchar"})
# Types whose length/precision coercion PostgreSQL skips when the new modifier does not narrow
# (varchar_support, numeric_support, timestamp_support, ...): (modifier index that must not
# shrink, modifiers that must stay equal).
_WIDENING = {
    "varchar": ((0,), ()),
    "numeric": ((0,), (1,)),
    "timestamp": ((0,), ()),
    "timestamptz": ((0,), ()),
    "time": ((0,), ()),
    "varbit": ((0,), ()),
}


def rewrites(old: ColumnType, new: ColumnType) -> bool:
    """Whether ALTER COLUMN ... TYPE from `old` to `new` rewrites the table or rebuilds an index.

    PostgreSQL 15 does neither for a relabel (varchar to text, text to varchar without a length)
    or a modifier that does not narrow (a longer varchar, a numeric of more precision and the
    same scale, a finer timestamp, none at all). timestamp to timestamptz keeps the table when
    the session's TimeZone is UTC but rebuilds its indexes: reported.
    """
    if old == new:
        return False
    if old.array != new.array:
        return True
    if old.array:  # an array's elements are coerced one by one (even varchar[] to text[])
        return True
    if new.name == "text" and old.name in _TEXT_LIKE:
        return False  # varchar(n) -> text: a relabel
    if old.name == "text" and new.name == "varchar":
        return bool(new.modifiers)  # to varchar without a length: a relabel; with one: a check
    if old.name != new.name or old.name not in _WIDENING:
        return True
    if not new.modifiers:
        return False  # removing the length or precision
    if not old.modifiers:
        return True  # adding one: every value is checked
    grows, same = _WIDENING[old.name]
    old_mods, new_mods = _padded(old), _padded(new)
    return any(new_mods[i] < old_mods[i] for i in grows) or any(
        new_mods[i] != old_mods[i] for i in same
    )


def _padded(kind: ColumnType) -> tuple[int, ...]:
    """numeric(p) is numeric(p, 0)."""
    return (
        (*kind.modifiers, 0)
        if kind.name == "numeric" and len(kind.modifiers) == 1
        else (kind.modifiers)
    )


@dataclass
class Schema:
    """Tables with their known column types, and which table each index is on."""

    columns: dict[Table, dict[str, ColumnType | None]] = field(default_factory=dict)
    indexes: dict[Table, Table] = field(default_factory=dict)  # (schema, index) -> its table

    def type_of(self, table: Table, column: str) -> ColumnType | None:
        return self.columns.get(table, {}).get(column)

    def table_of_index(self, index: Table) -> Table | None:
        return self.indexes.get(index)

    def apply(self, node: Any) -> None:
        """Replay one statement (a RawStmt's stmt) into the model."""
        replay = _REPLAYS.get(type(node))
        if replay is not None:
            replay(self, node)

    def _create_table(self, node: Any) -> None:
        table = table_key(node.relation)
        if node.if_not_exists and table in self.columns:
            return  # it stays as it was
        self._forget(table)
        known = not node.inhRelations and not node.partbound and not node.ofTypename
        columns: dict[str, ColumnType | None] = {}
        for element in node.tableElts or ():
            if isinstance(element, ast.ColumnDef):
                columns[str(element.colname)] = column_type(element.typeName, element.collClause)
            elif isinstance(element, ast.TableLikeClause):
                known = False
        # Inherited or LIKE columns are unknown: such a table answers None for any column.
        self.columns[table] = columns if known else _Unknown(columns)

    def _create_table_as(self, node: Any) -> None:
        self._forget(table_key(node.into.rel))
        self.columns[table_key(node.into.rel)] = _Unknown()

    def _select(self, node: Any) -> None:
        if node.intoClause is not None:
            self._forget(table_key(node.intoClause.rel))
            self.columns[table_key(node.intoClause.rel)] = _Unknown()

    def _alter_table(self, node: Any) -> None:
        if node.objtype != ObjectType.OBJECT_TABLE:
            return
        table = table_key(node.relation)
        columns = self.columns.setdefault(table, _Unknown())
        for command in node.cmds or ():
            subtype = command.subtype.name
            if subtype == "AT_AddColumn":
                name = command.def_.colname
                if command.missing_ok and (name in columns or isinstance(columns, _Unknown)):
                    # ADD COLUMN IF NOT EXISTS of a column it has (or may have): kept as it was.
                    columns.setdefault(name, None)
                    continue
                columns[name] = column_type(command.def_.typeName, command.def_.collClause)
            elif subtype == "AT_DropColumn":
                columns.pop(command.name, None)
            elif subtype == "AT_AlterColumnType":
                definition = command.def_
                columns[command.name] = column_type(definition.typeName, definition.collClause)

    def _rename(self, node: Any) -> None:
        if node.renameType == ObjectType.OBJECT_TABLE:
            old = table_key(node.relation)
            new = (old[0], node.newname)
            self._forget(new)
            if old in self.columns:
                self.columns[new] = self.columns.pop(old)
            for index, table in self.indexes.items():
                if table == old:
                    self.indexes[index] = new
        elif (
            node.renameType == ObjectType.OBJECT_COLUMN
            and node.relationType == ObjectType.OBJECT_TABLE
        ):
            columns = self.columns.get(table_key(node.relation))
            if columns is not None:
                kind = columns.pop(node.subname, None)
                columns[node.newname] = kind
        elif node.renameType == ObjectType.OBJECT_INDEX:
            old = table_key(node.relation)
            if old in self.indexes:
                self.indexes[(old[0], node.newname)] = self.indexes.pop(old)

    def _drop(self, node: Any) -> None:
        for names in node.objects or ():
            parts = [str(part.sval) for part in names]
            key = (parts[-2] if len(parts) > 1 else DEFAULT_SCHEMA, parts[-1])
            if node.removeType == ObjectType.OBJECT_TABLE:
                self._forget(key)
            elif node.removeType == ObjectType.OBJECT_INDEX:
                self.indexes.pop(key, None)

    def _index(self, node: Any) -> None:
        if node.idxname:
            table = table_key(node.relation)
            self.indexes[(table[0], node.idxname)] = table

    def _forget(self, table: Table) -> None:
        self.columns.pop(table, None)
        for index in [index for index, on in self.indexes.items() if on == table]:
            del self.indexes[index]


class _Unknown(dict[str, "ColumnType | None"]):
    """The columns of a table whose columns are not all known (CREATE TABLE AS, LIKE, INHERITS,
    or one no revision read creates): any column it does not list is of an unknown type."""


def table_key(relation: Any) -> Table:
    return (relation.schemaname or DEFAULT_SCHEMA, relation.relname)


_REPLAYS = {
    ast.CreateStmt: Schema._create_table,
    ast.CreateTableAsStmt: Schema._create_table_as,
    ast.SelectStmt: Schema._select,
    ast.AlterTableStmt: Schema._alter_table,
    ast.RenameStmt: Schema._rename,
    ast.DropStmt: Schema._drop,
    ast.IndexStmt: Schema._index,
}
