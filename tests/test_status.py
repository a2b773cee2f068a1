"""`prosaas-migrate status`: a read-only report, text or JSON, never failing on what it reports."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from prosaas_migrate import config
from tests import project
from tests.conftest import clean_env, cli, on_a_terminal, query, version
from tests.pgcluster import Cluster, PgBouncer, free_port


@pytest.fixture
def app(tmp_path: Path) -> Path:
    project.create(tmp_path, project.linear(3))
    return tmp_path


def squeezed(text: str) -> str:
    """The report with the column padding folded, so tests do not pin widths."""
    return re.sub(r" {2,}", " ", text)


def status(app: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return cli(["status", *args], env, app)


def as_json(app: Path, env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    result = status(app, env, "--json", *args)
    assert "Traceback" not in result.stderr
    return result.returncode, json.loads(result.stdout)


def test_reports_pending_revisions_in_order(app: Path, db_url: str) -> None:
    assert cli(["run"], {"RUN_MIGRATIONS": "1", "DATABASE_URL": db_url}, app).returncode == 0
    project.write_revisions(app, project.linear(5))
    result = status(app, {"DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for section in ("Configuration", "Alembic", "Database", "Revisions", "Lock"):
        assert f"\n{section}\n" in f"\n{text}"
    assert text.index("Configuration") < text.index("Alembic") < text.index("Database")
    assert text.index("Database") < text.index("Revisions") < text.index("Lock")
    rows = squeezed(text)
    assert " current r003\n" in rows
    assert " heads r005\n" in rows
    assert rows.index(" r004 create t004\n") < rows.index(" r005 create t005\n")
    assert " state free" in rows
    assert "\x1b[" not in text  # not a terminal: no colour


def test_check_exit_codes(app: Path, db_url: str) -> None:
    env = {"DATABASE_URL": db_url}
    assert status(app, env).returncode == 0
    code, report = as_json(app, env, "--check")
    assert code == 1 and report["revisions"]["at_head"] is False
    assert cli(["run"], {**env, "RUN_MIGRATIONS": "1"}, app).returncode == 0
    code, report = as_json(app, env, "--check")
    assert code == 0 and report["revisions"]["at_head"] is True
    assert report["revisions"]["pending"] == []


def test_without_a_database_it_still_reports_and_check_says_3(app: Path) -> None:
    url = f"postgresql://app:s3cr3t@127.0.0.1:{free_port()}/app"
    result = status(app, {"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    assert " reachable no: connection failed" in squeezed(result.stdout)
    assert "postgresql://app:***@127.0.0.1" in result.stdout
    assert "s3cr3t" not in result.stdout + result.stderr
    code, report = as_json(app, {"DATABASE_URL": url}, "--check")
    assert code == 3
    assert report["database"]["reachable"] is False
    assert report["revisions"]["heads"] == ["r003"]  # the scripts are still read


def test_a_bad_configuration_is_reported_where_it_is(app: Path, db_url: str) -> None:
    env = {
        "RUN_MIGRATIONS": "maybe",
        "MIGRATION_LOCK_WAIT_SECONDS": "-5",
        "MIGRATION_LOCK_KEY": str(2**64),
        "DATABASE_URL": db_url,
    }
    result = status(app, env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "✗ RUN_MIGRATIONS: 'maybe' is invalid" in result.stdout
    assert "✗ MIGRATION_LOCK_WAIT_SECONDS: '-5' is invalid" in result.stdout
    assert " run decision unknown: RUN_MIGRATIONS" in squeezed(result.stdout)
    code, report = as_json(app, env, "--check")
    assert code == 2
    assert len(report["configuration"]["errors"]) == 3
    assert report["lock"]["key"] is None and "MIGRATION_LOCK_KEY" in report["lock"]["error"]
    assert report["database"]["reachable"] is True  # unrelated sections still work


def test_sources_are_named(app: Path, db_url: str) -> None:
    (app / ".env").write_text("SERVICE_ROLE=api\nMIGRATION_STATEMENT_TIMEOUT=90s\n")
    env = {"RUN_MIGRATIONS_ON_START": "0", "MIGRATION_STATEMENT_TIMEOUT": "2min"}
    _, report = as_json(app, {**env, "DATABASE_URL": db_url}, "--config", "alembic.ini")
    sources = {
        row["name"]: (row["value"], row["source"]) for row in report["configuration"]["settings"]
    }
    assert sources["SERVICE_ROLE"] == ("api", ".env")
    assert sources["MIGRATION_STATEMENT_TIMEOUT"] == ("2min", "environment")  # real env wins
    assert sources["MIGRATION_LOCK_WAIT_SECONDS"] == ("30", "default")
    assert sources["ALEMBIC_CONFIG"] == ("alembic.ini", "--config")
    assert sources["RUN_MIGRATIONS"] == (None, "unset")
    assert report["configuration"]["run"] == {
        "migrate": False,
        "decided_by": "RUN_MIGRATIONS_ON_START",
        "value": "0",
        "error": None,
    }
    text = status(app, {**env, "DATABASE_URL": db_url}).stdout
    assert "skip (legacy RUN_MIGRATIONS_ON_START=0)" in text


def test_the_holder_is_named(app: Path, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True, application_name="prosaas-migrate:api-7") as h:
        h.execute("SELECT pg_advisory_lock(%s)", [config.default_lock_key()])
        code, report = as_json(app, {"DATABASE_URL": db_url})
        text = status(app, {"DATABASE_URL": db_url}).stdout
        pid = h.info.backend_pid
    assert code == 0
    holder = report["lock"]["holder"]
    assert report["lock"]["held"] is True
    assert holder["pid"] == pid
    assert holder["application_name"] == "prosaas-migrate:api-7"
    assert holder["client_addr"] == "127.0.0.1"
    assert holder["state"] == "idle"
    assert f"pid {pid} (prosaas-migrate:api-7)" in text


pytestmark = pytest.mark.majors  # its database tests run on each --pg-majors major

JSON_FIELDS = {
    "": {"version", "configuration", "alembic", "database", "revisions", "lock", "lint"},
    "configuration": {"settings", "run", "dotenv_error", "errors"},
    "configuration.run": {"migrate", "decided_by", "value", "error"},
    "configuration.settings[]": {"name", "value", "source", "error", "note", "meaning"},
    "alembic": {"config", "config_source", "script_location", "fast_path", "error"},
    "database": {"reachable", "url", "url_source", "server_version", "pooler", "rejected", "error"},
    "revisions": {"current", "heads", "pending", "at_head", "unknown", "invalid_indexes", "error"},
    "revisions.pending[]": {"revision", "message"},
    "lock": {"key", "key_source", "held", "holder", "error"},
    "lock.holder": {
        "pid", "application_name", "client_addr", "connected_since", "connected_seconds",
        "state", "state_seconds",
    },
    "lint": {"revisions_checked", "allowed", "renderer", "renderer_note", "findings", "error"},
}  # fmt: skip


def test_json_field_names_are_stable_and_documented(app: Path, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as h:
        h.execute("SELECT pg_advisory_lock(%s)", [config.default_lock_key()])
        result = status(app, {"DATABASE_URL": db_url}, "--json")
    report = json.loads(result.stdout)
    assert result.stderr == ""  # only the document on stdout, nothing else anywhere
    assert set(report) == JSON_FIELDS[""]
    for path, fields in JSON_FIELDS.items():
        if not path:
            continue
        node: Any = report
        for part in path.removesuffix("[]").split("."):
            node = node[part]
        node = node[0] if path.endswith("[]") else node
        assert set(node) == fields, path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    readme = re.sub(r"```.*?```", "", readme, flags=re.DOTALL)  # inline code only
    documented = {
        token for span in re.findall(r"`([^`]+)`", readme) for token in re.split(r"[.\[\]]+", span)
    }
    for fields in JSON_FIELDS.values():
        assert fields <= documented, fields - documented


@pytest.fixture
def logged_db(db_url: str, own_cluster: Cluster) -> Iterator[tuple[str, Cluster]]:
    """A database whose every statement lands in the server log."""
    query(
        own_cluster.url(),
        f"ALTER DATABASE \"{db_url.rsplit('/', 1)[1]}\" SET log_statement = 'all'",
    )
    yield db_url, own_cluster


def test_status_is_read_only_as_the_server_sees_it(
    app: Path, logged_db: tuple[str, Cluster]
) -> None:
    db_url, cluster = logged_db
    before = cluster.log.stat().st_size
    result = status(app, {"DATABASE_URL": db_url})
    with cluster.log.open(encoding="utf-8", errors="replace") as log:
        log.seek(before)
        logged = log.read()  # statements span several lines: keep them whole
    assert result.returncode == 0, result.stderr
    assert "pg_locks" in logged  # the log really shows status's statements
    for forbidden in ("advisory_lock(", "CREATE", "INSERT", "UPDATE", "DELETE", "SET SESSION"):
        assert forbidden not in logged, forbidden
    # Its reads run in short read-only transactions, each one ended: none is left open, and
    # no setting is made for the session (a pooler would hand it on to another client).
    statements = re.findall(r"statement: (\w+)", logged)
    assert statements.count("BEGIN") == statements.count("COMMIT") >= 1
    assert logged.count("'transaction_read_only', 'on', true") == statements.count("BEGIN")
    assert ", false)" not in logged  # no set_config(..., is_local => false)
    assert version(db_url) == []
    assert query(db_url, "SELECT to_regclass('alembic_version')") == [(None,)]


def test_a_broken_project_is_reported_not_raised(tmp_path: Path, db_url: str) -> None:
    project.create(tmp_path, project.linear(2))
    (tmp_path / "migrations" / "versions" / "r002.py").write_text("import no_such_module\n")
    code, report = as_json(tmp_path, {"DATABASE_URL": db_url})
    assert code == 0
    assert "no_such_module" in report["alembic"]["error"]
    assert report["database"]["reachable"] is True
    assert report["lock"]["held"] is False


def test_a_database_ahead_of_the_scripts_is_reported(app: Path, db_url: str) -> None:
    query(db_url, "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
    query(db_url, "INSERT INTO alembic_version VALUES ('zzz999')")
    code, report = as_json(app, {"DATABASE_URL": db_url}, "--check")
    assert code == 5  # its own code: neither "pending" (1) nor "could not tell" (3)
    assert report["revisions"]["current"] == ["zzz999"]
    assert report["revisions"]["unknown"] == ["zzz999"]
    assert report["revisions"]["at_head"] is False
    text = squeezed(status(app, {"DATABASE_URL": db_url}).stdout)
    assert "the database is ahead of these scripts: zzz999 is not among them" in text


def test_without_alembic_ini_the_rest_is_still_shown(tmp_path: Path, db_url: str) -> None:
    code, report = as_json(tmp_path, {"DATABASE_URL": db_url}, "--check")
    assert code == 2
    assert "ALEMBIC_CONFIG: 'alembic.ini' is invalid" in report["alembic"]["error"]
    assert report["database"]["reachable"] is True
    assert report["revisions"]["current"] is None  # which version table? only env.py says
    assert report["lock"]["held"] is False


@pytest.mark.parametrize(("no_color", "coloured"), [(None, True), ("1", False)])
def test_colour_only_on_a_terminal_and_never_with_no_color(
    app: Path, db_url: str, no_color: str | None, coloured: bool
) -> None:
    env = clean_env({"DATABASE_URL": db_url})
    if no_color:
        env["NO_COLOR"] = no_color
    code, output = on_a_terminal(["status"], env, app)
    assert code == 0
    assert "Configuration" in output
    assert ("\x1b[" in output) is coloured


def test_status_judges_only_the_url_run_would_migrate_with(app: Path, db_url: str) -> None:
    # The Secret layout docs/kubernetes.md recommends: the app's own driver in DATABASE_URL.
    env = {
        "MIGRATION_DATABASE_URL": db_url,
        "DATABASE_URL": "postgresql+asyncpg://app:s3cr3t@pgbouncer:6432/app",
    }
    code, report = as_json(app, env, "--check")
    assert code == 1, report  # pending: it read the database, nothing is misconfigured
    assert report["configuration"]["errors"] == []
    rows = {row["name"]: row for row in report["configuration"]["settings"]}
    assert rows["DATABASE_URL"]["note"] == "not used for migrating: MIGRATION_DATABASE_URL wins"
    assert rows["DATABASE_URL"]["error"] is None
    assert report["database"]["url_source"] == "MIGRATION_DATABASE_URL"
    assert "s3cr3t" not in json.dumps(report)


def test_an_unreadable_dotenv_is_reported_and_status_goes_on(app: Path, db_url: str) -> None:
    (app / ".env").write_bytes(b"MIGRATION_LOCK_WAIT_SECONDS=5\nSERVICE_ROLE=\xff\n")
    result = status(app, {"DATABASE_URL": db_url}, "--json", "--check")
    assert result.returncode == 2  # misconfigured, and said
    report = json.loads(result.stdout)  # the document is there all the same
    assert "cannot read" in report["configuration"]["dotenv_error"]
    assert report["configuration"]["errors"][0] == report["configuration"]["dotenv_error"]
    assert report["database"]["reachable"] is True
    assert report["revisions"]["pending"] is not None
    text = status(app, {"DATABASE_URL": db_url})
    assert text.returncode == 0 and " .env cannot read" in squeezed(text.stdout)
    (app / "worker.log").write_text("")
    trace = cli(["worker-trace", "worker.log"], {}, app)  # needs no .env at all
    assert trace.returncode == 0, trace.stderr
    run = cli(["run", "--", "true"], {"RUN_MIGRATIONS": "0"}, app)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "cannot read" in run.stderr and "Traceback" not in run.stderr


def test_the_lock_key_is_a_string_in_json(app: Path, db_url: str) -> None:
    # 7214607257041625889 > 2**53: jq and JavaScript would read the number as ...6000.
    _, report = as_json(app, {"DATABASE_URL": db_url})
    assert report["lock"]["key"] == str(config.DEFAULT_LOCK_KEY)
    _, report = as_json(app, {"DATABASE_URL": db_url, "MIGRATION_LOCK_KEY": "-9"})
    assert report["lock"]["key"] == "-9"


@pytest.mark.parametrize("bouncer", ["transaction", "session"], indirect=True)
def test_status_warns_of_a_pooler_that_run_refuses(
    app: Path, db_url: str, bouncer: PgBouncer
) -> None:
    url = bouncer.url(db_url.rsplit("/", 1)[1])
    code, report = as_json(app, {"DATABASE_URL": url}, "--check")
    assert report["database"]["reachable"], report["database"]
    assert code == 1  # pending: the report goes on, the warning does not hide the schema
    result = status(app, {"DATABASE_URL": url})
    if "transaction" in bouncer.base.name:
        assert "different server sessions" in report["database"]["pooler"]
        refusal = r"^ +pooler .*run refuses to migrate through it \(exit 2 when a revision is"
        assert re.search(refusal, result.stdout, re.MULTILINE)
        assert "MIGRATION_DATABASE_URL" in result.stdout
        # What status says is what run does.
        refused = cli(["run"], {"RUN_MIGRATIONS": "1", "DATABASE_URL": url}, app)
        assert refused.returncode == 2, refused.stderr
    else:
        assert report["database"]["pooler"] is None
        assert not re.search(r"^ +pooler ", result.stdout, re.MULTILINE)
    assert version(db_url) == []


def test_a_crash_is_never_read_as_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error (a dependency older than the code expects, a bug) must not exit 1,
    which `--check` means as "migrations are pending": it exits 3, "could not tell"."""
    from click.testing import CliRunner

    from prosaas_migrate import status as report_status
    from prosaas_migrate.cli import main

    def crash(*args: object, **kwargs: object) -> None:
        raise TypeError("Config.__init__() got an unexpected keyword argument 'toml_file'")

    monkeypatch.setattr(report_status, "gather", crash)
    result = CliRunner().invoke(main, ["status", "--check"], env={"DATABASE_URL": ""})
    assert result.exit_code == 3, result.output
    assert "status could not finish" in result.output
    unchecked = CliRunner().invoke(main, ["status"], env={"DATABASE_URL": ""})
    assert isinstance(unchecked.exception, TypeError)  # without --check: Python's own traceback


def test_invalid_indexes_on_the_tables_pending_revisions_touch_are_listed(
    tmp_path: Path, db_url: str
) -> None:
    """Issue 16 point 2: what a failed concurrent build left, where the deploy will work."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        for table in ("leads", "other"):
            conn.execute(f"CREATE TABLE {table} (email text)")
            conn.execute(f"INSERT INTO {table} VALUES ('a'), ('a')")
            with pytest.raises(psycopg.errors.UniqueViolation):  # leaves an invalid index
                conn.execute(f"CREATE UNIQUE INDEX CONCURRENTLY ix_{table} ON {table} (email)")
    revisions = [project.Revision("r001", sql=["ALTER TABLE leads ADD COLUMN source text"])]
    project.create(tmp_path, revisions)
    result = status(tmp_path, {"DATABASE_URL": db_url}, "--json")
    report = json.loads(result.stdout)
    assert report["revisions"]["invalid_indexes"] == [{"index": "ix_leads", "table": "leads"}]
    text = status(tmp_path, {"DATABASE_URL": db_url}).stdout
    assert re.search(r"^  invalid index +ix_leads on leads \(a failed concurrent build", text, re.M)
    assert "ix_other" not in text  # a table the deploy does not touch
