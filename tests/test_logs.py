"""The log vocabulary: the lines operators and tests grep for, exactly; and no password in them,
nor in what a project's env.py prints while it runs, without mangling what merely contains one."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from psycopg.conninfo import make_conninfo
from sqlalchemy.engine import make_url

from prosaas_migrate import config, conninfo, logs
from tests.leaks import MARKER, PASSWORDS, SHORT_PASSWORDS


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    assert captured.out == ""  # logs never touch stdout: it belongs to the service
    return captured.err.splitlines()


def test_the_design_notes_lines_are_printed_exactly(capsys: pytest.CaptureFixture[str]) -> None:
    logs.checkpoint("RUN_MIGRATIONS", "1")
    logs.statement_timeout_set("120s")
    logs.lock_timeout(30)
    logs.disabled("RUN_MIGRATIONS", "0")
    got = lines(capsys)
    for expected in [
        "🔧 MIGRATION CHECKPOINT: Starting apply_migrations()",
        "✅ Set statement_timeout to 120s for migration connection",
        "⚠️ MIGRATION CHECKPOINT: Could not acquire lock in time -> skipping migrations",
        "   Waited 30s but another process is running migrations",
        "   This is SAFE - migrations will run in another container",
        "🚫 MIGRATIONS_DISABLED: RUN_MIGRATIONS is not set to '1'",
        "   Migrations are disabled for this service",
    ]:
        assert expected in got


def test_lock_lines_start_with_the_markers(capsys: pytest.CaptureFixture[str]) -> None:
    logs.lock_acquired(42, 0.5)
    logs.lock_released(42)
    got = lines(capsys)
    assert got[0].startswith("✅ Acquired migration lock")
    assert got[1].startswith("✅ Released migration lock")


def test_every_event_is_one_line_per_detail(capsys: pytest.CaptureFixture[str]) -> None:
    logs.waiting(42, 5, None)
    logs.applying("abc", "add leads")
    logs.ran("abc", None)
    logs.migration_failed("def", "ValueError: boom", rolled_back=["abc", "def"])
    logs.exec_service(["gunicorn", "app:app"])
    assert lines(capsys) == [
        "⏳ Waiting for migration lock 42 (5s so far); held by no holder visible "
        "(it may have just released)",
        "🔧 Applying revision abc (add leads)",
        "☑️ Ran revision abc: not committed yet",
        "❌ MIGRATION FAILED in revision def: ValueError: boom",
        "   Rolled back: abc, def (nothing of them is in the database)",
        "   The service is not started",
        "🚀 Starting service: gunicorn app:app",
    ]


def test_a_hidden_secret_never_reaches_a_line_or_a_field(
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = 'p"\\ä@ss'  # quotes, a backslash and an accent: JSON would escape each
    logs.hide([secret])
    try:
        for log_format in ("text", "json"):
            logs.configure(log_format)
            logs.error(f"could not parse postgresql://u:{secret}@h/db")
            logs.connect_retry(f"postgresql://u:{secret}@h", 1, f"no: {secret}", 3)
    finally:
        logs.configure("text")
        logs._secrets = ()
    err = capsys.readouterr().err
    assert 'p"' not in err and secret not in err and "ss@h" not in err.replace("***@h", "")
    assert err.count("***") == 9  # 3 text, 6 JSON (message and fields)


# -- Masking: every form of a password, and nothing that merely contains it --------------------

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@contextmanager
def hiding(password: str, log_format: str = "text") -> Iterator[conninfo.ConnInfo]:
    """Log as `run` does once it has read a URL with `password` in it."""
    url = f"postgresql://app:{quote(password, safe='')}@127.0.0.1:5432/appdb?sslmode=disable"
    info = conninfo.parse("DATABASE_URL", url)
    logs.configure(log_format)
    logs.hide(info.secrets)
    try:
        yield info
    finally:
        logs.configure("text")
        logs._secrets = ()


def careless_prints(info: conninfo.ConnInfo) -> list[str]:
    """What an env.py (or a library it calls) may print about the database it was given."""
    password = info.params["password"]
    ours = conninfo.sqlalchemy_url(info)
    url = make_url(ours)
    return [
        f"env.py using {ours}",
        f"ini {ours.replace('%', '%%')}",
        f"rendered {url.render_as_string(hide_password=False)}",
        f"password {password}",
        f"repr {url.password!r} {info.params!r} {info.params!a}",
        f"json {json.dumps(info.params)} {json.dumps(info.params, ensure_ascii=False)}",
        f"libpq {make_conninfo('', **info.params)}",
        f"environ {info.text}",
    ]


@FUZZ
@given(
    password=PASSWORDS,
    log_format=st.sampled_from(["text", "json"]),
    cuts=st.lists(st.integers(1, 9), max_size=40),
)
def test_nothing_env_py_prints_shows_the_password(
    capsys: pytest.CaptureFixture[str], password: str, log_format: str, cuts: list[int]
) -> None:
    """Written to either stream in pieces of any size (a secret may be split across writes, or
    over several lines when it holds a line break), through print, write and logging."""
    capsys.readouterr()
    with hiding(password, log_format) as info:
        text = "".join(line + "\n" for line in careless_prints(info))
        with logs.foreign_output_as_events("env.py"):
            handler = logging.StreamHandler()  # bound to sys.stderr as it is now: ours
            logger = logging.getLogger("careless")
            logger.addHandler(handler)
            try:
                logger.warning("connecting to %s", info.text)
            finally:
                logger.removeHandler(handler)
            for stream in (sys.stdout, sys.stderr):
                position = 0
                for cut in [*cuts, len(text)]:
                    stream.write(text[position : position + cut])
                    position += cut
            print(careless_prints(info)[-1], end="")  # unfinished: flushed when env.py is done
    out, err = capsys.readouterr()
    assert out == ""  # stdout belongs to the service (or to status --json's document)
    assert MARKER not in err, err
    assert err.count("postgresql+psycopg://app:***@127.0.0.1:5432/appdb") >= 6, err


@FUZZ
@given(password=SHORT_PASSWORDS, key=st.integers(-(2**63), 2**63 - 1))
def test_a_short_password_mangles_nothing_that_merely_contains_it(
    capsys: pytest.CaptureFixture[str], password: str, key: int
) -> None:
    assume(password not in (str(key), str(-key)))
    # Tokens in which the password is a part of a longer word, never the whole: left alone.
    unrelated = [
        str(key),
        str(config.DEFAULT_LOCK_KEY),
        "postgresql://",
        "postgres://",
        "postgresql+psycopg://",
        f"{password}_admin",
        f"app_{password}",
        f"{password}x",
        f"x{password}",
        f"{password}2024",
    ]
    capsys.readouterr()
    for log_format in ("text", "json"):
        with hiding(password, log_format):
            logs.lock_acquired(key, 0.5)
            logs.waiting(config.DEFAULT_LOCK_KEY, 5, None)
            logs.error(f"seen: {' '.join(unrelated)}; the password itself: ({password})")
        err = capsys.readouterr().err
        for token in unrelated:
            assert token in err, (token, err)
        assert f"({password})" not in err
        assert "(***)" in err


@pytest.mark.parametrize(
    ("password", "line", "shown"),
    [
        # e: a lock key or a scheme merely holds the password: both stay as they are.
        ("7", '"key": "7214607257041625889"', '"key": "7214607257041625889"'),
        ("7", "attempt 7 of 10", "attempt *** of 10"),
        ("postgres", "postgresql://postgres:x@h", "postgresql://***:x@h"),  # the user IS it
        ("postgres", "postgres://h postgres_admin", "postgres://h postgres_admin"),
        ("postgresql", "postgresql+psycopg://h", "postgresql+psycopg://h"),
        # An edge that is punctuation bounds the password by itself: masked, whatever touches it.
        ("!ab", "x!ab y", "x*** y"),
        ("ab!", "ab!y", "***y"),
        ("ab!", "cab!y", "cab!y"),  # 'cab!' is another word: its letters run on past the edge
        ("-1", "key -1234", "key -1234"),
        ("-1", "key -1,", "key ***,"),
        # After a percent-escape a new token starts: `%3D` is an encoded '='.
        ("Zq9", "user%3DZq9@h x3DZq9", "user%3D***@h x3DZq9"),
    ],
)
def test_a_secret_is_masked_where_it_stands_alone(password: str, line: str, shown: str) -> None:
    assert conninfo.scrub(line, [password]) == shown


def test_env_py_output_in_text_mode_passes_through_masked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = sys.stdout, sys.stderr
    with hiding("Zq9secret"):
        with logs.foreign_output_as_events("env.py"):
            print("using postgresql://app:Zq9secret@h/db")
            print()  # a blank line is kept in text mode
            sys.stderr.write("INFO  [alembic] Zq9")
            sys.stderr.write("secret\nunfinished Zq9secret")
            with logs.foreign_output_as_events("env.py"):  # nested: the outer one holds
                print("inner Zq9secret")
        print("after: stdout is the service's again")
    assert (sys.stdout, sys.stderr) == before
    out, err = capsys.readouterr()
    assert out == "after: stdout is the service's again\n"
    assert err.splitlines() == [
        "using postgresql://app:***@h/db",
        "",
        "INFO  [alembic] ***",
        "inner ***",
        "unfinished ***",
    ]


def test_env_py_output_in_json_mode_is_output_events(capsys: pytest.CaptureFixture[str]) -> None:
    with hiding("Zq9secret", "json"), logs.foreign_output_as_events("env.py"):
        print("using Zq9secret")
        print()
        print("to stderr", file=sys.stderr)
    out, err = capsys.readouterr()
    assert out == ""
    records = [json.loads(line) for line in err.splitlines()]
    assert [(r["event"], r["message"], r["source"], r["stream"]) for r in records] == [
        ("output", "using ***", "env.py", "stdout"),
        ("output", "to stderr", "env.py", "stderr"),
    ]
