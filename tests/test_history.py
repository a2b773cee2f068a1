"""The schema model lint replays from revisions, and its rewrite judgement against a real server."""

from __future__ import annotations

import pglast
import psycopg
import pytest

from prosaas_migrate import history
from prosaas_migrate.history import ColumnType

# (old type, new type, whether PostgreSQL 15 rewrites the table or rebuilds an index on it)
TYPE_CHANGES = [
    ("varchar(100)", "varchar(200)", False),
    ("varchar(100)", "varchar(100)", False),
    ("character varying(100)", "varchar", False),
    ("varchar(100)", "text", False),
    ("varchar", "text", False),
    ("text", "varchar", False),
    ("text", "character varying", False),
    ("numeric(10, 2)", "numeric(12, 2)", False),
    ("numeric(10, 2)", "numeric", False),
    ("numeric(10)", "numeric(12)", False),
    ("numeric(10)", "numeric(12, 0)", False),
    ("decimal(10, 2)", "numeric(11, 2)", False),
    ("timestamp(3)", "timestamp(6)", False),
    ("timestamp(3)", "timestamp", False),
    ("timestamptz(3)", "timestamptz", False),
    ("time(2)", "time(4)", False),
    ("varbit(4)", "varbit(8)", False),
    ("int", "integer", False),
    ("serial", "int", False),
    ("varchar(100)", "varchar(50)", True),
    ("text", "varchar(100)", True),
    ("varchar", "varchar(10)", True),
    ("numeric(10, 2)", "numeric(12, 3)", True),
    ("numeric(10, 2)", "numeric(9, 2)", True),
    ("numeric", "numeric(10, 2)", True),
    ("int", "bigint", True),
    ("bigint", "int", True),
    ("int", "text", True),
    ("timestamp", "timestamptz", True),  # the table stays (TimeZone UTC), its index is rebuilt
    ("timestamp(6)", "timestamp(3)", True),
    ("char(10)", "char(20)", True),
    ("char(10)", "text", True),
    ("bit(4)", "bit(8)", True),
    ("varchar(10)[]", "text[]", True),
    ("text[]", "varchar[]", True),
    ("varchar(10)", "name", True),
    ("float4", "float8", True),
]


def type_of(sql_type: str) -> ColumnType:
    (raw,) = pglast.parse_sql(f"CREATE TABLE x (c {sql_type})")
    kind = history.column_type(raw.stmt.tableElts[0].typeName)  # type: ignore[union-attr]
    assert kind is not None
    return kind


@pytest.mark.parametrize(
    ("old", "new", "rewrites"), TYPE_CHANGES, ids=[f"{o}->{n}" for o, n, _ in TYPE_CHANGES]
)
def test_rewrites_says_what_the_server_does(
    db_url: str, old: str, new: str, rewrites: bool
) -> None:
    assert history.rewrites(type_of(old), type_of(new)) == rewrites
    indexable = "[]" not in old and "bit" not in old
    with psycopg.connect(db_url) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute(f"CREATE TABLE x (c {old})")
        if indexable:
            conn.execute("CREATE INDEX ix_x ON x (c)")
        for _ in range(3):
            conn.execute("INSERT INTO x DEFAULT VALUES")
        files = "SELECT pg_relation_filenode('x'), pg_relation_filenode(to_regclass('ix_x'))"
        before = conn.execute(files).fetchone()
        conn.execute(f"ALTER TABLE x ALTER COLUMN c TYPE {new}")
        after = conn.execute(files).fetchone()
        conn.rollback()
    assert (before != after) == rewrites, (before, after)


def test_types_are_named_as_sql_names_them() -> None:
    assert str(type_of("character varying(100)")) == "varchar(100)"
    assert str(type_of("int")) == "integer"
    assert str(type_of("bigserial")) == "bigint"
    assert str(type_of("numeric(10,2)")) == "numeric(10, 2)"
    assert str(type_of("text[]")) == "text[]"
    assert str(type_of("timestamp with time zone")) == "timestamp with time zone"


def replayed(sql: str) -> history.Schema:
    schema = history.Schema()
    for raw in pglast.parse_sql(sql):
        schema.apply(raw.stmt)
    return schema


def test_the_model_follows_renames_drops_and_re_creations() -> None:
    schema = replayed(
        """
        CREATE TABLE a (id int, name varchar(50), note text);
        CREATE INDEX ix_a_name ON a (name);
        ALTER TABLE a RENAME COLUMN name TO title;
        ALTER TABLE a ALTER COLUMN title TYPE varchar(80);
        ALTER TABLE a RENAME TO b;
        ALTER INDEX ix_a_name RENAME TO ix_b_title;
        ALTER TABLE b DROP COLUMN note, ADD COLUMN note bigint;
        CREATE TABLE c (x text);
        DROP TABLE c;
        CREATE TABLE c (x int);
        CREATE TABLE s.d (x text);
        CREATE TABLE e AS SELECT 1 AS x;
        CREATE TABLE f (LIKE b, extra text);
        ALTER TABLE f ADD COLUMN IF NOT EXISTS title text;
        """
    )
    assert schema.type_of(("public", "a"), "title") is None  # renamed away
    assert schema.type_of(("public", "b"), "title") == type_of("varchar(80)")
    assert schema.type_of(("public", "b"), "name") is None
    assert schema.type_of(("public", "b"), "note") == type_of("bigint")
    assert schema.table_of_index(("public", "ix_b_title")) == ("public", "b")
    assert schema.table_of_index(("public", "ix_a_name")) is None
    assert schema.type_of(("public", "c"), "x") == type_of("int")
    assert schema.type_of(("s", "d"), "x") == type_of("text")
    assert schema.type_of(("public", "d"), "x") is None  # another schema's table
    assert schema.type_of(("public", "e"), "x") is None  # CREATE TABLE AS: unknown
    assert schema.type_of(("public", "f"), "extra") == type_of("text")
    assert schema.type_of(("public", "f"), "title") is None  # LIKE may have brought it
    dropped = replayed("CREATE TABLE g (x int); CREATE INDEX ix_g ON g (x); DROP TABLE g")
    assert dropped.type_of(("public", "g"), "x") is None
    assert dropped.table_of_index(("public", "ix_g")) is None
