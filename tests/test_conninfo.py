"""Every connection-string form libpq accepts works, and its password never reaches an output.

The forms are generated from libpq's grammar (URL userinfo, `?password=` with a plain or a
percent-encoded key, keyword strings with quoting and escapes, several hosts), and libpq itself
(`conninfo_to_dict`) confirms each one means what the test thinks before the check is made.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from prosaas_migrate import conninfo
from prosaas_migrate.errors import ConfigError
from tests import project
from tests.conftest import cli, version
from tests.pgcluster import free_port

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# A marker no other part of a connection string contains, so "not in the output" means
# exactly "the password is not there".
PASSWORDS = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]),  # libpq's limits
    min_size=1,
    max_size=12,
).map(lambda tail: f"Zq9{tail}")


def keyword_value(text: str) -> str:
    """libpq's quoting of a keyword string value."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def forms(password: str, host: str = "127.0.0.1", port: int = 5432, db: str = "app") -> list[str]:
    encoded = quote(password, safe="")
    return [
        f"postgresql://app:{encoded}@{host}:{port}/{db}",
        f"postgres://app:{encoded}@{host}:{port}/{db}?sslmode=disable",
        f"postgresql+psycopg://app:{encoded}@{host}:{port}/{db}",
        f"postgresql://app@{host}:{port}/{db}?password={encoded}",
        f"postgresql://app@{host}:{port}/{db}?application_name=x&pass%77ord={encoded}",
        f"postgresql://app:{encoded}@{host}:{free_port()},{host}:{port}/{db}"
        "?target_session_attrs=read-write",
        f"host={host} port={port} user=app password={keyword_value(password)} dbname={db}",
        f"host={host},{host} port={free_port()},{port} dbname={db} user=app "
        f"password = {keyword_value(password)}",
    ]


@FUZZ
@given(password=PASSWORDS)
def test_every_form_masks_the_password(password: str) -> None:
    for text in forms(password):
        params = conninfo_to_dict(text.replace("postgresql+psycopg://", "postgresql://"))
        assert params["password"] == password  # libpq reads the form as the test means it
        info = conninfo.parse("DATABASE_URL", text)
        assert info.params["password"] == password
        for shown in (info.display, conninfo.redact(text)):
            assert password not in shown and quote(password, safe="") not in shown, shown
            assert "***" in shown


@FUZZ
@given(password=PASSWORDS, breakage=st.sampled_from([":99999/", ":port/", "%zz", " extra"]))
def test_a_broken_string_is_refused_without_its_password(password: str, breakage: str) -> None:
    for text in forms(password):
        broken = text.replace(":5432/", breakage, 1) if "/" in breakage else text + breakage
        try:
            conninfo.parse("DATABASE_URL", broken)
        except ConfigError as exc:
            assert exc.variable == "DATABASE_URL"
            message = str(exc)
            assert password not in message and quote(password, safe="") not in message, message
            assert "\n" not in message


@FUZZ
@given(password=PASSWORDS)
def test_sqlalchemy_connects_with_exactly_what_libpq_read(password: str) -> None:
    dialect = create_engine("postgresql+psycopg://").dialect
    for text in forms(password):
        info = conninfo.parse("DATABASE_URL", text)
        _, params = dialect.create_connect_args(make_url(conninfo.sqlalchemy_url(info)))
        params.pop("context", None)
        assert {key: str(value) for key, value in params.items()} == info.params


@pytest.mark.parametrize(
    "text",
    [
        "mysql://u:Zq9secret@h/db",
        "driver://user:Zq9secret@localhost/dbname",
        "postgresql://u:Zq9se/cret@h/db",  # an unencoded '/' in the password
        "postgresql://u:Zq9se@cret@h/db",  # an unencoded '@' in the password
        "postgresql://h:5432,h2/db?password=Zq9secret",  # 2 hosts, 1 port: fine; ok below
        "host=h password=Zq9secret word",  # unquoted blank: libpq quotes the tail back
        "Zq9secret",
    ],
)
def test_refusals_never_echo_the_password(text: str) -> None:
    try:
        info = conninfo.parse("DATABASE_URL", text)
    except ConfigError as exc:
        assert "Zq9se" not in str(exc), str(exc)
        return
    assert "Zq9se" not in info.display


@pytest.fixture
def app(tmp_path: Path) -> Path:
    project.create(tmp_path, project.linear(2))
    return tmp_path


@pytest.mark.parametrize("form", range(len(forms("x"))))
def test_run_and_status_work_with_every_form_and_never_print_it(
    app: Path, db_url: str, form: int
) -> None:
    password = "Zq9 s3cr3t'\"@/?&=%\\ä"  # the test cluster trusts, so any password is let in
    base = db_url.rsplit("/", 1)[0].removeprefix("postgresql://postgres@")
    host, port = base.split(":")
    text = forms(password, host, int(port), db_url.rsplit("/", 1)[1])[form].replace(
        "app:", "postgres:", 1
    )
    text = text.replace("user=app", "user=postgres").replace("app@", "postgres@", 1)
    outputs = []
    for log_format in ("text", "json"):
        env = {"RUN_MIGRATIONS": "1", "DATABASE_URL": text, "MIGRATION_LOG_FORMAT": log_format}
        result = cli(["run", "--", "true"], env, app)
        assert result.returncode == 0, result.stderr
        outputs += [result.stdout, result.stderr]
    assert version(db_url) == ["r002"]
    for args in (["status"], ["status", "--json"]):
        result = cli(args, {"DATABASE_URL": text}, app)
        assert result.returncode == 0, result.stderr
        outputs += [result.stdout, result.stderr]
    report = json.loads(outputs[-2])
    assert report["database"]["reachable"] is True
    assert report["revisions"]["at_head"] is True
    everything = "\n".join(outputs)
    for leak in (password, quote(password, safe=""), "s3cr3t"):
        assert leak not in everything


def test_an_unreachable_server_in_any_form_never_prints_the_password(app: Path) -> None:
    password = "Zq9s3cr3t"
    for text in forms(password, port=free_port()):
        env = {"RUN_MIGRATIONS": "1", "DATABASE_URL": text, "MIGRATION_LOCK_WAIT_SECONDS": "0"}
        result = cli(["run", "--", "true"], env, app)
        assert result.returncode == 3, result.stderr
        status = cli(["status", "--json", "--check"], {"DATABASE_URL": text}, app)
        assert status.returncode == 3, status.stderr
        for output in (result.stderr, status.stdout, status.stderr):
            assert password not in output, output
