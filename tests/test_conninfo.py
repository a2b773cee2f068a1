"""Every connection-string form libpq accepts works, and its password never reaches an output.

The forms are generated from libpq's grammar (URL userinfo, `?password=` with a plain or a
percent-encoded key, `sslpassword`, keyword strings with quoting and escapes, several hosts),
encoded every way a person or a library writes them and also not encoded at all; libpq itself
(`conninfo_to_dict`) says what each one means. Then every reading the tool gives (the display,
`redact`, a refusal) and every rendering other code may print (SQLAlchemy's, psycopg's, repr,
JSON, the text as written) is checked for the password.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy import create_engine
from sqlalchemy.engine import URL, make_url

from prosaas_migrate import conninfo
from prosaas_migrate.errors import ConfigError
from tests import project
from tests.conftest import cli, version
from tests.leaks import MARKER, PASSWORDS, encodings, shows
from tests.pgcluster import free_port

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


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
        f"postgresql://app@{host}:{port}/{db}?sslpassword={encoded}&password={encoded}",
        f"host={host} port={port} user=app sslpassword={keyword_value(password)} "
        f"password={keyword_value(password)} dbname={db}",
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
            assert MARKER not in shown, shown
            assert not any(shows(shown, secret) for secret in info.secrets), shown
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
            assert MARKER not in message, message
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


# -- Generated from libpq's grammar, written well and badly -----------------------------------


@st.composite
def written(draw: st.DrawFn, password: str, needed: str) -> str:
    """`password` as someone might put it in a URL: encoded fully, as SQLAlchemy does, only
    where libpq needs it, at random, in lower-case hex, or not at all (a common mistake)."""
    style = draw(st.sampled_from(["all", "sqlalchemy", "needed", "some", "lower", "none", "bad"]))
    if style == "bad":  # not encoded, with at least one character that libpq reads otherwise
        at = draw(st.integers(len(MARKER), len(password)))
        return password[:at] + draw(st.sampled_from("@/?&=%:# ")) + password[at:]
    if style == "all":
        return quote(password, safe="")
    if style == "sqlalchemy":
        return quote(password, safe=" +")
    if style == "lower":
        return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), quote(password, safe=""))
    if style == "none":
        return password
    out = []
    for char in password:
        must = char in needed or char.isspace()
        encode = must or (style == "some" and draw(st.booleans()))
        out.append(quote(char, safe="") if encode else char)
    return "".join(out)


@st.composite
def urls(draw: st.DrawFn) -> tuple[str, str]:
    """(a URL, the password its writer meant) over libpq's URI grammar."""
    password = draw(PASSWORDS)
    scheme = draw(st.sampled_from(["postgresql", "postgres", "postgresql+psycopg"]))
    user = draw(st.sampled_from(["app", "", "postgres", "us%40er", "a.b-c"]))
    hosts = draw(
        st.lists(
            st.sampled_from(["127.0.0.1", "db", "[::1]", "db.internal:5433", "h:5432", "%2Ftmp"]),
            max_size=3,
        )
    )
    path = draw(st.sampled_from(["", "/", "/app", "/my%20db"]))
    query = draw(
        st.lists(
            st.sampled_from(
                ["sslmode=disable", "application_name=svc", "connect_timeout=5", "user=other"]
            ),
            max_size=3,
        )
    )
    place = draw(st.sampled_from(["userinfo", "password", "pass%77ord", "sslpassword", "both"]))
    userinfo = f"{user}@" if user else ""
    if place in ("userinfo", "both"):
        userinfo = f"{user}:{draw(written(password, '%@/'))}@"
    if place != "userinfo":
        key = "sslpassword" if place == "both" else place
        position = draw(st.integers(0, len(query)))
        query.insert(position, f"{key}={draw(written(password, '%&='))}")
    text = f"{scheme}://{userinfo}{','.join(hosts)}{path}"
    return (f"{text}?{'&'.join(query)}" if query else text), password


@st.composite
def keyword_strings(draw: st.DrawFn) -> tuple[str, str]:
    """(a keyword string, the password its writer meant) over libpq's conninfo grammar."""
    password = draw(PASSWORDS)
    style = draw(st.sampled_from(["quoted", "escaped", "raw"]))
    if style == "quoted":
        value = keyword_value(password)
    elif style == "escaped":  # unquoted, every blank, quote and backslash escaped
        value = re.sub(r"([\\' \t\n\r\v\f])", r"\\\1", password)
    else:
        value = password
    blank = draw(st.sampled_from(["", " ", "\t", " \n "]))
    key = draw(st.sampled_from(["password", "sslpassword"]))
    others = draw(
        st.lists(
            st.sampled_from(
                [
                    "host=127.0.0.1,db port=5432,5433",
                    "user=app",
                    "dbname='my db'",
                    "sslmode=disable",
                ]
            ),
            unique=True,
        )
    )
    others.insert(draw(st.integers(0, len(others))), f"{key}{blank}={blank}{value}")
    # A missing blank glues two pairs into one value (`user=apppassword=...`).
    return draw(st.sampled_from([" ", "\n", ""])).join(others), password


CONNECTION_STRINGS = st.one_of(urls(), keyword_strings())


def password_values(params: dict[str, str]) -> list[str]:
    return [value for key, value in params.items() if "password" in key and value]


@FUZZ
@given(case=CONNECTION_STRINGS)
def test_no_reading_of_any_string_shows_its_password(case: tuple[str, str]) -> None:
    text, password = case
    outputs = [conninfo.redact(text)]
    try:
        info = conninfo.parse("DATABASE_URL", text)
    except ConfigError as exc:
        outputs.append(str(exc))
    else:
        outputs.append(info.display)
        after_scheme = info.display.partition("://")[2]  # a scheme is no secret, whatever it is
        assert not any(shows(after_scheme, secret) for secret in info.secrets), info.display
        if password in password_values(info.params):  # libpq reads it as meant
            assert set(encodings(password)) <= set(info.secrets)
    for shown in outputs:
        assert MARKER not in shown, (text, shown)


@FUZZ
@given(case=CONNECTION_STRINGS)
def test_every_rendering_of_an_accepted_password_is_masked(case: tuple[str, str]) -> None:
    """What other code may print (SQLAlchemy's URL, psycopg's conninfo, repr, JSON, the string
    as written) holds the password only in forms `secrets` knows."""
    text, _ = case
    try:
        info = conninfo.parse("DATABASE_URL", text)
    except ConfigError:
        return
    ours = conninfo.sqlalchemy_url(info)
    renderings = [text, info.text, ours, ours.replace("%", "%%"), repr(info.params)]
    renderings += [json.dumps(info.params), json.dumps(info.params, ensure_ascii=False)]
    renderings += [ascii(info.params), make_conninfo("", **info.params), str(make_url(ours).query)]
    for key, value in info.params.items():
        if "password" not in key:
            continue
        by_sqlalchemy = [
            URL.create("postgresql+psycopg", username="app", password=value, host="h"),
            URL.create("postgresql+psycopg", host="h", query={key: value}),
        ]
        renderings += [url.render_as_string(hide_password=False) for url in by_sqlalchemy]
        renderings += [f"{key}={value}", f"{key}: {value!r}", f'"{key}": {json.dumps(value)}']
    for rendering in renderings:
        masked = conninfo.scrub(rendering, info.secrets)
        assert MARKER not in masked, (rendering, masked)
        assert not any(shows(masked, value) for value in password_values(info.params)), masked


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # a: an unencoded '/' then '?' in the password: libpq cannot read it; mask to the last '@'.
        ("postgresql://u:Zq9/a?x@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql://u:Zq9/a?x=1@h/db?sslmode=disable",
            "postgresql://u:***@h/db?sslmode=disable",
        ),
        ("postgresql://u:1234/a?application_name=Zq9@h/db", "postgresql://u:***@h/db"),
        ("mysql://u:Zq9@h/db", "mysql://u:***@h/db"),
        ("postgresql://user:Zq9secret/db", "postgresql://user:***/db"),  # a forgotten '@host'
        # c: sslpassword, and any key naming a password, in URLs and keyword strings.
        ("postgresql://u@h/db?sslpassword=Zq9Key", "postgresql://u@h/db?sslpassword=***"),
        ("postgresql://u@h/db?sslpass%77ord=Zq9Key", "postgresql://u@h/db?sslpass%77ord=***"),
        ("host=h sslpassword=Zq9Key", "host=h sslpassword=***"),
        # d: an unencoded '&' in a ?password=: libpq cannot read it; nothing after the key shows.
        ("postgresql://u@h/db?password=Zq9&ret", "postgresql://u@h/db?password=***"),
        ("postgresql://h/db?password=Zq9:x@y", "postgresql://h/db?password=***"),
        ("postgresql://u@h/db?a=1&passwd=Zq9&b", "postgresql://u@h/db?a=1&passwd=***"),
        ("postgresql://?password=Zq9@", "postgresql://?password=***"),  # read as user info
        (
            "host=h user=apppassword=Zq9",
            "(27 characters of a keyword string with a password in another value)",
        ),
        # e: exact and no wider where libpq reads it: only the password is masked.
        ("postgresql://postgres:Zq9@h:5432/postgres", "postgresql://postgres:***@h:5432/postgres"),
        ("postgresql://u:Zq9?x@h/db", "postgresql://u:***@h/db"),  # '?' is fine in user info
        # A password that is also the user's name is masked there too: it is the password.
        ("postgresql://Zq9:Zq9@h/db", "postgresql://***:***@h/db"),
        ("host=h user=Zq9 password=Zq9", "user=*** password=*** host=h"),
    ],
)
def test_the_reviewed_leaks_are_closed(text: str, shown: str) -> None:
    assert conninfo.redact(text) == shown
    try:
        info = conninfo.parse("DATABASE_URL", text)
    except ConfigError as exc:
        assert MARKER not in str(exc), str(exc)
    else:
        assert info.display == shown.replace("mysql", "postgresql", 1)


def test_secrets_hold_every_password_like_value_in_the_forms_sqlalchemy_writes() -> None:
    info = conninfo.parse(
        "DATABASE_URL", "postgresql://app:p%40ss%20w0rd%21@h/db?sslpassword=k%26ey+1"
    )
    assert {"p@ss w0rd!", "p%40ss w0rd%21", "p%40ss%20w0rd%21", "p%40ss+w0rd%21"} <= set(
        info.secrets
    )
    assert {"k&ey+1", "k%26ey%2B1", "k%26ey+1"} <= set(info.secrets)
    # SQLAlchemy renders them so: the forms are the real ones, not guesses.
    rendered = make_url(conninfo.sqlalchemy_url(info)).render_as_string(hide_password=False)
    assert "p%40ss w0rd%21" in rendered
    assert conninfo.scrub(rendered, info.secrets).count("***") == 2


def test_a_refusal_never_quotes_a_fragment_of_the_string() -> None:
    # libpq quotes the fragment it choked on; it may hold quotes, or be a password's tail.
    texts = ["host=h password=Zq9a Zq9b=c"]
    if psycopg.pq.version() >= 170000:  # an older libpq (psycopg-binary 3.1) takes URL blanks
        texts.append('postgresql://u:Zq9"a b"c@h/db')
    for text in texts:
        with pytest.raises(ConfigError) as caught:
            conninfo.parse("DATABASE_URL", text)
        assert MARKER not in str(caught.value), str(caught.value)


# -- Through the real command ------------------------------------------------------------------

LOUD_ENV = textwrap.dedent(
    """\
    import json
    import os
    import sys

    from alembic import context
    from psycopg.conninfo import make_conninfo

    config = context.config
    connection = config.attributes["connection"]
    url = config.get_main_option("sqlalchemy.url")
    engine_url = connection.engine.url
    password = engine_url.password or engine_url.query.get("password")
    # Everything a careless env.py might print, on both streams, some of it in pieces.
    print(f"env.py using {url}")
    print(f"env.py stderr {engine_url.render_as_string(hide_password=False)}", file=sys.stderr)
    print("environ", os.environ.get("DATABASE_URL"), file=sys.stderr)
    print("password:", password)
    print(repr(password), json.dumps({"password": password}), make_conninfo("", password=password))
    sys.stdout.write(url[:12])
    sys.stdout.write(url[12:] + "\\n")
    sys.stderr.write(f"unfinished {url}")
    context.configure(connection=connection, target_metadata=None, version_table="alembic_version")
    with context.begin_transaction():
        context.run_migrations()
    """
)


# Xk7 marks the end: a password's first line masked but not its second would show it.
@pytest.mark.parametrize("password", ["Zq9 s3cr3t'\"@/?&=%\\ä+!Xk7", "Zq9\nXk7"])
def test_what_env_py_prints_is_masked_and_never_reaches_stdout(
    app: Path, db_url: str, password: str
) -> None:
    # version_table= in env.py makes run and status both ask env.py (no fast path).
    (app / "migrations" / "env.py").write_text(LOUD_ENV)
    text = db_url.replace(
        "postgresql://postgres@", f"postgresql://postgres:{quote(password, safe='')}@"
    )
    seen = []
    for log_format in ("text", "json"):
        env = {"RUN_MIGRATIONS": "1", "DATABASE_URL": text, "MIGRATION_LOG_FORMAT": log_format}
        result = cli(["run", "--", "true"], env, app)
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""  # env.py's prints went to stderr, not to the service's stdout
        seen += [result.stdout, result.stderr]
        if log_format == "text":
            assert "env.py using postgresql+psycopg://postgres:***@" in result.stderr
            assert "environ postgresql://postgres:***@" in result.stderr
            assert "unfinished postgresql+psycopg://postgres:***@" in result.stderr
        else:
            records = [json.loads(line) for line in result.stderr.splitlines()]
            output = [r for r in records if r["event"] == "output"]
            assert {r["stream"] for r in output} == {"stdout", "stderr"}
            assert any("env.py using postgresql+psycopg://" in r["message"] for r in output)
    assert version(db_url) == ["r002"]
    for args in (["status"], ["status", "--json"]):
        result = cli(args, {"DATABASE_URL": text}, app)
        assert result.returncode == 0, result.stderr
        assert "env.py using postgresql+psycopg://postgres:***@" in result.stderr
        seen += [result.stdout, result.stderr]
    report = json.loads(seen[-2])  # env.py's prints did not break the document
    assert report["revisions"]["at_head"] is True
    everything = "\n".join(seen)
    assert MARKER not in everything
    assert "s3cr3t" not in everything and "Xk7" not in everything


@pytest.mark.parametrize(
    "tail",
    [
        "u:Zq9/a?x@{host}/{db}",  # a
        "postgres@{host}/{db}?sslmode=disable&sslpassword=Zq9Key",  # c
        "postgres@{host}/{db}?password=Sec&Zq9ret",  # d: the tail after an unencoded '&'
    ],
)
def test_run_and_status_never_print_a_reviewed_leak(app: Path, db_url: str, tail: str) -> None:
    host, db = db_url.removeprefix("postgresql://postgres@").split("/")
    text = "postgresql://" + tail.format(host=host, db=db)
    for log_format in ("text", "json"):
        env = {"RUN_MIGRATIONS": "1", "DATABASE_URL": text, "MIGRATION_LOG_FORMAT": log_format}
        env["MIGRATION_LOCK_WAIT_SECONDS"] = "0"
        result = cli(["run", "--", "true"], env, app)
        assert result.returncode in (0, 2), result.stderr
        assert MARKER not in result.stdout + result.stderr, result.stderr
    for args in (["status"], ["status", "--json"]):
        result = cli(args, {"DATABASE_URL": text}, app)
        assert MARKER not in result.stdout + result.stderr, result.stdout


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://h/db?sslmode=foo",
        "postgresql://h/db?target_session_attrs=bogus",
        "host=h dbname=db gssencmode=maybe",
    ],
)
def test_a_typo_in_an_enumerated_option_is_refused_at_once(text: str) -> None:
    # libpq would only say so when connecting: after the whole wait budget of retries.
    with pytest.raises(ConfigError, match="must be one of"):
        conninfo.parse("DATABASE_URL", text)
