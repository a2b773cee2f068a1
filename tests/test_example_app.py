"""The example application's Alembic project also works as plain `alembic`, at a shell."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, clean_env, version

APP_DIR = Path(__file__).resolve().parent.parent / "examples" / "prosaas-app"
ALEMBIC = BIN.parent / "alembic"


def alembic(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ALEMBIC), *args], env=clean_env(env), cwd=APP_DIR, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+psycopg"])
def test_alembic_upgrade_head_reads_database_url(db_url: str, scheme: str) -> None:
    url = scheme + db_url.removeprefix("postgresql")
    result = alembic("upgrade", "head", env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    assert version(db_url) == ["0003"]


def test_migration_database_url_wins_as_it_does_for_prosaas_migrate(db_url: str) -> None:
    unreachable = "postgresql://nobody@127.0.0.1:1/nothing"
    env = {"DATABASE_URL": unreachable, "MIGRATION_DATABASE_URL": db_url}
    result = alembic("upgrade", "head", env=env)
    assert result.returncode == 0, result.stderr
    assert version(db_url) == ["0003"]


def test_without_a_url_it_says_what_to_set() -> None:
    result = alembic("upgrade", "head", env={})
    assert result.returncode == 1
    assert "Set DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr and "KeyError" not in result.stderr
