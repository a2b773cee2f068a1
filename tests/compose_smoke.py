"""The compose smoke test on a real Docker engine, run by .ci/run (needs root).

    .venv/bin/python -m tests.compose_smoke

No registry is reachable here, so it builds everything locally: a Debian base image made with
debootstrap (its tarball cached in CACHE_DIR between runs), the project's wheels copied into the
build context, `docker build --network none`. It starts its own dockerd and a throwaway
PostgreSQL on the host, runs the three app services of docker-compose.yml with an override that
puts them on the host network, and checks: exactly one container migrated, the schema is at head,
worker and prosaas-calls never touched the lock, each service is the process tini started (the
entrypoint and prosaas-migrate exec'd into it), and nothing is left after `compose down`.
Where no engine can be started it says why and fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import compose
import psycopg

from tests.pgcluster import Cluster, free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_BINARY = Path(compose.__file__).parent / "docker-compose"
CACHE_DIR = Path(os.environ.get("PROSAAS_SMOKE_CACHE", "/var/cache/prosaas-migrate"))
BASE_TAR = CACHE_DIR / "debian-bookworm-python3.tar"
BASE_IMAGE = "local/debian-python:bookworm"
IMAGE = "prosaas-migrate-example:latest"  # as docker-compose.yml names it
PROJECT = "prosaas-smoke"
APP_SERVICES = ("prosaas-api", "worker", "prosaas-calls")
CONTEXT_FILES = (
    "Dockerfile", ".dockerignore", "entrypoint.sh", "pyproject.toml", "README.md",
    "prosaas_migrate", "examples",
)  # fmt: skip
STARTED = time.monotonic()


class SmokeFailure(Exception):
    pass


def say(message: str) -> None:
    print(f"[smoke {time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    result = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise SmokeFailure(
            f"{' '.join(argv[:4])} ... exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result.stdout


def ensure_packages() -> None:
    missing = [tool for tool in ("dockerd", "debootstrap") if not shutil.which(tool)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SmokeFailure(f"{', '.join(missing)} missing and not root to install docker.io")
    say(f"installing docker.io and debootstrap ({', '.join(missing)} missing)")
    run(["apt-get", "update", "-qq"])
    # --no-upgrade: without it apt also upgrades the machine's PostgreSQL packages.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "install", "-y", "-qq", "--no-upgrade", "docker.io", "debootstrap"], env=env)


class Engine:
    """A private dockerd: its own data, exec root and socket, no bridge, no iptables."""

    def __init__(self, work: Path) -> None:
        self.root = work / "docker"
        self.socket = self.root / "docker.sock"
        self.config = self.root / "config"
        self.log = self.root / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(self.config),
        }

    def start(self) -> None:
        (self.config / "cli-plugins").mkdir(parents=True)
        shutil.copy(COMPOSE_BINARY, self.config / "cli-plugins" / "docker-compose")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    "dockerd", "--data-root", str(self.root / "data"),
                    "--exec-root", str(self.root / "exec"), "-H", f"unix://{self.socket}",
                    "--pidfile", str(self.root / "docker.pid"), "--bridge=none",
                    "--iptables=false", "--ip6tables=false",
                ],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            probe = subprocess.run(
                ["docker", "info"], env=self.env, capture_output=True, check=False
            )
            if probe.returncode == 0:
                say("dockerd answers")
                return
            time.sleep(0.5)
        tail = self.log.read_text(errors="replace")[-3000:]
        raise SmokeFailure(f"no Docker engine could be started here; dockerd said:\n{tail}")

    def docker(self, *args: str, timeout: float = 600) -> str:
        return run(["docker", *args], env=self.env, timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # dockerd leaves its default network namespace mounted under the exec root.
        netns = self.root / "exec" / "netns" / "default"
        if netns.exists():
            subprocess.run(["umount", str(netns)], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def debian_mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        match = re.search(r"^URIs:\s*(\S+)", sources.read_text(), re.MULTILINE)
        if match:
            return match.group(1)
    return "http://deb.debian.org/debian"


def ensure_base_image(engine: Engine, work: Path) -> None:
    if not BASE_TAR.exists():
        rootfs = work / "rootfs"
        say(f"debootstrap bookworm from {debian_mirror()} (once; cached in {BASE_TAR})")
        run([
            "debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
            "bookworm", str(rootfs), debian_mirror(),
        ], timeout=900)  # fmt: skip
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = BASE_TAR.with_suffix(".partial")
        run(["tar", "-C", str(rootfs), "-cf", str(partial), "."])
        partial.rename(BASE_TAR)
        shutil.rmtree(rootfs, ignore_errors=True)
    say("docker import of the base image")
    engine.docker("import", str(BASE_TAR), BASE_IMAGE)


def build_image(engine: Engine, work: Path) -> None:
    context = work / "context"
    context.mkdir()
    for name in CONTEXT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, context / name)
    wheels = context / "wheels"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    say("collecting wheels for an offline build")
    run([*pip, "wheel", "-w", str(wheels), str(ROOT)])
    run([*pip, "download", "-d", str(wheels), "--only-binary", ":all:", "setuptools>=68", "wheel"])
    say("docker build --network none")
    engine.docker(
        "build", "--network", "none", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
        "--build-arg", "OFFLINE=1", "-t", IMAGE, str(context), timeout=900,
    )  # fmt: skip


def write_override(work: Path, database_url: str, api_port: int) -> Path:
    """Host networking (a bridge's private addresses are off limits here), our PostgreSQL."""
    override: dict[str, Any] = {"services": {}}
    for name in APP_SERVICES:
        service: dict[str, Any] = {
            "network_mode": "host",
            "environment": {"DATABASE_URL": database_url},
        }
        if name == "prosaas-api":
            service["environment"]["PORT"] = str(api_port)
            service["ports"] = "!reset"
        override["services"][name] = service
    # JSON is YAML; the !reset tag needs to stay a tag, so write that one line by hand.
    text = json.dumps(override, indent=2).replace('"!reset"', "!reset []")
    path = work / "compose.ci.yml"
    path.write_text(text)
    return path


class Compose:
    def __init__(self, engine: Engine, override: Path) -> None:
        self.base = [
            str(COMPOSE_BINARY), "--ansi", "never", "-p", PROJECT,
            "-f", str(ROOT / "docker-compose.yml"), "-f", str(override),
        ]  # fmt: skip
        self.env = engine.env

    def __call__(self, *args: str, timeout: float = 300) -> str:
        return run([*self.base, *args], env=self.env, timeout=timeout)

    def containers(self) -> list[dict[str, Any]]:
        out = self("ps", "-a", "--format", "json")
        text = out.strip()
        if not text:
            return []
        if text.startswith("["):
            rows: list[dict[str, Any]] = json.loads(text)
            return rows
        return [json.loads(line) for line in text.splitlines()]

    def logs(self, service: str) -> str:
        return self("logs", "--no-color", "--no-log-prefix", service)


def wait_until_up(compose_: Compose) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        rows = {row["Service"]: row for row in compose_.containers()}
        exited = [name for name, row in rows.items() if row["State"] == "exited"]
        if exited:
            logs = "\n".join(f"--- {n}\n{compose_.logs(n)}" for n in exited)
            raise SmokeFailure(f"containers exited early: {exited}\n{logs}")
        api_healthy = rows.get("prosaas-api", {}).get("Health") == "healthy"
        running = all(rows.get(n, {}).get("State") == "running" for n in APP_SERVICES)
        if api_healthy and running:
            return
        time.sleep(1)
    raise SmokeFailure(f"services not up in time: {compose_.containers()}")


def processes(engine: Engine, container: str) -> list[tuple[int, int, str]]:
    """(pid, ppid, cmdline) of every process in the container, read from /proc in it."""
    script = (
        "import json, os\n"
        "rows = []\n"
        "for p in sorted(int(d) for d in os.listdir('/proc') if d.isdigit()):\n"
        "    if p == os.getpid():\n"
        "        continue\n"
        "    try:\n"
        "        stat = open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()\n"
        "        cmd = open(f'/proc/{p}/cmdline').read().replace(chr(0), ' ').strip()\n"
        "    except OSError:\n"
        "        continue\n"
        "    rows.append((p, int(stat[1]), cmd))\n"
        "print(json.dumps(rows))\n"
    )
    out = engine.docker("exec", container, "python", "-c", script)
    return [(int(pid), int(ppid), str(cmd)) for pid, ppid, cmd in json.loads(out)]


def check(engine: Engine, compose_: Compose, database_url: str) -> None:
    logs = {name: compose_.logs(name) for name in APP_SERVICES}
    migrated = [n for n, text in logs.items() if "Migrations complete: 3 revision(s)" in text]
    if migrated != ["prosaas-api"]:
        raise SmokeFailure(f"expected only prosaas-api to migrate, got {migrated}:\n{logs}")
    for name in ("worker", "prosaas-calls"):
        if "MIGRATIONS_DISABLED" not in logs[name] or "migration lock" in logs[name]:
            raise SmokeFailure(f"{name} should start without the lock:\n{logs[name]}")
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    if row != ("0003",):
        raise SmokeFailure(f"schema not at head: {row}")
    say("one migrator, schema at head 0003, worker and calls never touched the lock")

    ids = {row["Service"]: row["ID"] for row in compose_.containers()}
    for name in APP_SERVICES:
        procs = processes(engine, ids[name])
        init = [p for p in procs if p[0] == 1]
        children = [p for p in procs if p[1] == 1]
        logged_pid = re.search(r"\(pid=(\d+)\)", logs[name])
        if not init or "docker-init" not in init[0][2]:
            raise SmokeFailure(f"{name}: PID 1 is not tini (docker-init): {procs}")
        if len(children) != 1 or "example_services" not in children[0][2]:
            raise SmokeFailure(f"{name}: tini's only child should be the service: {procs}")
        if not logged_pid or int(logged_pid.group(1)) != children[0][0]:
            raise SmokeFailure(f"{name}: the service logged another pid: {logs[name]}")
        # PID 1's own command line names /entrypoint.sh; no other process may be it.
        if any(
            "prosaas-migrate" in cmd or "entrypoint" in cmd for pid, _, cmd in procs if pid != 1
        ):
            raise SmokeFailure(f"{name}: the entrypoint or runner is still around: {procs}")
        say(f"{name}: tini (PID 1) -> {children[0][2]} (PID {children[0][0]}), nothing else")


def rollback(compose_: Compose, database_url: str) -> None:
    """A newer image migrated to 0004, then this one is deployed again: every service starts."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0004'")
    compose_("up", "-d", "--no-deps", "--no-build", *APP_SERVICES)
    wait_until_up(compose_)
    api = compose_.logs("prosaas-api")
    if "The database is ahead of this image: it is at 0004" not in api:
        raise SmokeFailure(f"the api did not say the database is ahead:\n{api}")
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    if row != ("0004",):
        raise SmokeFailure(f"a rollback deploy touched the version: {row}")
    compose_("stop", "--timeout", "15")
    say("rollback deploy (database at 0004, image at 0003): all three services started")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="prosaas-smoke-"))
    engine = Engine(work)
    cluster: Cluster | None = None
    compose_: Compose | None = None
    try:
        ensure_packages()
        engine.start()
        ensure_base_image(engine, work)
        build_image(engine, work)
        cluster = Cluster()
        cluster.start()
        database_url = cluster.create_database("prosaas")
        compose_ = Compose(engine, write_override(work, database_url, free_port()))
        say("docker compose up --no-deps (the host's PostgreSQL stands in for db)")
        compose_("up", "-d", "--no-deps", "--no-build", *APP_SERVICES)
        wait_until_up(compose_)
        check(engine, compose_, database_url)
        compose_("stop", "--timeout", "15")
        for name in APP_SERVICES:  # SIGTERM went through tini to the service itself
            if "stopped cleanly" not in compose_.logs(name):
                raise SmokeFailure(f"{name} did not stop cleanly:\n{compose_.logs(name)}")
        say("compose stop: every service caught SIGTERM and stopped cleanly")
        rollback(compose_, database_url)
        compose_("down", "--timeout", "15")
        left = engine.docker("ps", "-aq").split()
        if left:
            raise SmokeFailure(f"containers left after compose down: {left}")
        say("compose down: nothing left running")
        say("PASSED")
        return 0
    except SmokeFailure as failure:
        say(f"FAILED: {failure}")
        if compose_ is not None:
            for name in APP_SERVICES:
                with contextlib.suppress(SmokeFailure):
                    print(f"--- {name} logs\n{compose_.logs(name)}", flush=True)
        return 1
    finally:
        if compose_ is not None:
            subprocess.run([*compose_.base, "down", "--timeout", "5"], env=compose_.env,
                           capture_output=True, check=False)  # fmt: skip
        engine.stop()
        if cluster is not None:
            cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
