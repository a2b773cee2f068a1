"""URLs from files (DATABASE_URL_FILE, MIGRATION_DATABASE_URL_FILE) and libpq's PGPASSFILE, end to
end: the real command against the real server, and what it prints never holds the secret."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import psycopg
import pytest

from tests import project
from tests.conftest import BIN, Server, clean_env, cli, query, version
from tests.pgcluster import Cluster

PASSWORD = "Zq9 s3cr3t'\"@/?&=%ä"  # the suite's cluster trusts, so any password is let in
FRAGMENT = "s3cr3t"


@pytest.fixture
def app(tmp_path: Path) -> Path:
    project.create(tmp_path / "app", project.linear(2))
    return tmp_path / "app"


def with_password(db_url: str, password: str = PASSWORD) -> str:
    return db_url.replace("postgres@", f"postgres:{quote(password, safe='')}@", 1)


def write_secret(folder: Path, text: str | bytes, name: str = "database_url") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def outputs(*results: subprocess.CompletedProcess[str]) -> str:
    return "\n".join(part for result in results for part in (result.stdout, result.stderr))


@pytest.mark.parametrize("variable", ["DATABASE_URL_FILE", "MIGRATION_DATABASE_URL_FILE"])
def test_run_and_status_read_the_url_from_a_file_and_never_print_it(
    app: Path, tmp_path: Path, db_url: str, variable: str
) -> None:
    path = write_secret(tmp_path / "secrets", with_password(db_url) + "\n")
    env = {variable: path}
    if variable.startswith("MIGRATION_"):
        env["DATABASE_URL"] = "postgresql://app@127.0.0.1:1/nothing"  # loses: never dialled
    results = [
        cli(["run", "--", "true"], {**env, "RUN_MIGRATIONS": "1", "MIGRATION_LOG_FORMAT": fmt}, app)
        for fmt in ("text", "json")
    ]
    for result in results:
        assert result.returncode == 0, result.stderr
    assert "Migrations complete: 2 revision(s) applied" in results[0].stderr
    assert version(db_url) == ["r002"]
    text = cli(["status"], env, app)
    report = cli(["status", "--json", "--check"], env, app)
    assert report.returncode == 0, report.stdout + report.stderr
    document = json.loads(report.stdout)
    assert document["database"]["reachable"] is True
    assert document["database"]["url_source"] == f"{variable}={path}"
    assert document["database"]["url"].startswith("postgresql://postgres:***@127.0.0.1:")
    rows = {row["name"]: row for row in document["configuration"]["settings"]}
    assert (rows[variable]["value"], rows[variable]["source"]) == (path, "environment")
    assert f"({variable}={path})" in text.stdout
    everything = outputs(*results, text, report)
    assert FRAGMENT not in everything and "%27" not in everything


def cannot_be_read(folder: Path) -> str:
    path = write_secret(folder, f"postgresql://app:{FRAGMENT}@db/app\n")
    Path(path).chmod(0o000)
    return path


# Root reads any file: without these capabilities it is held to the file's mode like anyone.
AS_IF_NOT_ROOT = [
    "setpriv", "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
]  # fmt: skip


def a_directory(folder: Path) -> str:
    folder.mkdir(parents=True)
    return str(folder)


UNUSABLE: dict[str, tuple[Callable[[Path], str], str]] = {
    "missing": (lambda d: str(d / "missing"), "No such file or directory"),
    "directory": (a_directory, "a directory"),
    "empty": (lambda d: write_secret(d, "\n"), "empty"),
    "not a URL": (lambda d: write_secret(d, f"{FRAGMENT}-just-the-password\n"), "not shown"),
    "not UTF-8": (lambda d: write_secret(d, f"password={FRAGMENT}\xe9".encode("latin-1")), "UTF-8"),
    "too big": (lambda d: write_secret(d, f"password={FRAGMENT} " * 8000), "64 KiB"),
    "another scheme": (lambda d: write_secret(d, f"mysql://app:{FRAGMENT}@db/app\n"), "mysql://"),
    "unreadable": (cannot_be_read, "Permission denied"),
}


@pytest.mark.parametrize("case", UNUSABLE, ids=list(UNUSABLE))
def test_an_unusable_file_is_exit_2_naming_it_and_never_a_byte_of_it(
    app: Path, tmp_path: Path, case: str
) -> None:
    make, reason = UNUSABLE[case]
    path = make(tmp_path / "secrets")
    env = {"DATABASE_URL_FILE": path}

    def command(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        if case == "unreadable" and os.geteuid() == 0:
            return subprocess.run(
                [*AS_IF_NOT_ROOT, str(BIN), *args], env=clean_env({**env, **extra}), cwd=app,
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
        return cli(list(args), {**env, **extra}, app)

    service = ("run", "--", "sh", "-c", "echo the service started")
    # Every container reads its own file, a worker too: a secret that is not there says so.
    runs = [command(*service, RUN_MIGRATIONS=flag) for flag in ("1", "0")]
    if case in ("not a URL", "another scheme"):
        # The file is read, but what it holds is the app's business where nothing migrates.
        worker = runs.pop()
        assert worker.returncode == 0, worker.stderr
        assert "the service started" in worker.stdout
    for result in runs:
        assert result.returncode == 2, outputs(result)
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("❌")]
        assert line.startswith("❌ prosaas-migrate: DATABASE_URL_FILE"), result.stderr
        assert path in line and reason in line, line
        assert "the service started" not in result.stdout
        assert "Traceback" not in result.stderr
    status = command("status", "--json", "--check")
    assert status.returncode == 2, outputs(status)
    (error,) = json.loads(status.stdout)["configuration"]["errors"]
    assert error.startswith("DATABASE_URL_FILE") and path in error and reason in error
    text = command("status")
    assert f"✗ {error}" in text.stdout
    assert FRAGMENT not in outputs(*runs, status, text)


def test_a_worker_starts_with_a_url_file_whatever_its_driver(tmp_path: Path) -> None:
    path = write_secret(tmp_path, "postgresql+asyncpg://app:x@db/app\n")
    result = cli(
        ["run", "--", "sh", "-c", 'echo "started with $DATABASE_URL_FILE"'],
        {"RUN_MIGRATIONS": "0", "DATABASE_URL_FILE": path},
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert f"started with {path}" in result.stdout  # the service reads the file itself


@pytest.mark.parametrize("variable", ["DATABASE_URL", "MIGRATION_DATABASE_URL"])
def test_a_variable_and_its_file_both_set_is_exit_2_in_one_line(
    app: Path, tmp_path: Path, db_url: str, variable: str
) -> None:
    env = {variable: db_url, f"{variable}_FILE": write_secret(tmp_path, db_url)}
    for flag in ("1", "0"):
        result = cli(["run", "--", "true"], {**env, "RUN_MIGRATIONS": flag}, app)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"❌ prosaas-migrate: {variable} and {variable}_FILE are both set; set only one of "
            f"them ({variable}_FILE is the path of a file holding {variable}'s value)"
        ]
    assert version(db_url) == []
    status = cli(["status", "--json", "--check"], env, app)
    assert status.returncode == 2
    report = json.loads(status.stdout)
    assert report["database"]["error"].startswith(f"not checked: {variable} and {variable}_FILE")


# -- libpq's password file ---------------------------------------------------------------------


@pytest.fixture
def password_role(server: Server, own_cluster: Cluster, db_url: str) -> Iterator[str]:
    """A role that must give a password (scram-sha-256) over TCP, owning the test database; the
    rest of the suite's cluster keeps trusting everyone. Yields the role's URL, no password."""
    role = f"pgpass_{os.getpid()}"
    dbname = db_url.rsplit("/", 1)[1]
    query(server.admin_url, f'DROP ROLE IF EXISTS "{role}"')
    query(server.admin_url, f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{FRAGMENT}-pgpass'")
    query(server.admin_url, f'ALTER DATABASE "{dbname}" OWNER TO "{role}"')
    hba = own_cluster.data / "pg_hba.conf"
    trusting = hba.read_text()
    hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n{trusting}")
    url = f"postgresql://{role}@127.0.0.1:{own_cluster.port}/{dbname}"
    try:
        query(server.admin_url, "SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while True:  # the reload is asynchronous: wait until the server asks for a password
            try:
                psycopg.connect(url, passfile="/nonexistent", connect_timeout=5).close()
            except psycopg.OperationalError as exc:
                assert "password" in str(exc), exc
                break
            assert time.monotonic() < deadline, "pg_hba.conf was not reloaded"
            time.sleep(0.05)
        yield url
    finally:
        hba.write_text(trusting)
        query(server.admin_url, "SELECT pg_reload_conf()")
        # The role owns what the test migrated: the database goes with it.
        query(server.admin_url, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        query(server.admin_url, f'DROP ROLE IF EXISTS "{role}"')


@pytest.mark.parametrize("env_py", ["cookbook", "stock"])
def test_a_url_without_a_password_works_with_pgpassfile(
    password_role: str, tmp_path: Path, db_url: str, env_py: str
) -> None:
    app = tmp_path / "app"
    project.create(app, project.linear(2), env=env_py)
    where = urlsplit(password_role)
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(
        f"127.0.0.1:{where.port}:{where.path.lstrip('/')}:{where.username}:{FRAGMENT}-pgpass\n"
    )
    env = {
        "RUN_MIGRATIONS": "1",
        "DATABASE_URL_FILE": write_secret(tmp_path / "secrets", password_role + "\n"),
        "MIGRATION_LOCK_WAIT_SECONDS": "0",
        "HOME": str(tmp_path),  # no ~/.pgpass of this machine's to stand in
    }
    # Without it, or with one libpq must ignore (group-readable), the server says no.
    for passfile, mode in ((tmp_path / "nowhere", 0o600), (pgpass, 0o640)):
        pgpass.chmod(mode)
        refused = cli(["run", "--", "true"], {**env, "PGPASSFILE": str(passfile)}, app)
        # Permanent: exit 2 at once, naming the variable (no retry can supply a password).
        assert refused.returncode == 2, refused.stderr
        assert "DATABASE_URL_FILE=" in refused.stderr
        assert "the server asks for a password and none is given" in refused.stderr
        assert version(db_url) == []
    pgpass.chmod(0o600)
    result = cli(["run", "--", "true"], {**env, "PGPASSFILE": str(pgpass)}, app)
    assert result.returncode == 0, result.stderr
    assert version(db_url) == ["r002"]
    status = cli(["status", "--json", "--check"], {**env, "PGPASSFILE": str(pgpass)}, app)
    assert status.returncode == 0, status.stdout
    assert json.loads(status.stdout)["database"]["url"] == password_role  # nothing to mask
    assert FRAGMENT not in outputs(refused, result, status)


@pytest.mark.parametrize(
    "shape",
    [b"\xef\xbb\xbf%s\r\n", b"\xef\xbb\xbf  %s \n", b"%s\r\n\r\n"],
    ids=["BOM and CRLF (Notepad)", "BOM and blanks", "CRLF lines"],
)
def test_a_file_saved_by_a_windows_editor_is_read_as_its_url(
    app: Path, tmp_path: Path, db_url: str, shape: bytes
) -> None:
    path = write_secret(tmp_path / "secrets", shape % with_password(db_url).encode())
    result = cli(["run", "--", "true"], {"RUN_MIGRATIONS": "1", "DATABASE_URL_FILE": path}, app)
    assert result.returncode == 0, result.stderr
    assert version(db_url) == ["r002"]
    assert FRAGMENT not in result.stderr


def test_a_nul_byte_in_the_file_is_exit_2_not_a_url_cut_short(app: Path, tmp_path: Path) -> None:
    # libpq reads a C string: everything after the NUL would be dropped without a word.
    path = write_secret(
        tmp_path / "secrets", f"postgresql://app:{FRAGMENT}@127.0.0.1:1/app\0sslmode=require\n"
    )
    for flag in ("1", "0"):
        env = {"RUN_MIGRATIONS": flag, "DATABASE_URL_FILE": path}
        result = cli(["run", "--", "true"], env, app)
        assert result.returncode == 2, result.stderr
        assert "a NUL character in the file" in result.stderr and path in result.stderr
        assert FRAGMENT not in result.stderr and "\0" not in result.stderr


@pytest.mark.parametrize("variable", ["DATABASE_URL", "MIGRATION_DATABASE_URL"])
@pytest.mark.parametrize("real", ["variable", "file"])
def test_a_dotenv_twin_never_overrides_a_really_set_url(
    app: Path, tmp_path: Path, db_url: str, variable: str, real: str
) -> None:
    """A developer's .env (DATABASE_URL for a local server) in a container whose secret is really
    set: the .env's value is a fallback for what is unset, so the real one wins, as for any
    variable, instead of a 'both set' that the container's environment does not show."""
    path = write_secret(tmp_path / "secrets", db_url + "\n")
    stale = "postgresql://dev:devpass@127.0.0.1:1/dev"  # never dialled
    if real == "file":
        env, dotenv = {f"{variable}_FILE": path}, f"{variable}={stale}\n"
    else:
        env, dotenv = {variable: db_url}, f"{variable}_FILE={tmp_path / 'nowhere'}\n"
    if variable.startswith("MIGRATION_"):
        env["DATABASE_URL"] = "postgresql://app@127.0.0.1:1/nothing"  # loses: never dialled
    (app / ".env").write_text(dotenv)
    service = ["run", "--", "sh", "-c", 'echo "url=${DATABASE_URL-} file=${DATABASE_URL_FILE-}"']
    worker = cli(service, {**env, "RUN_MIGRATIONS": "0"}, app)
    assert worker.returncode == 0, worker.stderr
    result = cli(service, {**env, "RUN_MIGRATIONS": "1", "MIGRATION_LOCK_WAIT_SECONDS": "0"}, app)
    assert result.returncode == 0, result.stderr
    assert version(db_url) == ["r002"]
    # The service gets only what the container set: not the .env's twin beside it.
    assert "devpass" not in result.stdout and "nowhere" not in result.stdout
    report = cli(["status", "--json", "--check"], env, app)
    assert report.returncode == 0, report.stdout
    assert json.loads(report.stdout)["configuration"]["errors"] == []
