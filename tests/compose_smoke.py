"""The compose smoke test on a real Docker engine, run by .ci/run (needs root).

    .venv/bin/python -m tests.compose_smoke

No registry is reachable here, so it builds everything locally: a Debian base image made with
debootstrap (its tarball cached in CACHE_DIR between runs), the project's wheels copied into the
build context, `docker build --network none`. It starts its own dockerd and a throwaway
PostgreSQL on the host, runs the three app services of docker-compose.yml with an override that
puts them on the host network and points the compose secrets at files holding that server's URL,
and checks: the image ships tini and its documented ENTRYPOINT form works; exactly one container
migrated, the schema is at head, worker and prosaas-calls never touched the lock; every
container read its URL from /run/secrets/database_url and none has a URL in its environment;
each service is the process tini started (the entrypoint and prosaas-migrate exec'd into it);
a rollback deploy starts; a deploy whose new revision fails leaves the api Exited (1) after its
restart policy's 5 retries, the README's recovery commands (`compose run --rm --entrypoint
prosaas-migrate prosaas-api status`, `... lint`) report it without running the migration (here
with `--no-deps`: the host's PostgreSQL stands in for db), as does `plan` run from the new
image (and `compose exec worker prosaas-migrate plan` in a running container says nothing is
pending), and the fixed image migrates to head; nothing is left after `compose down`. Where
no engine can be started it says why and fails.
"""

from __future__ import annotations

import contextlib
import hashlib
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
# What the base holds beyond minbase; the cache key, so a base cached without one is rebuilt.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "tini")
BASE_KEY = hashlib.sha256(",".join(BASE_PACKAGES).encode()).hexdigest()[:8]
BASE_TAR = CACHE_DIR / f"debian-bookworm-{BASE_KEY}.tar"
BASE_IMAGE = "local/debian-python:bookworm"
IMAGE = "prosaas-migrate-example:latest"  # as docker-compose.yml names it
PROJECT = "prosaas-smoke"
APP_SERVICES = ("prosaas-api", "worker", "prosaas-calls")
# The README's recovery after a failed migration: `docker compose` + this + `status` or `lint`
# (tests/test_readme.py holds the README to it).
RECOVERY = ("run", "--rm", "--entrypoint", "prosaas-migrate", "prosaas-api")
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
            "debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
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


def write_secrets(work: Path, database_url: str) -> Path:
    """Our PostgreSQL's URL where the compose secrets come from, as scripts/secrets lays them
    out: files 0644 (the containers read them as uid 10001) in a folder only root may enter."""
    folder = work / "secrets"
    folder.mkdir(mode=0o700)
    for name, text in (("database_url", database_url), ("postgres_password", "unused")):
        (folder / name).write_text(text + "\n")  # secret files end with a newline
        (folder / name).chmod(0o644)
    return folder


def write_override(work: Path, secrets: Path, api_port: int) -> Path:
    """Host networking (a bridge's private addresses are off limits here), our PostgreSQL's URL
    in the secret files; the services keep their DATABASE_URL_FILE."""
    override: dict[str, Any] = {
        "services": {},
        "secrets": {
            name: {"file": str(secrets / name)} for name in ("database_url", "postgres_password")
        },
    }
    for name in APP_SERVICES:
        service: dict[str, Any] = {"network_mode": "host", "environment": {}}
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
    def __init__(self, engine: Engine, *overrides: Path) -> None:
        self.base = [
            str(COMPOSE_BINARY), "--ansi", "never", "-p", PROJECT,
            "-f", str(ROOT / "docker-compose.yml"),
            *(arg for override in overrides for arg in ("-f", str(override))),
        ]  # fmt: skip
        self.env = engine.env

    def __call__(self, *args: str, timeout: float = 300) -> str:
        return run([*self.base, *args], env=self.env, timeout=timeout)

    def exits(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run it and hand back whatever it exits with, for the commands meant to fail."""
        return subprocess.run(
            [*self.base, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip

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


def check_tini(engine: Engine) -> None:
    """The image ships tini, and docs/kubernetes.md's ENTRYPOINT form runs through it."""
    tini = ["run", "--rm", "--network", "none", "--entrypoint", "/usr/bin/tini", IMAGE, "--"]
    engine.docker(*tini, "/entrypoint.sh", "true")  # exits 0, or run() raises
    parent = engine.docker(
        *tini, "/entrypoint.sh", "python", "-c", "import os; print(os.getppid())"
    )
    if parent.strip() != "1":
        raise SmokeFailure(f"the service's parent is {parent.strip()}, not tini as PID 1")
    failed = subprocess.run(
        ["docker", *tini, "/entrypoint.sh", "sh", "-c", "exit 3"], env=engine.env,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if failed.returncode != 3:
        raise SmokeFailure(f"tini did not pass the service's exit code 3 on: {failed.returncode}")
    say("image: /usr/bin/tini -- /entrypoint.sh runs the service as tini's child, exit codes pass")


def check_secrets(engine: Engine, compose_: Compose, logs: dict[str, str], url: str) -> None:
    """Each container read its URL from the mounted secret; none holds it in its environment."""
    ids = {row["Service"]: row["ID"] for row in compose_.containers()}
    for name in APP_SERVICES:
        if "database URL: DATABASE_URL_FILE=/run/secrets/database_url" not in logs[name]:
            raise SmokeFailure(f"{name} did not read /run/secrets/database_url:\n{logs[name]}")
        env = json.loads(engine.docker("inspect", "--format", "{{json .Config.Env}}", ids[name]))
        if "DATABASE_URL_FILE=/run/secrets/database_url" not in env or any(
            url in item or item.startswith("DATABASE_URL=") for item in env
        ):
            raise SmokeFailure(f"{name}: the URL is in the environment, or the file is not: {env}")
        mounted = engine.docker("exec", ids[name], "cat", "/run/secrets/database_url")
        if mounted.strip() != url:
            raise SmokeFailure(f"{name}: /run/secrets/database_url does not hold the secret file")
    say("every container read its URL from /run/secrets/database_url; none has it in its env")


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
    check_secrets(engine, compose_, logs, database_url)
    # The README's `docker compose exec worker prosaas-migrate plan`, from a shell in a running
    # container that never migrates: it reads its URL from the secret, as the service did.
    plan = compose_.exits("exec", "-T", "worker", "prosaas-migrate", "plan")
    if plan.returncode != 0 or "nothing to run: the database is at head" not in plan.stdout:
        raise SmokeFailure(f"exec worker plan: {plan.returncode}\n{plan.stdout}{plan.stderr}")
    say("compose exec worker prosaas-migrate plan: exit 0, nothing to run")

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


# A new revision that fails on every database (the column does not exist), then its fix. The
# index without CONCURRENTLY is also what `lint` reports.
BROKEN_REVISION = '''"""index leads by score

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_leads_score", "leads", ["score"])


def downgrade() -> None:
    op.drop_index("ix_leads_score", "leads")
'''
FIXED_REVISION = (
    BROKEN_REVISION.replace(
        'op.create_index("ix_leads_score", "leads", ["score"])',
        'op.add_column("leads", sa.Column("score", sa.Integer()))',
    )
    .replace("from alembic import op", "import sqlalchemy as sa\nfrom alembic import op")
    .replace('op.drop_index("ix_leads_score", "leads")', 'op.drop_column("leads", "score")')
)


def build_release(engine: Engine, work: Path, tag: str, revision: str) -> Path:
    """The image with one more revision, and the override that deploys it."""
    context = work / f"release-{tag}"
    context.mkdir()
    (context / "0004_leads_score.py").write_text(revision)
    (context / "Dockerfile").write_text(
        f"FROM {IMAGE}\nCOPY 0004_leads_score.py /app/migrations/versions/\n"
    )
    image = IMAGE.replace(":latest", f":{tag}")
    engine.docker("build", "--network", "none", "-t", image, str(context), timeout=300)
    override = work / f"compose.{tag}.yml"
    override.write_text(json.dumps({"services": {n: {"image": image} for n in APP_SERVICES}}))
    return override


def container_state(engine: Engine, compose_: Compose, service: str) -> tuple[str, int, int]:
    ids = {row["Service"]: row["ID"] for row in compose_.containers()}
    state = json.loads(engine.docker("inspect", "--format", "{{json .}}", ids[service]))
    return state["State"]["Status"], state["State"]["ExitCode"], state["RestartCount"]


def failed_migration(engine: Engine, work: Path, overrides: list[Path], database_url: str) -> None:
    """A release whose new revision fails: the api gives up after its 5 retries; the README's
    recovery commands report it without migrating; the fixed release migrates."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0003'")  # after the rollback
    broken = Compose(engine, *overrides, build_release(engine, work, "broken", BROKEN_REVISION))
    broken("up", "-d", "--no-deps", "--no-build", *APP_SERVICES)
    deadline = time.monotonic() + 120
    while (state := container_state(engine, broken, "prosaas-api"))[0] != "exited" or state[2] < 5:
        if time.monotonic() > deadline:
            raise SmokeFailure(f"the api did not give up after 5 restarts: {state}")
        time.sleep(0.5)
    time.sleep(3)  # a sixth start would come within 3.2 s (Docker doubles 100 ms each time)
    api = broken.logs("prosaas-api")
    if container_state(engine, broken, "prosaas-api") != ("exited", 1, 5):
        raise SmokeFailure(f"api: {container_state(engine, broken, 'prosaas-api')}\n{api}")
    if api.count("❌ MIGRATION FAILED in revision 0004") != 6:
        raise SmokeFailure(f"expected the first try and 5 retries to fail:\n{api}")
    say("broken release: the api tried 0004 6 times (restart: on-failure:5), then Exited (1)")

    # The trap the README warns of: `compose run SERVICE CMD` goes through the entrypoint, and
    # with RUN_MIGRATIONS=1 it migrates (and fails) before CMD would run.
    trap = broken.exits("run", "--rm", "--no-deps", "prosaas-api", "prosaas-migrate", "status")
    if trap.returncode != 1 or "MIGRATION FAILED" not in trap.stdout + trap.stderr:
        raise SmokeFailure(f"compose run without --entrypoint: {trap.returncode}\n{trap.stderr}")
    recovery = [*RECOVERY[:2], "--no-deps", *RECOVERY[2:]]  # no db service to start here
    status = broken.exits(*recovery, "status", "--check")
    lint = broken.exits(*recovery, "lint")
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        index = conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'ix_leads_score'")
        indexes = index.fetchone()
    if status.returncode != 1 or "0004" not in status.stdout + status.stderr:
        raise SmokeFailure(
            f"status --check: {status.returncode} (want 1, pending)\n{status.stdout}"
        )
    for said in (status.stdout + status.stderr, lint.stdout + lint.stderr):
        if "MIGRATION CHECKPOINT" in said or "Applying revision" in said:
            raise SmokeFailure(f"a recovery command ran the migration:\n{said}")
    if lint.returncode != 1 or "index-not-concurrent" not in lint.stdout + lint.stderr:
        raise SmokeFailure(f"lint: {lint.returncode}\n{lint.stdout}{lint.stderr}")
    # The README's way to ask a new release what it will run: plan from that image.
    plan = broken.exits(
        "run", "--rm", "--no-deps", "--entrypoint", "prosaas-migrate", "worker", "plan", "--json"
    )  # fmt: skip
    planned = json.loads(plan.stdout) if plan.stdout.startswith("{") else {}
    statements = [s for r in planned.get("revisions", ()) for s in r["statements"]]
    if plan.returncode != 1 or [r["revision"] for r in planned["revisions"]] != ["0004"]:
        raise SmokeFailure(f"plan from the new image: {plan.returncode}\n{plan.stdout}")
    lock = statements[0]["locks"][0]
    if (lock["mode"], lock["table"], lock["table_state"]) != ("SHARE", "leads", "existing"):
        raise SmokeFailure(f"plan: the index's lock on leads is not shown: {statements}")
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        index = conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'ix_leads_score'")
        indexes = index.fetchone()
    if row != ("0003",) or indexes != (0,):
        raise SmokeFailure(f"the recovery commands changed the database: {row}, {indexes}")
    say("plan from the new image (compose run --entrypoint prosaas-migrate worker plan): "
        f"exit 1, 0004 pending, {lock['mode']} on leads ({lock['bytes']} bytes)")  # fmt: skip
    say("recovery: compose run --rm --entrypoint prosaas-migrate prosaas-api status --check "
        "exits 1 (0004 pending), lint names the revision, nothing migrated")  # fmt: skip

    fixed = Compose(engine, *overrides, build_release(engine, work, "fixed", FIXED_REVISION))
    fixed("up", "-d", "--no-deps", "--no-build", *APP_SERVICES)
    wait_until_up(fixed)
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    if row != ("0004",) or "Migrations complete: 1 revision(s) applied, now at 0004" not in (
        fixed.logs("prosaas-api")
    ):
        raise SmokeFailure(f"the fixed release did not migrate: {row}\n{fixed.logs('prosaas-api')}")
    fixed("stop", "--timeout", "15")
    say("fixed release: 0004 applied, every service up, schema at head 0004")


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
        check_tini(engine)
        secrets = write_secrets(work, database_url)
        overrides = [write_override(work, secrets, free_port())]
        compose_ = Compose(engine, *overrides)
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
        failed_migration(engine, work, overrides, database_url)
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
