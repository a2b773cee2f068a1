"""The three-service start-up of docker-compose.yml, as local processes, without Docker.

Starts a throwaway PostgreSQL (or a fresh database on --database-url's server), then runs each
app service of docker-compose.yml through entrypoint.sh with that service's environment and
command, all at once, their output interleaved and prefixed like `docker compose up`. Each exit
is reported as it happens and the other services keep running, as with `docker compose up`;
Ctrl-C stops everything and removes what the demo created.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class Interrupts:
    """Ctrl-C and SIGTERM as requests to stop: counted, never raised as KeyboardInterrupt."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.count = 0

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        self.count += 1
        self.stop.set()


# Installed before anything else is loaded, so a Ctrl-C at any moment (importing, initdb, the
# server's start) asks the demo to stop and clean up instead of raising wherever it lands.
INTERRUPTS = Interrupts()
signal.signal(signal.SIGINT, INTERRUPTS)
signal.signal(signal.SIGTERM, INTERRUPTS)

import argparse  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import ExitStack, contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit  # noqa: E402

import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.pgcluster import Cluster, free_port  # noqa: E402

if TYPE_CHECKING:
    from psycopg.pq.abc import PGconn

APP_DIR = ROOT / "examples" / "prosaas-app"  # the image's WORKDIR /app
URL_VARIABLES = ("DATABASE_URL", "MIGRATION_DATABASE_URL")
# Their _FILE twins name a file holding the URL: compose mounts a secret there (/run/secrets/...);
# the demo writes its own URL into a file of its own and points them at that.
URL_FILE_VARIABLES = tuple(f"{name}_FILE" for name in URL_VARIABLES)
STOP_TIMEOUT = 10.0  # like `docker compose stop`: SIGTERM, then SIGKILL after this
INTERRUPTED = 130


class SetupFailed(Exception):
    """The database could not be prepared; the message says why."""


class BadInput(Exception):
    """An argument or the compose file cannot be used; the message says why, in one line."""


@dataclass
class Service:
    name: str
    command: list[str]
    environment: dict[str, str]


def emit(line: str) -> None:
    """Print a line; a closed stdout (`./scripts/demo | head`) must not stop the clean-up."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def say(message: str) -> None:
    emit(f"demo | {message}")


def read_compose(compose_file: Path) -> list[Service]:
    """The app services of a compose file (every service but a postgres image), checked before
    anything starts: a file that cannot be read or used is BadInput, never a traceback."""
    where = f"--compose-file {compose_file}"
    try:
        spec = yaml.safe_load(compose_file.read_text())
    except OSError as exc:
        raise BadInput(f"{where}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"{where}: not YAML ({problem})") from None
    services = spec.get("services") if isinstance(spec, dict) else None
    if not isinstance(services, dict):
        raise BadInput(f"{where}: no `services` mapping")
    found = []
    for name, body in services.items():
        if not isinstance(body, dict):
            raise BadInput(f"{where}: service {name} is not a mapping")
        if str(body.get("image", "")).startswith("postgres"):
            continue
        found.append(
            Service(str(name), _command(where, name, body), _environment(where, name, body))
        )
    if not found:
        raise BadInput(f"{where}: no service to start besides the database")
    return found


def _command(where: str, name: str, body: dict[str, Any]) -> list[str]:
    """The service's `command`, in either of compose's forms (a list, or a string it splits)."""
    command = body.get("command")
    if isinstance(command, str):
        command = shlex.split(command)
    if not isinstance(command, list) or not command:
        raise BadInput(f"{where}: service {name} has no `command` (the demo runs no image CMD)")
    return [str(word) for word in command]


def _environment(where: str, name: str, body: dict[str, Any]) -> dict[str, str]:
    """The service's `environment`, in either of compose's forms; a variable without a value
    takes this shell's, as compose does."""
    environment = body.get("environment") or {}
    if isinstance(environment, list):
        pairs = [str(item).partition("=") for item in environment]
        environment = {key: value if sep else None for key, sep, value in pairs}
    if not isinstance(environment, dict):
        raise BadInput(f"{where}: service {name} has an `environment` that is no mapping or list")
    return {
        str(key): str(value) if value is not None else os.environ[str(key)]
        for key, value in environment.items()
        if value is not None or str(key) in os.environ
    }


def app_services(
    services: list[Service], replicas: int, database_url: str, url_file: Path
) -> list[Service]:
    """Each service pointed at our PostgreSQL, the one that migrates in `replicas` copies: a URL
    variable gets our URL, a _FILE variable the path of `url_file`, which holds it."""
    started = []
    for service in services:
        environment = dict(service.environment)
        for variable in URL_VARIABLES:
            if variable in environment:
                environment[variable] = database_url
        for variable in URL_FILE_VARIABLES:
            if variable in environment:
                environment[variable] = str(url_file)
        count = replicas if environment.get("RUN_MIGRATIONS") == "1" else 1
        for index in range(1, count + 1):
            env = dict(environment)
            if "PORT" in env:
                env["PORT"] = str(free_port())  # replicas share this host's ports
            started.append(Service(f"{service.name}-{index}", service.command, env))
    return started


def exit_status(returncode: int) -> int:
    """The exit code as compose and a shell report it: 128+N for a process killed by signal N
    (Popen says -N)."""
    return 128 - returncode if returncode < 0 else returncode


@contextmanager
def secret_file(text: str) -> Iterator[Path]:
    """`text` in a file only we may read, as a mounted secret would hold it; removed at the end."""
    folder = Path(tempfile.mkdtemp(prefix="prosaas-demo-secrets-"))  # 0700
    path = folder / "database_url"
    try:
        path.write_text(text + "\n")  # secrets files end with a newline; it is dropped
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- the database -----------------------------------------------------------------------------


@contextmanager
def throwaway_cluster() -> Iterator[str | None]:
    """A PostgreSQL server in a folder of our own, removed at the end whatever happened.

    Cluster() makes its folder before initdb runs; when Ctrl-C kills initdb, the constructor
    raises and there is no object left to destroy. Making that folder inside one of ours
    (tempfile.tempdir) means removing ours always takes it. Yields the URL, or None when
    interrupted first.
    """
    own = Path(tempfile.mkdtemp(prefix="prosaas-demo-"))
    cluster: Cluster | None = None
    try:
        own.chmod(0o755)  # the postgres user (when we are root) must reach the cluster's folder
        say("starting a throwaway PostgreSQL (initdb, then the server: a few seconds)")
        try:
            saved, tempfile.tempdir = tempfile.tempdir, str(own)
            try:
                cluster = Cluster()
            finally:
                tempfile.tempdir = saved
            if not INTERRUPTS.stop.is_set():
                cluster.start()
        except RuntimeError as exc:  # initdb or pg_ctl failed: killed by Ctrl-C, or broken
            if not INTERRUPTS.stop.is_set():
                raise SetupFailed(str(exc)) from None
        if cluster is None or INTERRUPTS.stop.is_set():
            yield None
        else:
            say(f"throwaway PostgreSQL on 127.0.0.1:{cluster.port}")
            yield cluster.url()
    finally:
        remove_cluster(cluster, own)


def remove_cluster(cluster: Cluster | None, own: Path) -> None:
    """Stop the server (a pg_ctl start cut short may still be bringing it up), then delete."""
    deadline = time.monotonic() + 10
    while True:
        if cluster is not None:
            cluster.stop("immediate")
        shutil.rmtree(own, ignore_errors=True)
        if not own.exists() or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # a starting server was still writing into the folder
    if own.exists():
        say(f"could not remove {own}: delete it by hand")


def with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` instead (a `dbname=` parameter would override it)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "dbname"]
    return urlunsplit(parts._replace(path=f"/{name}", query=urlencode(query)))


def describe_server(pgconn: PGconn) -> str:
    """Where a connection went: `127.0.0.1:5432`, or the Unix socket's path."""
    host = pgconn.host.decode(errors="replace")
    port = pgconn.port.decode(errors="replace")
    if host.startswith(("/", "@")):  # a socket folder, or Linux's abstract namespace
        return f"the Unix socket {host.rstrip('/')}/.s.PGSQL.{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe_url(url: str) -> str:
    """Where a URL points, before connecting: its host and port, or its socket folder."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:  # a URL libpq cannot parse: connecting says why
        return "the server in --database-url"
    host = str(params.get("host") or os.environ.get("PGHOST") or "")
    port = str(params.get("port") or os.environ.get("PGPORT") or "5432")
    if not host:
        return f"the default Unix socket (port {port})"
    if host.startswith(("/", "@")):
        return f"the Unix socket {host.rstrip('/')}/.s.PGSQL.{port}"
    return f"{host} (port {port})"


@contextmanager
def fresh_database(url: str) -> Iterator[str | None]:
    """A new database on the server of `url`, dropped at the end; the one in `url` is untouched."""
    import psycopg
    from psycopg import sql

    admin = url.replace("postgresql+psycopg://", "postgresql://", 1)  # libpq's own schemes
    name = f"prosaas_demo_{secrets.token_hex(4)}"
    server = describe_url(admin)
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            server = describe_server(conn.pgconn)  # the host libpq chose, socket or not
            say(f"creating database {name} on {server} for the demo; it is dropped at the end")
            say("(the database named in --database-url is not changed)")
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if exc.sqlstate == "42501":  # insufficient_privilege
            reason += " (the demo needs a role that may create databases)"
        raise SetupFailed(f"cannot create database {name} on {server}: {reason}") from None
    try:
        yield None if INTERRUPTS.stop.is_set() else with_database(url, name)
    finally:
        try:
            with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
                drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                conn.execute(drop.format(sql.Identifier(name)))
            say(f"dropped database {name}")
        except psycopg.Error as exc:
            say(f"could not drop database {name} on {server}: {exc}; drop it by hand")


# --- the services ----------------------------------------------------------------------------


class Demo:
    def __init__(self, services: list[Service]) -> None:
        self.services = services
        self.processes: list[tuple[Service, subprocess.Popen[str]]] = []
        self.relays: dict[str, threading.Thread] = {}
        self.codes: dict[str, int] = {}  # exits already reported
        self.width = max(len(s.name) for s in services)
        self.lock = threading.Lock()

    def say(self, name: str, line: str) -> None:
        with self.lock:
            emit(f"{name:<{self.width}} | {line}")

    def start(self) -> None:
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        # A URL in this shell must not stand in for, or clash with, the service's own.
        shell = {
            k: v for k, v in os.environ.items() if k not in (*URL_VARIABLES, *URL_FILE_VARIABLES)
        }
        for service in self.services:
            env = {**shell, **service.environment, "PATH": path, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(
                [str(ROOT / "entrypoint.sh"), *service.command],
                cwd=APP_DIR,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,  # Ctrl-C reaches us; we stop them in order
            )
            self.processes.append((service, proc))
            relay = threading.Thread(target=self._relay, args=(service, proc), daemon=True)
            self.relays[service.name] = relay
            relay.start()

    def _relay(self, service: Service, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.say(service.name, line.rstrip("\n"))

    def report_exits(self) -> list[str]:
        """Print each exit once, as it happens, after the service's last lines."""
        exited = []
        for service, proc in self.processes:
            returncode = proc.poll()
            if returncode is not None and service.name not in self.codes:
                code = exit_status(returncode)
                self.relays[service.name].join(timeout=2)
                self.say(service.name, f"exited with code {code}")
                self.codes[service.name] = code
                exited.append(service.name)
        return exited

    def supervise(self, *, abort_on_exit: bool, exit_after: float | None) -> None:
        """Return on Ctrl-C, when every service has exited, or (abort_on_exit) on any exit."""
        deadline = None if exit_after is None else time.monotonic() + exit_after
        while True:
            exited = self.report_exits()
            if len(self.codes) == len(self.processes):
                say("every service has exited")
                return
            if exited and abort_on_exit:
                say(f"{exited[0]} exited: stopping the others (--abort-on-container-exit)")
                return
            if INTERRUPTS.stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                return
            INTERRUPTS.stop.wait(0.1)

    def stop(self) -> None:
        """SIGTERM every running service, as `docker compose stop` does; SIGKILL stragglers."""
        running = [proc for _, proc in self.processes if proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        if running:
            say("stopping all services (Ctrl-C again to kill them)")
        seen = INTERRUPTS.count
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(proc.poll() is None for proc in running):
            if INTERRUPTS.count > seen or time.monotonic() > deadline:
                for proc in running:
                    if proc.poll() is None:
                        proc.kill()
            self.report_exits()
            time.sleep(0.05)
        self.report_exits()

    def exit_code(self) -> int:
        """0 when every service exited with 0 (or stopped cleanly), else 1."""
        return 0 if all(code == 0 for code in self.codes.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=1, help="api replicas racing to migrate")
    parser.add_argument(
        "--database-url",
        help="create a fresh database on this PostgreSQL server (dropped at the end) instead of "
        "starting a throwaway server; the database in the URL is not changed",
    )
    parser.add_argument(
        "--abort-on-container-exit",
        action="store_true",
        help="stop every service as soon as one exits, as `docker compose up` does with it",
    )
    parser.add_argument(
        "--exit-after", type=float, metavar="SECONDS", help="stop by itself (for tests)"
    )
    parser.add_argument("--compose-file", type=Path, default=ROOT / "docker-compose.yml")
    args = parser.parse_args()
    try:  # every input is checked before anything starts
        if args.replicas < 1:
            raise BadInput("--replicas must be 1 or more")
        if args.database_url is not None and not args.database_url.startswith(
            ("postgres://", "postgresql://", "postgresql+psycopg://")
        ):
            raise BadInput("--database-url must be a postgresql:// URL")
        services = read_compose(args.compose_file)
    except BadInput as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")

    with ExitStack() as cleanup:
        try:
            if args.database_url is None:
                url = cleanup.enter_context(throwaway_cluster())
            else:
                url = cleanup.enter_context(fresh_database(args.database_url))
        except SetupFailed as exc:
            say(str(exc))
            return 1
        if url is None or INTERRUPTS.stop.is_set():
            say("interrupted before the services started")
            return INTERRUPTED
        url_file = cleanup.enter_context(secret_file(url))
        demo = Demo(app_services(services, args.replicas, url, url_file))
        cleanup.callback(demo.stop)  # also when something below fails
        demo.start()
        demo.supervise(abort_on_exit=args.abort_on_container_exit, exit_after=args.exit_after)
        demo.stop()
        return demo.exit_code()
    raise AssertionError("unreachable")  # ExitStack does not swallow the return


if __name__ == "__main__":
    sys.exit(main())
