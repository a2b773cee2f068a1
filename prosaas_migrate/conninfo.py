"""Connection strings as libpq reads them: validate, normalise for SQLAlchemy, mask the password.

Everything libpq accepts is accepted: `postgresql://` and `postgres://` URLs (multi-host,
`?password=` and other parameters included), `postgresql+psycopg://` (SQLAlchemy's spelling), and
libpq keyword strings (`host=db user=app password=... dbname=app`). libpq itself is the judge
(psycopg's `conninfo_to_dict`); a few things it only notices when connecting (a port that is no
number) are checked here too, so a typo is a configuration error, not minutes of retries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from prosaas_migrate.errors import ConfigError

URL_SCHEMES = ("postgres", "postgresql", "postgresql+psycopg")
GRAMMAR = (
    "a postgresql://user:password@host:port/dbname URL (postgres:// and postgresql+psycopg:// "
    "also accepted, multi-host and ?param= forms included) or a libpq keyword string "
    "(host=... dbname=...)"
)
MASK = "***"


@dataclass(frozen=True)
class ConnInfo:
    """A connection string libpq accepts, with what it means and how to show it."""

    text: str  # what psycopg.connect takes: a postgresql:// URL or the keyword string as given
    params: dict[str, str]  # libpq's own reading of it
    display: str  # safe to log: the password masked

    @property
    def secrets(self) -> tuple[str, ...]:
        """Forms of the password that may turn up in free text (error messages)."""
        password = self.params.get("password")
        if not password:
            return ()
        return tuple(dict.fromkeys([password, quote(password, safe=""), quote(password)]))


def parse(variable: str, value: str) -> ConnInfo:
    """Read `value` as libpq would; ConfigError naming `variable` (password masked) if it can't."""
    text = value.strip()
    scheme, sep, rest = split_scheme(text)
    if sep:
        if scheme.lower() not in URL_SCHEMES:
            raise ConfigError(variable, redact(text), GRAMMAR)
        text = f"postgresql://{rest}"
    elif "=" not in text:
        raise ConfigError(variable, redact(text), GRAMMAR)
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = {k: str(v) for k, v in conninfo_to_dict(text).items()}
    except ProgrammingError as exc:
        raise ConfigError(
            variable, redact(text), f"{GRAMMAR} ({_scrub_parse_error(exc)})"
        ) from None
    problem = _connect_time_problem(params)
    if problem:
        raise ConfigError(variable, redact(text), f"{GRAMMAR} ({problem})")
    return ConnInfo(text, params, _display(text, params))


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def split_scheme(text: str) -> tuple[str, str, str]:
    """(scheme, "://", rest) for a URL; ("", "", text) for anything else.

    As libpq decides: only a string that starts with a scheme is a URL; a keyword string may
    hold "://" inside a value (a password, say) and is still a keyword string.
    """
    scheme, sep, rest = text.partition("://")
    if sep and _SCHEME.fullmatch(scheme):
        return scheme, sep, rest
    return "", "", text


def _connect_time_problem(params: dict[str, str]) -> str | None:
    """What libpq would only say when connecting, which a config check can say at once."""
    hosts = params.get("host", "").split(",")
    ports = params.get("port", "").split(",")
    for port in ports:
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            return "a port must be a number from 1 to 65535"
    if len(ports) > 1 and len(ports) != len(hosts):
        return f"{len(ports)} ports for {len(hosts)} hosts"
    for host in hosts:
        # A host name never holds these; seeing one means a password with an unencoded @ or /.
        if not host.startswith("/") and ("@" in host or "/" in host):
            return "a host name holds '@' or '/': percent-encode them in the password"
    return None


def _scrub_parse_error(exc: Exception) -> str:
    """libpq's parse error without the fragment it quotes, which may be part of a password."""
    message = " ".join(str(exc).split())
    if message.startswith("invalid connection option"):
        return message  # it quotes an option name, never a value
    return re.sub(r'"[^"]*"', '"…"', message)


def _display(text: str, params: dict[str, str]) -> str:
    if text.startswith("postgresql://"):
        return redact(text)
    from psycopg.conninfo import make_conninfo

    shown = {k: (MASK if k == "password" else v) for k, v in params.items()}
    return make_conninfo("", **shown)


def redact(text: str) -> str:
    """`text` with any password masked, whatever its shape; never raises. Safe to log."""
    scheme, sep, rest = split_scheme(text)
    if not sep:
        if "=" not in text:
            # Neither a URL nor a keyword string: it could be anything, a password included.
            return f"({len(text)} characters, neither a URL nor key=value; not shown)"
        return _redact_keyword_string(text)
    return f"{scheme}://{_redact_url_rest(rest)}"


def _redact_keyword_string(text: str) -> str:
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(text)
    except ProgrammingError:
        # Unreadable: where a value starts or ends is unknown, so any part could be the password.
        return f"({len(text)} characters of a keyword string libpq cannot read; not shown)"
    return make_conninfo("", **{k: (MASK if k == "password" else v) for k, v in params.items()})


def _redact_url_rest(rest: str) -> str:
    # libpq ends the user:password part at the first '@' before a '/'; a password holding an
    # unencoded '@' would leave its tail in the host part, so mask up to the last '@' there.
    authority_end = _first_of(rest, "/")
    at = rest.rfind("@", 0, authority_end)
    if at < 0 and "@" in rest[authority_end:]:
        # "u:pa/ss@h": a '/' inside the password; mask up to that later '@' (over-mask, not leak).
        query_at = _first_of(rest, "?")
        at = rest.rfind("@", 0, query_at)
    if at >= 0:
        user, colon, _password = rest[:at].partition(":")
        userinfo = f"{user}:{MASK}" if colon else user
        rest = f"{userinfo}{rest[at:]}"
    base, question, query = rest.partition("?")
    if not question:
        return rest
    pairs = []
    for pair in query.split("&"):
        key, equals, _value = pair.partition("=")
        pairs.append(f"{key}={MASK}" if equals and _is_password_key(key) else pair)
    return f"{base}?{'&'.join(pairs)}"


def _is_password_key(key: str) -> bool:
    try:
        return unquote(key, errors="strict").strip().lower() == "password"
    except UnicodeDecodeError:
        return True  # undecodable: do not bet a secret on it


def _first_of(text: str, char: str) -> int:
    index = text.find(char)
    return len(text) if index < 0 else index


def sqlalchemy_url(info: ConnInfo) -> str:
    """A postgresql+psycopg:// URL that makes SQLAlchemy connect with exactly `info.params`."""
    from sqlalchemy.engine import URL

    params = dict(info.params)
    host, port = params.get("host", ""), params.get("port", "")
    simple = (
        "," not in host
        and not host.startswith("/")
        and (port == "" or port.isdigit())
        and params.get("user") is not None
    )
    if simple:
        url = URL.create(
            "postgresql+psycopg",
            username=params.pop("user"),
            password=params.pop("password", None),
            host=params.pop("host", None) or None,
            port=int(params.pop("port")) if port else None,
            database=params.pop("dbname", None),
            query=params,
        )
    else:
        url = URL.create("postgresql+psycopg", query=params)  # libpq keywords, passed through
    return url.render_as_string(hide_password=False)


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """`text` with every known secret replaced by the mask."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    return text
