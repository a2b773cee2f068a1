"""Messages that say what is true (issue 16, point 11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import cli


@pytest.mark.parametrize("service", [["-x"], ["--help"], ["-", "a"]])
def test_a_service_after_dashdash_that_starts_with_a_dash_is_execd_not_refused(
    tmp_path: Path, service: list[str]
) -> None:
    result = cli(["run", "--", *service], {}, tmp_path)
    assert result.returncode == 127, result.stderr
    assert "put the service after --" not in result.stderr
    assert f"cannot exec {service[0]}: No such file or directory (ENOENT)" in result.stderr


@pytest.mark.parametrize(
    "args", [["-x"], ["-x", "--", "gunicorn"], ["--config", "alembic.ini", "--bogus", "x"]]
)
def test_an_unknown_option_before_dashdash_is_a_usage_error(
    tmp_path: Path, args: list[str]
) -> None:
    result = cli(["run", *args], {}, tmp_path)
    assert result.returncode == 2, result.stderr
    bad = next(arg for arg in args if arg.startswith("-") and arg != "--config")
    assert f"no such option: {bad} (put the service after --)" in result.stderr


def test_a_dash_service_after_dashdash_with_options_before_it(tmp_path: Path) -> None:
    (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = migrations\n")
    result = cli(["run", "--config", "alembic.ini", "--", "-x"], {}, tmp_path)
    assert result.returncode == 127, result.stderr
