"""`prosaas-migrate plan`: what a deploy would run here, against a real database with real sizes.

A project is migrated part way for real, a table filled with real rows and analyzed; the plan's
locks, transactions, findings and sizes are then checked against the server's own catalog, and
the server's log proves the plan wrote nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from prosaas_migrate import plan
from prosaas_migrate.cli import main
from tests import project
from tests.conftest import cli, query, version
from tests.pgcluster import Cluster, free_port

APPLIED = {
    "r001": """\
        op.create_table(
            "leads",
            sa.Column("id", sa.BigInteger, primary_key=True),
            sa.Column("email", sa.Text),
        )
        op.create_table("notes", sa.Column("id", sa.Integer))
        """,
}
PENDING = {
    "r002": """\
        op.add_column("leads", sa.Column("source", sa.Text))
        op.create_index("ix_leads_email", "leads", ["email"])
        """,
    "r003": """\
        with op.get_context().autocommit_block():
            op.create_index("ix_leads_source", "leads", ["source"], postgresql_concurrently=True)
        op.create_table("audit", sa.Column("id", sa.Integer), sa.Column("at", sa.DateTime))
        op.create_index("ix_audit_at", "audit", ["at"])
        op.add_column("notes", sa.Column("body", sa.Text))
        """,
    "r004": """\
        op.execute("UPDATE leads SET source = 'web' WHERE source IS NULL")
        """,
}
MESSAGES = {
    "r001": "leads and notes",
    "r002": "add leads.source",
    "r003": "index leads.source, add audit",
    "r004": "backfill leads.source",
}
ROWS = 200_000


def write_revision(root: Path, revision: str, down: str | None, body: str) -> None:
    (root / "migrations" / "versions" / f"{revision}.py").write_text(
        f'"""{MESSAGES.get(revision, revision)}"""\n'
        "import sqlalchemy as sa\n"
        "from alembic import op\n\n"
        f"revision = {revision!r}\n"
        f"down_revision = {down!r}\n"
        "branch_labels = None\n"
        "depends_on = None\n\n\n"
        "def upgrade() -> None:\n"
        f"{textwrap.indent(textwrap.dedent(body).strip(), '    ')}\n"
    )


def write_revisions(root: Path, revisions: dict[str, str], after: str | None = None) -> None:
    down = after
    for revision, body in revisions.items():
        write_revision(root, revision, down, body)
        down = revision


@pytest.fixture
def app(tmp_path: Path) -> Path:
    project.create(tmp_path, [], env="cookbook")
    write_revisions(tmp_path, APPLIED)
    return tmp_path


@pytest.fixture
def part_way(app: Path, db_url: str) -> tuple[Path, str]:
    """r001 applied for real, leads filled with real rows and analyzed; r002-r004 pending."""
    env = {"RUN_MIGRATIONS": "1", "DATABASE_URL": db_url}
    result = cli(["run"], env, app)
    assert result.returncode == 0, result.stderr
    query(
        db_url,
        f"INSERT INTO leads (id, email) SELECT g, 'lead' || g || '@example.com' "
        f"FROM generate_series(1, {ROWS}) g",
    )
    query(db_url, "ANALYZE leads")
    write_revisions(app, PENDING, after="r001")
    return app, db_url


def run_plan(app: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = cli(["plan", *args], env, app)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def as_json(app: Path, env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    result = run_plan(app, env, "--json")
    return result.returncode, json.loads(result.stdout)


def catalog(url: str, table: str) -> tuple[int, int]:
    sizes = "SELECT reltuples::float8, pg_total_relation_size(oid) FROM pg_class WHERE oid = %s"
    row = query(url, sizes + "::regclass", [table])[0]
    return round(float(str(row[0]))), int(str(row[1]))


def locks_of(
    document: dict[str, Any], revision: str
) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Each statement of a revision, with (mode, table, state) of each of its locks."""
    found = next(r for r in document["revisions"] if r["revision"] == revision)
    return [
        (s["sql"], [(lock["mode"], lock["table"], lock["table_state"]) for lock in s["locks"]])
        for s in found["statements"]
    ]


def test_the_pending_revisions_in_order_with_their_locks(part_way: tuple[Path, str]) -> None:
    app, db_url = part_way
    code, document = as_json(app, {"DATABASE_URL": db_url})
    assert code == 1, document
    assert document["database"]["current"] == ["r001"]
    assert [r["revision"] for r in document["revisions"]] == ["r002", "r003", "r004"]
    bookkeeping = ("ROW EXCLUSIVE", "alembic_version", "existing")
    assert locks_of(document, "r002") == [
        ("ALTER TABLE leads ADD COLUMN source TEXT", [("ACCESS EXCLUSIVE", "leads", "existing")]),
        ("CREATE INDEX ix_leads_email ON leads (email)", [("SHARE", "leads", "existing")]),
        (
            "UPDATE alembic_version SET version_num='r002' "
            "WHERE alembic_version.version_num = 'r001'",
            [bookkeeping],
        ),
    ]
    r003 = locks_of(document, "r003")
    assert r003[0] == (
        "CREATE INDEX CONCURRENTLY ix_leads_source ON leads (source)",
        [("SHARE UPDATE EXCLUSIVE", "leads", "existing")],
    )
    assert r003[1][0].startswith("CREATE TABLE audit") and r003[1][1] == []
    assert r003[2] == (
        "CREATE INDEX ix_audit_at ON audit (at)",
        [("SHARE", "audit", "created")],
    )
    assert r003[3] == (
        "ALTER TABLE notes ADD COLUMN body TEXT",
        [("ACCESS EXCLUSIVE", "notes", "existing")],
    )
    assert locks_of(document, "r004")[0] == (
        "UPDATE leads SET source = 'web' WHERE source IS NULL",
        [("ROW EXCLUSIVE", "leads", "existing")],
    )


def test_sizes_are_the_catalogs(part_way: tuple[Path, str]) -> None:
    app, db_url = part_way
    _, document = as_json(app, {"DATABASE_URL": db_url})
    rows, size = catalog(db_url, "leads")
    assert rows == ROWS  # ANALYZE counted them all: a small table is read whole
    first = document["revisions"][0]["statements"][0]["locks"][0]
    assert (first["table"], first["rows"], first["bytes"]) == ("leads", rows, size)
    assert first["queues_app"] is True
    # notes was never analyzed: reltuples is -1, and the plan says "unknown", not 0.
    assert query(db_url, "SELECT reltuples FROM pg_class WHERE oid = 'notes'::regclass") == [(-1,)]
    notes = document["revisions"][1]["statements"][3]["locks"][0]
    assert (notes["rows"], notes["bytes"]) == (None, catalog(db_url, "notes")[1])
    created = document["revisions"][1]["statements"][2]["locks"][0]
    assert (created["created_in"], created["rows"], created["bytes"]) == ("r003", None, None)

    text = run_plan(app, {"DATABASE_URL": db_url}).stdout
    assert f"ACCESS EXCLUSIVE on leads (200 k rows, {plan.bytes_text(size)})" in text
    assert "ACCESS EXCLUSIVE on notes (unknown rows, " in text
    assert "SHARE on audit (created by this plan in r003)" in text


def test_an_autocommit_block_runs_outside_a_transaction(part_way: tuple[Path, str]) -> None:
    app, db_url = part_way
    _, document = as_json(app, {"DATABASE_URL": db_url})
    statements = [s for r in document["revisions"] for s in r["statements"]]
    outside = [s["sql"] for s in statements if not s["in_transaction"]]
    assert outside == ["CREATE INDEX CONCURRENTLY ix_leads_source ON leads (source)"]
    concurrent = next(s for s in statements if s["sql"] == outside[0])
    assert concurrent["concurrent"] is True
    text = run_plan(app, {"DATABASE_URL": db_url}).stdout
    index = text.index("CREATE INDEX CONCURRENTLY ix_leads_source")
    assert text[index:].splitlines()[1].strip() == "outside a transaction (autocommit_block)"
    # The COMMIT before the block ends r002's transaction; the BEGIN after it opens the one
    # the rest runs in, up to the final COMMIT: r003's lock on notes lasts through r004.
    held = {s["sql"]: s["held_until"] for s in statements}
    assert held["ALTER TABLE leads ADD COLUMN source TEXT"] == "r002"
    assert held[outside[0]] is None
    assert held["ALTER TABLE notes ADD COLUMN body TEXT"] == "r004"
    after = text[text.index("CREATE TABLE audit") :]
    assert after.splitlines()[1].strip() == "in the transaction committed after r004"


def test_lints_findings_are_shown_under_their_revision(part_way: tuple[Path, str]) -> None:
    app, db_url = part_way
    _, document = as_json(app, {"DATABASE_URL": db_url})
    found = {r["revision"]: [f["rule"] for f in r["findings"]] for r in document["revisions"]}
    assert found == {"r002": ["index-not-concurrent"], "r003": [], "r004": []}
    text = run_plan(app, {"DATABASE_URL": db_url}).stdout
    r002 = text[text.index("\nr002") : text.index("\nr003")]
    assert "lint: 1 finding" in r002
    assert "index-not-concurrent: CREATE INDEX ix_leads_email ON leads (email)" in r002
    assert "lint: no findings" in text[text.index("\nr003") :]


def test_exit_codes_as_status_check(app: Path, db_url: str) -> None:
    env = {"DATABASE_URL": db_url}
    assert run_plan(app, env).returncode == 1  # r001 pending on a fresh database
    assert cli(["run"], {**env, "RUN_MIGRATIONS": "1"}, app).returncode == 0
    result = run_plan(app, env)
    assert result.returncode == 0, result.stderr
    assert "nothing to run: the database is at head" in result.stdout
    code, document = as_json(app, env)
    assert (code, document["pending"], document["revisions"]) == (0, 0, [])


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"DATABASE_URL": "driver://user:pass@localhost/dbname"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://app@db:notaport/app"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://app@db/app", "RUN_MIGRATIONS": "maybe"}, "RUN_MIGRATIONS"),
        ({"DATABASE_URL": "postgresql://app@db/app", "ALEMBIC_CONFIG": "nope.ini"}, "nope.ini"),
    ],
)
def test_a_bad_configuration_is_one_line_and_exit_2(
    app: Path, env: dict[str, str], variable: str
) -> None:
    result = run_plan(app, env)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], result.stderr
    code, document = as_json(app, env)
    assert code == 2 and variable in document["error"]


def test_config_names_the_project_from_anywhere(app: Path, db_url: str, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ini = str(app / "alembic.ini")
    result = cli(["plan", "--config", ini], {"DATABASE_URL": db_url}, elsewhere)
    assert result.returncode == 1, result.stderr
    assert "r001  leads and notes" in result.stdout
    (elsewhere / ".env").write_text(f"DATABASE_URL={db_url}\n")  # read as run and status read it
    assert cli(["plan", "-c", ini, "--json"], {}, elsewhere).returncode == 1


def test_without_a_url_it_is_misconfigured(app: Path) -> None:
    result = run_plan(app, {})
    assert result.returncode == 2
    assert "DATABASE_URL: not set" in result.stderr


def test_an_unreadable_dotenv_is_misconfigured(app: Path) -> None:
    (app / ".env").write_bytes(b"DATABASE_URL=\xff\n")  # not UTF-8
    result = run_plan(app, {})
    assert result.returncode == 2
    assert "cannot read" in result.stderr and ".env" in result.stderr
    code, document = as_json(app, {})
    assert code == 2 and "cannot read" in document["error"]


def test_an_unreachable_database_is_exit_3(app: Path) -> None:
    url = f"postgresql://app:s3cr3t@127.0.0.1:{free_port()}/app"
    result = run_plan(app, {"DATABASE_URL": url})
    assert result.returncode == 3, result.stderr
    assert "database unreachable at postgresql://app:***@127.0.0.1" in result.stderr
    assert "s3cr3t" not in result.stdout + result.stderr
    code, document = as_json(app, {"DATABASE_URL": url})
    assert code == 3 and document["database"]["current"] is None


def test_a_database_ahead_of_the_scripts_is_5(app: Path, db_url: str) -> None:
    query(db_url, "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
    query(db_url, "INSERT INTO alembic_version VALUES ('zzz999')")
    code, document = as_json(app, {"DATABASE_URL": db_url})
    assert code == 5 and document["database"]["unknown"] == ["zzz999"]


@pytest.fixture
def logged_db(db_url: str, own_cluster: Cluster) -> Iterator[tuple[str, Cluster]]:
    """A database whose every statement lands in the server log."""
    name = db_url.rsplit("/", 1)[1]
    query(own_cluster.url(), f"ALTER DATABASE \"{name}\" SET log_statement = 'all'")
    yield db_url, own_cluster


def test_plan_writes_nothing_as_the_server_sees_it(
    app: Path, logged_db: tuple[str, Cluster]
) -> None:
    db_url, cluster = logged_db
    # A database that predates Alembic: the first revision alters a table it did not create.
    query(db_url, "CREATE TABLE legacy (id int)")
    write_revision(app, "r002", "r001", 'op.add_column("legacy", sa.Column("x", sa.Integer))')
    tables = "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
    before_tables = query(db_url, tables)
    before = cluster.log.stat().st_size
    result = run_plan(app, {"DATABASE_URL": db_url})
    with cluster.log.open(encoding="utf-8", errors="replace") as log:
        log.seek(before)
        logged = log.read()
    assert result.returncode == 1, result.stderr
    assert "pg_total_relation_size" in logged  # the log really shows plan's statements
    for forbidden in ("advisory_lock(", "CREATE", "INSERT", "UPDATE", "DELETE", "SET SESSION"):
        assert forbidden not in logged, forbidden
    statements = re.findall(r"statement: (\w+)", logged)
    assert statements.count("BEGIN") == statements.count("COMMIT") >= 2
    assert logged.count("'transaction_read_only', 'on', true") == statements.count("BEGIN")
    assert version(db_url) == []
    assert query(db_url, "SELECT to_regclass('alembic_version')") == [(None,)]
    assert query(db_url, tables) == before_tables
    # On a fresh database the version table Alembic would create is known to be new.
    assert "ROW EXCLUSIVE on alembic_version (created by this plan in r001)" in result.stdout
    assert "ACCESS EXCLUSIVE on legacy (unknown rows, 0 bytes, never analyzed)" in result.stdout


def test_json_round_trips(part_way: tuple[Path, str]) -> None:
    app, db_url = part_way
    code, document = as_json(app, {"DATABASE_URL": db_url})
    assert json.loads(json.dumps(document)) == document
    assert set(document) == {
        "version",
        "exit_code",
        "error",
        "database",
        "pending",
        "renderer",
        "renderer_note",
        "catalog_error",
        "revisions",
    }
    assert document["exit_code"] == code == 1
    revision = document["revisions"][0]
    assert set(revision) == {"revision", "message", "file", "error", "statements", "findings"}
    statement = revision["statements"][0]
    assert set(statement) == {
        "sql",
        "kind",
        "in_transaction",
        "held_until",
        "concurrent",
        "locks",
    }
    assert set(statement["locks"][0]) == {
        "schema",
        "table",
        "relkind",
        "mode",
        "queues_app",
        "table_state",
        "created_in",
        "on",
        "rows",
        "bytes",
    }
    assert isinstance(statement["locks"][0]["rows"], int)
    assert isinstance(statement["locks"][0]["bytes"], int)


def test_help_ends_with_a_real_example() -> None:
    result = CliRunner().invoke(main, ["plan", "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert "docker compose exec worker prosaas-migrate plan" in result.output


def test_per_migration_transactions_from_the_projects_own_env_py(
    tmp_path: Path, db_url: str
) -> None:
    project.create(tmp_path, [], env="stock")
    env_py = tmp_path / "migrations" / "env.py"
    text = env_py.read_text()
    assert text.count("literal_binds=True,") == 1  # the offline branch's configure()
    env_py.write_text(
        text.replace("literal_binds=True,", "transaction_per_migration=True, literal_binds=True,")
    )
    write_revisions(tmp_path, APPLIED)
    write_revision(tmp_path, "r001b", "r001", 'op.create_index("ix_leads_old", "leads", ["email"])')
    env = {"DATABASE_URL": db_url}
    assert cli(["run"], {**env, "RUN_MIGRATIONS": "1"}, tmp_path).returncode == 0
    write_revisions(tmp_path, PENDING, after="r001b")
    write_revision(tmp_path, "r005", "r004", 'op.drop_index("ix_leads_old", table_name="leads")')
    code, document = as_json(tmp_path, env)
    assert code == 1
    assert (document["renderer"], document["renderer_note"]) == ("env.py", None)
    assert [r["revision"] for r in document["revisions"]] == ["r002", "r003", "r004", "r005"]
    for revision in document["revisions"]:
        for statement in revision["statements"]:
            if statement["in_transaction"]:
                assert statement["held_until"] == revision["revision"], statement
    # DROP INDEX names the index; the lock falls on its table, which the catalog names.
    dropped = document["revisions"][-1]["statements"][0]
    assert dropped["sql"] == "DROP INDEX ix_leads_old"
    on_table = next(lock for lock in dropped["locks"] if lock["relkind"] == "table of index")
    assert (on_table["mode"], on_table["on"], on_table["table_state"]) == (
        "ACCESS EXCLUSIVE",
        "leads",
        "existing",
    )
    text = run_plan(tmp_path, env).stdout
    assert "ACCESS EXCLUSIVE on leads, the table of index ix_leads_old (" in text
    assert "in the transaction committed after r003" in text


def test_a_table_locked_by_a_migration_leaves_sizes_unknown_not_a_hang(
    part_way: tuple[Path, str],
) -> None:
    import psycopg

    app, db_url = part_way
    with psycopg.connect(db_url) as holder:
        holder.execute("LOCK TABLE leads IN ACCESS EXCLUSIVE MODE")
        code, document = as_json(app, {"DATABASE_URL": db_url})
        text = run_plan(app, {"DATABASE_URL": db_url}).stdout
        holder.rollback()
    assert code == 1  # what is pending is known; only the sizes are not
    assert document["catalog_error"].startswith("a table stayed locked for 5.0s")
    first = document["revisions"][0]["statements"][0]["locks"][0]
    assert (first["table_state"], first["rows"], first["bytes"]) == ("unknown", None, None)
    assert "ACCESS EXCLUSIVE on leads (size unknown)" in text
    assert "table sizes unknown: " in text


README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
SAMPLE = re.compile(r"^<!-- plan sample -->\n```\n(.*?)\n```", re.MULTILINE | re.DOTALL)


def test_the_readme_sample_is_what_plan_prints(part_way: tuple[Path, str]) -> None:
    app, db_url = part_way
    result = run_plan(app, {"DATABASE_URL": db_url})
    assert result.returncode == 1, result.stderr

    def shape(text: str) -> list[str]:
        # The URL (a throwaway server's port and database) aside, every character is the tool's.
        lines = [
            line for line in text.rstrip("\n").splitlines() if not line.startswith("database:")
        ]
        return [re.sub(r"[0-9]+(?:\.[0-9]+)?", "N", line) for line in lines]

    (sample,) = SAMPLE.findall(README)
    assert shape(sample) == shape(result.stdout)


def test_the_summary_names_what_the_app_will_wait_for(part_way: tuple[Path, str]) -> None:
    app, db_url = part_way
    text = run_plan(app, {"DATABASE_URL": db_url}).stdout
    summary = text.split("Locks the application's queries will wait for\n", 1)[1].split("\n\n")[0]
    size = plan.bytes_text(catalog(db_url, "leads")[1])
    assert summary.splitlines() == [
        f"  ACCESS EXCLUSIVE on leads (200 k rows, {size}): from r002, held until the COMMIT "
        "after r002",
        f"  ACCESS EXCLUSIVE on notes (unknown rows, {plan.bytes_text(catalog(db_url, 'notes')[1])}"
        ", never analyzed): from r003, held until the COMMIT after r004",
    ]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 rows"),
        (1, "1 row"),
        (9_999, "9,999 rows"),
        (200_000, "200 k rows"),
        (12_345_678, "12 M rows"),
        (1_500_000, "1.5 M rows"),
        (None, "unknown rows"),
    ],
)
def test_row_counts_read_like_a_person_would_say_them(value: int | None, text: str) -> None:
    assert plan.rows_text(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0 bytes"), (8192, "8.0 kB"), (16 * 1024**2, "16 MB"), (int(3.1 * 1024**3), "3.1 GB")],
)
def test_sizes_count_as_pg_size_pretty_does(value: int, text: str) -> None:
    assert plan.bytes_text(value) == text


def test_partitions_schemas_renames_and_unparsable_sql(app: Path, db_url: str) -> None:
    env = {"DATABASE_URL": db_url}
    assert cli(["run"], {**env, "RUN_MIGRATIONS": "1"}, app).returncode == 0
    query(db_url, "CREATE SCHEMA crm")
    query(db_url, "CREATE TABLE crm.contacts AS SELECT g AS id FROM generate_series(1, 5000) g")
    query(db_url, "CREATE TABLE events (at date, n int) PARTITION BY RANGE (at)")
    query(
        db_url,
        "CREATE TABLE events_a PARTITION OF events FOR VALUES FROM (MINVALUE) TO ('2026-01-01')",
    )
    query(
        db_url,
        "CREATE TABLE events_b PARTITION OF events FOR VALUES FROM ('2026-01-01') TO (MAXVALUE)",
    )
    query(
        db_url,
        "INSERT INTO events SELECT date '2025-12-01' + g % 60, g FROM generate_series(1, 30000) g",
    )
    query(db_url, "ANALYZE crm.contacts")
    query(db_url, "ANALYZE events")
    write_revision(
        app,
        "r002",
        "r001",
        """\
        op.add_column("events", sa.Column("kind", sa.Text))
        op.add_column("contacts", sa.Column("kind", sa.Text), schema="crm")
        op.rename_table("contacts", "people", schema="crm")
        op.create_index("ix_people_kind", "people", ["kind"], schema="crm")
        op.execute("ALTER TABLE leads ADD COLUMN")
        """,
    )
    code, document = as_json(app, env)
    assert code == 1
    statements = document["revisions"][0]["statements"]
    events, contacts, renamed, index, broken = (s["locks"] for s in statements[:5])
    parts = query(
        db_url,
        "SELECT sum(reltuples)::bigint, sum(pg_total_relation_size(oid))::bigint FROM pg_class"
        " WHERE relname IN ('events_a', 'events_b')",
    )[0]
    assert (events[0]["rows"], events[0]["bytes"]) == parts == (30000, parts[1])
    people = catalog(db_url, "crm.contacts")
    assert contacts[0]["schema"] == "crm" and (contacts[0]["rows"], contacts[0]["bytes"]) == people
    assert renamed[0]["table"] == "contacts"
    # After the rename, the rows are those of crm.contacts under its new name.
    assert (index[0]["table"], index[0]["table_state"], index[0]["rows"]) == (
        "people",
        "existing",
        5000,
    )
    assert broken == [] and statements[4]["kind"] == "unparsable"
    rules = [f["rule"] for f in document["revisions"][0]["findings"]]
    assert "syntax-error" in rules
    text = run_plan(app, env).stdout
    assert "locks unknown: PostgreSQL's parser rejects it (see lint below)" in text
    assert "SHARE on crm.people (5,000 rows, " in text


def test_a_revision_file_that_does_not_load_is_misconfigured(app: Path, db_url: str) -> None:
    (app / "migrations" / "versions" / "r002.py").write_text(
        "revision = 'r002'\ndown_revision = 'r001'\ndef upgrade(:\n"
    )
    result = run_plan(app, {"DATABASE_URL": db_url})
    assert result.returncode == 2, result.stderr
    assert "r002.py:3" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_without_transactional_ddl_nothing_is_called_an_autocommit_block(
    tmp_path: Path, db_url: str
) -> None:
    project.create(tmp_path, [], env="stock")
    env_py = tmp_path / "migrations" / "env.py"
    env_py.write_text(
        env_py.read_text().replace(
            "literal_binds=True,", "transactional_ddl=False, literal_binds=True,", 1
        )
    )
    write_revisions(tmp_path, APPLIED)
    code, document = as_json(tmp_path, {"DATABASE_URL": db_url})
    assert code == 1 and "transactional_ddl=False" in document["renderer_note"]
    statements = document["revisions"][0]["statements"]
    assert not any(s["in_transaction"] for s in statements)
    text = run_plan(tmp_path, {"DATABASE_URL": db_url}).stdout
    assert "     outside a transaction\n" in text and "autocommit_block" not in text
    assert "note: env.py sets transactional_ddl=False" in text


def test_findings_are_judged_against_what_the_applied_revisions_built(
    app: Path, db_url: str
) -> None:
    # As `lint --since <current>`: the applied history says which table an index is on (so a
    # backfill after REINDEX INDEX is under its SHARE lock) and a column's type (so varchar to
    # text is a relabel, not an unknown type change).
    write_revision(
        app,
        "r002",
        "r001",
        'op.add_column("leads", sa.Column("name", sa.String(100)))\n'
        'op.create_index("ix_leads_name", "leads", ["name"])',
    )
    env = {"RUN_MIGRATIONS": "1", "DATABASE_URL": db_url}
    assert cli(["run"], env, app).returncode == 0
    write_revision(
        app,
        "r003",
        "r002",
        'op.execute("REINDEX INDEX ix_leads_name")\n'
        'op.execute("UPDATE leads SET name = lower(name)")\n'
        'op.alter_column("leads", "name", type_=sa.Text)',
    )
    code, document = as_json(app, {"DATABASE_URL": db_url})
    assert code == 1
    (revision,) = document["revisions"]
    found = [(f["rule"], f["statement"]) for f in revision["findings"]]
    assert found == [
        ("reindex-not-concurrent", "REINDEX INDEX ix_leads_name"),
        ("backfill-under-lock", "UPDATE leads SET name = lower(name)"),
    ]
    lint = cli(["lint", "--since", "r002", "--format", "json"], {}, app)
    assert [(f["rule"], f["statement"]) for f in json.loads(lint.stdout)["findings"]] == found
