"""Arguments, help and usage errors, through click's CliRunner (no process is replaced here)."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from prosaas_migrate import __version__
from prosaas_migrate.cli import main


class Exec(Exception):
    pass


@pytest.fixture(autouse=True)
def no_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_execvp(file: str, args: list[str]) -> None:
        raise Exec(args)

    monkeypatch.setattr(os, "execvp", fake_execvp)


def test_every_command_has_help_ending_with_an_example() -> None:
    for name, command in [("", main), *main.commands.items()]:
        result = CliRunner().invoke(main, [name, "--help"] if name else ["--help"])
        assert result.exit_code == 0, result.output
        assert command.help, name
        assert "Example:" in result.output
        assert "prosaas-migrate" in result.output.split("Example:")[1]


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--", "gunicorn", "app:app", "--workers", "2"],
        ["run", "gunicorn", "app:app", "--workers", "2"],
    ],
)
def test_service_arguments_are_passed_through(args: list[str]) -> None:
    result = CliRunner().invoke(main, args, env={"RUN_MIGRATIONS": "0"})
    assert isinstance(result.exception, Exec)
    assert result.exception.args[0] == ["gunicorn", "app:app", "--workers", "2"]


def test_an_unknown_option_is_a_usage_error_not_a_service() -> None:
    result = CliRunner().invoke(main, ["run", "--confg", "x.ini"])
    assert result.exit_code == 2
    assert "no such option: --confg" in result.output


def test_an_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["migrate"])
    assert result.exit_code == 2
