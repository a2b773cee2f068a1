"""A closed or full stdout or stderr never keeps the service from starting (issue 16, point 10).

Python makes a closed stream None and a full one raises on flush; either used to end `run` with
a traceback (or with nothing at all, stderr being gone) before the exec.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests import project
from tests.conftest import BIN, clean_env, version

REDIRECTIONS = [">&-", "2>&-", ">&- 2>&-", "2>/dev/full", ">/dev/full", ">/dev/full 2>/dev/full"]


def start(cwd: Path, env: dict[str, str], redirection: str) -> tuple[int, str]:
    """Run `run -- service` with the streams redirected; (exit status, what the service wrote)."""
    marker = cwd / "service.pid"
    service = f"echo $$ > {marker}"
    proc = subprocess.Popen(
        ["sh", "-c", f'exec "$0" run -- sh -c "$1" {redirection}', str(BIN), service],
        cwd=cwd,
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
    )
    status = proc.wait(timeout=60)
    pid = marker.read_text().strip() if marker.exists() else ""
    assert pid == str(proc.pid), "the service did not start in the same process"
    return status, pid


@pytest.mark.parametrize("redirection", REDIRECTIONS)
def test_the_disabled_path_execs_whatever_the_streams(tmp_path: Path, redirection: str) -> None:
    status, _pid = start(tmp_path, {"RUN_MIGRATIONS": "0"}, redirection)
    assert status == 0


@pytest.mark.parametrize("redirection", ["2>&-", "2>/dev/full"])
def test_the_migrating_path_migrates_and_execs_with_stderr_gone(
    tmp_path: Path, db_url: str, redirection: str
) -> None:
    project.create(tmp_path, project.linear(2))
    status, _pid = start(tmp_path, {"RUN_MIGRATIONS": "1", "DATABASE_URL": db_url}, redirection)
    assert status == 0
    assert version(db_url) == ["r002"]
