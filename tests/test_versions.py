"""The versions of the runtime requirements installed here are within what pyproject.toml
declares; in the lowest-versions run (.venv-min, PROSAAS_LOWEST_VERSIONS=1, which
./scripts/test makes) they are exactly the declared minimums, so that run cannot silently test
the newest releases instead."""

from __future__ import annotations

import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
LOWEST = bool(os.environ.get("PROSAAS_LOWEST_VERSIONS"))


def floor(requirement: str) -> tuple[str, str]:
    """(distribution, minimum) of a `name[extra]>=X` requirement; every one must declare it."""
    found = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[([^\]]*)\])?>=([0-9.]+)", requirement)
    assert found, f"{requirement!r}: declare the minimum as name>=X"
    return found[1], found[3]


def release(version: str) -> tuple[int, ...]:
    """2.0 and 2.0.0 are one release (PEP 440 pads with zeros)."""
    parts = [int(part) for part in re.findall(r"\d+", version.split("+")[0])[:4]]
    return tuple(parts + [0] * (4 - len(parts)))


@pytest.mark.parametrize("requirement", REQUIREMENTS)
def test_each_requirement_is_installed_within_its_declared_range(requirement: str) -> None:
    name, minimum = floor(requirement)
    installed = metadata.version(name)
    if LOWEST:
        assert release(installed) == release(minimum), f"{name} {installed}, declared >={minimum}"
    else:
        assert release(installed) >= release(minimum), f"{name} {installed}, declared >={minimum}"


def test_the_lowest_run_has_psycopgs_binary_at_the_same_minimum() -> None:
    if not LOWEST:
        pytest.skip("only in the lowest-versions run (PROSAAS_LOWEST_VERSIONS=1)")
    _, minimum = floor(next(r for r in REQUIREMENTS if r.startswith("psycopg[")))
    assert release(metadata.version("psycopg-binary")) == release(minimum)
