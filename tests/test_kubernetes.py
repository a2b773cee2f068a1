"""deploy/kubernetes: schema-valid manifests whose containers run what they are meant to.

No Kubernetes cluster is reachable here, so this proves what can be proven offline: every file
validates against the Kubernetes API schemas (strict: unknown fields fail), no migrate-and-exit
container relies on the image's CMD, and the argv each container would run, by Kubernetes' rules
for `command`/`args` over the Dockerfile's ENTRYPOINT and CMD, really does its job against a real
PostgreSQL.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import psycopg
import pytest
import yaml

from prosaas_migrate.config import DEFAULT_LOCK_KEY, decide_run
from tests.conftest import BIN, clean_env, version
from tests.pgcluster import free_port

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
DOCS = ROOT / "docs" / "kubernetes.md"
APP_DIR = ROOT / "examples" / "prosaas-app"  # the image's WORKDIR /app
# Recent and pinned, so a new kubernetes-validate release cannot change what passes.
KUBERNETES_VERSION = "1.35.0"
# Where the image's absolute paths live in this checkout (the Dockerfile's COPY lines).
IMAGE_PATHS = {"/entrypoint.sh": str(ROOT / "entrypoint.sh")}
LONG_RUNNING_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
RUN_TO_COMPLETION_KINDS = ("Job", "CronJob")


@dataclass(frozen=True)
class Image:
    entrypoint: list[str]
    cmd: list[str]


@dataclass(frozen=True)
class Container:
    """One container of one manifest, and whether Kubernetes expects it to exit."""

    file: str
    workload: str
    spec: dict[str, Any]
    exits: bool  # an initContainer or a Job's container

    @property
    def id(self) -> str:
        return f"{self.file}:{self.workload}/{self.spec['name']}"

    pod: dict[str, Any]  # the pod spec it runs in: its volumes

    def env(self) -> dict[str, str]:
        return {item["name"]: item["value"] for item in self.spec.get("env", [])}

    def mounted_secrets(self) -> dict[str, str]:
        """mountPath -> the name of the Secret a `secret` volume mounts there."""
        volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
        return {
            mount["mountPath"]: volumes[mount["name"]]["secret"]["secretName"]
            for mount in self.spec.get("volumeMounts", [])
            if "secret" in volumes.get(mount["name"], {})
        }


def image() -> Image:
    """The ENTRYPOINT and CMD the Dockerfile's final stage declares (exec form)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    entrypoint = re.findall(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.MULTILINE)[-1]
    cmd = re.findall(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)[-1]
    return Image(json.loads(entrypoint), json.loads(cmd))


def effective_argv(container: dict[str, Any], image: Image) -> list[str]:
    """What the container runs: `command` replaces ENTRYPOINT, `args` replaces CMD.

    Given a command but no args, the image's CMD is ignored; given neither, both run. An empty
    list counts as absent, because the fields are `omitempty` and the API server drops it.
    """
    command = container.get("command") or None
    args = container.get("args") or None
    if command is None:
        return [*image.entrypoint, *(args if args is not None else image.cmd)]
    return [*command, *(args or [])]


def manifest_files() -> list[Path]:
    return sorted(MANIFESTS.rglob("*.yaml"))


def documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in manifest_files():
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                yield str(path.relative_to(MANIFESTS)), document


def pod_spec(document: dict[str, Any]) -> dict[str, Any] | None:
    kind = document["kind"]
    if kind in (*LONG_RUNNING_KINDS, "Job"):
        spec: dict[str, Any] = document["spec"]["template"]["spec"]
        return spec
    if kind == "CronJob":
        spec = document["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return spec
    return None


def containers() -> list[Container]:
    found = []
    for file, document in documents():
        spec = pod_spec(document)
        if spec is None:
            continue
        workload = f"{document['kind']}/{document['metadata']['name']}"
        for init in spec.get("initContainers", []):
            found.append(Container(file, workload, init, exits=True, pod=spec))
        for main in spec["containers"]:
            exits = document["kind"] in RUN_TO_COMPLETION_KINDS
            found.append(Container(file, workload, main, exits=exits, pod=spec))
    return found


def migrates(container: Container) -> bool:
    """The run decision prosaas-migrate itself takes from this container's environment (only
    the decision: the URL files exist in the pod, not here)."""
    return decide_run(container.env())[0]


ALL = containers()
EXITING = [c for c in ALL if c.exits]
LONG_RUNNING = [c for c in ALL if not c.exits]


def test_the_manifests_are_all_there() -> None:
    kinds = sorted(f"{file}:{doc['kind']}/{doc['metadata']['name']}" for file, doc in documents())
    assert kinds == [
        "alternatives/migrate-job.yaml:Job/prosaas-migrate",
        "alternatives/prosaas-api-initcontainer.yaml:Deployment/prosaas-api",
        "prosaas-api.yaml:Deployment/prosaas-api",
        "prosaas-calls.yaml:Deployment/prosaas-calls",
        "secret.yaml:Secret/prosaas-db",
        "worker.yaml:Deployment/worker",
    ]
    assert len(EXITING) == 2 and len(LONG_RUNNING) == 4


# --- the API schemas ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "document", [doc for _, doc in documents()], ids=[file for file, _ in documents()]
)
def test_validates_against_the_kubernetes_api_schema(document: dict[str, Any]) -> None:
    checked = kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    assert checked == "1.35"  # the pinned schemas were really used, not an older fallback


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        (lambda c: c.update(comand=["prosaas-migrate", "run"]), "'comand' was unexpected"),
        (lambda c: c["env"][0].update(value=1), "1 is not of type"),
        (lambda c: c.pop("name"), "'name' is a required property"),
    ],
    ids=["misspelt field", "unquoted env value", "missing name"],
)
def test_strict_validation_really_catches_mistakes(mistake: Any, message: str) -> None:
    document = copy.deepcopy(next(doc for file, doc in documents() if file == "prosaas-api.yaml"))
    mistake(document["spec"]["template"]["spec"]["containers"][0])
    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    assert message in caught.value.message


def test_what_the_schemas_leave_to_the_api_server() -> None:
    """Checks the API server makes beyond the schema: selectors, names, Job restart policy."""
    name = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # DNS-1123 label
    secrets = {doc["metadata"]["name"] for _, doc in documents() if doc["kind"] == "Secret"}
    for file, document in documents():
        assert name.match(document["metadata"]["name"]), file
        spec = pod_spec(document)
        if spec is None:
            continue
        if document["kind"] in LONG_RUNNING_KINDS:
            selector = document["spec"]["selector"]["matchLabels"]
            labels = document["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), file
        if document["kind"] == "Job":
            assert spec["restartPolicy"] == "Never", file
        every = [*spec.get("initContainers", []), *spec["containers"]]
        assert len({c["name"] for c in every}) == len(every), file
        for container in every:
            assert name.match(container["name"]), file
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, file


def secret_keys() -> dict[str, set[str]]:
    """Each Secret's name -> its keys, the file names a `secret` volume holds."""
    return {
        doc["metadata"]["name"]: set(doc.get("stringData", {})) | set(doc.get("data", {}))
        for _, doc in documents()
        if doc["kind"] == "Secret"
    }


@pytest.mark.parametrize("container", ALL, ids=[c.id for c in ALL])
def test_the_urls_are_files_of_the_mounted_secret_never_variables(container: Container) -> None:
    """Each *_FILE variable names a key of a Secret mounted read-only where it points."""
    env = container.env()
    assert "envFrom" not in container.spec, container.id  # a Secret as variables: no
    assert not {"DATABASE_URL", "MIGRATION_DATABASE_URL"} & set(env), container.id
    assert not any("://" in value for value in env.values()), container.id
    mounts = {m["mountPath"]: m for m in container.spec.get("volumeMounts", [])}
    secrets = container.mounted_secrets()
    keys = secret_keys()
    files = {name: path for name, path in env.items() if name.endswith("_FILE")}
    assert set(files) == {"DATABASE_URL_FILE", "MIGRATION_DATABASE_URL_FILE"}, container.id
    for variable, path in files.items():
        folder, key = path.rsplit("/", 1)
        assert folder in secrets, f"{container.id}: {variable}={path} is not in a secret mount"
        assert mounts[folder]["readOnly"] is True, container.id
        assert key in keys[secrets[folder]], f"{container.id}: {secrets[folder]} has no {key}"
    # The uid the image runs as reads the root-owned files through the pod's fsGroup.
    assert container.pod["securityContext"]["fsGroup"] == 10001, container.id
    for volume in container.pod["volumes"]:
        assert volume["secret"]["defaultMode"] == 0o440, container.id


# --- the rule: migrate-and-exit containers never rely on the image's CMD --------------------


def test_no_container_has_an_empty_command_or_args() -> None:
    for container in ALL:
        for field in ("command", "args"):
            if field in container.spec:
                value = container.spec[field]
                assert isinstance(value, list) and value, f"{container.id}: {field}: {value!r}"


@pytest.mark.parametrize("container", EXITING, ids=[c.id for c in EXITING])
def test_a_container_that_migrates_and_exits_says_so(container: Container) -> None:
    assert migrates(container), container.id
    assert container.spec["command"] == ["prosaas-migrate", "run"], container.id
    assert "args" not in container.spec, container.id
    assert effective_argv(container.spec, image()) == ["prosaas-migrate", "run"]


@pytest.mark.parametrize("container", LONG_RUNNING, ids=[c.id for c in LONG_RUNNING])
def test_a_long_running_container_runs_its_service_through_the_entrypoint(
    container: Container,
) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    workload = container.workload.split("/", 1)[1]
    assert "command" not in container.spec, container.id  # keep ENTRYPOINT: it migrates
    assert container.spec["args"] == compose[workload]["command"], container.id
    argv = effective_argv(container.spec, image())
    assert argv == ["/entrypoint.sh", *container.spec["args"]]


def test_empty_args_would_run_the_image_cmd() -> None:
    """The trap the explicit command avoids: `args: []` is dropped and CMD (the api) runs."""
    trap = {"name": "migrate", "args": []}
    assert effective_argv(trap, image()) == ["/entrypoint.sh", *image().cmd]
    assert image().cmd == ["python", "-m", "example_services", "api"]  # never exits


def test_only_the_api_migrates_in_the_deployments() -> None:
    decisions = {c.id: migrates(c) for c in LONG_RUNNING}
    assert decisions == {
        "alternatives/prosaas-api-initcontainer.yaml:Deployment/prosaas-api/api": False,
        "prosaas-api.yaml:Deployment/prosaas-api/api": True,
        "prosaas-calls.yaml:Deployment/prosaas-calls/calls": False,
        "worker.yaml:Deployment/worker/worker": False,
    }


def test_waits_and_deadlines_leave_room_for_the_migration() -> None:
    by_file = {file: doc for file, doc in documents()}
    job = by_file["alternatives/migrate-job.yaml"]
    hooks = job["metadata"]["annotations"]["helm.sh/hook"].split(",")
    assert {"pre-install", "pre-upgrade"} <= set(hooks)
    assert job["spec"]["backoffLimit"] == 0
    job_container = next(c for c in EXITING if c.workload == "Job/prosaas-migrate")
    job_wait = int(job_container.env()["MIGRATION_LOCK_WAIT_SECONDS"])
    assert job["spec"]["activeDeadlineSeconds"] > 2 * job_wait  # the wait, then the migration

    init = next(c for c in EXITING if c.workload == "Deployment/prosaas-api")
    in_container = next(c for c in LONG_RUNNING if c.file == "prosaas-api.yaml")
    assert int(init.env()["MIGRATION_LOCK_WAIT_SECONDS"]) >= 600
    # The in-container api may spend its lock wait before it listens: the startup probe allows it.
    probe = in_container.spec["startupProbe"]
    wait = int(in_container.env()["MIGRATION_LOCK_WAIT_SECONDS"])
    assert probe["periodSeconds"] * probe["failureThreshold"] > 2 * wait


# --- the argv each container would run, run for real ---------------------------------------


def run_env(container: Container, db_url: str, root: Path) -> dict[str, str]:
    """The container's own variables, its secret mounts played by folders under `root` whose
    files (one per key, as the kubelet writes them) hold the test server's URL instead of the
    placeholders; the *_FILE variables point into them."""
    path = f"{BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}"  # the image's PATH has it
    env = container.env()
    keys = secret_keys()
    for mount_path, secret in container.mounted_secrets().items():
        folder = root / mount_path.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        for key in keys[secret]:
            (folder / key).write_text(db_url + "\n")
        for name, value in env.items():
            if name.endswith("_FILE") and value.startswith(mount_path + "/"):
                env[name] = str(folder / value.removeprefix(mount_path + "/"))
    return clean_env({**env, "PATH": path})


def local(argv: list[str]) -> list[str]:
    return [IMAGE_PATHS.get(argv[0], argv[0]), *argv[1:]]


@pytest.mark.parametrize("container", EXITING, ids=[c.id for c in EXITING])
def test_the_migrate_and_exit_argv_migrates_and_exits(
    container: Container, db_url: str, tmp_path: Path
) -> None:
    argv = local(effective_argv(container.spec, image()))
    for attempt in ("migrates", "finds the schema at head"):
        result = subprocess.run(
            argv, env=run_env(container, db_url, tmp_path), cwd=APP_DIR, capture_output=True,
            text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"{attempt}:\n{result.stderr}"
        assert version(db_url) == ["0003"]
    assert "Starting service" not in result.stderr


@pytest.mark.parametrize("container", LONG_RUNNING, ids=[c.id for c in LONG_RUNNING])
def test_the_long_running_argv_starts_the_service(
    container: Container, db_url: str, tmp_path: Path
) -> None:
    argv = local(effective_argv(container.spec, image()))
    env = run_env(container, db_url, tmp_path) | {"PORT": str(free_port())}  # 8000 may be taken
    proc = subprocess.Popen(
        argv, env=env, cwd=APP_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []

    def collect() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    started = re.compile(r"\] (listening on|started) ")
    try:
        deadline = time.monotonic() + 60
        while not any(started.search(line) for line in lines) and time.monotonic() < deadline:
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.05)
        if "PORT" in container.env():  # the api: its /healthz asks the database in the file
            url = f"http://127.0.0.1:{env['PORT']}/healthz"
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    output = "".join(lines)
    assert started.search(output), output
    assert ("Migrations complete" in output) == migrates(container), output
    assert "stopped cleanly" in output
    # The service read its URL from the mounted file, as prosaas-migrate did.
    assert f"database URL: DATABASE_URL_FILE={env['DATABASE_URL_FILE']}" in output, output


# --- the docs quote the files, never a diverging copy ---------------------------------------


def yaml_blocks(markdown: str) -> list[str]:
    return [
        textwrap.dedent(block)
        for block in re.findall(r"^ *```yaml\n(.*?)^ *```$", markdown, re.MULTILINE | re.DOTALL)
    ]


def is_excerpt(block: str, text: str) -> bool:
    """`block` is a run of whole lines of `text`, give or take a common indentation."""
    wanted = block.rstrip("\n").splitlines()
    lines = text.splitlines()
    for start in range(len(lines) - len(wanted) + 1):
        window = "\n".join(lines[start : start + len(wanted)])
        if textwrap.dedent(window) == "\n".join(wanted):
            return True
    return False


def test_every_yaml_block_in_the_docs_is_an_excerpt_of_a_manifest() -> None:
    markdown = DOCS.read_text()
    blocks = yaml_blocks(markdown)
    assert len(blocks) >= 3
    texts = [path.read_text() for path in manifest_files()]
    for block in blocks:
        assert any(is_excerpt(block, text) for text in texts), block


def test_the_docs_link_every_manifest() -> None:
    markdown = DOCS.read_text()
    linked = set(re.findall(r"\]\(\.\./(deploy/kubernetes/[^)]+\.yaml)\)", markdown))
    assert linked == {str(path.relative_to(ROOT)) for path in manifest_files()}


# --- what the docs promise of the initContainer variant, run for real -----------------------


INITCONTAINER_FILE = "alternatives/prosaas-api-initcontainer.yaml"


def run_container(
    container: Container, db_url: str, root: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        local(effective_argv(container.spec, image())), env=run_env(container, db_url, root) | env,
        cwd=APP_DIR, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_a_busy_lock_lets_the_api_start_unless_it_waits_for_head(
    db_url: str, tmp_path: Path
) -> None:
    """The initContainer that cannot get the lock in time exits 0 without migrating, so the api
    would start before head; MIGRATION_WAIT_FOR_HEAD_SECONDS on the api holds it (exit 4)."""
    init = next(c for c in EXITING if c.file == INITCONTAINER_FILE)
    api = next(c for c in LONG_RUNNING if c.file == INITCONTAINER_FILE)
    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [DEFAULT_LOCK_KEY])
        result = run_container(init, db_url, tmp_path, MIGRATION_LOCK_WAIT_SECONDS="1")
        assert result.returncode == 0, result.stderr
        assert "Could not acquire lock in time -> skipping migrations" in result.stderr
        assert version(db_url) == []  # skipped: nothing migrated
        port = str(free_port())
        result = run_container(
            api, db_url, tmp_path, MIGRATION_WAIT_FOR_HEAD_SECONDS="2", PORT=port
        )
        assert result.returncode == 4, result.stderr
        assert "not starting the service" in result.stderr
        assert "listening" not in result.stdout + result.stderr
    header = (MANIFESTS / INITCONTAINER_FILE).read_text().split("\napiVersion:", 1)[0]
    for text in (header, DOCS.read_text()):
        assert "MIGRATION_WAIT_FOR_HEAD_SECONDS" in text
        assert "skip" in text and "never starts before" not in text


def test_a_busy_lock_fails_a_migrate_and_exit_container_when_told_to(
    db_url: str, tmp_path: Path
) -> None:
    """As docs/kubernetes.md says: with MIGRATION_ON_LOCK_TIMEOUT=fail a Job or initContainer
    that cannot get the lock in time exits 1 (the release stops, the init is retried) instead
    of 0, which would let the new version roll out on the old schema."""
    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [DEFAULT_LOCK_KEY])
        for container in EXITING:
            env = {"MIGRATION_LOCK_WAIT_SECONDS": "1", "MIGRATION_ON_LOCK_TIMEOUT": "fail"}
            result = run_container(container, db_url, tmp_path, **env)
            assert result.returncode == 1, f"{container.id}:\n{result.stderr}"
            assert "MIGRATION_ON_LOCK_TIMEOUT=fail" in result.stderr
    assert version(db_url) == []
    assert DOCS.read_text().count("MIGRATION_ON_LOCK_TIMEOUT") >= 2  # the init and the Job


def test_a_rollback_starts_the_older_image_unless_told_to_fail(db_url: str, tmp_path: Path) -> None:
    """As docs/kubernetes.md says: a database ahead of the image (a newer one migrated) is
    never downgraded; the migrate-and-exit container exits 0, or 1 with
    MIGRATION_UNKNOWN_REVISION=fail."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('0004_from_a_newer_image')")
    for container in EXITING:
        result = run_container(container, db_url, tmp_path)
        assert result.returncode == 0, f"{container.id}:\n{result.stderr}"
        assert "The database is ahead of this image" in result.stderr
        result = run_container(container, db_url, tmp_path, MIGRATION_UNKNOWN_REVISION="fail")
        assert result.returncode == 1, f"{container.id}:\n{result.stderr}"
        assert version(db_url) == ["0004_from_a_newer_image"]  # never downgraded
    assert "MIGRATION_UNKNOWN_REVISION" in DOCS.read_text()
