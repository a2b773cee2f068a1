"""Arguments, help and usage errors, through click's CliRunner (no process is replaced here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from prosaas_migrate import __version__
from prosaas_migrate.cli import main
from prosaas_migrate.config import SETTINGS
from prosaas_migrate.errors import CHECK_MEANINGS, EXIT_MEANINGS


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


def words(text: str) -> str:
    return " ".join(text.replace("`", "").split())


def test_run_help_lists_every_setting_and_exit_code_from_the_tables() -> None:
    # The README is not in the image: inside a container, `run --help` is the documentation.
    result = CliRunner().invoke(main, ["run", "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    text = words(result.output)
    for setting in SETTINGS:
        assert setting.name in text
        assert words(setting.meaning) in text, setting.name
    for code, meaning in EXIT_MEANINGS.items():
        assert f"{int(code)} {words(meaning)}" in text


@pytest.mark.parametrize("command", ["status", "plan"])
def test_status_and_plan_help_list_the_check_codes(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"], terminal_width=100)
    text = words(result.output)
    for code, meaning in CHECK_MEANINGS.items():
        assert f"{int(code)} {words(meaning)}" in text


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["run", "--help"],
        ["status", "--help"],
        ["plan", "--help"],
        ["worker-trace", "--help"],
    ],
)
def test_help_never_reads_dotenv(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / ".env").write_bytes(b"RUN_MIGRATIONS=\xff\n")  # not UTF-8
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(main, args)
    finally:
        os.chdir(previous)
    assert result.exit_code == 0, result.output
