"""Property tests over the configuration parser: no input gives a traceback, and nothing it
accepts is something PostgreSQL (or libpq) would reject."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict

from prosaas_migrate import config, conninfo
from prosaas_migrate.errors import ConfigError
from tests.conftest import Server

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),  # raise it for a deeper search
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Text built from the pieces that matter to each grammar, plus anything at all.
DURATION_TEXT = st.one_of(
    st.text(alphabet="0123456789.usminhdS -+eEx'\t;", max_size=14),
    st.from_regex(r"\A[ \t]?[0-9]{0,11}(\.[0-9]{0,4})?[ \t]?(us|ms|s|min|h|d)?\Z"),
    st.text(max_size=12),
)
NAMES = st.sampled_from([*config.KNOWN_VARIABLES, "MIGRATION_LOCK_WAIT_SECOND", "PATH"])


@pytest.fixture(scope="module")
def pg(server: Server) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        yield conn


@FUZZ
@given(value=DURATION_TEXT)
def test_statement_timeout_accepted_means_accepted_by_postgresql(
    pg: psycopg.Connection[Any], value: str
) -> None:
    try:
        ms = config.parse_duration_ms("MIGRATION_STATEMENT_TIMEOUT", value)
    except ConfigError:
        return
    # What we send is the millisecond count; the server must take it and mean the same.
    row = pg.execute("SELECT set_config('statement_timeout', %s, false)", [str(ms)]).fetchone()
    pg.execute("RESET statement_timeout")
    assert row is not None
    assert config.parse_duration_ms("SHOW", str(row[0])) == ms
    # And the text as written means the same to the server, so the log line does not lie.
    row = pg.execute("SELECT set_config('statement_timeout', %s, false)", [value]).fetchone()
    pg.execute("RESET statement_timeout")
    assert row is not None and config.parse_duration_ms("SHOW", str(row[0])) == ms


@FUZZ
@given(value=st.one_of(st.integers().map(str), st.text(max_size=25)))
def test_lock_key_accepted_means_a_bigint_to_postgresql(
    pg: psycopg.Connection[Any], value: str
) -> None:
    try:
        key = config.parse_lock_key("MIGRATION_LOCK_KEY", value)
    except ConfigError:
        return
    row = pg.execute("SELECT %s::int8", [value.strip()]).fetchone()
    assert row == (key,)


@FUZZ
@given(
    value=st.one_of(
        st.text(max_size=60),
        st.from_regex(r"\A(postgres(ql)?(\+psycopg)?|mysql|driver)://[ -~]{0,40}\Z"),
    )
)
def test_accepted_urls_parse_in_libpq(value: str) -> None:
    try:
        info = conninfo.parse("DATABASE_URL", value)
    except ConfigError as exc:
        assert exc.variable == "DATABASE_URL"
        return
    assert conninfo_to_dict(info.text) == info.params  # libpq's own reading, unchanged


@FUZZ
@given(environ=st.dictionaries(NAMES, st.text(max_size=20), max_size=8))
def test_any_environment_loads_or_names_a_variable(environ: dict[str, str]) -> None:
    try:
        loaded = config.load(environ)
    except ConfigError as exc:
        assert exc.variable in config.KNOWN_VARIABLES
        assert "\n" not in str(exc).replace(repr(exc.value), "")
        return
    assert loaded.lock_wait_seconds >= 0 and loaded.wait_for_head_seconds >= 0
    assert 0 <= loaded.statement_timeout_ms <= 2**31 - 1
    assert loaded.lock_key is None or -(2**63) <= loaded.lock_key < 2**63
    assert loaded.log_format in config.LOG_FORMATS
    # Every bad variable is also reported by problems(), which status relies on.
    assert set(config.problems(environ)) <= set(environ)


@FUZZ
@given(environ=st.dictionaries(NAMES, st.text(max_size=20), max_size=8))
def test_problems_never_raises(environ: dict[str, str]) -> None:
    for variable, error in config.problems(environ).items():
        assert error.variable == variable
