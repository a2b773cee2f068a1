"""docker-compose.yml, the Dockerfile and the local demo that plays the compose file."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import compose
import pytest

from prosaas_migrate.worker_trace import Trace, problems_found
from tests.conftest import clean_env, version

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = Path(compose.__file__).parent / "docker-compose"  # the static binary, not the wrapper
APP_SERVICES = ("prosaas-api", "worker", "prosaas-calls")


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
        assert services[name]["environment"]["DATABASE_URL"].endswith("@db:5432/prosaas")


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


def test_demo_plays_the_compose_file_with_racing_api_replicas(db_url: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--replicas", "3",
         "--database-url", db_url],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    started = Counter[str]()
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

    assert version(db_url) == ["0003"]
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


def test_demo_starts_its_own_database_and_stops_by_itself() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--exit-after", "10"],
        env=clean_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo | throwaway PostgreSQL on 127.0.0.1:" in result.stdout
    assert "Migrations complete: 3 revision(s) applied, now at 0003" in result.stdout
