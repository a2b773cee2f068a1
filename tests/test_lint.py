"""`prosaas-migrate lint`: revisions rendered by the real Alembic offline, rules checked by pglast.

Every rule has a revision that triggers it and a safe twin that does not, written with Alembic's
op.* calls and with raw op.execute SQL; the lock each rule names is checked against a real server.
"""

from __future__ import annotations

import json
import os
import pty
import re
import socket
import subprocess
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from prosaas_migrate import lint, offline, revisions
from prosaas_migrate.cli import main
from prosaas_migrate.errors import ConfigError
from tests import project
from tests.conftest import BIN, clean_env, cli, query

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
    ],
    "cluster": [
        ("sql", 'op.execute("CLUSTER t USING ix_t_a")', 'op.execute("ANALYZE t")'),
    ],
    "lock-table": [
        (
            "sql",
            'op.execute("LOCK TABLE t IN SHARE ROW EXCLUSIVE MODE")',
            'op.execute("LOCK TABLE t IN SHARE UPDATE EXCLUSIVE MODE")',
        ),
        ("sql-default-mode", 'op.execute("LOCK t")', 'op.execute("SELECT 1")'),
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
SEPARATELY_TESTED = {"offline-render-failed"}


def test_every_rule_has_cases() -> None:
    assert set(CASES) | SEPARATELY_TESTED == set(lint.RULES)
    for rule, cases in CASES.items():
        table_rule = lint.RULES[rule].lock is not None
        styles = {style.split("-")[0] for style, _, _ in cases}
        # An Alembic op.* call and raw SQL for every rule that Alembic has an operation for.
        no_op_for_it = {"vacuum-full", "cluster", "lock-table", "syntax-error"}
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
    assert finding.lock == lint.RULES[rule].lock or rule == "lock-table"
    assert finding.statement and finding.message and finding.hint

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
            op.execute("DROP TABLE fresh, copy")
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
    result = invoke(tmp_path)
    assert result.exit_code == 2
    assert (
        "ALEMBIC_CONFIG: 'alembic.ini' is invalid; expected the path of an existing"
        in result.output
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
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [str(BIN), "lint"], env=env, cwd=app, stdout=follower, stderr=subprocess.PIPE
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO once the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=60) == 1
    output = b"".join(chunks).decode()
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
    "lock-table": ("LOCK TABLE t", ["t"]),
    "required-column-without-default": ("ALTER TABLE w ADD COLUMN c int NOT NULL", ["w"]),
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
    assert set(LOCK_EXAMPLES) | {"vacuum-full"} == table_rules  # VACUUM: no transaction


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
    # cluster, vacuum-full: a rewrite (VACUUM cannot run in a transaction: autocommit).
    assert filenode_changes("CLUSTER t USING ix_t_a")
    before = query(db_url, "SELECT pg_relation_filenode('t')")
    query(db_url, "VACUUM FULL t")
    assert query(db_url, "SELECT pg_relation_filenode('t')") != before

    with psycopg.connect(db_url) as conn:
        # required-column-without-default: fails on a table with rows.
        with pytest.raises(psycopg.errors.NotNullViolation):
            conn.execute("ALTER TABLE t ADD COLUMN c int NOT NULL")
        conn.rollback()
        # concurrently-in-transaction: fails inside a transaction block.
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.ActiveSqlTransaction):
            conn.execute("CREATE INDEX CONCURRENTLY ix_c ON t (b)")
        conn.rollback()


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
