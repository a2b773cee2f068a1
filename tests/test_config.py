"""config.load is pure: every rule of SPEC's table is a one-line case here."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from prosaas_migrate import config
from prosaas_migrate.errors import ConfigError


@pytest.mark.parametrize(
    ("environ", "run", "decided_by"),
    [
        ({}, False, "default"),
        ({"RUN_MIGRATIONS": "1"}, True, "RUN_MIGRATIONS"),
        ({"RUN_MIGRATIONS": "0"}, False, "RUN_MIGRATIONS"),
        ({"RUN_MIGRATIONS": "TRUE"}, True, "RUN_MIGRATIONS"),
        ({"RUN_MIGRATIONS": "Yes"}, True, "RUN_MIGRATIONS"),
        ({"RUN_MIGRATIONS": "on"}, True, "RUN_MIGRATIONS"),
        ({"RUN_MIGRATIONS": "False"}, False, "RUN_MIGRATIONS"),
        ({"RUN_MIGRATIONS": "NO"}, False, "RUN_MIGRATIONS"),
        ({"RUN_MIGRATIONS": "off"}, False, "RUN_MIGRATIONS"),
        ({"RUN_MIGRATIONS": ""}, False, "default"),
        ({"RUN_MIGRATIONS": "", "RUN_MIGRATIONS_ON_START": "1"}, True, "RUN_MIGRATIONS_ON_START"),
        ({"RUN_MIGRATIONS": "0", "RUN_MIGRATIONS_ON_START": "1"}, False, "RUN_MIGRATIONS"),
        ({"RUN_MIGRATIONS": "1", "RUN_MIGRATIONS_ON_START": "0"}, True, "RUN_MIGRATIONS"),
        ({"RUN_MIGRATIONS_ON_START": "true"}, True, "RUN_MIGRATIONS_ON_START"),
        ({"RUN_MIGRATIONS_ON_START": "0", "SERVICE_ROLE": "api"}, False, "RUN_MIGRATIONS_ON_START"),
        ({"SERVICE_ROLE": "api"}, True, "SERVICE_ROLE"),
        ({"SERVICE_ROLE": "API"}, True, "SERVICE_ROLE"),
        ({"SERVICE_ROLE": "Prosaas-Api"}, True, "SERVICE_ROLE"),
        ({"SERVICE_ROLE": "worker"}, False, "SERVICE_ROLE"),
        ({"SERVICE_ROLE": "prosaas-calls"}, False, "SERVICE_ROLE"),
        ({"RUN_MIGRATIONS": "0", "SERVICE_ROLE": "api"}, False, "RUN_MIGRATIONS"),
        ({"RUN_MIGRATIONS": "1", "SERVICE_ROLE": "worker"}, True, "RUN_MIGRATIONS"),
    ],
)
def test_run_decision_precedence(environ: dict[str, str], run: bool, decided_by: str) -> None:
    settings = config.load(environ)
    assert (settings.run, settings.decided_by) == (run, decided_by)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RUN_MIGRATIONS", "maybe"),
        ("RUN_MIGRATIONS", "2"),
        ("RUN_MIGRATIONS_ON_START", "y"),
        ("MIGRATION_LOCK_WAIT_SECONDS", "abc"),
        ("MIGRATION_LOCK_WAIT_SECONDS", "-5"),
        ("MIGRATION_LOCK_WAIT_SECONDS", "1.5"),
        ("MIGRATION_LOCK_WAIT_SECONDS", "\uff13\uff10"),  # full-width 30: int() takes it, we don't
        ("MIGRATION_STATEMENT_TIMEOUT", "abc"),
        ("MIGRATION_STATEMENT_TIMEOUT", "-5s"),
        ("MIGRATION_STATEMENT_TIMEOUT", "120S"),
        ("MIGRATION_STATEMENT_TIMEOUT", "120 sec"),
        ("MIGRATION_STATEMENT_TIMEOUT", "1s'; DROP TABLE x; --"),
        ("MIGRATION_STATEMENT_TIMEOUT", "30d"),  # over PostgreSQL's 2147483647 ms
        ("MIGRATION_STATEMENT_TIMEOUT", "0.1us"),  # would round to 0, i.e. no timeout
        ("MIGRATION_STATEMENT_TIMEOUT", "010"),  # octal 8 ms to PostgreSQL
        ("MIGRATION_LOCK_KEY", str(2**63)),
        ("MIGRATION_LOCK_KEY", str(-(2**63) - 1)),
        ("MIGRATION_LOCK_KEY", "0x10"),
        ("MIGRATION_LOCK_KEY", "key"),
    ],
)
def test_invalid_values_name_the_variable_and_value(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load({variable: value})
    assert caught.value.variable == variable
    message = str(caught.value)
    assert message.startswith(f"{variable}: {value!r} is invalid; expected ")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        ("120s", 120_000),
        ("2min", 120_000),
        ("0.5h", 1_800_000),
        ("1500ms", 1500),
        ("10", 10),  # PostgreSQL reads a bare number as milliseconds
        ("0", 0),
        ("1d", 86_400_000),
        (" 120 s ", 120_000),
        ("2147483647", 2_147_483_647),
        ("0.1d", 7_200_000),  # 2.4 h, kept by PostgreSQL as a whole 2 h
        ("0.7d", 61_200_000),  # 16.8 h -> 17 h
        ("2.5ms", 2),  # 2500 us -> 2.5 ms -> half to even
        ("1.005s", 1005),
    ],
)
def test_statement_timeout_grammar(value: str, ms: int) -> None:
    assert config.parse_duration_ms("MIGRATION_STATEMENT_TIMEOUT", value) == ms


def test_defaults() -> None:
    settings = config.load({})
    assert settings.lock_wait_seconds == 30
    assert settings.statement_timeout == "120s"
    assert settings.statement_timeout_ms == 120_000
    assert settings.lock_key is None  # derived from the version table's name when needed
    assert settings.lock_key_source == "default"
    assert settings.alembic_config == "alembic.ini"
    assert settings.alembic_config_source == "default"
    assert settings.database_url is None


def test_default_lock_key_is_stable_and_documented() -> None:
    # The README documents this value: changing the derivation would let an old and a new
    # version of the tool migrate at once during a rolling deploy.
    assert config.default_lock_key() == config.DEFAULT_LOCK_KEY == 7214607257041625889
    assert config.default_lock_key("public.other_version") != config.default_lock_key()


@pytest.mark.parametrize("key", ["0", "-1", str(2**63 - 1), str(-(2**63)), " 42 "])
def test_lock_key_accepts_signed_64_bit(key: str) -> None:
    settings = config.load({"MIGRATION_LOCK_KEY": key})
    assert settings.lock_key == int(key)
    assert settings.lock_key_source == "MIGRATION_LOCK_KEY"


def test_wait_seconds_zero_is_one_try() -> None:
    assert config.load({"MIGRATION_LOCK_WAIT_SECONDS": "0"}).lock_wait_seconds == 0


@pytest.mark.parametrize(
    ("option", "environ", "path", "source"),
    [
        (None, {}, "alembic.ini", "default"),
        (
            None,
            {"ALEMBIC_CONFIG": "/etc/app/alembic.ini"},
            "/etc/app/alembic.ini",
            "ALEMBIC_CONFIG",
        ),
        ("cli.ini", {"ALEMBIC_CONFIG": "/etc/app/alembic.ini"}, "cli.ini", "--config"),
    ],
)
def test_alembic_config_precedence(
    option: str | None, environ: dict[str, str], path: str, source: str
) -> None:
    settings = config.load(environ, config_option=option)
    assert (settings.alembic_config, settings.alembic_config_source) == (path, source)


@pytest.mark.parametrize(
    ("environ", "ini_url", "expected"),
    [
        (
            {"MIGRATION_DATABASE_URL": "postgresql://direct/db", "DATABASE_URL": "postgres://b/db"},
            "postgresql://ini/db",
            "postgresql://direct/db",
        ),
        (
            {"DATABASE_URL": "postgres://u:p@b:5432/db"},
            "postgresql://ini/db",
            "postgresql://u:p@b:5432/db",
        ),
        ({"DATABASE_URL": "postgresql+psycopg://b/db"}, None, "postgresql://b/db"),
        ({"DATABASE_URL": ""}, "postgresql://ini/db", "postgresql://ini/db"),
        ({}, "postgresql+psycopg://ini/db", "postgresql://ini/db"),
    ],
)
def test_database_url_precedence(
    environ: dict[str, str], ini_url: str | None, expected: str
) -> None:
    assert config.migration_conninfo(config.load(environ), ini_url).text == expected


@pytest.mark.parametrize(
    ("environ", "ini_url", "variable"),
    [
        ({}, None, "DATABASE_URL"),
        ({}, "driver://user:pass@localhost/dbname", "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://u:secret@h/db"}, None, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql+asyncpg://h/db"}, None, "DATABASE_URL"),
        ({"MIGRATION_DATABASE_URL": "localhost:5432"}, None, "MIGRATION_DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://h:port/db"}, None, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://u:secret%80@h/db"}, None, "DATABASE_URL"),  # not UTF-8
    ],
)
def test_unusable_database_url(environ: dict[str, str], ini_url: str | None, variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.migration_conninfo(config.load(environ), ini_url)
    assert caught.value.variable == variable
    assert "secret" not in str(caught.value)
    assert "pass@" not in str(caught.value)


def test_database_url_is_not_checked_when_not_migrating() -> None:
    # A worker's app may use another driver; it must start even so.
    settings = config.load({"RUN_MIGRATIONS": "0", "DATABASE_URL": "postgresql+asyncpg://h/db"})
    assert settings.run is False


# -- URLs from files (Docker and Kubernetes secrets) ------------------------------------------


def secret(tmp_path: Path, name: str, text: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("files", "variables", "expected", "source"),
    [
        (
            {"DATABASE_URL_FILE": "postgresql://f/db\n"},
            {},
            "postgresql://f/db",
            "DATABASE_URL_FILE",
        ),
        (
            {"MIGRATION_DATABASE_URL_FILE": "postgresql://direct/db\n"},
            {"DATABASE_URL": "postgresql://pooled/db"},
            "postgresql://direct/db",
            "MIGRATION_DATABASE_URL_FILE",
        ),
        (
            {"DATABASE_URL_FILE": "postgresql://pooled/db"},
            {"MIGRATION_DATABASE_URL": "postgresql://direct/db"},
            "postgresql://direct/db",
            "MIGRATION_DATABASE_URL",
        ),
        (
            {"MIGRATION_DATABASE_URL_FILE": "postgresql://direct/db", "DATABASE_URL_FILE": "x"},
            {},
            "postgresql://direct/db",
            "MIGRATION_DATABASE_URL_FILE",
        ),
        # Secrets files end with a newline, from an editor maybe CRLF and blanks: all dropped.
        (
            {"DATABASE_URL_FILE": "  host=f dbname=db password=p \r\n\n"},
            {},
            "host=f dbname=db password=p",
            "DATABASE_URL_FILE",
        ),
    ],
)
def test_a_url_file_stands_in_for_its_variable_in_the_same_precedence(
    tmp_path: Path,
    files: dict[str, str],
    variables: dict[str, str],
    expected: str,
    source: str,
) -> None:
    environ = {name: secret(tmp_path, name, text) for name, text in files.items()} | variables
    settings = config.load(environ)
    assert settings.database_url == expected
    named = f"{source}={environ[source]}" if source.endswith("_FILE") else source
    assert settings.database_url_source == named
    assert config.migration_conninfo(settings, "postgresql://ini/db").text == expected


def test_a_url_file_wins_over_the_ini(tmp_path: Path) -> None:
    environ = {"DATABASE_URL_FILE": secret(tmp_path, "url", "postgresql://f/db\n")}
    info = config.migration_conninfo(config.load(environ), "postgresql://ini/db")
    assert info.text == "postgresql://f/db"


@pytest.mark.parametrize("variable", ["DATABASE_URL", "MIGRATION_DATABASE_URL"])
def test_a_variable_and_its_file_both_set_is_one_line_naming_both(
    tmp_path: Path, variable: str
) -> None:
    environ = {variable: "postgresql://a/db", f"{variable}_FILE": secret(tmp_path, "u", "x")}
    with pytest.raises(ConfigError) as caught:
        config.load(environ)
    message = str(caught.value)
    assert message.startswith(f"{variable} and {variable}_FILE are both set; set only one")
    assert "\n" not in message
    assert caught.value.exit_code == 2
    assert config.problems(environ)[f"{variable}_FILE"].args == caught.value.args


def test_both_set_is_refused_even_where_the_other_url_wins(tmp_path: Path) -> None:
    # MIGRATION_DATABASE_URL wins for migrating, but the app reads DATABASE_URL(_FILE): which?
    environ = {
        "MIGRATION_DATABASE_URL": "postgresql://direct/db",
        "DATABASE_URL": "postgresql://a/db",
        "DATABASE_URL_FILE": secret(tmp_path, "u", "postgresql://b/db"),
    }
    with pytest.raises(ConfigError, match="DATABASE_URL and DATABASE_URL_FILE are both set"):
        config.load(environ)


CONTENT = "Zq9s3cr3t"  # a fragment of what the file holds: never in a message


def fifo(folder: Path) -> str:
    os.mkfifo(folder / "fifo")  # opened without O_NONBLOCK, reading it would wait forever
    return str(folder / "fifo")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: str(d / "missing"), "No such file or directory"),
        (lambda d: str(d), "a directory"),
        (lambda d: secret(d, "empty", ""), "empty"),
        (lambda d: secret(d, "blank", " \n\n"), "empty"),
        (lambda d: secret(d, "latin1", f"password={CONTENT}\xe9".encode("latin-1")), "UTF-8"),
        (lambda d: secret(d, "big", f"password={CONTENT} " * 10_000), "larger than 64 KiB"),
        (lambda d: "/dev/zero", "not a regular file"),  # endless: must neither hang nor fill
        (fifo, "not a regular file"),
    ],
    ids=["missing", "directory", "empty", "blank", "not UTF-8", "too big", "device", "FIFO"],
)
def test_an_unusable_file_names_the_variable_and_the_path_never_the_content(
    tmp_path: Path, make: Callable[[Path], str], reason: str
) -> None:
    path = make(tmp_path)
    for variable in ("DATABASE_URL_FILE", "MIGRATION_DATABASE_URL_FILE"):
        with pytest.raises(ConfigError) as caught:
            config.load({variable: path})
        message = str(caught.value)
        assert message.startswith(f"{variable}: {path!r} is invalid; expected "), message
        assert reason in message
        assert "\n" not in message and CONTENT not in message
        assert str(config.problems({variable: path})[variable]) == message


def test_a_bad_url_in_a_file_is_named_by_the_file_and_masked(tmp_path: Path) -> None:
    path = secret(tmp_path, "url", f"mysql://app:{CONTENT}@db/app\n")
    found = config.problems({"DATABASE_URL_FILE": path})["DATABASE_URL_FILE"]
    assert str(found).startswith(f"DATABASE_URL_FILE={path}: 'mysql://app:***@db/app' is invalid")
    assert CONTENT not in str(found)
    with pytest.raises(ConfigError) as caught:
        config.migration_conninfo(config.load({"DATABASE_URL_FILE": path}), None)
    assert str(caught.value) == str(found)


def test_the_file_is_read_only_for_the_url_in_use(tmp_path: Path) -> None:
    # DATABASE_URL_FILE names a file this container cannot read, but MIGRATION_DATABASE_URL
    # wins: as for DATABASE_URL itself, the losing URL is the app's business.
    environ = {
        "MIGRATION_DATABASE_URL": "postgresql://direct/db",
        "DATABASE_URL_FILE": str(tmp_path / "missing"),
    }
    assert config.load(environ).database_url == "postgresql://direct/db"
    assert config.problems(environ) == {}
