"""Connection strings as libpq reads them: validate, normalise for SQLAlchemy, mask the password.

Everything libpq accepts is accepted: `postgresql://` and `postgres://` URLs (multi-host,
`?password=` and other parameters included), `postgresql+psycopg://` (SQLAlchemy's spelling), and
libpq keyword strings (`host=db user=app password=... dbname=app`). libpq itself is the judge
(psycopg's `conninfo_to_dict`); a few things it only notices when connecting (a port that is no
number) are checked here too, so a typo is a configuration error, not minutes of retries.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, quote_plus, unquote

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
    variable: str = ""  # where it came from (DATABASE_URL, sqlalchemy.url in ...), for errors

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every form its passwords (password, sslpassword) may take in free text: as written,
        percent-encoded (SQLAlchemy's way too), quoted for a keyword string, a repr or JSON."""
        return _secret_forms(self.text, self.params)


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
    except UnicodeDecodeError:  # psycopg decodes what libpq read: %80 is not UTF-8
        raise ConfigError(
            variable, redact(text), f"{GRAMMAR} (a %-encoded byte that is not UTF-8 text)"
        ) from None
    problem = _connect_time_problem(params)
    if problem:
        raise ConfigError(variable, redact(text), f"{GRAMMAR} ({problem})")
    return ConnInfo(text, params, redact(text), variable)


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
    for key, allowed in _CHOICES.items():
        if key in params and params[key] not in allowed:
            return f"{key} must be one of {', '.join(allowed)}"
    return None


# libpq's enumerated options: a typo here would otherwise cost the whole wait budget in retries.
_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": (
        "any", "read-write", "read-only", "primary", "standby", "prefer-standby",
    ),
    "load_balance_hosts": ("disable", "random"),
}  # fmt: skip


def _scrub_parse_error(exc: Exception) -> str:
    """libpq's parse error without the fragment it quotes, which may be part of a password."""
    message = " ".join(str(exc).split())
    # From the first quote to the last: a fragment may hold quotes of its own, and even an
    # "invalid connection option" may be the tail of a password with an unencoded '&' or blank.
    return re.sub(r'".*"', '"…"', message)


def redact(text: str) -> str:
    """`text` with any password masked, whatever its shape; never raises. Safe to log.

    A string libpq reads is masked exactly where libpq finds its passwords; anything else (or a
    string whose exact masking would still show one) is masked conservatively, hiding more than
    needed rather than a byte of a password.
    """
    scheme, sep, rest = split_scheme(text)
    if not sep:
        if "=" not in text:
            # Neither a URL nor a keyword string: it could be anything, a password included.
            return f"({len(text)} characters, neither a URL nor key=value; not shown)"
        return _redact_keyword_string(text)
    return f"{scheme}://{_redact_url_rest(scheme, rest)}"


def _libpq_reading(text: str) -> dict[str, str] | None:
    """libpq's parameters for `text`, or None when libpq cannot read it."""
    from psycopg import Error
    from psycopg.conninfo import conninfo_to_dict

    try:
        return {k: str(v) for k, v in conninfo_to_dict(text).items()}
    except (Error, ValueError):  # ValueError: a NUL or a lone surrogate, which libpq never sees
        return None


def _redact_keyword_string(text: str) -> str:
    from psycopg.conninfo import make_conninfo

    params = _libpq_reading(text)
    if params is None:
        # Unreadable: where a value starts or ends is unknown, so any part could be the password.
        return f"({len(text)} characters of a keyword string libpq cannot read; not shown)"
    if _smuggled(params):
        return f"({len(text)} characters of a keyword string with a password in another value)"
    shown = make_conninfo(
        "", **{k: (MASK if _is_password_key(k) else v) for k, v in params.items()}
    )
    # Another value equal to a password (user=app password=app) would still show it.
    return scrub(shown, _secret_forms(text, params))


def _redact_url_rest(scheme: str, rest: str) -> str:
    text = f"postgresql://{rest}"
    params = _libpq_reading(text) if scheme.lower() in URL_SCHEMES else None
    if params is None:
        return _mask_url_conservatively(rest)
    forms = _secret_forms(text, params)
    shown = _mask_url_exactly(rest)
    # The safety net: exact masking that leaves a password in sight is not good enough.
    if _suspicious(rest, params) or scrub(shown, forms) != shown:
        shown = _mask_url_conservatively(rest)
    # A user name that is the password too (postgres:postgres@) is the password: masked.
    return scrub(shown, forms)


def _suspicious(rest: str, params: dict[str, str]) -> bool:
    """True when libpq reads `rest` but probably not as its writer meant (a password's tail)."""
    return (
        _connect_time_problem(params) is not None
        or bool(_smuggled(params))
        # An '@' past the user info: most likely one more in a password with an unencoded '/'.
        or "@" in rest[_user_info_end(rest) :]
    )


_PASSWORD_ASSIGNMENT = re.compile(r"password\s*=", re.IGNORECASE)


def _smuggled(params: dict[str, str]) -> list[str]:
    """What follows `password=` inside another parameter's value: libpq took the writer's
    password for part of it (`?password=x@` read as user info; `user=apppassword=x`)."""
    found = []
    for key, value in params.items():
        match = None if _is_password_key(key) else _PASSWORD_ASSIGNMENT.search(value)
        if match:
            tail = value[match.end() :]
            found += [tail, tail.strip(_BLANKS + "'\"")]
    return found


def _user_info_end(rest: str) -> int:
    """Where libpq's `user:password@` ends in a URL (0 if none): at the first '@' before any '/'."""
    match = re.match(r"[^@/]*@", rest)
    return match.end() if match else 0


def _mask_url_exactly(rest: str) -> str:
    end = _user_info_end(rest)
    user, colon, _password = rest[: max(end - 1, 0)].partition(":")
    head = f"{user}:{MASK}@" if colon else rest[:end]
    base, question, query = rest[end:].partition("?")
    if not question:
        return head + base
    pairs = []
    for pair in query.split("&"):
        key, equals, _value = pair.partition("=")
        pairs.append(f"{key}={MASK}" if equals and _is_password_key(key) else pair)
    return f"{head}{base}?{'&'.join(pairs)}"


def _mask_url_conservatively(rest: str) -> str:
    """Mask every part of a URL (after `scheme://`) that could hold a piece of a password."""
    spans = []
    at = rest.rfind("@")
    colon = rest.find(":", 0, max(at, 0))
    if colon >= 0:
        spans.append((colon + 1, at))  # user:pass/wo?rd@host: whatever the '@'s and '/'s
    netloc = re.match(r"[^/?]*", rest[at + 1 :])
    assert netloc is not None  # it matches the empty string
    spans += [(at + 1 + start, at + 1 + end) for start, end in _odd_ports(netloc.group())]
    for separator in re.finditer(r"[?&]([^=?&]*)", rest):
        if _may_be_password_key(separator.group(1)):
            # Its value may hold an unencoded '&' or '?': nothing after it is safe to show.
            spans.append((separator.end() + rest.startswith("=", separator.end()), len(rest)))
            break
    return _mask_spans(rest, spans)


def _odd_ports(netloc: str) -> list[tuple[int, int]]:
    """Spans of ports that are no number: `user:secret/db` (a forgotten '@') reads as host:port."""
    spans = []
    offset = 0
    for item in netloc.split(","):
        colon = item.find(":", item.find("]") + 1 if item.startswith("[") else 0)
        port = item[colon + 1 :] if colon >= 0 else ""
        if port and not (port.isascii() and port.isdigit()):
            spans.append((offset + colon + 1, offset + len(item)))
        offset += len(item) + 1
    return spans


def _is_password_key(key: str) -> bool:
    """A libpq parameter that holds a secret: password, sslpassword (any key naming a password)."""
    try:
        return "password" in unquote(key, errors="strict").strip().lower()
    except UnicodeDecodeError:
        return True  # undecodable: do not bet a secret on it


def _may_be_password_key(key: str) -> bool:
    """Broader, for strings libpq cannot read: a misspelt or half-written password key too."""
    try:
        name = unquote(key, errors="strict").strip().lower()
    except UnicodeDecodeError:
        return True
    return any(word in name for word in ("pass", "pw", "secret"))


def _secret_forms(text: str, params: dict[str, str]) -> tuple[str, ...]:
    """Every form in which a password libpq read from `text` may turn up in free text."""
    values = [v for k, v in params.items() if _is_password_key(k)] + _smuggled(params)
    forms: dict[str, None] = {}
    for value in [*values, *_written_secrets(text)]:
        forms.update(dict.fromkeys(_encodings(value)))
    for form in list(forms):
        # Output is masked a line at a time: a password with a line break in it shows in pieces.
        # A piece of punctuation alone ('+') is no secret, and would mask it everywhere.
        for piece in [*form.splitlines(), *form.split("\n")]:
            if any(_is_word(char) for char in piece):
                forms.update(dict.fromkeys([piece, piece.strip()]))
    return tuple(form for form in forms if form.strip())  # blanks alone would mask every gap


def _encodings(value: str) -> list[str]:
    import json

    forms = [
        value,
        quote(value, safe=""),  # percent-encoded in a URL we render
        _ESCAPE.sub(lambda escape: escape.group().lower(), quote(value, safe="")),
        quote(value),
        quote(value, safe=" +"),  # SQLAlchemy's URL.render_as_string for a password
        quote_plus(value),  # SQLAlchemy's for a query value (multi-host URLs)
        value.replace("\\", "\\\\").replace("'", "\\'"),  # a keyword string's quoting
        repr(value)[1:-1],
        ascii(value)[1:-1],
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
    ]
    return forms + [form.replace("%", "%%") for form in forms if "%" in form]  # alembic.ini


def _written_secrets(text: str) -> list[str]:
    """The passwords exactly as written in `text` (libpq has read it), whatever their encoding."""
    if not text.startswith("postgresql://"):
        return [value for key, value in _keyword_pairs(text) if _is_password_key(key)]
    rest = text.removeprefix("postgresql://")
    end = _user_info_end(rest)
    found = [rest[: max(end - 1, 0)].partition(":")[2]]
    _base, _question, query = rest[end:].partition("?")
    for pair in query.split("&"):
        key, _equals, value = pair.partition("=")
        if _is_password_key(key):
            found.append(value)
    return found


_BLANKS = " \t\n\v\f\r"  # C's isspace(), which libpq uses


def _keyword_pairs(text: str) -> list[tuple[str, str]]:
    """(key, value as written, quotes off) for each pair of a keyword string libpq has read."""
    pairs = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in _BLANKS:
            i += 1
            continue
        start = i
        while i < n and text[i] != "=" and text[i] not in _BLANKS:
            i += 1
        key = text[start:i]
        i = _skip_blanks(text, i)
        i = _skip_blanks(text, i + 1)  # the '=' (there: libpq has read the string), then blanks
        quoted = i < n and text[i] == "'"
        start = i + quoted
        i = start
        while i < n and (text[i] != "'" if quoted else text[i] not in _BLANKS):
            i += 2 if text[i] == "\\" else 1
        pairs.append((key, text[start : min(i, n)]))
        i += 1
    return pairs


def _skip_blanks(text: str, i: int) -> int:
    while i < len(text) and text[i] in _BLANKS:
        i += 1
    return i


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


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret masked where it stands as a token of its own.

    An occurrence inside a longer run of letters, digits or '_' is left alone: a password `7`
    must not turn a lock key 7214607257041625889 into `***21460***...`, which would both mangle
    the log and give the password away. Edges that are punctuation bound themselves.
    """
    spans = []
    for secret in secrets:
        if not secret:
            continue
        start = text.find(secret)
        while start >= 0:
            if _stands_alone(text, start, start + len(secret)):
                spans.append((start, start + len(secret)))
            start = text.find(secret, start + 1)
    return _mask_spans(text, spans)


_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def _stands_alone(text: str, start: int, end: int) -> bool:
    # A letter or digit before the start runs on into the secret: another word. Unless it ends
    # a percent-escape: `%3D` is a '=' in a URL, not a letter.
    runs_on = start > 0 and _is_word(text[start - 1])
    if runs_on and _is_word(text[start]) and not _ESCAPE.fullmatch(text, max(start - 3, 0), start):
        return False
    if _is_word(text[end - 1]) and end < len(text) and _is_word(text[end]):
        return False
    return not _in_scheme(text, start, end)


_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")


def _in_scheme(text: str, start: int, end: int) -> bool:
    """True for `postgres` in `postgres://` or `postgresql+psycopg://`: a scheme, not a secret."""
    if not _SCHEME_CHARS.issuperset(text[start:end]):
        return False
    while end < len(text) and text[end] in _SCHEME_CHARS:
        end += 1
    return text.startswith("://", end)


def _is_word(char: str) -> bool:
    return char.isalnum() or char == "_"


def _mask_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with each span replaced by the mask; spans that overlap or touch become one."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    shown, position = [], 0
    for start, end in merged:
        shown += [text[position:start], MASK]
        position = end
    shown.append(text[position:])
    return "".join(shown)
