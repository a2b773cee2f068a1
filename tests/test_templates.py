"""Projects as Alembic itself writes them: `alembic init -t T` for every template the installed
Alembic ships, revisions made by `alembic revision`, custom version tables, pyproject settings.
Each is run end to end with nothing but DATABASE_URL, and `status` must agree with `run`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from prosaas_migrate import compat, config
from tests.conftest import Server, cli, query

ALEMBIC = Path(sys.executable).parent / "alembic"
SERVICE = ["sh", "-c", "echo service-started"]
# [tool.alembic] and its templates came with Alembic 1.16; the declared minimum is older.
PYPROJECT = ["pyproject", "pyproject_async"] if compat.reads_pyproject() else []
SINGLE_DB = ["generic", "async", *PYPROJECT]
needs_pyproject = pytest.mark.skipif(
    not compat.reads_pyproject(), reason="Alembic before 1.16 has no [tool.alembic]"
)


def installed_templates() -> list[str]:
    import alembic

    folder = Path(alembic.__file__).parent / "templates"
    return sorted(p.name for p in folder.iterdir() if (p / "env.py").is_file())


def alembic(root: Path, *args: str) -> None:
    result = subprocess.run(
        [str(ALEMBIC), *args], cwd=root, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def init(root: Path, template: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    alembic(root, "init", "-t", template, "migrations")
    return root


def revision(root: Path, rev_id: str, body: str, *, down: str | None = None, **opts: str) -> Path:
    """`alembic revision`, then its upgrade() filled with `body` (one statement a line)."""
    alembic(root, "revision", "-m", f"create {rev_id}", "--rev-id", rev_id, *_flags(opts))
    path = next((root / "migrations" / "versions").rglob(f"{rev_id}_*.py"))
    code = "\n".join(f"    op.execute({line!r})" for line in body.splitlines())
    source = path.read_text()
    source, filled = re.subn(  # the docstring came with Alembic 1.15
        r'(def upgrade\(\) -> None:\n(?:    """Upgrade schema."""\n)?)    pass\n',
        lambda m: m.group(1) + code + "\n",
        source,
        count=1,
    )
    assert filled == 1, source
    path.write_text(source)
    return path


def _flags(opts: dict[str, str]) -> list[str]:
    return [f"--{key.replace('_', '-')}={value}" for key, value in opts.items()]


def logged(rev_id: str) -> str:
    return (
        "CREATE TABLE IF NOT EXISTS revision_log (revision text)\n"
        f"INSERT INTO revision_log VALUES ('{rev_id}')"
    )


def run(root: Path, url: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return cli(["run", "--", *SERVICE], {"RUN_MIGRATIONS": "1", "DATABASE_URL": url, **extra}, root)


def status_json(root: Path, url: str) -> tuple[int, dict[str, Any]]:
    result = cli(["status", "--json", "--check"], {"DATABASE_URL": url}, root)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def ran(url: str) -> list[str]:
    if not query(url, "SELECT to_regclass('revision_log') IS NOT NULL")[0][0]:
        return []
    return [str(r[0]) for r in query(url, "SELECT revision FROM revision_log")]


def test_every_template_alembic_ships_is_covered() -> None:
    # A new template in a future Alembic must get a test here, not slip through.
    assert set(installed_templates()) == {*SINGLE_DB, "multidb"}


@pytest.mark.parametrize("template", SINGLE_DB)
def test_each_template_migrates_with_just_database_url(
    tmp_path: Path, db_url: str, template: str
) -> None:
    root = init(tmp_path, template)
    revision(root, "r001", logged("r001"))
    code, report = status_json(root, db_url)
    assert code == 1, report  # pending
    assert report["revisions"]["pending"] == [{"revision": "r001", "message": "create r001"}]

    first = run(root, db_url)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "service-started\n"
    assert ran(db_url) == ["r001"]
    assert "Migrations complete: 1 revision(s) applied, now at r001" in first.stderr

    second = run(root, db_url)
    assert second.returncode == 0, second.stderr
    assert "Schema is current at r001: nothing to migrate (lock not needed)" in second.stderr
    code, report = status_json(root, db_url)
    assert (code, report["revisions"]["at_head"]) == (0, True)

    revision(root, "r002", logged("r002"), head="r001")
    assert status_json(root, db_url)[0] == 1
    third = run(root, db_url)
    assert third.returncode == 0, third.stderr
    assert ran(db_url) == ["r001", "r002"]


@needs_pyproject
def test_a_recursive_version_location_in_pyproject_is_never_missed(
    tmp_path: Path, db_url: str
) -> None:
    # The fast path reads versions/ only; with recursive_version_locations it must defer to
    # Alembic, or a revision in versions/2025/ would be silently left pending.
    root = init(tmp_path, "pyproject")
    toml = root / "pyproject.toml"
    toml.write_text(toml.read_text().replace("[tool.alembic]\n", "[tool.alembic]\n"
                    "recursive_version_locations = true\n", 1))  # fmt: skip
    revision(root, "r001", logged("r001"))
    assert run(root, db_url).returncode == 0
    nested = root / "migrations" / "versions" / "2025"
    nested.mkdir()
    moved = revision(root, "r002", logged("r002"), head="r001")
    moved.rename(nested / moved.name)
    code, report = status_json(root, db_url)
    assert code == 1 and report["alembic"]["fast_path"] is False
    result = run(root, db_url)
    assert result.returncode == 0, result.stderr
    assert "Schema is current" not in result.stderr
    assert ran(db_url) == ["r001", "r002"]


@needs_pyproject
def test_a_project_with_only_pyproject_toml(tmp_path: Path, db_url: str) -> None:
    root = init(tmp_path, "pyproject")
    (root / "alembic.ini").unlink()  # [tool.alembic] alone is a whole configuration
    revision(root, "r001", logged("r001"))
    result = run(root, db_url)
    assert result.returncode == 0, result.stderr
    assert ran(db_url) == ["r001"]
    result = run(root, db_url, ALEMBIC_CONFIG="pyproject.toml")
    assert "Schema is current at r001" in result.stderr


@pytest.mark.skipif(compat.reads_pyproject(), reason="this Alembic reads [tool.alembic]")
def test_a_pyproject_only_project_on_an_older_alembic_is_one_config_line(
    tmp_path: Path, db_url: str
) -> None:
    # Alembic before 1.16 never reads [tool.alembic]: such a project is a configuration error
    # for every command (not a traceback that `status --check` would read as "pending").
    root = init(tmp_path, "generic")
    (root / "alembic.ini").unlink()
    (root / "pyproject.toml").write_text('[tool.alembic]\nscript_location = "migrations"\n')
    env = {"RUN_MIGRATIONS": "1", "DATABASE_URL": db_url, "ALEMBIC_CONFIG": "pyproject.toml"}
    for args in (["run", "--", *SERVICE], ["status", "--check"], ["lint"]):
        result = cli(args, env, root)
        assert result.returncode == 2, (args, result.stderr)
        said = result.stdout + result.stderr  # status reports on stdout
        assert "Traceback" not in said
        line = "[tool.alembic] in pyproject.toml needs Alembic 1.16 or newer; this environment"
        assert "ALEMBIC_CONFIG" in said and line in said, said
    assert "service-started" not in result.stdout


@pytest.mark.parametrize(
    ("options", "schema"),
    [
        ('version_table="app_version"', None),
        ('version_table="app_version", version_table_schema="audit"', "audit"),
    ],
)
def test_a_custom_version_table_is_the_one_run_and_status_read(
    tmp_path: Path, db_url: str, options: str, schema: str | None
) -> None:
    root = init(tmp_path, "generic")
    env_py = root / "migrations" / "env.py"
    env_py.write_text(
        env_py.read_text().replace(
            "connection=connection, target_metadata=target_metadata",
            f"connection=connection, target_metadata=target_metadata, {options}",
        )
    )
    if schema:
        query(db_url, f"CREATE SCHEMA {schema}")
    revision(root, "r001", logged("r001"))
    revision(root, "r002", logged("r002"), head="r001")
    for attempt in range(2):
        result = run(root, db_url)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "service-started\n"
        assert "MIGRATION FAILED" not in result.stderr
        if attempt:
            assert "Schema is current at r002: nothing to migrate (lock not needed)" in (
                result.stderr
            )
    table = f"{schema}.app_version" if schema else "app_version"
    assert query(db_url, f"SELECT version_num FROM {table}") == [("r002",)]
    assert query(db_url, "SELECT to_regclass('alembic_version')") == [(None,)]
    assert ran(db_url) == ["r001", "r002"]
    code, report = status_json(root, db_url)
    assert code == 0 and report["revisions"]["current"] == ["r002"]
    # The lock key follows the version table, so two histories in one database never block
    # each other; status names the same key run used.
    key = config.default_lock_key(f"{schema or 'public'}.app_version")
    assert report["lock"]["key"] == str(key)


def test_two_histories_in_one_database_do_not_block_each_other(tmp_path: Path, db_url: str) -> None:
    first = init(tmp_path / "first", "generic")
    revision(first, "a001", "CREATE TABLE a (id int)")
    second = init(tmp_path / "second", "generic")
    env_py = second / "migrations" / "env.py"
    env_py.write_text(
        env_py.read_text().replace(
            "connection=connection, target_metadata=target_metadata",
            'connection=connection, target_metadata=target_metadata, version_table="b_version"',
        )
    )
    revision(second, "b001", "CREATE TABLE b (id int)")
    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [config.DEFAULT_LOCK_KEY])  # first's key
        result = run(second, db_url, MIGRATION_LOCK_WAIT_SECONDS="0")
        assert result.returncode == 0, result.stderr
        assert "Migrations complete: 1 revision(s) applied, now at b001" in result.stderr
    assert run(first, db_url).returncode == 0
    assert query(db_url, "SELECT version_num FROM alembic_version") == [("a001",)]
    assert query(db_url, "SELECT version_num FROM b_version") == [("b001",)]


def test_multidb_with_the_placeholder_urls_is_refused_at_once(tmp_path: Path) -> None:
    root = init(tmp_path, "multidb")
    url = "postgresql://app:s3cr3t-pw@127.0.0.1:9/app"  # never dialled
    result = run(root, url, MIGRATION_LOCK_WAIT_SECONDS="30")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 3, result.stderr  # checkpoint (2 lines) + one error
    assert "sqlalchemy.url in [engine1] of alembic.ini" in result.stderr
    assert "driver://user:***@localhost/dbname" in result.stderr
    assert "s3cr3t-pw" not in result.stderr


def test_multidb_with_real_urls_migrates_every_database(tmp_path: Path, server: Server) -> None:
    lock_db, one, two = server.new_database(), server.new_database(), server.new_database()
    root = init(tmp_path, "multidb")
    ini = root / "alembic.ini"
    text = ini.read_text()
    text = text.replace("driver://user:pass@localhost/dbname2", two, 1)
    text = text.replace("driver://user:pass@localhost/dbname", one, 1)
    ini.write_text(text)
    alembic(root, "revision", "-m", "create things", "--rev-id", "r001")
    path = next((root / "migrations" / "versions").glob("r001_*.py"))
    source = path.read_text()
    for engine, table in (("engine1", "one_t"), ("engine2", "two_t")):
        source = source.replace(
            f'def upgrade_{engine}() -> None:\n    """Upgrade {engine} schema."""\n    pass\n',
            f'def upgrade_{engine}() -> None:\n    op.execute("CREATE TABLE {table} (id int)")\n',
        ).replace(  # before Alembic 1.15, without the docstring
            f"def upgrade_{engine}() -> None:\n    pass\n",
            f'def upgrade_{engine}() -> None:\n    op.execute("CREATE TABLE {table} (id int)")\n',
        )
    path.write_text(source)
    result = run(root, lock_db)
    assert result.returncode == 0, result.stderr
    assert query(one, "SELECT version_num FROM alembic_version") == [("r001",)]
    assert query(two, "SELECT version_num FROM alembic_version") == [("r001",)]
    assert query(one, "SELECT to_regclass('one_t') IS NOT NULL") == [(True,)]
    assert query(two, "SELECT to_regclass('two_t') IS NOT NULL") == [(True,)]
    again = run(root, lock_db)
    assert "Schema is current at r001" in again.stderr, again.stderr
    # Alembic itself agrees that every database is at head.
    alembic_cfg = Config(str(ini))  # before 1.16 the template's location is not %(here)s-based
    alembic_cfg.set_main_option("script_location", str(root / "migrations"))
    assert ScriptDirectory.from_config(alembic_cfg).get_heads() == ["r001"]
