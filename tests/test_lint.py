"""`prosaas-migrate lint`: revisions rendered by the real Alembic offline, rules checked by pglast.

Every rule has a revision that triggers it and a safe twin that does not, written with Alembic's
op.* calls and with raw op.execute SQL; the lock each rule names is checked against a real server.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import socket
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pglast
import psycopg
import pytest
from alembic.operations import Operations
from click.testing import CliRunner

from prosaas_migrate import compat, lint, locks, offline, revisions
from prosaas_migrate.cli import main
from prosaas_migrate.errors import ConfigError
from tests import project
from tests.conftest import clean_env, cli, on_a_terminal, query

# -- fixture projects -------------------------------------------------------------------------

BASE = """\
op.create_table("u", sa.Column("id", sa.Integer, primary_key=True))
op.create_table(
    "t",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("a", sa.Integer),
    sa.Column("b", sa.Integer, nullable=False),
    sa.Column("u_id", sa.Integer),
)
op.create_table("w", sa.Column("id", sa.Integer, nullable=False))
op.create_index("ix_t_a", "t", ["a"])
"""
BLOCK = "with op.get_context().autocommit_block():\n"


def project_at(root: Path) -> revisions.Project:
    return revisions.read_project(str(root / "alembic.ini"), "ALEMBIC_CONFIG")


def write_revision(
    root: Path,
    revision: str,
    down: str | tuple[str, ...] | None,
    body: str,
    *,
    header: str = "",
) -> Path:
    path = root / "migrations" / "versions" / f"{revision}.py"
    path.write_text(
        f'"""{revision}"""\n'
        "import sqlalchemy as sa\n"
        "from alembic import op\n"
        f"{header}\n"
        f"revision = {revision!r}\n"
        f"down_revision = {down!r}\n"
        "branch_labels = None\n"
        "depends_on = None\n\n\n"
        "def upgrade() -> None:\n"
        f"{textwrap.indent(textwrap.dedent(body).strip(), '    ')}\n"
    )
    return path


def new_project(root: Path, env: str = "stock") -> Path:
    """`alembic init` (the stock env.py, or the cookbook one), with r001 creating t, u and w."""
    project.create(root, [], env=env)
    write_revision(root, "r001", None, BASE)
    return root


def lint_at(root: Path, since: str | None = None) -> lint.Report:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return lint.lint_project(project_at(root), "ALEMBIC_CONFIG", since=since)
    finally:
        os.chdir(cwd)


def rules(report: lint.Report) -> list[tuple[str, str]]:
    return [(finding.revision, finding.rule) for finding in report.findings]


# -- every rule, unsafe and safe --------------------------------------------------------------

CASES: dict[str, list[tuple[str, str, str]]] = {
    # rule: [(style, unsafe body, safe twin)]
    "index-not-concurrent": [
        (
            "op",
            'op.create_index("ix_t_b", "t", ["b"])',
            f'{BLOCK}    op.create_index("ix_t_b", "t", ["b"], postgresql_concurrently=True)',
        ),
        (
            "sql",
            'op.execute("CREATE UNIQUE INDEX ix_t_b ON t (b)")',
            f'{BLOCK}    op.execute("CREATE UNIQUE INDEX CONCURRENTLY ix_t_b ON t (b)")',
        ),
    ],
    "reindex-not-concurrent": [
        (
            "sql",
            'op.execute("REINDEX INDEX ix_t_a")',
            f'{BLOCK}    op.execute("REINDEX INDEX CONCURRENTLY ix_t_a")',
        ),
        (
            "sql-table",
            'op.execute("REINDEX TABLE public.t")',
            f'{BLOCK}    op.execute("REINDEX (CONCURRENTLY) TABLE t")',
        ),
        (
            # An index of a table created in the same revision, or created in it itself.
            "sql-new",
            'op.execute("REINDEX (VERBOSE) INDEX ix_t_a")',
            'op.create_table("fresh", sa.Column("id", sa.Integer))\n'
            'op.create_index("ix_fresh", "fresh", ["id"])\n'
            'op.execute("REINDEX INDEX ix_fresh")\nop.execute("REINDEX TABLE fresh")',
        ),
    ],
    "drop-index-not-concurrent": [
        (
            "op",
            'op.drop_index("ix_t_a", table_name="t")',
            f'{BLOCK}    op.drop_index("ix_t_a", table_name="t", postgresql_concurrently=True)',
        ),
        (
            "sql",
            'op.execute("DROP INDEX IF EXISTS ix_t_a")',
            'op.create_table("fresh", sa.Column("id", sa.Integer))\n'
            'op.create_index("ix_fresh", "fresh", ["id"])\nop.execute("DROP INDEX ix_fresh")',
        ),
    ],
    "concurrently-in-transaction": [
        (
            "op",
            'op.create_index("ix_t_b", "t", ["b"], postgresql_concurrently=True)',
            f'{BLOCK}    op.create_index("ix_t_b", "t", ["b"], postgresql_concurrently=True)',
        ),
        (
            "sql",
            'op.execute("DROP INDEX CONCURRENTLY ix_t_a")',
            f'{BLOCK}    op.execute("DROP INDEX CONCURRENTLY ix_t_a")',
        ),
    ],
    "required-column-without-default": [
        (
            "op",
            'op.add_column("t", sa.Column("c", sa.Integer, nullable=False))',
            'op.add_column("t", sa.Column("c", sa.Integer, nullable=False, server_default="0"))',
        ),
        (
            "sql",
            'op.execute("ALTER TABLE t ADD COLUMN c text NOT NULL")',
            "op.execute(\"ALTER TABLE t ADD COLUMN c text NOT NULL DEFAULT ''\")",
        ),
        (
            # server_default=sa.null() renders DEFAULT NULL: no value for the existing rows.
            "op-default-null",
            'op.add_column("t", sa.Column("c", sa.Integer, nullable=False, '
            "server_default=sa.null()))",
            'op.add_column("t", sa.Column("c", sa.Integer, nullable=True, '
            "server_default=sa.null()))",
        ),
        (
            "sql-default-null",
            'op.execute("ALTER TABLE t ADD COLUMN c int NOT NULL DEFAULT NULL::integer")',
            'op.execute("ALTER TABLE t ADD COLUMN c int NOT NULL DEFAULT 0::integer")',
        ),
    ],
    "volatile-default": [
        (
            "op",
            'op.add_column("t", sa.Column("k", sa.Uuid, server_default=sa.text("gen_random_uuid()"'
            ")))",
            'op.add_column("t", sa.Column("k", sa.DateTime(timezone=True), '
            "server_default=sa.func.now()))",
        ),
        (
            "op-identity",
            'op.add_column("t", sa.Column("n", sa.BigInteger, sa.Identity()))',
            'op.add_column("t", sa.Column("n", sa.BigInteger))',
        ),
        (
            "sql",
            'op.execute("ALTER TABLE t ADD COLUMN n bigserial")',
            'op.execute("ALTER TABLE t ADD COLUMN at timestamptz DEFAULT CURRENT_TIMESTAMP")',
        ),
    ],
    "column-type-change": [
        (
            "op",
            'op.alter_column("t", "a", type_=sa.BigInteger)',
            'op.add_column("t", sa.Column("a_big", sa.BigInteger))',
        ),
        (
            "sql",
            'op.execute("ALTER TABLE t ALTER COLUMN a TYPE bigint USING a::bigint")',
            'op.execute("ALTER TABLE t ADD COLUMN a_big bigint")',
        ),
    ],
    "set-not-null": [
        (
            "op",
            'op.alter_column("t", "a", nullable=False)',
            'op.create_check_constraint("ck_a", "t", "a IS NOT NULL", postgresql_not_valid=True)',
        ),
        (
            "sql",
            'op.execute("ALTER TABLE t ALTER COLUMN a SET NOT NULL")',
            'op.execute("ALTER TABLE t ADD CONSTRAINT ck_a CHECK (a IS NOT NULL) NOT VALID")\n'
            'op.execute("ALTER TABLE t VALIDATE CONSTRAINT ck_a")',
        ),
    ],
    "foreign-key-without-not-valid": [
        (
            "op",
            'op.create_foreign_key("fk_t_u", "t", "u", ["u_id"], ["id"])',
            'op.create_foreign_key("fk_t_u", "t", "u", ["u_id"], ["id"], '
            "postgresql_not_valid=True)",
        ),
        (
            "op-column",
            'op.add_column("t", sa.Column("v_id", sa.Integer, sa.ForeignKey("u.id")))',
            'op.add_column("t", sa.Column("v_id", sa.Integer))',
        ),
        (
            "sql",
            'op.execute("ALTER TABLE t ADD CONSTRAINT fk FOREIGN KEY (u_id) REFERENCES u (id)")',
            'op.execute("ALTER TABLE t ADD CONSTRAINT fk FOREIGN KEY (u_id) REFERENCES u (id) '
            'NOT VALID")',
        ),
        (
            "sql-do-block",
            # The idempotent DO block runs its ALTER on the first deploy, as if written outside.
            'op.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname '
            "= 'fk') THEN ALTER TABLE t ADD CONSTRAINT fk FOREIGN KEY (u_id) REFERENCES u (id); "
            'END IF; END $$")',
            'op.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname '
            "= 'fk') THEN ALTER TABLE t ADD CONSTRAINT fk FOREIGN KEY (u_id) REFERENCES u (id) "
            'NOT VALID; END IF; END $$")',
        ),
    ],
    "check-without-not-valid": [
        (
            "op",
            'op.create_check_constraint("ck_b", "t", "b > 0")',
            'op.create_check_constraint("ck_b", "t", "b > 0", postgresql_not_valid=True)',
        ),
        (
            "sql",
            'op.execute("ALTER TABLE t ADD CONSTRAINT ck_b CHECK (b > 0)")',
            'op.execute("ALTER TABLE t ADD CONSTRAINT ck_b CHECK (b > 0) NOT VALID")',
        ),
    ],
    "unique-without-index": [
        (
            "op",
            'op.create_unique_constraint("uq_t_b", "t", ["b"])',
            f'{BLOCK}    op.create_index("uq_t_b", "t", ["b"], unique=True, '
            "postgresql_concurrently=True)\n"
            'op.execute("ALTER TABLE t ADD CONSTRAINT uq_t_b UNIQUE USING INDEX uq_t_b")',
        ),
        (
            "op-primary-key",
            'op.create_primary_key("w_pkey", "w", ["id"])',
            f'{BLOCK}    op.execute("CREATE UNIQUE INDEX CONCURRENTLY w_pkey ON w (id)")\n'
            'op.execute("ALTER TABLE w ADD CONSTRAINT w_pkey PRIMARY KEY USING INDEX w_pkey")',
        ),
        (
            "sql",
            'op.execute("ALTER TABLE t ADD CONSTRAINT uq_t_b UNIQUE (b)")',
            'op.execute("ALTER TABLE t ADD CONSTRAINT uq_t_b UNIQUE USING INDEX ix_t_a")',
        ),
    ],
    "exclusion-constraint": [
        (
            "op",
            'op.create_exclude_constraint("ex_t_b", "t", ("b", "="), using="gist")',
            "from sqlalchemy.dialects.postgresql import ExcludeConstraint\n"
            'op.create_table("fresh", sa.Column("b", sa.Integer), '
            'ExcludeConstraint(("b", "="), using="gist"))',
        ),
        (
            "sql",
            'op.execute("ALTER TABLE t ADD CONSTRAINT ex EXCLUDE USING gist '
            "(int4range(a, b, '[]') WITH &&)\")",
            'op.execute("CREATE TABLE fresh (a int, b int, EXCLUDE USING gist '
            "(int4range(a, b, '[]') WITH &&))\")",
        ),
    ],
    "rename-column": [
        (
            "op",
            'op.alter_column("t", "a", new_column_name="a2")',
            'op.add_column("t", sa.Column("a2", sa.Integer))',
        ),
        (
            "sql",
            'op.execute("ALTER TABLE t RENAME COLUMN a TO a2")',
            'op.execute("ALTER INDEX ix_t_a RENAME TO ix_t_a2")',
        ),
    ],
    "rename-table": [
        (
            "op",
            'op.rename_table("t", "t2")',
            'op.execute("CREATE VIEW t2 AS SELECT * FROM t")',
        ),
        (
            "sql",
            'op.execute("ALTER TABLE IF EXISTS public.t RENAME TO t2")',
            'op.execute("CREATE VIEW t2 AS SELECT * FROM t")',
        ),
        (
            "sql-set-schema",
            # Another schema: the running image's unqualified queries no longer find it. A
            # table the revision creates is nobody's yet, wherever it moves.
            'op.execute("CREATE SCHEMA app")\nop.execute("ALTER TABLE t SET SCHEMA app")',
            'op.execute("CREATE SCHEMA app")\n'
            'op.execute("CREATE TABLE fresh (id int)")\n'
            'op.execute("ALTER TABLE fresh SET SCHEMA app")\n'
            'op.execute("CREATE INDEX ix_fresh ON app.fresh (id)")',
        ),
    ],
    "drop-column": [
        (
            "op",
            'op.drop_column("t", "b")',
            'op.alter_column("t", "b", nullable=True)',
        ),
        (
            "sql",
            'op.execute("ALTER TABLE t DROP COLUMN b")',
            'op.execute("ALTER TABLE t ALTER COLUMN b DROP NOT NULL")',
        ),
    ],
    "drop-table": [
        (
            "op",
            'op.drop_table("u")',
            'op.create_table("scratch", sa.Column("id", sa.Integer))\nop.drop_table("scratch")',
        ),
        (
            "sql",
            'op.execute("DROP TABLE IF EXISTS u")',
            'op.execute("CREATE TABLE scratch (id int)")\nop.execute("DROP TABLE scratch")',
        ),
    ],
    "vacuum-full": [
        (
            "sql",
            f'{BLOCK}    op.execute("VACUUM (FULL, ANALYZE) t")',
            f'{BLOCK}    op.execute("VACUUM (ANALYZE) t")',
        ),
        (
            # Read as PostgreSQL reads a boolean option: 1/true/on, 0/false/off (any case).
            "sql-option-value",
            f'{BLOCK}    op.execute("VACUUM (FULL 1, ANALYZE) t")',
            f'{BLOCK}    op.execute("VACUUM (FULL false) t")\n'
            f'    op.execute("VACUUM (FULL OFF) t")\n'
            f'    op.execute("VACUUM (FULL 0) t")',
        ),
    ],
    "cluster": [
        ("sql", 'op.execute("CLUSTER t USING ix_t_a")', 'op.execute("ANALYZE t")'),
    ],
    "table-rewrite": [
        ("sql", 'op.execute("ALTER TABLE t SET TABLESPACE pg_default")', 'op.execute("ANALYZE t")'),
        ("sql-logged", 'op.execute("ALTER TABLE t SET UNLOGGED")', 'op.execute("VACUUM t")'),
        (
            "sql-new-table",
            'op.execute("ALTER TABLE t SET LOGGED")',
            'op.execute("CREATE TABLE n (id int)")\nop.execute("ALTER TABLE n SET UNLOGGED")',
        ),
    ],
    "lock-table": [
        (
            "sql",
            'op.execute("LOCK TABLE t IN SHARE ROW EXCLUSIVE MODE")',
            'op.execute("LOCK TABLE t IN SHARE UPDATE EXCLUSIVE MODE")',
        ),
        ("sql-default-mode", 'op.execute("LOCK t")', 'op.execute("SELECT 1")'),
    ],
    "backfill-under-lock": [
        (
            "op",
            'op.add_column("t", sa.Column("c", sa.Integer))\n'
            'op.execute(sa.table("t", sa.column("c", sa.Integer)).update().values(c=0))',
            'op.add_column("t", sa.Column("c", sa.Integer))\n'
            f"{BLOCK}    op.execute(sa.table('t', sa.column('c', sa.Integer))"
            ".update().values(c=0))",
        ),
        (
            "sql",
            'op.execute("ALTER TABLE t ADD COLUMN c int")\n'
            'op.execute("UPDATE t SET c = a WHERE c IS NULL")',
            # INSERT ... VALUES is seed data, not a backfill; new tables are nobody's yet.
            'op.execute("ALTER TABLE t ADD COLUMN c int")\n'
            'op.execute("INSERT INTO t (id, b) VALUES (1, 1)")\n'
            'op.execute("CREATE TABLE fresh (id int)")\n'
            'op.execute("CREATE INDEX ix_fresh ON fresh (id)")\n'
            'op.execute("INSERT INTO fresh SELECT id FROM u")',
        ),
        (
            "sql-insert-select",
            # CREATE TRIGGER holds SHARE ROW EXCLUSIVE on t; INSERT before it is not under it.
            'op.execute("CREATE TRIGGER tr BEFORE INSERT ON t EXECUTE FUNCTION f()")\n'
            'op.execute("INSERT INTO t (id, b) SELECT id, id FROM u")',
            'op.execute("INSERT INTO t (id, b) SELECT id, id FROM u")\n'
            'op.execute("CREATE TRIGGER tr BEFORE INSERT ON t EXECUTE FUNCTION f()")',
        ),
        (
            "sql-writing-with",
            # A SELECT whose WITH updates t is an UPDATE of t; a WITH that only reads is not.
            'op.execute("ALTER TABLE t ADD COLUMN c int")\n'
            'op.execute("WITH x AS (UPDATE t SET c = a RETURNING id) SELECT count(*) FROM x")',
            'op.execute("ALTER TABLE t ADD COLUMN c int")\n'
            'op.execute("WITH x AS (SELECT id FROM u) SELECT count(*) FROM x")',
        ),
        (
            "sql-savepoint",
            # A SAVEPOINT (or its RELEASE) ends no transaction: the lock is still held.
            'op.execute("ALTER TABLE t ADD COLUMN c int")\n'
            'op.execute("SAVEPOINT backfill")\n'
            'op.execute("UPDATE t SET c = a")\n'
            'op.execute("RELEASE SAVEPOINT backfill")',
            'op.execute("SAVEPOINT backfill")\n'
            'op.execute("UPDATE t SET a = 0")\n'
            'op.execute("RELEASE SAVEPOINT backfill")\n'
            'op.execute("ALTER TABLE t ADD COLUMN c int")',
        ),
        (
            "sql-do-block",
            # A DO block's own statements run in the transaction; one that only creates a type
            # or seeds a row is no backfill.
            'op.execute("ALTER TABLE t ADD COLUMN c int")\n'
            'op.execute("DO $$ DECLARE r record; BEGIN FOR r IN SELECT id FROM u LOOP '
            'UPDATE t SET c = r.id WHERE u_id = r.id; END LOOP; END $$")',
            'op.execute("ALTER TABLE t ADD COLUMN c int")\n'
            "op.execute(\"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_type WHERE typname = 'e') "
            "THEN CREATE TYPE e AS ENUM ('a'); END IF; INSERT INTO t (id, b) VALUES (1, 1); "
            'END $$")',
        ),
        (
            "sql-copy",
            # A copy of the locked table reads all of it under the lock; WITH NO DATA reads none.
            'op.execute("ALTER TABLE t ADD COLUMN c int")\n'
            'op.execute("CREATE TABLE t_copy AS SELECT * FROM t")\n'
            'op.execute("SELECT * INTO t_copy2 FROM t")',
            'op.execute("ALTER TABLE t ADD COLUMN c int")\n'
            'op.execute("CREATE TABLE t_copy AS SELECT * FROM t WITH NO DATA")',
        ),
    ],
    "syntax-error": [
        (
            "sql",
            'op.execute("ALTER TABLE t ADD COLUMN")',
            'op.execute("ALTER TABLE t ADD COLUMN c int")',
        ),
    ],
}
# Rules about a revision as a whole, each with tests of its own below.
SEPARATELY_TESTED = {"offline-render-failed", "unknown-allow"}


def test_every_rule_has_cases() -> None:
    assert set(CASES) | SEPARATELY_TESTED == set(lint.RULES)
    for rule, cases in CASES.items():
        table_rule = lint.RULES[rule].lock is not None
        styles = {style.split("-")[0] for style, _, _ in cases}
        # An Alembic op.* call and raw SQL for every rule that Alembic has an operation for.
        no_op_for_it = {
            "vacuum-full",
            "cluster",
            "lock-table",
            "syntax-error",
            "reindex-not-concurrent",
            "table-rewrite",
        }
        assert styles == ({"sql"} if rule in no_op_for_it else {"op", "sql"}), rule
        assert table_rule or rule in {"concurrently-in-transaction", "syntax-error"}


@pytest.mark.parametrize(
    ("rule", "unsafe", "safe"),
    [
        pytest.param(rule, unsafe, safe, id=f"{rule}-{style}")
        for rule, cases in CASES.items()
        for style, unsafe, safe in cases
    ],
)
def test_rule_fires_and_its_safe_twin_does_not(
    tmp_path: Path, rule: str, unsafe: str, safe: str
) -> None:
    bad = new_project(tmp_path / "unsafe")
    write_revision(bad, "r002", "r001", unsafe)
    report = lint_at(bad)
    assert report.revisions_checked == 2
    assert report.findings, f"{rule} did not fire on:\n{unsafe}"
    assert {(f.revision, f.rule) for f in report.findings} == {("r002", rule)}
    finding = report.findings[0]
    assert finding.file == str(Path("migrations/versions/r002.py"))
    # lock-table and backfill-under-lock name the mode the SQL takes or holds.
    assert finding.lock == lint.RULES[rule].lock or rule in ("lock-table", "backfill-under-lock")
    assert finding.statement and finding.message and finding.hint
    assert "--" not in finding.statement  # Alembic's "-- Running upgrade" comment is not SQL

    good = new_project(tmp_path / "safe")
    write_revision(good, "r002", "r001", safe)
    report = lint_at(good)
    assert report.revisions_checked == 2
    assert report.findings == []


def test_a_long_statement_is_truncated(tmp_path: Path) -> None:
    root = new_project(tmp_path)
    columns = ", ".join(f"c{n}" for n in range(60))
    write_revision(root, "r002", "r001", f'op.execute("CREATE INDEX ix_wide ON t ({columns})")')
    (finding,) = lint_at(root).findings
    assert len(finding.statement) == lint.STATEMENT_WIDTH
    assert finding.statement.startswith("CREATE INDEX ix_wide ON t (c0, c1")
    assert finding.statement.endswith("...")


# -- transactions: autocommit_block, per-migration transactions --------------------------------

PER_MIGRATION_ANCHOR = "literal_binds=True,"  # in the stock env.py's offline configure()
PER_MIGRATION = "transaction_per_migration=True,\n        literal_binds=True,"
NO_TRANSACTIONS = "transactional_ddl=False,\n        literal_binds=True,"


@pytest.mark.parametrize("per_migration", [False, True], ids=["one-transaction", "per-migration"])
def test_autocommit_block_is_recognised_from_alembics_commit_and_begin(
    tmp_path: Path, per_migration: bool
) -> None:
    root = new_project(tmp_path)
    if per_migration:
        env = root / "migrations" / "env.py"
        text = env.read_text()
        assert text.count("literal_binds=True,") == 1  # the offline branch's configure()
        env.write_text(text.replace("literal_binds=True,", PER_MIGRATION))
    write_revision(
        root,
        "r002",
        "r001",
        BLOCK
        + '    op.create_index("ix_ok", "t", ["b"], postgresql_concurrently=True)\n'
        + 'op.create_index("ix_bad", "t", ["b", "a"], postgresql_concurrently=True)',
    )
    write_revision(root, "r003", "r002", BLOCK + '    op.execute("DROP INDEX CONCURRENTLY ix_ok")')
    cfg, script = offline.load_script_directory(project_at(root), "ALEMBIC_CONFIG")
    revisions, heads = offline.select(script, None)
    rendering = offline.render(cfg, script, revisions, starting_heads=heads)
    assert rendering.renderer == offline.ENV_PY_RENDERER
    # What the installed Alembic writes for an autocommit_block() in offline mode.
    r002 = next(c.sql for c in rendering.chunks if c.revision and c.revision.revision == "r002")
    assert "COMMIT;\n\nCREATE INDEX CONCURRENTLY ix_ok ON t (b);\n\nBEGIN;" in r002
    assert r002.count("BEGIN;") == (2 if per_migration else 1)

    report = lint.check(rendering, revisions_checked=len(revisions))
    assert [(f.revision, f.rule, f.statement) for f in report.findings] == [
        ("r002", "concurrently-in-transaction", "CREATE INDEX CONCURRENTLY ix_bad ON t (b, a)")
    ]


def test_without_transactional_ddl_the_report_says_what_it_cannot_see(tmp_path: Path) -> None:
    root = new_project(tmp_path)
    env = root / "migrations" / "env.py"
    env.write_text(env.read_text().replace(PER_MIGRATION_ANCHOR, NO_TRANSACTIONS, 1))
    write_revision(root, "r002", "r001", 'op.create_index("ix", "t", ["b"])')
    report = lint_at(root)
    assert rules(report) == [("r002", "index-not-concurrent")]
    assert report.renderer == "env.py"
    assert "transactional_ddl=False" in str(report.renderer_note)
    assert "transactional_ddl=False" in lint.render_text(report, style=lambda text, **_: text)


# -- what is exempt, what is allowed ----------------------------------------------------------


@pytest.mark.parametrize("style", ["op", "sql"])
def test_a_table_created_in_the_same_revision_is_exempt(tmp_path: Path, style: str) -> None:
    root = new_project(tmp_path)
    body = {
        "op": """\
            op.create_table("fresh", sa.Column("id", sa.Integer), sa.Column("u_id", sa.Integer))
            op.create_index("ix_fresh", "fresh", ["id"])
            op.create_foreign_key("fk_fresh_u", "fresh", "u", ["u_id"], ["id"])
            op.add_column("fresh", sa.Column("n", sa.Integer, nullable=False))
            op.alter_column("fresh", "id", type_=sa.BigInteger, nullable=False)
            op.create_unique_constraint("uq_fresh", "fresh", ["n"])
            op.rename_table("fresh", "fresher")
            op.drop_column("fresher", "n")
            op.create_index("ix_fresher", "fresher", ["u_id"], postgresql_concurrently=True)
            op.create_index("ix_t_b", "t", ["b"])
            """,
        "sql": """\
            op.execute("CREATE TABLE public.fresh (id int, u_id int)")
            op.execute("CREATE INDEX ix_fresh ON fresh (id)")
            op.execute("ALTER TABLE fresh ADD COLUMN r float DEFAULT random()")
            op.execute("ALTER TABLE fresh ADD CONSTRAINT ck CHECK (id > 0)")
            op.execute("LOCK TABLE fresh")
            op.execute("CREATE TABLE copy AS SELECT * FROM t")
            op.execute("CREATE INDEX ix_copy ON copy (a)")
            op.execute("SELECT * INTO selected FROM t")
            op.execute("CREATE INDEX ix_selected ON selected (a)")
            op.execute("DROP TABLE fresh, copy, selected")
            op.execute("CREATE INDEX CONCURRENTLY ix_fresh2 ON fresh (u_id)")
            op.execute("CREATE INDEX ix_t_b ON t (b)")
            """,
    }[style]
    write_revision(root, "r002", "r001", body)
    write_revision(root, "r003", "r002", 'op.execute("CREATE INDEX ix_later ON fresh (u_id)")')
    found = [(f.revision, f.rule, f.table) for f in lint_at(root).findings]
    # A new table exempts it from the table rules, not from a CONCURRENTLY that would fail, nor
    # the old table t, nor the next revision (by then the new image may be serving it).
    concurrently = ("r002", "concurrently-in-transaction", None)
    assert found == [
        concurrently,
        ("r002", "index-not-concurrent", "t"),
        ("r003", "index-not-concurrent", "fresh"),
    ]


def test_an_allow_comment_silences_its_rule_in_its_revision_only(tmp_path: Path) -> None:
    root = new_project(tmp_path)
    unsafe = 'op.create_index("ix_t_b", "t", ["b"])\nop.drop_column("t", "a")'
    write_revision(
        root,
        "r002",
        "r001",
        unsafe,
        header="# prosaas-migrate: allow index-not-concurrent, cluster\n",
    )
    write_revision(root, "r003", "r002", 'op.create_index("ix_t_u", "t", ["u_id"])')
    write_revision(
        root,
        "r004",
        "r003",
        'op.drop_column("t", "b")  # prosaas-migrate: allow drop-column\n'
        'op.execute("CLUSTER t USING ix_t_a")',
        header="# prosaas-migrate: allow   rename-column  set-not-null\n",
    )
    report = lint_at(root)
    assert rules(report) == [
        ("r002", "drop-column"),
        ("r003", "index-not-concurrent"),
        ("r004", "cluster"),
    ]
    assert report.allowed == 2

    write_revision(
        root, "r004", "r003", 'op.drop_column("t", "b")  # prosaas-migrate: allow drop-column'
    )
    result = invoke(tmp_path, "--config", str(root / "alembic.ini"), "--since", "r003")
    assert result.exit_code == 0, result.output
    assert (
        "no findings in 1 revision checked; 1 allowed by a comment in the revision" in result.output
    )


@pytest.mark.parametrize(
    "create",
    [
        pytest.param(
            'op.create_table("fresh", sa.Column("id", sa.Integer), if_not_exists=True)',
            marks=pytest.mark.skipif(
                "if_not_exists" not in inspect.signature(Operations.create_table).parameters,
                reason="create_table(if_not_exists=) came with Alembic 1.13.3",
            ),
        ),
        'op.execute("CREATE TABLE IF NOT EXISTS fresh (id int)")',
        'op.execute("CREATE TABLE IF NOT EXISTS fresh AS SELECT * FROM t")',
    ],
    ids=["op", "sql", "sql-as"],
)
def test_create_table_if_not_exists_is_not_a_new_table(tmp_path: Path, create: str) -> None:
    """The table may exist already, with rows: what follows on it is checked as on any table."""
    root = new_project(tmp_path)
    write_revision(root, "r002", "r001", f'{create}\nop.create_index("ix", "fresh", ["id"])')
    assert [(f.rule, f.table) for f in lint_at(root).findings] == [
        ("index-not-concurrent", "fresh")
    ]


@pytest.mark.parametrize(
    ("created", "indexed", "exempt"),
    [
        ("", "", True),
        ("", 'schema="public"', True),
        ('schema="public"', "", True),
        ("", 'schema="other"', False),
        ('schema="other"', "", False),
        ('schema="other"', 'schema="other"', True),
        ('schema="other"', 'schema="third"', False),
    ],
)
def test_a_new_table_exempts_that_table_in_that_schema_only(
    tmp_path: Path, created: str, indexed: str, exempt: bool
) -> None:
    """Unqualified means the default search_path schema, public; any other schema is another
    table."""
    root = new_project(tmp_path)
    write_revision(
        root,
        "r002",
        "r001",
        f'op.create_table("bar", sa.Column("a", sa.Integer), {created})\n'
        f'op.create_index("ix_bar_a", "bar", ["a"], {indexed})',
    )
    found = [finding.rule for finding in lint_at(root).findings]
    assert found == ([] if exempt else ["index-not-concurrent"])


def test_an_allow_comment_is_read_exactly_and_a_wrong_one_is_a_finding(tmp_path: Path) -> None:
    root = new_project(tmp_path)
    unsafe = 'op.create_index("ix_t_b", "t", ["b"])\nop.drop_table("u")\nop.drop_column("t", "a")'
    header = (
        '"""Not a comment: # prosaas-migrate: allow drop-column"""\n'
        "# prosaas-migrate: allow drop-table: it is empty, index-not-concurrent\n"
    )
    write_revision(root, "r002", "r001", unsafe, header=header)
    report = lint_at(root)
    # The reason after ':' names index-not-concurrent; the docstring allows nothing.
    assert rules(report) == [("r002", "index-not-concurrent"), ("r002", "drop-column")]
    assert report.allowed == 1

    for comment in (
        "# prosaas-migrate: allow drop-table -- it is empty, index-not-concurrent",
        "# prosaas-migrate: allow drop-table - it is empty",
        "# prosaas-migrate: allow drop-table,index-not-concurrent:empty",
        "#prosaas-migrate:allow drop-table",
        "# noqa: E501  # prosaas-migrate: allow drop-table  # type: ignore",
    ):
        write_revision(root, "r002", "r001", 'op.drop_table("u")', header=comment)
        report = lint_at(root)
        assert (report.findings, report.allowed) == ([], 1), comment


@pytest.mark.parametrize(
    ("comment", "problem"),
    [
        (
            "# prosaas-migrate: allow drop-tabel",
            "line 4: 'drop-tabel' is not a rule (did you mean drop-table?)",
        ),
        (
            "# prosaas-migrate: allow drop-table because it is empty",
            "line 4: 'because', 'it', 'is', 'empty' are not rules",
        ),
        ("# prosaas-migrate: allow", "line 4: it names no rule"),
        ("# prosaas-migrate: alow drop-table", "line 4: 'alow drop-table' does not start with"),
        ("# prosaas-migrate: allow unknown-allow", "line 4: unknown-allow cannot be allowed"),
    ],
)
def test_an_allow_comment_lint_cannot_read_is_an_unknown_allow_finding(
    tmp_path: Path, comment: str, problem: str
) -> None:
    root = new_project(tmp_path)
    write_revision(root, "r002", "r001", 'op.drop_table("u")', header=comment)
    report = lint_at(root)
    # The comment allows nothing it cannot read: drop-table is still reported.
    assert rules(report) == [("r002", "unknown-allow"), ("r002", "drop-table")]
    finding = report.findings[0]
    assert (finding.revision, finding.statement, finding.lock) == ("r002", comment, None)
    assert problem in finding.message, finding.message
    assert "prosaas-migrate: allow RULE" in finding.hint
    result = invoke(root, "--json")
    assert result.exit_code == 1
    assert json.loads(result.output)["findings"][0]["rule"] == "unknown-allow"


# -- which revisions: --since, branches --------------------------------------------------------


def test_since_checks_only_the_revisions_after_it(tmp_path: Path) -> None:
    root = new_project(tmp_path)
    write_revision(root, "r002", "r001", 'op.drop_column("t", "a")')
    write_revision(root, "r003", "r002", 'op.create_index("ix_t_b", "t", ["b"])')
    assert rules(lint_at(root)) == [("r002", "drop-column"), ("r003", "index-not-concurrent")]
    report = lint_at(root, since="r002")
    assert report.revisions_checked == 1
    assert rules(report) == [("r003", "index-not-concurrent")]
    with pytest.raises(ConfigError, match="Multiple revisions start with 'r00'"):
        lint_at(root, since="r00")
    head = lint_at(root, since="r003")
    assert head.revisions_checked == 0 and head.findings == []
    assert lint_at(root, since="base").revisions_checked == 3


def branchy(root: Path) -> None:
    """r001 -> a1 -> a2 and r001 -> b1: two heads; then m1 merges them and c1 follows."""
    write_revision(root, "a1", "r001", 'op.drop_column("t", "a")')
    write_revision(root, "a2", "a1", 'op.create_index("ix_t_b", "t", ["b"])')
    write_revision(root, "b1", "r001", 'op.alter_column("t", "b", type_=sa.BigInteger)')


@pytest.mark.parametrize("env", ["stock", "cookbook"])
def test_a_branchy_history_two_heads_then_a_merge(tmp_path: Path, env: str) -> None:
    root = new_project(tmp_path, env=env)
    branchy(root)
    report = lint_at(root)
    assert report.revisions_checked == 4
    found = rules(report)
    assert sorted(found) == [
        ("a1", "drop-column"),
        ("a2", "index-not-concurrent"),
        ("b1", "column-type-change"),
    ]
    assert found.index(("a1", "drop-column")) < found.index(("a2", "index-not-concurrent"))

    write_revision(root, "m1", ("a2", "b1"), "pass")
    write_revision(root, "c1", "m1", 'op.rename_table("u", "users")')
    report = lint_at(root)
    assert report.revisions_checked == 6
    assert rules(report)[-1] == ("c1", "rename-table")
    assert len(report.findings) == 4
    # What a branch adds: from a1, upgrading to heads also applies b1 (the other branch).
    assert sorted(rules(lint_at(root, since="a1"))) == [
        ("a2", "index-not-concurrent"),
        ("b1", "column-type-change"),
        ("c1", "rename-table"),
    ]
    assert rules(lint_at(root, since="m1")) == [("c1", "rename-table")]


# -- rendering: both env.py styles, failures --------------------------------------------------


def test_both_env_py_styles_render_offline_with_the_same_findings(tmp_path: Path) -> None:
    reports = {}
    for env in ("stock", "cookbook"):
        root = new_project(tmp_path / env, env=env)
        write_revision(root, "r002", "r001", 'op.create_index("ix_t_b", "t", ["b"])')
        reports[env] = lint_at(root)
    assert reports["stock"].renderer == "env.py"
    assert reports["stock"].renderer_note is None
    assert reports["cookbook"].renderer == "prosaas-migrate"
    assert reports["cookbook"].renderer_note == "env.py has no offline branch: it tried to connect"
    assert (
        rules(reports["stock"]) == rules(reports["cookbook"]) == [("r002", "index-not-concurrent")]
    )


@pytest.mark.parametrize(
    ("replace", "by", "note"),
    [
        (
            'url = config.get_main_option("sqlalchemy.url")',
            'url = os.environ["APP_DATABASE_URL"]',
            "env.py fails offline: KeyError: 'APP_DATABASE_URL'",
        ),
        (
            'url = config.get_main_option("sqlalchemy.url")',
            'url = "sqlite://"',
            "env.py renders for sqlite, not postgresql",
        ),
    ],
    ids=["env.py-raises", "another-dialect"],
)
def test_an_env_py_that_cannot_render_for_postgresql_falls_back_and_says_why(
    tmp_path: Path, replace: str, by: str, note: str
) -> None:
    root = new_project(tmp_path)
    env = root / "migrations" / "env.py"
    assert replace in env.read_text()
    env.write_text("import os\n" + env.read_text().replace(replace, by))
    write_revision(root, "r002", "r001", 'op.create_index("ix", "t", ["b"])')
    report = lint_at(root)
    assert (report.renderer, report.renderer_note) == ("prosaas-migrate", note)
    assert rules(report) == [("r002", "index-not-concurrent")]


QUERYING = """\
count = op.get_bind().execute(sa.text("SELECT count(*) FROM t")).scalar()
op.execute(f"ALTER TABLE t ADD COLUMN c{count} int")
"""


@pytest.mark.parametrize("env", ["stock", "cookbook"])
def test_a_revision_that_cannot_render_offline_is_a_finding_and_the_rest_is_checked(
    tmp_path: Path, env: str
) -> None:
    root = new_project(tmp_path, env=env)
    write_revision(root, "r002", "r001", 'op.create_index("ix_t_b", "t", ["b"])')
    write_revision(root, "r003", "r002", QUERYING)
    write_revision(root, "r004", "r003", 'op.drop_column("t", "a")')
    write_revision(root, "r005", "r004", 'raise RuntimeError("needs the app")')
    write_revision(root, "r006", "r005", 'op.drop_table("u")')
    report = lint_at(root)
    assert report.revisions_checked == 6
    assert rules(report) == [
        ("r002", "index-not-concurrent"),
        ("r003", "offline-render-failed"),
        ("r004", "drop-column"),
        ("r005", "offline-render-failed"),
        ("r006", "drop-table"),
    ]
    failed = report.findings[1]
    assert failed.file == str(Path("migrations/versions/r003.py"))
    assert failed.lock is None and failed.statement == ""
    assert "AttributeError" in failed.message and "scalar" in failed.message
    assert "RuntimeError: needs the app" in report.findings[3].message
    assert report.renderer == ("env.py" if env == "stock" else "prosaas-migrate")


def test_a_revision_that_connects_is_refused_and_reported(tmp_path: Path) -> None:
    root = new_project(tmp_path)
    write_revision(
        root,
        "r002",
        "r001",
        'sa.create_engine("postgresql+psycopg://x@127.0.0.1:1/x").connect()',
    )
    (finding,) = lint_at(root).findings
    assert finding.rule == "offline-render-failed"
    assert "tried to connect to a database" in finding.message


def test_a_revision_file_that_does_not_load_is_a_usage_error(tmp_path: Path) -> None:
    root = new_project(tmp_path)
    path = write_revision(root, "r002", "r001", "pass")
    path.write_text(path.read_text() + "\ndef broken(:\n")
    result = cli(["lint"], {}, root)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "cannot load the revisions: migrations/versions/r002.py:" in result.stderr
    assert "SyntaxError" in result.stderr


def test_the_multidb_template_renders_each_database_without_writing_files(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    command.init(Config(str(tmp_path / "alembic.ini")), str(tmp_path / "migrations"), "multidb")
    # The multidb template's revision shape: upgrade(engine_name) calls upgrade_<engine>().
    write_revision(tmp_path, "r001", None, 'globals()[f"upgrade_{engine_name}"]()')
    path = tmp_path / "migrations" / "versions" / "r001.py"
    path.write_text(
        path.read_text().replace("upgrade()", "upgrade(engine_name: str)")
        + '\n\ndef upgrade_engine1() -> None:\n    op.create_index("ix_t_b", "t", ["b"])\n'
        + '\n\ndef upgrade_engine2() -> None:\n    op.drop_column("t", "a")\n'
    )
    report = lint_at(tmp_path)
    assert rules(report) == [("r001", "index-not-concurrent"), ("r001", "drop-column")]
    assert report.renderer == "prosaas-migrate"
    assert not list(tmp_path.glob("*.sql"))


ENV_GUARD = (
    "import os\nimport sys\n"
    "if not os.environ.get('DATABASE_URL'):\n"
    "    sys.exit('DATABASE_URL is not set')\n"
)


@pytest.mark.parametrize("env", ["stock", "cookbook"])
def test_an_env_py_that_exits_falls_back_to_the_own_renderer(tmp_path: Path, env: str) -> None:
    """A guard that calls sys.exit() (SystemExit is no Exception) is an env.py failing offline."""
    root = new_project(tmp_path, env=env)
    env_py = root / "migrations" / "env.py"
    env_py.write_text(ENV_GUARD + env_py.read_text())
    write_revision(root, "r002", "r001", 'op.create_index("ix_t_b", "t", ["b"])')
    result = cli(["lint", "--json"], {}, root)
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert [f["rule"] for f in document["findings"]] == ["index-not-concurrent"]
    assert document["renderer"] == "prosaas-migrate"
    assert document["renderer_note"] == (
        "env.py fails offline: SystemExit: it called sys.exit('DATABASE_URL is not set')"
    )


@pytest.mark.parametrize("env", ["stock", "cookbook"])
@pytest.mark.parametrize("code", ["0", "1", "'stop'"])
def test_a_revision_that_exits_is_offline_render_failed(
    tmp_path: Path, env: str, code: str
) -> None:
    root = new_project(tmp_path, env=env)
    write_revision(root, "r002", "r001", f"import sys\nsys.exit({code})")
    write_revision(root, "r003", "r002", 'op.drop_table("u")')
    result = cli(["lint", "--json"], {}, root)
    assert result.returncode == 1, result.stderr
    findings = json.loads(result.stdout)["findings"]
    assert [(f["revision"], f["rule"]) for f in findings] == [
        ("r002", "offline-render-failed"),
        ("r003", "drop-table"),
    ]
    assert f"SystemExit: it called sys.exit({code})" in findings[0]["message"]


def test_a_revision_that_exits_on_import_is_a_usage_error(tmp_path: Path) -> None:
    root = new_project(tmp_path)
    path = write_revision(root, "r002", "r001", "pass")
    path.write_text("import sys\nsys.exit(0)\n" + path.read_text())
    result = cli(["lint"], {}, root)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.strip().count("\n") == 0
    assert "cannot load the revisions:" in result.stderr
    assert "SystemExit: it called sys.exit(0)" in result.stderr


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        (
            "version_locations = 5",
            "[tool.alembic] version_locations in pyproject.toml: '5' is invalid; expected a list "
            "of strings",
        ),
        (
            'version_locations = "%(here)s/migrations/versions"',
            "[tool.alembic] version_locations in pyproject.toml:",
        ),
        ("version_locations = [5]", "expected a list of strings"),
        ("prepend_sys_path = 5", "[tool.alembic] prepend_sys_path in pyproject.toml"),
        ('truncate_slug_length = "x"', "truncate_slug_length in pyproject.toml: '\"x\"'"),
        ("sourceless = 1", "sourceless in pyproject.toml: '1' is invalid; expected true or false"),
        ("post_write_hooks = 5", "post_write_hooks in pyproject.toml"),
        ('script_location = "%(nope)s"', "expected an Alembic project (KeyError: 'nope')"),
    ],
)
@pytest.mark.skipif(
    not compat.reads_pyproject(), reason="Alembic before 1.16 has no [tool.alembic]"
)
def test_a_malformed_tool_alembic_is_one_line_exit_2(
    tmp_path: Path, setting: str, named: str
) -> None:
    """Alembic itself trusts these types (TypeError, or a string split into letters)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(tmp_path / "alembic.ini"), toml_file=str(tmp_path / "pyproject.toml"))
    command.init(cfg, str(tmp_path / "migrations"), "pyproject")
    write_revision(tmp_path, "r001", None, BASE)
    assert cli(["lint"], {}, tmp_path).returncode == 0  # the template as it comes
    toml = tmp_path / "pyproject.toml"
    key = setting.split(" = ")[0]
    text = re.sub(rf"(?ms)^{key} = \[.*?^\]\n", "", toml.read_text())  # a list on lines
    text = re.sub(rf"(?m)^{key} = .*\n", "", text)
    toml.write_text(text.replace("[tool.alembic]\n", f"[tool.alembic]\n{setting}\n", 1))
    result = cli(["lint", "--json"], {}, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert named in result.stderr


def test_a_deeply_nested_expression_is_checked_not_a_traceback(tmp_path: Path) -> None:
    """Its parse tree is too deep for json.loads; pglast's own tree still shows what it calls."""
    root = new_project(tmp_path)
    terms = "+".join(["1"] * 1000)
    write_revision(
        root, "r002", "r001", f'op.execute("ALTER TABLE t ADD COLUMN c int DEFAULT {terms}")'
    )
    write_revision(
        root,
        "r003",
        "r002",
        f'op.execute("ALTER TABLE t ADD COLUMN d float DEFAULT random() + {terms}")',
    )
    result = cli(["lint", "--json"], {}, root)
    assert result.returncode == 1, result.stderr
    findings = json.loads(result.stdout)["findings"]
    assert [(f["revision"], f["rule"]) for f in findings] == [("r003", "volatile-default")]
    assert "random()" in findings[0]["message"]


# -- the command: exit codes, output ----------------------------------------------------------


@pytest.fixture
def app(tmp_path: Path) -> Path:
    root = new_project(tmp_path)
    write_revision(root, "r002", "r001", 'op.create_index("ix_t_b", "t", ["b"])')
    write_revision(
        root, "r003", "r002", 'op.drop_column("t", "a")\nop.alter_column("t", "b", nullable=True)'
    )
    return root


def invoke(root: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return CliRunner().invoke(main, ["lint", *args], env=env)
    finally:
        os.chdir(cwd)


def test_exit_codes(app: Path) -> None:
    assert invoke(app).exit_code == 1
    assert invoke(app, "--since", "r002").exit_code == 1
    assert invoke(app, "--since", "r003").exit_code == 0
    write_revision(app, "r004", "r003", 'op.add_column("t", sa.Column("c", sa.Text))')
    result = invoke(app, "--since", "r003")
    assert result.exit_code == 0, result.output
    assert result.output == "no findings in 1 revision checked\n"


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--since", "nope"], {}, "--since: 'nope' is invalid"),
        (["--config", "missing.ini"], {}, "--config: 'missing.ini' is invalid"),
        ([], {"ALEMBIC_CONFIG": "elsewhere.ini"}, "ALEMBIC_CONFIG: 'elsewhere.ini' is invalid"),
        (["--since"], {}, "Option '--since' requires an argument"),
        (["--bogus"], {}, "--bogus"),
    ],
)
def test_usage_and_configuration_errors_exit_2_naming_the_argument(
    app: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    result = invoke(app, *args, env=env)
    assert result.exit_code == 2
    assert named in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_without_an_ini_in_the_working_folder(tmp_path: Path) -> None:
    """ALEMBIC_CONFIG is not set: the message names the default, not the variable."""
    result = invoke(tmp_path)
    assert result.exit_code == 2
    assert result.output == (
        "❌ prosaas-migrate: ./alembic.ini (the default; set ALEMBIC_CONFIG or --config): "
        "'alembic.ini' is invalid; expected the path of an existing alembic.ini (or of a "
        "pyproject.toml with [tool.alembic])\n"
    )


def test_variables_meant_for_run_do_not_matter(app: Path) -> None:
    result = invoke(
        app, env={"RUN_MIGRATIONS": "maybe", "MIGRATION_LOCK_KEY": "x", "DATABASE_URL": "driver://"}
    )
    assert result.exit_code == 1, result.output


def test_json_document(app: Path) -> None:
    result = invoke(app, "--json")
    assert result.exit_code == 1
    document = json.loads(result.output)
    assert document["revisions_checked"] == 3
    assert document["allowed"] == 0
    assert [f["rule"] for f in document["findings"]] == ["index-not-concurrent", "drop-column"]
    first = document["findings"][0]
    assert {"revision", "file", "rule", "statement", "lock", "message", "hint"} <= first.keys()
    assert first["revision"] == "r002"
    assert first["file"] == str(Path("migrations/versions/r002.py"))
    assert first["statement"] == "CREATE INDEX ix_t_b ON t (b)"
    assert first["lock"] == "SHARE"
    assert first["table"] == "t"
    assert "INSERT, UPDATE and DELETE" in first["message"]
    assert "CONCURRENTLY" in first["hint"]


def test_text_is_grouped_by_revision(app: Path) -> None:
    write_revision(
        app,
        "r004",
        "r003",
        'op.create_index("ix_t_u", "t", ["u_id"])\nop.rename_table("u", "users")',
    )
    result = invoke(app)
    assert result.exit_code == 1
    text = result.output
    assert "\x1b[" not in text  # not a terminal
    blocks = text.split("\n\n")
    assert blocks[0].startswith(f"r002  {Path('migrations/versions/r002.py')}\n")
    assert blocks[1].startswith("r003  ")
    assert blocks[2].startswith("r004  ")
    assert (
        blocks[2].count("\n  index-not-concurrent: ") + blocks[2].count("\n  rename-table: ") == 2
    )
    assert "    lock: SHARE on t\n" in blocks[0]
    assert blocks[-1] == "4 findings in 3 of 4 revisions checked\n"


@pytest.mark.parametrize(("no_color", "coloured"), [(None, True), ("1", False)])
def test_colour_only_on_a_terminal_and_never_with_no_color(
    app: Path, no_color: str | None, coloured: bool
) -> None:
    env = clean_env()
    if no_color:
        env["NO_COLOR"] = no_color
    code, output = on_a_terminal(["lint"], env, app)
    assert code == 1
    assert "index-not-concurrent" in output
    assert ("\x1b[" in output) is coloured


class Listener:
    """A TCP port on 127.0.0.1 that counts the connections made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    port = Listener()
    yield port
    port.sock.close()


@pytest.mark.parametrize("env", ["stock", "cookbook"])
def test_the_real_command_needs_no_database_and_connects_to_none(
    tmp_path: Path, env: str, listener: Listener
) -> None:
    """A CI job: no server, no DATABASE_URL; and with URLs that point somewhere, none is used."""
    root = new_project(tmp_path, env=env)
    write_revision(root, "r002", "r001", 'op.create_index("ix_t_b", "t", ["b"])')
    result = cli(["lint", "--json"], {}, root)
    assert result.returncode == 1, result.stderr
    assert [f["rule"] for f in json.loads(result.stdout)["findings"]] == ["index-not-concurrent"]

    url = f"postgresql://app:secret@127.0.0.1:{listener.port}/app"
    ini = root / "alembic.ini"
    ini.write_text(ini.read_text().replace("driver://user:pass@localhost/dbname", url))
    variables = {"DATABASE_URL": url, "MIGRATION_DATABASE_URL": url, "RUN_MIGRATIONS": "1"}
    result = cli(["lint"], variables, root)
    assert result.returncode == 1, result.stderr
    assert "index-not-concurrent" in result.stdout
    assert listener.connections == 0
    assert "INFO" not in result.stderr  # env.py's own logging stays out of the output


# -- the rules against a real server ----------------------------------------------------------

LOCK_EXAMPLES = {
    # rule: (statement, the tables it locks)
    "index-not-concurrent": ("CREATE INDEX ix_t_b ON t (b)", ["t"]),
    "reindex-not-concurrent": ("REINDEX TABLE t", ["t"]),
    "drop-index-not-concurrent": ("DROP INDEX ix_t_a", ["t"]),
    "volatile-default": ("ALTER TABLE t ADD COLUMN r float DEFAULT random()", ["t"]),
    "column-type-change": ("ALTER TABLE t ALTER COLUMN a TYPE bigint", ["t"]),
    "set-not-null": ("ALTER TABLE t ALTER COLUMN a SET NOT NULL", ["t"]),
    "foreign-key-without-not-valid": (
        "ALTER TABLE t ADD CONSTRAINT fk FOREIGN KEY (u_id) REFERENCES u (id)",
        ["t", "u"],
    ),
    "check-without-not-valid": ("ALTER TABLE t ADD CONSTRAINT ck CHECK (b > 0)", ["t"]),
    "unique-without-index": ("ALTER TABLE t ADD CONSTRAINT uq UNIQUE (b)", ["t"]),
    "rename-column": ("ALTER TABLE t RENAME COLUMN a TO a2", ["t"]),
    "rename-table": ("ALTER TABLE t RENAME TO t2", ["t"]),
    "drop-column": ("ALTER TABLE t DROP COLUMN a", ["t"]),
    "drop-table": ("DROP TABLE w", ["w"]),
    "cluster": ("CLUSTER t USING ix_t_a", ["t"]),
    "table-rewrite": ("ALTER TABLE t SET UNLOGGED", ["t"]),
    "lock-table": ("LOCK TABLE t", ["t"]),
    "required-column-without-default": ("ALTER TABLE w ADD COLUMN c int NOT NULL", ["w"]),
    "exclusion-constraint": (
        "ALTER TABLE t ADD CONSTRAINT ex EXCLUDE USING gist (int4range(a, b, '[]') WITH &&)",
        ["t"],
    ),
}
_STRENGTH = [
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
]


def schema(url: str, rows: int = 10) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE u (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, a int, b int NOT NULL, u_id int)")
        conn.execute("CREATE TABLE w (id int NOT NULL)")  # empty
        conn.execute("CREATE INDEX ix_t_a ON t (a)")
        conn.execute("INSERT INTO u SELECT g FROM generate_series(1, %s) g", [rows])
        conn.execute("INSERT INTO t SELECT g, g, g, g FROM generate_series(1, %s) g", [rows])


def test_every_table_rule_has_a_lock_example() -> None:
    table_rules = {name for name, rule in lint.RULES.items() if rule.lock is not None}
    # VACUUM: no transaction; a backfill is two statements (test_a_backfill_under_a_lock_...).
    assert set(LOCK_EXAMPLES) | {"vacuum-full", "backfill-under-lock"} == table_rules


@pytest.mark.parametrize("rule", sorted(LOCK_EXAMPLES))
def test_the_lock_each_rule_names_is_the_lock_tables(rule: str) -> None:
    """A rule's `lock` documents what prosaas_migrate.locks says its example statement takes."""
    statement, tables = LOCK_EXAMPLES[rule]
    (raw,) = pglast.parse_sql(statement)
    assert raw.stmt is not None
    taken = locks.statement_locks(raw.stmt)
    modes = {
        INDEX_TABLES.get(lock.table, lock.table): lock.mode
        for lock in taken.locks
        if lock.relkind in (locks.TABLE, locks.TABLE_OF_INDEX)
    }
    assert modes == dict.fromkeys(tables, lint.RULES[rule].lock)


INDEX_TABLES = {"ix_t_a": "t"}  # the schema's indexes and their tables


@pytest.mark.parametrize("rule", sorted(LOCK_EXAMPLES))
def test_the_lock_each_rule_names_is_the_one_postgresql_takes(db_url: str, rule: str) -> None:
    schema(db_url)
    statement, tables = LOCK_EXAMPLES[rule]
    expected = "".join(word.capitalize() for word in str(lint.RULES[rule].lock).split()) + "Lock"
    with psycopg.connect(db_url) as conn:
        oids = {
            name: conn.execute("SELECT %s::regclass::oid", [name]).fetchone() for name in tables
        }
        conn.execute(statement)
        for name, oid in oids.items():
            rows = conn.execute(
                "SELECT mode FROM pg_locks WHERE relation = %s AND pid = pg_backend_pid()",
                [oid[0] if oid else None],
            ).fetchall()
            strongest = max((str(row[0]) for row in rows), key=_STRENGTH.index)
            assert strongest == expected, (rule, name, rows)
        conn.rollback()


def test_the_rules_report_what_the_server_does_with_a_finding_it_names(db_url: str) -> None:
    """Rewrites, failures: what each message claims, checked on a table with rows."""
    schema(db_url)

    def filenode_changes(statement: str) -> bool:
        with psycopg.connect(db_url) as conn:
            before = conn.execute("SELECT pg_relation_filenode('t')").fetchone()
            conn.execute(statement)
            after = conn.execute("SELECT pg_relation_filenode('t')").fetchone()
            conn.rollback()
        return before != after

    # volatile-default: a volatile default rewrites; since PostgreSQL 11 a stable one does not.
    for rewrites in (
        "ADD COLUMN r float DEFAULT random()",
        "ADD COLUMN k uuid DEFAULT gen_random_uuid()",
        "ADD COLUMN c timestamptz DEFAULT clock_timestamp()",
        "ADD COLUMN n bigserial",
        "ADD COLUMN n bigint GENERATED ALWAYS AS IDENTITY",
        "ADD COLUMN g int GENERATED ALWAYS AS (a * 2) STORED",
        "ALTER COLUMN a TYPE bigint",
    ):
        assert filenode_changes(f"ALTER TABLE t {rewrites}"), rewrites
        assert rules_of(f"ALTER TABLE t {rewrites}") in (
            ["volatile-default"],
            ["column-type-change"],
        )
    for keeps in (
        "ADD COLUMN c timestamptz DEFAULT now()",
        "ADD COLUMN c timestamptz DEFAULT CURRENT_TIMESTAMP",
        "ADD COLUMN c timestamptz NOT NULL DEFAULT statement_timestamp()",
        "ADD COLUMN c text DEFAULT lower('X')",
        "ADD COLUMN c int DEFAULT 0",
        "ADD COLUMN c jsonb DEFAULT '{}'::jsonb",
        "ALTER COLUMN a TYPE int",
    ):
        assert not filenode_changes(f"ALTER TABLE t {keeps}"), keeps
    for keeps in ("DEFAULT now()", "DEFAULT CURRENT_TIMESTAMP", "DEFAULT lower('X')"):
        assert rules_of(f"ALTER TABLE t ADD COLUMN c text {keeps}") == []
    # cluster, vacuum-full: a rewrite (VACUUM cannot run in a transaction: autocommit); a FULL
    # option set to false, 0 or off is no VACUUM FULL.
    assert filenode_changes("CLUSTER t USING ix_t_a")
    for vacuum, full in (
        ("VACUUM (FULL false) t", False),
        ("VACUUM (FULL 0, ANALYZE) t", False),
        ("VACUUM (FULL Off) t", False),
        ("VACUUM (FULL 1) t", True),
        ("VACUUM (FULL) t", True),
        ("VACUUM FULL t", True),
    ):
        before = query(db_url, "SELECT pg_relation_filenode('t')")
        query(db_url, vacuum)
        assert (query(db_url, "SELECT pg_relation_filenode('t')") != before) == full, vacuum
        assert rules_of(vacuum) == (["vacuum-full"] if full else []), vacuum

    with psycopg.connect(db_url) as conn:
        # required-column-without-default: fails on a table with rows, DEFAULT NULL as well.
        for required in (
            "c int NOT NULL",
            "c int NOT NULL DEFAULT NULL",
            "c int NOT NULL DEFAULT NULL::int",
        ):
            with pytest.raises(psycopg.errors.NotNullViolation):
                conn.execute(f"ALTER TABLE t ADD COLUMN {required}")
            conn.rollback()
            assert rules_of(f"ALTER TABLE t ADD COLUMN {required}")[0] == (
                "required-column-without-default"
            )
        # concurrently-in-transaction: fails inside a transaction block; CONCURRENTLY false is
        # a plain REINDEX, which does not.
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.ActiveSqlTransaction):
            conn.execute("CREATE INDEX CONCURRENTLY ix_c ON t (b)")
        conn.rollback()
        conn.execute("REINDEX (CONCURRENTLY false) INDEX ix_t_a")
        conn.rollback()
        assert rules_of("BEGIN; REINDEX (CONCURRENTLY false) INDEX ix_t_a") == [
            "reindex-not-concurrent"
        ]
        assert rules_of("BEGIN; REINDEX (CONCURRENTLY) INDEX ix_t_a") == [
            "concurrently-in-transaction"
        ]
        # A 1,000-term default is valid SQL for the server (and no syntax error for lint).
        terms = "+".join(["1"] * 1000)
        conn.execute(f"ALTER TABLE t ADD COLUMN deep int DEFAULT {terms}")
        conn.rollback()
        assert rules_of(f"ALTER TABLE t ADD COLUMN deep int DEFAULT {terms}") == []


def rules_of(sql: str) -> list[str]:
    checker = lint._Checker()
    chunk = offline.Chunk(sql, revision=_FakeScript(), session_start=True)  # type: ignore[arg-type]
    return [finding.rule for finding in checker.chunk(chunk)]


class _FakeScript:
    revision = "r0"
    path = "r0.py"


def test_the_functions_taken_as_not_volatile_are_not_on_the_server(db_url: str) -> None:
    rows = query(
        db_url,
        "SELECT proname, array_agg(DISTINCT provolatile::text) FROM pg_proc "
        "WHERE proname = ANY(%s) GROUP BY proname",
        [sorted(lint.NON_VOLATILE_FUNCTIONS)],
    )
    volatility = {str(name): set(kinds) for name, kinds in rows}  # type: ignore[call-overload]
    assert volatility.keys() == lint.NON_VOLATILE_FUNCTIONS
    assert all(kinds <= {"i", "s"} for kinds in volatility.values()), volatility
    rows = query(
        db_url,
        "SELECT DISTINCT provolatile::text FROM pg_proc WHERE proname = ANY(%s)",
        [["random", "gen_random_uuid", "clock_timestamp", "timeofday", "nextval"]],
    )
    assert rows == [("v",)]


def test_the_disabled_run_path_imports_none_of_the_linter(tmp_path: Path) -> None:
    env = {"RUN_MIGRATIONS": "0", "PYTHONPROFILEIMPORTTIME": "1"}
    result = cli(["run", "--", "true"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    imported = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert any("prosaas_migrate.runner" in line for line in imported)  # the profile is real
    for heavy in ("pglast", "prosaas_migrate.lint", "prosaas_migrate.offline"):
        assert not [line for line in imported if f" {heavy}" in line], heavy


# -- set-not-null: a validated CHECK (c IS NOT NULL) spares the scan ---------------------------


def test_the_readmes_safe_recipe_for_not_null_is_not_reported(tmp_path: Path) -> None:
    root = new_project(tmp_path)
    write_revision(
        root,
        "r002",
        "r001",
        'op.create_check_constraint("ck_a", "t", "a IS NOT NULL", postgresql_not_valid=True)',
    )
    write_revision(root, "r003", "r002", 'op.execute("ALTER TABLE t VALIDATE CONSTRAINT ck_a")')
    write_revision(
        root,
        "r004",
        "r003",
        'op.alter_column("t", "a", nullable=False)\nop.drop_constraint("ck_a", "t", "check")',
    )
    assert rules(lint_at(root)) == []
    # From r003 on, the check was added before the revisions checked: the replayed history
    # still knows it.
    assert rules(lint_at(root, since="r003")) == []
    assert rules(lint_at(root, since="r002")) == []


@pytest.mark.parametrize(
    ("between", "scans"),
    [
        ("", True),  # NOT VALID only: PostgreSQL still scans
        ('op.execute("ALTER TABLE t VALIDATE CONSTRAINT ck_a")', False),
        (
            'op.execute("ALTER TABLE t VALIDATE CONSTRAINT ck_a")\n'
            'op.drop_constraint("ck_a", "t", "check")',
            True,
        ),
        (
            'op.alter_column("t", "a", new_column_name="a2")\n'
            'op.execute("ALTER TABLE t VALIDATE CONSTRAINT ck_a")\n'
            'op.alter_column("t", "a2", new_column_name="a")',
            False,
        ),
        (
            'op.execute("ALTER TABLE t RENAME CONSTRAINT ck_a TO ck_b")\n'
            'op.execute("ALTER TABLE t VALIDATE CONSTRAINT ck_b")',
            False,
        ),
        ('op.execute("ALTER TABLE other.t VALIDATE CONSTRAINT ck_a")', True),
    ],
    ids=["not-validated", "validated", "dropped", "column-renamed", "renamed", "other-schema"],
)
def test_set_not_null_follows_the_check_through_later_revisions(
    tmp_path: Path, between: str, scans: bool
) -> None:
    root = new_project(tmp_path)
    write_revision(
        root,
        "r002",
        "r001",
        'op.create_check_constraint("ck_a", "t", "a IS NOT NULL", postgresql_not_valid=True)',
    )
    write_revision(root, "r003", "r002", between or "pass")
    write_revision(root, "r004", "r003", 'op.alter_column("t", "a", nullable=False)')
    found = [rule for revision, rule in rules(lint_at(root)) if revision == "r004"]
    assert found == (["set-not-null"] if scans else [])


def test_a_check_made_with_a_new_table_proves_not_null_in_later_revisions(tmp_path: Path) -> None:
    root = new_project(tmp_path)
    write_revision(
        root,
        "r002",
        "r001",
        'op.create_table("fresh", sa.Column("a", sa.Integer), sa.Column("b", sa.Integer), '
        'sa.CheckConstraint("a IS NOT NULL", name="ck_fresh_a"))',
    )
    write_revision(
        root,
        "r003",
        "r002",
        'op.alter_column("fresh", "a", nullable=False)\n'
        'op.alter_column("fresh", "b", nullable=False)',
    )
    assert [f.statement for f in lint_at(root).findings] == [
        "ALTER TABLE fresh ALTER COLUMN b SET NOT NULL"
    ]


# What PostgreSQL accepts as proof, next to what lint accepts: each `setup` precedes
# `ALTER TABLE t ALTER COLUMN a SET NOT NULL` on a table with rows.
NOT_NULL_PROOFS = [
    ["ALTER TABLE t ADD CONSTRAINT ck CHECK (a IS NOT NULL) NOT VALID"],
    [
        "ALTER TABLE t ADD CONSTRAINT ck CHECK (a IS NOT NULL) NOT VALID",
        "ALTER TABLE t VALIDATE CONSTRAINT ck",
    ],
    ["ALTER TABLE t ADD CONSTRAINT ck CHECK (a IS NOT NULL)"],
    ["ALTER TABLE t ADD CONSTRAINT ck CHECK (a IS NOT NULL AND b > 0)"],
    ["ALTER TABLE t ADD CONSTRAINT ck CHECK (NOT (a IS NULL))"],
    ["ALTER TABLE t ADD CONSTRAINT ck CHECK (t.a IS NOT NULL)"],
    ["ALTER TABLE t ADD CONSTRAINT ck CHECK (a > 0)"],
    ["ALTER TABLE t ADD CONSTRAINT ck CHECK (a IS NOT NULL OR b IS NOT NULL)"],
    ["ALTER TABLE t ADD CONSTRAINT ck CHECK (b IS NOT NULL)"],
    [
        "ALTER TABLE t ADD CHECK (a IS NOT NULL) NOT VALID",  # named t_a_check by PostgreSQL
        "ALTER TABLE t VALIDATE CONSTRAINT t_a_check",
    ],
    [
        "ALTER TABLE t ADD CHECK (a IS NOT NULL AND b > 0) NOT VALID",  # t_check
        "ALTER TABLE t VALIDATE CONSTRAINT t_check",
    ],
    [
        "ALTER TABLE t ADD CONSTRAINT ck CHECK (a IS NOT NULL) NOT VALID",
        "ALTER TABLE t VALIDATE CONSTRAINT ck",
        "ALTER TABLE t DROP CONSTRAINT ck",
    ],
    [
        "ALTER TABLE t ADD CONSTRAINT ck CHECK (a IS NOT NULL AND u_id > 0)",
        "ALTER TABLE t DROP COLUMN u_id",  # drops the check with it
    ],
    [
        "ALTER TABLE t RENAME TO t_old",
        "CREATE TABLE t (id int, a int, b int, CONSTRAINT ck CHECK (a IS NOT NULL) NOT VALID)",
        "INSERT INTO t SELECT id, a, b FROM t_old",
    ],
]


@pytest.mark.parametrize("setup", NOT_NULL_PROOFS, ids=lambda setup: " / ".join(setup)[-60:])
def test_set_not_null_is_reported_exactly_when_postgresql_scans(
    db_url: str, setup: list[str]
) -> None:
    """PostgreSQL says (at DEBUG1) when existing constraints spare the scan; lint agrees."""
    schema(db_url)
    final = "ALTER TABLE t ALTER COLUMN a SET NOT NULL"
    with psycopg.connect(db_url) as conn:
        notices: list[str] = []
        conn.add_notice_handler(lambda notice: notices.append(str(notice.message_primary)))
        for statement in setup:
            conn.execute(statement)
        conn.execute("SET LOCAL client_min_messages = debug1")
        conn.execute(final)
        conn.rollback()
    skipped = any("are sufficient to prove that it does not contain nulls" in n for n in notices)
    reported = "set-not-null" in rules_of(";\n".join([*setup, final]))
    assert reported == (not skipped), notices


# -- status shows the findings of the pending revisions ---------------------------------------


def test_status_shows_the_findings_of_the_pending_revisions(tmp_path: Path, db_url: str) -> None:
    root = new_project(tmp_path, env="cookbook")
    write_revision(root, "r002", "r001", 'op.drop_column("t", "a")')
    env = {"DATABASE_URL": db_url}
    assert cli(["run"], {**env, "RUN_MIGRATIONS": "1"}, root).returncode == 0
    result = cli(["status", "--json"], env, root)
    assert json.loads(result.stdout)["lint"] is None  # at head: nothing to check
    text = re.sub(r" {2,}", " ", cli(["status"], env, root).stdout)
    assert "Lint\n pending revisions none" in text

    write_revision(root, "r003", "r002", 'op.create_index("ix_t_b", "t", ["b"])')
    write_revision(root, "r004", "r003", 'op.alter_column("t", "b", nullable=True)')
    tables = query(db_url, "SELECT count(*) FROM pg_class WHERE relkind = 'r'")
    result = cli(["status", "--json"], env, root)
    assert result.returncode == 0, result.stderr
    checked = json.loads(result.stdout)["lint"]
    assert checked["revisions_checked"] == 2
    assert [(f["revision"], f["rule"]) for f in checked["findings"]] == [
        ("r003", "index-not-concurrent")
    ]
    assert checked["renderer"] == "prosaas-migrate"  # status never runs the project's env.py
    text = re.sub(r" {2,}", " ", cli(["status"], env, root).stdout)  # column widths vary
    assert text.split("\n\n")[-1].rstrip("\n") == (
        "Lint\n"
        " pending revisions 2\n"
        " findings 1\n"
        " r003 index-not-concurrent: CREATE INDEX ix_t_b ON t (b)"
    )
    # Still read-only: nothing created, the version where it was.
    assert query(db_url, "SELECT count(*) FROM pg_class WHERE relkind = 'r'") == tables
    assert query(db_url, "SELECT version_num FROM alembic_version") == [("r002",)]


def test_a_rendering_that_fails_before_any_revision_never_passes_silently(tmp_path: Path) -> None:
    root = new_project(tmp_path)
    write_revision(root, "r002", "r001", 'op.create_index("ix", "t", ["b"])')
    _, script = offline.load_script_directory(project_at(root), "ALEMBIC_CONFIG")
    report = lint.findings_for(script, ["r001", "r002"], current=["unknown"])
    assert rules(report) == [("r001", "offline-render-failed"), ("r002", "offline-render-failed")]
    assert "unknown" in report.findings[0].message
    assert rules(lint.findings_for(script, ["r002"], current=["r001"])) == [
        ("r002", "index-not-concurrent")
    ]


def test_env_py_logging_config_does_not_outlive_the_rendering(tmp_path: Path) -> None:
    """The stock env.py's fileConfig() disables every existing logger; lint puts them back."""
    import logging

    app_logger = logging.getLogger("an.application.logger")
    root_handlers = list(logging.getLogger().handlers)
    root = new_project(tmp_path)
    write_revision(root, "r002", "r001", 'op.create_index("ix", "t", ["b"])')
    report = lint_at(root)
    assert report.renderer == "env.py"  # its fileConfig() really ran
    assert app_logger.disabled is False
    assert logging.getLogger().handlers == root_handlers


@pytest.mark.parametrize("since", ["", " "])
def test_an_empty_since_is_a_usage_error_naming_it(app: Path, since: str) -> None:
    """What the README's CI recipe passes when `alembic heads` prints nothing."""
    result = cli(["lint", "--json", "--since", since], {}, app)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert f"--since: {since!r} is invalid; expected a revision of this project" in result.stderr


def test_since_takes_a_prefix_of_an_id_of_four_characters_or_more(tmp_path: Path) -> None:
    """Alembic matches a prefix, of any length, only against ids of 4+ characters."""
    root = new_project(tmp_path)  # r001
    write_revision(root, "ae1027a6acf", "r001", 'op.drop_column("t", "a")')
    write_revision(root, "b2c", "ae1027a6acf", 'op.create_index("ix_t_b", "t", ["b"])')
    assert rules(lint_at(root, since="a")) == [("b2c", "index-not-concurrent")]
    assert lint_at(root, since="b2c").revisions_checked == 0
    with pytest.raises(ConfigError, match="No such revision or branch 'b2'"):
        lint_at(root, since="b2")


def test_alembic_config_from_dotenv_is_used_and_nothing_else(tmp_path: Path) -> None:
    """.env fills in ALEMBIC_CONFIG as for run and status; its other variables do not matter."""
    new_project(tmp_path / "sub")
    write_revision(tmp_path / "sub", "r002", "r001", 'op.create_index("ix_t_b", "t", ["b"])')
    (tmp_path / ".env").write_text(
        "ALEMBIC_CONFIG=sub/alembic.ini\nRUN_MIGRATIONS=maybe\nMIGRATION_LOCK_KEY=x\n"
    )
    (tmp_path / "sub" / "migrations" / "script.py.mako").unlink()  # not needed to lint
    result = cli(["lint", "--json"], {}, tmp_path)
    assert result.returncode == 1, result.stderr
    assert [f["rule"] for f in json.loads(result.stdout)["findings"]] == ["index-not-concurrent"]

    # A variable really set wins over .env, as everywhere.
    result = cli(["lint"], {"ALEMBIC_CONFIG": "elsewhere.ini"}, tmp_path)
    assert result.returncode == 2
    assert "ALEMBIC_CONFIG: 'elsewhere.ini' is invalid" in result.stderr


def test_an_unreadable_dotenv_is_one_line_exit_2(app: Path) -> None:
    (app / ".env").write_bytes(b"ALEMBIC_CONFIG=\xff\xfe\n")
    result = cli(["lint", "--json"], {}, app)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.strip().count("\n") == 0
    assert "cannot read " in result.stderr and ".env" in result.stderr


# -- backfills under a held lock ---------------------------------------------------------------


@pytest.mark.parametrize("per_migration", [False, True], ids=["one-transaction", "per-migration"])
def test_a_backfill_is_judged_by_the_locks_its_transaction_holds(
    tmp_path: Path, per_migration: bool
) -> None:
    root = new_project(tmp_path)
    if per_migration:
        env = root / "migrations" / "env.py"
        env.write_text(env.read_text().replace(PER_MIGRATION_ANCHOR, PER_MIGRATION, 1))
    write_revision(root, "r002", "r001", 'op.add_column("t", sa.Column("c", sa.Integer))')
    write_revision(root, "r003", "r002", 'op.execute("UPDATE t SET c = a")')
    # A schema change in an autocommit_block has committed before the backfill after it.
    write_revision(
        root,
        "r004",
        "r003",
        BLOCK
        + '    op.execute("ALTER TABLE u ADD COLUMN d int")\nop.execute("UPDATE u SET d = 0")',
    )
    report = lint_at(root)
    if per_migration:  # each revision commits: r003 starts with no lock held
        assert rules(report) == []
        return
    assert rules(report) == [("r003", "backfill-under-lock")]
    (finding,) = report.findings
    assert finding.lock == "ACCESS EXCLUSIVE" and finding.table == "t"
    assert "taken by ALTER TABLE ADD COLUMN in revision r002" in finding.message
    # --since r002: the database is at r002, so the upgrade's transaction holds nothing yet.
    assert rules(lint_at(root, since="r002")) == []


def test_a_lock_moves_with_its_table_to_another_schema(tmp_path: Path) -> None:
    root = new_project(tmp_path)
    write_revision(
        root,
        "r002",
        "r001",
        'op.execute("CREATE SCHEMA app")\n'
        'op.execute("ALTER TABLE t ADD COLUMN c int")\n'
        'op.execute("ALTER TABLE t SET SCHEMA app")\n'
        'op.execute("UPDATE app.t SET c = 0")',
    )
    assert rules(lint_at(root)) == [("r002", "rename-table"), ("r002", "backfill-under-lock")]


@pytest.mark.parametrize("per_migration", [False, True], ids=["one-transaction", "per-migration"])
def test_a_revision_that_fails_offline_does_not_end_the_transaction(
    tmp_path: Path, per_migration: bool
) -> None:
    # Rendering starts a new session after r003; online, the upgrade goes on in the same
    # transaction, so r004's backfill runs under r002's lock (unless each revision commits).
    root = new_project(tmp_path)
    if per_migration:
        env = root / "migrations" / "env.py"
        env.write_text(env.read_text().replace(PER_MIGRATION_ANCHOR, PER_MIGRATION, 1))
    write_revision(root, "r002", "r001", 'op.add_column("t", sa.Column("c", sa.Integer))')
    write_revision(
        root, "r003", "r002", 'op.get_bind().execute(sa.text("SELECT count(*) FROM t")).scalar()'
    )
    write_revision(root, "r004", "r003", 'op.execute("UPDATE t SET c = 0")')
    found = rules(lint_at(root))
    if per_migration:
        assert found == [("r003", "offline-render-failed")]
    else:
        assert found == [("r003", "offline-render-failed"), ("r004", "backfill-under-lock")]


def test_a_plain_reindex_stops_reads_too_as_its_message_says(db_url: str) -> None:
    schema(db_url)
    with psycopg.connect(db_url) as reindex, psycopg.connect(db_url) as app:
        app.execute("SET lock_timeout = '100ms'")
        app.commit()
        for statement in ("REINDEX INDEX ix_t_a", "REINDEX TABLE t", "DROP INDEX ix_t_a"):
            reindex.execute(statement)
            for query_ in ("SELECT * FROM t WHERE id = 1", "INSERT INTO t (id, b) VALUES (0, 0)"):
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    app.execute(query_)
                app.rollback()
            reindex.rollback()
    assert "every query that plans on the table" in lint.RULES["reindex-not-concurrent"].why


# -- type changes judged against the history ---------------------------------------------------

HISTORY = [
    # (revision body, the findings it must give)
    (
        'op.create_table("people", sa.Column("id", sa.Integer), sa.Column("name", '
        'sa.String(50)), sa.Column("bio", sa.Text), sa.Column("code", sa.String(10)))',
        [],
    ),
    ('op.alter_column("people", "name", type_=sa.String(100))', []),
    ('op.alter_column("people", "name", new_column_name="full_name")', ["rename-column"]),
    ('op.alter_column("people", "full_name", type_=sa.Text)', []),
    ('op.rename_table("people", "persons")', ["rename-table"]),
    ('op.alter_column("persons", "full_name", type_=sa.String(20))', ["column-type-change"]),
    (
        'op.drop_column("persons", "bio")\nop.add_column("persons", sa.Column("bio", sa.Integer))',
        ["drop-column"],
    ),
    ('op.alter_column("persons", "bio", type_=sa.BigInteger)', ["column-type-change"]),
    ('op.drop_table("persons")', ["drop-table"]),
    (
        'op.create_table("persons", sa.Column("id", sa.Integer), sa.Column("full_name", sa.Text))',
        [],
    ),
    ('op.alter_column("persons", "full_name", type_=sa.String())', []),
    ('op.alter_column("persons", "code", type_=sa.Text)', ["column-type-change"]),
    ('op.execute("ALTER TABLE legacy ALTER COLUMN x TYPE text")', ["column-type-change"]),
    ('op.add_column("t", sa.Column("price", sa.Numeric(10, 2)))', []),
    ('op.alter_column("t", "price", type_=sa.Numeric(14, 2))', []),
    (
        'op.execute("ALTER TABLE t ALTER COLUMN price TYPE numeric(14, 2) USING price + 0")',
        ["column-type-change"],
    ),
    ('op.execute("ALTER TABLE t ALTER COLUMN price TYPE numeric USING price::numeric")', []),
    ('op.execute("ALTER TABLE persons RENAME full_name TO name")', ["rename-column"]),
    ('op.alter_column("persons", "name", type_=sa.String(20))', ["column-type-change"]),
    ('op.alter_column("persons", "name", type_=sa.String(30))', []),
]
# Many tables, each renamed and widened, to make the history long (and the replay's cost real).
for n in range(15):
    HISTORY += [
        (f'op.create_table("h{n}", sa.Column("v", sa.String(10)))', []),
        (f'op.rename_table("h{n}", "k{n}")', ["rename-table"]),
        (f'op.alter_column("k{n}", "v", type_=sa.String(20))', []),
        (f'op.alter_column("k{n}", "v", type_=sa.Integer)', ["column-type-change"]),
    ]


def history_project(root: Path) -> list[tuple[str, str]]:
    new_project(root)
    expected: list[tuple[str, str]] = []
    down = "r001"
    for n, (body, found) in enumerate(HISTORY, start=2):
        revision = f"r{n:03d}"
        write_revision(root, revision, down, body)
        expected += [(revision, rule) for rule in found]
        down = revision
    return expected


def test_type_changes_are_judged_against_the_replayed_history(tmp_path: Path) -> None:
    expected = history_project(tmp_path)
    report = lint_at(tmp_path)
    assert report.revisions_checked == len(HISTORY) + 1
    assert rules(report) == expected
    messages = {f.revision: f.message for f in report.findings if f.rule == "column-type-change"}
    assert "persons.full_name from text to varchar(20):" in messages["r007"]
    assert "persons.bio from integer to bigint:" in messages["r009"]
    assert "persons.code to text, from a type lint does not know" in messages["r013"]
    assert "legacy.x to text, from a type lint does not know" in messages["r014"]
    assert "from numeric(14, 2) to numeric(14, 2) with a USING expression" in messages["r017"]
    assert "persons.name from varchar to varchar(20):" in messages["r020"]
    assert "k0.v from varchar(20) to integer:" in messages["r025"]

    # --since: the revisions before it are replayed (renames, drops and all), not reported.
    for since in ("r006", "r012", "r020"):
        after = [(revision, rule) for revision, rule in expected if revision > since]
        assert rules(lint_at(tmp_path, since=since)) == after, since


def test_a_type_change_that_drops_a_columns_collation_rebuilds_its_indexes(
    tmp_path: Path, db_url: str
) -> None:
    # varchar(100) -> text is a relabel, but ALTER ... TYPE without COLLATE resets the column's
    # collation to the default, and PostgreSQL rebuilds its indexes under ACCESS EXCLUSIVE.
    with psycopg.connect(db_url) as conn:
        conn.execute('CREATE TABLE x (s varchar(100) COLLATE "C", d varchar(100))')
        conn.execute("CREATE INDEX ix_x_s ON x (s)")
        conn.execute("CREATE INDEX ix_x_d ON x (d)")
        files = "SELECT pg_relation_filenode('ix_x_s'), pg_relation_filenode('ix_x_d')"
        before = conn.execute(files).fetchone()
        conn.execute("ALTER TABLE x ALTER COLUMN s TYPE text, ALTER COLUMN d TYPE text")
        after = conn.execute(files).fetchone()
        conn.rollback()
    assert before is not None and after is not None
    assert before[0] != after[0] and before[1] == after[1]

    root = new_project(tmp_path)
    write_revision(
        root,
        "r002",
        "r001",
        'op.create_table("x", sa.Column("s", sa.String(100, collation="C")), '
        'sa.Column("d", sa.String(100)))\n'
        'op.create_index("ix_x_s", "x", ["s"])\nop.create_index("ix_x_d", "x", ["d"])',
    )
    write_revision(
        root,
        "r003",
        "r002",
        'op.alter_column("x", "s", type_=sa.Text)\nop.alter_column("x", "d", type_=sa.Text)',
    )
    report = lint_at(root)
    assert rules(report) == [("r003", "column-type-change")]
    assert 'x.s from varchar(100) COLLATE "C" to text, which resets' in report.findings[0].message
