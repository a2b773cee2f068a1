"""docker-compose.yml, the Dockerfile and the local demo that plays the compose file."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import compose
import pytest

from prosaas_migrate.worker_trace import Trace, problems_found
from tests import project
from tests.conftest import Server, clean_env, query, skip_outside_ci, version

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = Path(compose.__file__).parent / "docker-compose"  # the static binary, not the wrapper
APP_SERVICES = ("prosaas-api", "worker", "prosaas-calls")
DEMO = ROOT / "scripts" / "demo.py"


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The compose file as Compose itself resolves it (anchors, merges, defaults)."""
    result = subprocess.run(
        [str(COMPOSE), "--ansi", "never", "-f", str(ROOT / "docker-compose.yml"), "config",
         "--format", "json"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def test_only_the_api_migrates(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert set(services) == {"db", *APP_SERVICES}
    assert services["prosaas-api"]["environment"]["RUN_MIGRATIONS"] == "1"
    assert services["worker"]["environment"]["RUN_MIGRATIONS"] == "0"
    assert services["prosaas-calls"]["environment"]["RUN_MIGRATIONS"] == "0"


def test_one_image_and_the_database_healthy_first(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert len({services[name]["image"] for name in APP_SERVICES}) == 1
    assert "healthcheck" in services["db"]
    for name in APP_SERVICES:
        assert services[name]["depends_on"]["db"]["condition"] == "service_healthy"
        assert services[name]["init"] is True


def test_passwords_are_secret_files_never_inline(resolved: dict[str, Any]) -> None:
    """Compose mounts each secret at /run/secrets/<name>; the *_FILE variables point there."""
    services, secrets = resolved["services"], resolved["secrets"]
    assert {name: Path(spec["file"]).relative_to(ROOT) for name, spec in secrets.items()} == {
        "postgres_password": Path("secrets/postgres_password"),
        "database_url": Path("secrets/database_url"),
    }
    wanted = {"db": ("POSTGRES_PASSWORD_FILE", "postgres_password")}
    wanted |= {name: ("DATABASE_URL_FILE", "database_url") for name in APP_SERVICES}
    for name, (variable, secret) in wanted.items():
        environment = services[name]["environment"]
        assert [m["target"] for m in services[name]["secrets"]] == [f"/run/secrets/{secret}"]
        assert environment[variable] == f"/run/secrets/{secret}"
        # Nothing that holds a password itself: no URL, no POSTGRES_PASSWORD.
        assert not {"DATABASE_URL", "MIGRATION_DATABASE_URL", "POSTGRES_PASSWORD"} & set(
            environment
        ), name
    assert "prosaas:prosaas@" not in (ROOT / "docker-compose.yml").read_text()
    # The files themselves stay out of git and of the image.
    ignored = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "-q", "secrets/database_url"], check=False
    )
    assert ignored.returncode == 0


def test_restart_policies_and_start_periods(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    # A broken revision fails every time: the api gives up after a few tries, Exited (1).
    assert services["prosaas-api"]["restart"] == "on-failure:5"
    for name in ("db", "worker", "prosaas-calls"):
        assert services[name]["restart"] == "unless-stopped", name
    # Probes failing while the database initialises, or the api migrates, do not count.
    assert services["db"]["healthcheck"]["start_period"] == "30s"
    assert services["prosaas-api"]["healthcheck"]["start_period"] == "5m0s"
    lock_wait = int(services["prosaas-api"]["environment"]["MIGRATION_LOCK_WAIT_SECONDS"])
    assert 2 * lock_wait < 300  # the wait for the lock, then the migration itself


def test_the_secrets_script_makes_both_files_once(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "secrets"
    folder = tmp_path / "secrets"
    first = subprocess.run([str(script), str(folder)], capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    password = (folder / "postgres_password").read_text()
    url = (folder / "database_url").read_text()
    assert password.endswith("\n") and len(password.strip()) >= 32
    assert url == f"postgresql://prosaas:{password.strip()}@db:5432/prosaas\n"
    # The containers (uid 10001, postgres 999) read the bind-mounted files; the host's other
    # users cannot enter the folder.
    assert folder.stat().st_mode & 0o777 == 0o700
    for name in ("postgres_password", "database_url"):
        assert (folder / name).stat().st_mode & 0o777 == 0o644
    again = subprocess.run([str(script), str(folder)], capture_output=True, text=True, check=False)
    assert again.returncode == 0 and "kept as they are" in again.stderr
    assert (folder / "postgres_password").read_text() == password  # never overwritten
    (folder / "database_url").unlink()
    half = subprocess.run([str(script), str(folder)], capture_output=True, text=True, check=False)
    assert half.returncode == 1 and "only one of" in half.stderr


def test_dockerfile_runs_the_entrypoint_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.12-slim$", dockerfile, re.MULTILINE)
    assert dockerfile.count("FROM ${BASE_IMAGE}") == 2  # build stage, slim runtime
    assert 'ENTRYPOINT ["/entrypoint.sh"]' in dockerfile
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")


def test_hadolint_is_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@contextmanager
def demo(*args: str, **popen: Any) -> Iterator[subprocess.Popen[str]]:
    """The demo as a process; stopped (Ctrl-C, then SIGKILL) if a test leaves it running."""
    options: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT} | popen
    proc = subprocess.Popen(
        [sys.executable, str(DEMO), *args], env=options.pop("env", clean_env()), text=True,
        **options,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def test_demo_plays_the_compose_file_with_racing_api_replicas(server: Server, db_url: str) -> None:
    lines: list[str] = []
    started = Counter[str]()
    with demo("--replicas", "3", "--database-url", db_url) as proc:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while sum(started.values()) < 5 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            match = re.match(r"(\S+)-\d+ +\| \[\S+\] (listening on|started)", line)
            if match:
                started[match.group(1)] += 1
        assert started == {"prosaas-api": 3, "worker": 1, "prosaas-calls": 1}, "\n".join(lines)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = proc.communicate(timeout=30)
    lines += rest.splitlines()
    output = "\n".join(lines)
    assert proc.returncode == 0, output

    # A fresh database on that server, said before it is created and dropped at the end; the
    # database named in the URL is left as it was.
    created = re.search(r"^demo \| creating database (prosaas_demo_[0-9a-f]{8}) on ", output, re.M)
    assert created, output
    assert f"demo | dropped database {created.group(1)}" in output
    assert version(db_url) == []
    assert not query(server.admin_url, "SELECT 1 FROM pg_database WHERE datname = %s",
                     [created.group(1)])  # fmt: skip
    assert "Migrations complete: 3 revision(s) applied, now at 0003" in output
    for revision in ("0001", "0002", "0003"):
        assert output.count(f"Applying revision {revision}") == 1, output
    api = [line for line in lines if line.startswith("prosaas-api-")]
    assert sum("✅ Acquired migration lock" in line for line in api) >= 1
    assert sum("✅ Released migration lock" in line for line in api) >= 1
    for name in ("worker-1", "prosaas-calls-1"):
        own = [line for line in lines if line.startswith(f"{name} ")]
        assert any("🚫 MIGRATIONS_DISABLED" in line for line in own), output
        assert not any("migration lock" in line for line in own)
    assert output.count("exited with code 0") == 5
    assert output.count("stopped cleanly") == 5
    # The example worker logs real worker events; as prefixed by the demo they trace clean.
    trace = Trace().read(line for line in lines if line.startswith("worker-1 "))
    assert trace.report()["jobs_completed"] >= 1
    assert not problems_found(trace.report())


def test_demo_refuses_to_touch_a_server_where_it_cannot_create_a_database(
    server: Server, db_url: str
) -> None:
    role = f"no_createdb_{os.getpid()}"
    query(server.admin_url, f'DROP ROLE IF EXISTS "{role}"')
    query(server.admin_url, f'CREATE ROLE "{role}" LOGIN NOCREATEDB')
    try:
        url = db_url.replace("postgres@", f"{role}@", 1)
        result = subprocess.run(
            [sys.executable, str(DEMO), "--database-url", url, "--exit-after", "5"],
            env=clean_env(), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        query(server.admin_url, f'DROP ROLE IF EXISTS "{role}"')
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot create database prosaas_demo_" in result.stdout
    assert "the demo needs a role that may create databases" in result.stdout
    assert "Traceback" not in result.stderr
    assert version(db_url) == []  # nothing ran against the database in the URL


def failing_compose_file(tmp_path: Path) -> Path:
    """The api migrates a project whose revision fails; the worker is the example's."""
    ini = project.create(tmp_path / "broken", [project.Revision("r001", sql=["SELECT 1/0"])])
    spec = {
        "services": {
            "prosaas-api": {
                "environment": {"DATABASE_URL": "x", "RUN_MIGRATIONS": "1",
                                "ALEMBIC_CONFIG": str(ini)},
                "command": ["python", "-m", "example_services", "api"],
            },
            "worker": {
                "environment": {"DATABASE_URL": "x", "RUN_MIGRATIONS": "0"},
                "command": ["python", "-m", "example_services", "worker"],
            },
        }
    }  # fmt: skip
    path = tmp_path / "compose.yml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def test_demo_reports_an_exit_as_it_happens_and_keeps_the_others(
    server: Server, tmp_path: Path
) -> None:
    compose_file = str(failing_compose_file(tmp_path))
    lines: list[str] = []
    worker_started = api_exited = False
    with demo("--compose-file", compose_file, "--database-url", server.admin_url) as proc:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while not (worker_started and api_exited) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            worker_started = worker_started or "[worker] started" in line
            exit_line = re.match(r"prosaas-api-1 +\| exited with code 1$", line)
            api_exited = api_exited or exit_line is not None
        output = "\n".join(lines)
        # Reported while the demo still runs, before any Ctrl-C; the worker keeps running.
        assert api_exited and worker_started, output
        assert "MIGRATION FAILED" in output
        assert proc.poll() is None, output  # the demo runs on
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, output + rest  # a service failed
    assert "[worker] stopped cleanly" in rest  # still running until the Ctrl-C
    assert re.search(r"^worker-1 +\| exited with code 0$", rest, re.M), rest
    assert rest.count("exited with code") == 1  # the api's exit is not reported twice


def test_demo_abort_on_container_exit_stops_the_others(server: Server, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(DEMO), "--compose-file", str(failing_compose_file(tmp_path)),
         "--database-url", server.admin_url, "--abort-on-container-exit"],
        env=clean_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    output = result.stdout
    assert result.returncode == 1, output + result.stderr
    assert "prosaas-api-1 | exited with code 1" in output
    assert "stopping the others (--abort-on-container-exit)" in output
    assert "[worker] stopped cleanly" in output
    assert re.search(r"^worker-1 +\| exited with code 0$", output, re.M), output


def one_service_each(tmp_path: Path, commands: dict[str, list[str]]) -> Path:
    """A compose file whose services run `commands` without migrating."""
    services = {
        name: {"environment": {"DATABASE_URL": "x", "RUN_MIGRATIONS": "0"}, "command": command}
        for name, command in commands.items()
    }
    path = tmp_path / "compose.yml"
    path.write_text(json.dumps({"services": services}))
    return path


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (None, ["--compose-file", "/nonexistent/compose.yml"],
         "--compose-file /nonexistent/compose.yml: No such file or directory"),
        ("services: [", [], "compose.yml: not YAML (while parsing a flow node)"),
        ("- a list", [], "compose.yml: no `services` mapping"),
        ("services:\n  db:\n    image: postgres:15\n", [],
         "compose.yml: no service to start besides the database"),
        ("services:\n  worker:\n    environment: [RUN_MIGRATIONS=0]\n", [],
         "compose.yml: service worker has no `command`"),
        ("services:\n  worker:\n    command: [\"true\"]\n    environment: 7\n", [],
         "compose.yml: service worker has an `environment` that is no mapping or list"),
        (None, ["--replicas", "0"], "--replicas must be 1 or more"),
        (None, ["--database-url", "mysql://x/y"], "--database-url must be a postgresql:// URL"),
    ],
    ids=["missing", "not yaml", "not a mapping", "only a database", "no command",
         "odd environment", "replicas", "url"],
)  # fmt: skip
def test_demo_checks_its_inputs_before_starting_anything(
    tmp_path: Path, content: str | None, args: list[str], message: str
) -> None:
    if content is not None:
        (tmp_path / "compose.yml").write_text(content)
        args = ["--compose-file", str(tmp_path / "compose.yml"), *args]
    result = subprocess.run(
        [sys.executable, str(DEMO), *args, "--exit-after", "0"],
        env=clean_env(), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""  # no cluster, no database, no service: nothing was started
    (line,) = result.stderr.splitlines()  # one line, no traceback
    assert line.startswith("demo.py: error: ") and message in line, line


def test_demo_reports_a_service_killed_by_a_signal_as_compose_does(
    server: Server, tmp_path: Path
) -> None:
    compose_file = one_service_each(tmp_path, {
        "terminated": ["sh", "-c", "kill -TERM $$"],
        "killed": ["sh", "-c", "kill -KILL $$"],
        "failed": ["sh", "-c", "exit 3"],
    })  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(DEMO), "--compose-file", str(compose_file),
         "--database-url", server.admin_url],
        env=clean_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    output = result.stdout
    assert result.returncode == 1, output + result.stderr
    assert re.search(r"^terminated-1 +\| exited with code 143$", output, re.M), output
    assert re.search(r"^killed-1 +\| exited with code 137$", output, re.M), output
    assert re.search(r"^failed-1 +\| exited with code 3$", output, re.M), output
    assert "code -" not in output


def test_demo_names_the_unix_socket_of_a_socket_url(server: Server) -> None:
    if server.cluster is None:
        skip_outside_ci("needs the suite's own cluster, whose socket folder is known")
    cluster = server.cluster
    url = f"postgresql://postgres@/postgres?host={cluster.base}&port={cluster.port}"
    result = subprocess.run(
        [sys.executable, str(DEMO), "--database-url", url, "--exit-after", "20"],
        env=clean_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    socket = f"{cluster.base}/.s.PGSQL.{cluster.port}"
    created = re.search(
        rf"^demo \| creating database (prosaas_demo_\w+) on the Unix socket {socket} for the demo",
        output, re.M,
    )  # fmt: skip
    assert created, output
    assert "Migrations complete: 3 revision(s) applied, now at 0003" in output  # over the socket
    assert f"demo | dropped database {created.group(1)}" in output


@pytest.fixture
def private_tmpdir() -> Iterator[Path]:
    """A short TMPDIR of our own (a socket path must stay under 108 bytes) the postgres user
    can enter, so anything the demo leaves in it is the demo's."""
    path = Path(tempfile.mkdtemp(prefix="pd-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.name.isdigit() and text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.mark.parametrize(
    ("delay", "target"),
    [(0.1, "group"), (0.5, "group"), (1.0, "group"), (1.5, "group"), (0.5, "demo"), (1.0, "demo")],
)
def test_demo_ctrl_c_at_any_moment_cleans_up(
    private_tmpdir: Path, delay: float, target: str
) -> None:
    """Ctrl-C (SIGINT to the terminal's process group, initdb and pg_ctl included) or a lone
    SIGINT to the demo, at moments that fall in initdb, the server's start or the services'."""
    env = clean_env({"TMPDIR": str(private_tmpdir)})
    with demo(env=env, stderr=subprocess.PIPE, start_new_session=True) as proc:
        time.sleep(delay)
        if target == "group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert proc.returncode in (0, 1, 130), stdout + stderr  # 1: the api was cut short (143)
    assert list(private_tmpdir.iterdir()) == [], stdout
    assert processes_mentioning(str(private_tmpdir)) == []


def test_demo_starts_its_own_database_and_stops_by_itself() -> None:
    result = subprocess.run(
        [sys.executable, str(DEMO), "--exit-after", "10"],
        env=clean_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # initdb is said before it runs, so a first start does not look stuck
    assert result.stdout.startswith("demo | starting a throwaway PostgreSQL (initdb"), result.stdout
    assert "demo | throwaway PostgreSQL on 127.0.0.1:" in result.stdout
    assert "Migrations complete: 3 revision(s) applied, now at 0003" in result.stdout
