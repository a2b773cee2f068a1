"""The three-service start-up of docker-compose.yml, as local processes, without Docker.

Starts a throwaway PostgreSQL (or uses --database-url), then runs each app service of
docker-compose.yml through entrypoint.sh with that service's environment and command, all at
once, their output interleaved and prefixed like `docker compose up`. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.pgcluster import Cluster, free_port  # noqa: E402

APP_DIR = ROOT / "examples" / "prosaas-app"  # the image's WORKDIR /app
URL_VARIABLES = ("DATABASE_URL", "MIGRATION_DATABASE_URL")


@dataclass
class Service:
    name: str
    command: list[str]
    environment: dict[str, str]


def app_services(compose_file: Path, replicas: int, database_url: str) -> list[Service]:
    """Every service but the database, with its environment pointed at our PostgreSQL."""
    spec: dict[str, Any] = yaml.safe_load(compose_file.read_text())
    services = []
    for name, body in spec["services"].items():
        if str(body.get("image", "")).startswith("postgres"):
            continue
        environment = {key: str(value) for key, value in (body.get("environment") or {}).items()}
        for variable in URL_VARIABLES:
            if variable in environment:
                environment[variable] = database_url
        count = replicas if environment.get("RUN_MIGRATIONS") == "1" else 1
        for index in range(1, count + 1):
            env = dict(environment)
            if "PORT" in env:
                env["PORT"] = str(free_port())  # replicas share this host's ports
            services.append(Service(f"{name}-{index}", list(body["command"]), env))
    return services


class Demo:
    def __init__(self, services: list[Service]) -> None:
        self.services = services
        self.processes: list[tuple[Service, subprocess.Popen[str]]] = []
        self.width = max(len(s.name) for s in services)
        self.lock = threading.Lock()

    def say(self, name: str, line: str) -> None:
        with self.lock:
            print(f"{name:<{self.width}} | {line}", flush=True)

    def start(self) -> None:
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        for service in self.services:
            env = {**os.environ, **service.environment, "PATH": path, "PYTHONUNBUFFERED": "1"}
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
            threading.Thread(target=self._relay, args=(service, proc), daemon=True).start()

    def _relay(self, service: Service, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.say(service.name, line.rstrip("\n"))

    def running(self) -> bool:
        return any(proc.poll() is None for _, proc in self.processes)

    def stop(self) -> int:
        """SIGTERM everyone, as `docker compose down` does; 0 when all stopped cleanly."""
        for _, proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        failures = 0
        for service, proc in self.processes:
            try:
                code = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            self.say(service.name, f"exited with code {code}")
            failures += code != 0
        time.sleep(0.1)  # let the relays print their last lines
        return 0 if failures == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=1, help="api replicas racing to migrate")
    parser.add_argument("--database-url", help="use this PostgreSQL instead of a throwaway one")
    parser.add_argument(
        "--exit-after", type=float, metavar="SECONDS", help="stop by itself (for tests)"
    )
    parser.add_argument("--compose-file", type=Path, default=ROOT / "docker-compose.yml")
    args = parser.parse_args()
    if args.replicas < 1:
        parser.error("--replicas must be 1 or more")

    cluster = None
    url = args.database_url
    if url is None:
        cluster = Cluster()
        cluster.start()
        url = cluster.url()
        print(f"demo | throwaway PostgreSQL on 127.0.0.1:{cluster.port}", flush=True)
    stop = threading.Event()

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    demo = Demo(app_services(args.compose_file, args.replicas, url))
    try:
        demo.start()
        deadline = None if args.exit_after is None else time.monotonic() + args.exit_after
        while not stop.is_set() and demo.running():
            if deadline is not None and time.monotonic() >= deadline:
                break
            stop.wait(0.2)
        print("demo | stopping all services", flush=True)
        return demo.stop()
    finally:
        if cluster is not None:
            cluster.destroy()


if __name__ == "__main__":
    sys.exit(main())
