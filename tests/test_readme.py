"""The README is the first thing a user reads: its tables must match the code."""

from __future__ import annotations

import re
from pathlib import Path

from prosaas_migrate.config import KNOWN_VARIABLES, SETTINGS, default_lock_key
from prosaas_migrate.errors import CHECK_MEANINGS, EXIT_MEANINGS, CheckCode, ExitCode

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def table_after(heading: str) -> list[list[str]]:
    section = README.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_exit_code_table_matches_the_code() -> None:
    documented = {int(row[0]) for row in table_after("Exit codes")}
    assert documented == {int(code) for code in ExitCode}


def test_every_variable_is_documented() -> None:
    documented = {row[0].strip("`") for row in table_after("Configuration")}
    assert documented == set(KNOWN_VARIABLES)


def test_the_documented_default_lock_key_is_the_real_one() -> None:
    assert re.findall(r"`(\d{10,})`", README) == [str(default_lock_key())] * 2


def test_readme_commands_exist() -> None:
    root = Path(__file__).resolve().parent.parent
    commands = re.findall(r"^\./(scripts/\w+)", README, flags=re.MULTILINE)
    assert {"scripts/test", "scripts/demo"} <= set(commands)
    for command in commands:
        assert (root / command).is_file(), command


def test_every_json_event_is_documented() -> None:
    source = (Path(__file__).resolve().parent.parent / "prosaas_migrate" / "logs.py").read_text()
    emitted = set(re.findall(r'_emit\(\s*"(\w+)"', source))
    assert len(emitted) > 20  # the pattern really finds them
    section = README.split("With `MIGRATION_LOG_FORMAT=json` every line", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(\w+)`", section))
    assert emitted <= documented, emitted - documented


def test_the_configuration_table_is_the_settings_table() -> None:
    rows = table_after("Configuration")
    expected = [
        [f"`{s.name}`", f"`{s.default}`" if s.default is not None else "unset", s.meaning]
        for s in SETTINGS
    ]
    assert rows == expected


def test_status_check_codes_are_documented() -> None:
    section = README.split("With `--check`", 1)[1].split("`--json` prints", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert {int(row.split("|")[1]) for row in rows[1:]} == {int(code) for code in CheckCode}


def test_the_lint_rule_table_matches_the_rules() -> None:
    from prosaas_migrate.lint import RULES

    rows = table_after("Linting revisions")
    documented = {row[0].strip("`"): row[1].split(" (")[0] for row in rows}
    assert documented == {name: rule.lock or "none" for name, rule in RULES.items()}
    assert [row[0].strip("`") for row in rows] == list(RULES)  # the same order, too


def test_exit_code_meanings_are_the_ones_in_the_code() -> None:
    rows = table_after("Exit codes")
    assert {int(code): meaning for code, meaning in rows} == {
        int(code): meaning for code, meaning in EXIT_MEANINGS.items()
    }
    section = README.split("With `--check`", 1)[1].split("`--json` prints", 1)[0]
    check_rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    documented = {int(row.split("|")[1]): row.split("|")[2].strip() for row in check_rows}
    assert documented == {int(code): meaning for code, meaning in CHECK_MEANINGS.items()}


def test_the_recovery_commands_are_the_ones_the_compose_smoke_test_runs() -> None:
    from tests.compose_smoke import RECOVERY

    documented = re.findall(r"^ *(docker compose run .*?prosaas-api \w+)", README, re.MULTILINE)
    command = "docker compose " + " ".join(RECOVERY)
    assert sorted(set(documented)) == [f"{command} lint", f"{command} status"]
    assert len(documented) == 4  # in Containers and in Troubleshooting
