"""Turn an environment mapping into frozen Settings; a bad value raises ConfigError naming it."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from prosaas_migrate.errors import ConfigError

RUN_VARIABLES = ("RUN_MIGRATIONS", "RUN_MIGRATIONS_ON_START")
URL_VARIABLES = ("MIGRATION_DATABASE_URL", "DATABASE_URL")
KNOWN_VARIABLES = (
    *RUN_VARIABLES,
    "SERVICE_ROLE",
    "MIGRATION_LOCK_WAIT_SECONDS",
    "MIGRATION_STATEMENT_TIMEOUT",
    "MIGRATION_LOCK_KEY",
    "MIGRATION_WAIT_FOR_HEAD_SECONDS",
    "MIGRATION_LOG_FORMAT",
    *URL_VARIABLES,
    "ALEMBIC_CONFIG",
)
_OUR_PREFIXES = ("MIGRATION_", "RUN_MIGRATION")
LOG_FORMATS = ("text", "json")
MIGRATING_ROLES = frozenset({"api", "prosaas-api"})

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_FLAG_GRAMMAR = "1 or 0 (also true/false, yes/no, on/off in any case; empty means unset)"

DEFAULT_LOCK_WAIT_SECONDS = 30
DEFAULT_WAIT_FOR_HEAD_SECONDS = 0  # off
DEFAULT_STATEMENT_TIMEOUT = "120s"
DEFAULT_ALEMBIC_CONFIG = "alembic.ini"
# The advisory-lock key is derived from this name, so two Alembic histories with different
# version tables in one database never block each other. See default_lock_key().
DEFAULT_VERSION_TABLE = "public.alembic_version"
DEFAULT_LOCK_KEY = 7214607257041625889  # default_lock_key(DEFAULT_VERSION_TABLE), precomputed

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT32_MAX = 2**31 - 1  # statement_timeout's upper bound, in milliseconds

# PostgreSQL's own grammar for a time setting: a number, optional spaces, an optional unit.
# Units are case-sensitive there ("120S" is rejected), and a bare number means milliseconds.
# It reads integers with strtol(base 0), so a leading zero means octal ("010" is 8 ms): refuse
# those rather than disagree with the server.
# A number that starts with "." may not follow blanks: strtol skips them, but the server's
# strtod fallback restarts from the original text, so " .5" is refused there.
_DURATION = re.compile(
    r"(?:[ \t]*(?=[0-9])|(?=\.))((?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)"
    r"[ \t]*(us|ms|s|min|h|d)?[ \t]*"
)
# Largest first, as in PostgreSQL's unit table: each unit's next smaller one follows it.
_MS_PER_UNIT = {"d": 86_400_000, "h": 3_600_000, "min": 60_000, "s": 1000, "ms": 1, "us": 1 / 1000}
_SMALLER_UNIT = dict(zip(_MS_PER_UNIT, list(_MS_PER_UNIT)[1:], strict=False))
_DURATION_GRAMMAR = (
    "a PostgreSQL duration: a number with an optional unit us, ms, s, min, h or d "
    "(120s, 2min, 0.5h, 1500ms; no unit means ms; 0 means no timeout), at most 2147483647ms"
)
_URL_SCHEMES = ("postgres", "postgresql", "postgresql+psycopg")
_URL_GRAMMAR = "a postgresql://user:password@host:port/dbname URL (postgres:// also accepted)"


@dataclass(frozen=True)
class Settings:
    """Everything `run` and `status` need to know, resolved from the environment alone."""

    run: bool
    decided_by: str  # the variable that decided, or "default"
    decided_value: str | None
    lock_wait_seconds: int
    statement_timeout: str  # as configured, for the log line
    statement_timeout_ms: int  # what is sent to the server
    lock_key: int
    lock_key_source: str  # "MIGRATION_LOCK_KEY" or "default"
    database_url: str | None  # as set; checked only when migrating (the app may use another driver)
    database_url_source: str | None  # the variable it came from
    alembic_config: str
    alembic_config_source: str  # "--config", "ALEMBIC_CONFIG" or "default"
    wait_for_head_seconds: int = DEFAULT_WAIT_FOR_HEAD_SECONDS  # 0 = do not wait
    log_format: str = "text"


def load(environ: Mapping[str, str], *, config_option: str | None = None) -> Settings:
    """Resolve settings from environ alone; raise ConfigError naming the first bad variable."""
    run, decided_by, decided_value = decide_run(environ)
    timeout_text = _value(environ, "MIGRATION_STATEMENT_TIMEOUT") or DEFAULT_STATEMENT_TIMEOUT
    key_text = _value(environ, "MIGRATION_LOCK_KEY")
    url_source, url = _database_url(environ)
    if config_option is not None:
        alembic_config, alembic_source = config_option, "--config"
    elif alembic_env := _value(environ, "ALEMBIC_CONFIG"):
        alembic_config, alembic_source = alembic_env, "ALEMBIC_CONFIG"
    else:
        alembic_config, alembic_source = DEFAULT_ALEMBIC_CONFIG, "default"
    return Settings(
        run=run,
        decided_by=decided_by,
        decided_value=decided_value,
        lock_wait_seconds=parse_wait_seconds(
            "MIGRATION_LOCK_WAIT_SECONDS", _value(environ, "MIGRATION_LOCK_WAIT_SECONDS")
        ),
        statement_timeout=timeout_text.strip(),
        statement_timeout_ms=parse_duration_ms("MIGRATION_STATEMENT_TIMEOUT", timeout_text),
        lock_key=DEFAULT_LOCK_KEY if key_text is None else parse_lock_key(key_text),
        lock_key_source="default" if key_text is None else "MIGRATION_LOCK_KEY",
        database_url=url,
        database_url_source=url_source,
        alembic_config=alembic_config,
        alembic_config_source=alembic_source,
        wait_for_head_seconds=parse_wait_seconds(
            "MIGRATION_WAIT_FOR_HEAD_SECONDS", _value(environ, "MIGRATION_WAIT_FOR_HEAD_SECONDS")
        ),
        log_format=log_format(environ),
    )


def log_format(environ: Mapping[str, str]) -> str:
    """MIGRATION_LOG_FORMAT, read on its own first so that even config errors use it."""
    value = _value(environ, "MIGRATION_LOG_FORMAT")
    if value is None:
        return "text"
    if value.strip().lower() not in LOG_FORMATS:
        raise ConfigError("MIGRATION_LOG_FORMAT", value, "text or json")
    return value.strip().lower()


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(name, closest known name) for each variable that looks like ours but is not."""
    suspects = [
        name
        for name in environ
        if name.upper().startswith(_OUR_PREFIXES) and name not in KNOWN_VARIABLES
    ]
    if not suspects:
        return []
    import difflib  # only when there is something to suggest

    return [
        (name, difflib.get_close_matches(name.upper(), KNOWN_VARIABLES, n=1, cutoff=0.0)[0])
        for name in sorted(suspects)
    ]


def problems(environ: Mapping[str, str]) -> dict[str, ConfigError]:
    """Every bad variable at once (URLs included), for a report; load() stops at the first."""
    checks: dict[str, Callable[[str], object]] = {
        "RUN_MIGRATIONS": partial(parse_flag, "RUN_MIGRATIONS"),
        "RUN_MIGRATIONS_ON_START": partial(parse_flag, "RUN_MIGRATIONS_ON_START"),
        "MIGRATION_LOCK_WAIT_SECONDS": partial(parse_wait_seconds, "MIGRATION_LOCK_WAIT_SECONDS"),
        "MIGRATION_STATEMENT_TIMEOUT": partial(parse_duration_ms, "MIGRATION_STATEMENT_TIMEOUT"),
        "MIGRATION_LOCK_KEY": parse_lock_key,
        "MIGRATION_WAIT_FOR_HEAD_SECONDS": partial(
            parse_wait_seconds, "MIGRATION_WAIT_FOR_HEAD_SECONDS"
        ),
        "MIGRATION_LOG_FORMAT": lambda value: log_format({"MIGRATION_LOG_FORMAT": value}),
        **{name: partial(check_database_url, name) for name in URL_VARIABLES},
    }
    found: dict[str, ConfigError] = {}
    for variable, check in checks.items():
        value = _value(environ, variable)
        if value is None:
            continue
        try:
            check(value)
        except ConfigError as exc:
            found[variable] = exc
    return found


def decide_run(environ: Mapping[str, str]) -> tuple[bool, str, str | None]:
    """Apply the precedence RUN_MIGRATIONS > RUN_MIGRATIONS_ON_START > SERVICE_ROLE > skip."""
    for variable in RUN_VARIABLES:
        value = _value(environ, variable)
        if value is not None:
            return parse_flag(variable, value), variable, value
    role = _value(environ, "SERVICE_ROLE")
    if role is not None:
        return role.strip().lower() in MIGRATING_ROLES, "SERVICE_ROLE", role
    return False, "default", None


def parse_flag(variable: str, value: str) -> bool:
    """Read a yes/no variable with the grammar the design note and its users already use."""
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(variable, value, _FLAG_GRAMMAR)


def parse_wait_seconds(variable: str, value: str | None) -> int:
    """Whole, non-negative seconds; unset means the variable's default."""
    if value is None:
        return _WAIT_DEFAULTS[variable]
    if not re.fullmatch(r"[0-9]+", value.strip()):
        raise ConfigError(variable, value, "whole seconds, 0 or more (0 means one try)")
    return int(value.strip())


_WAIT_DEFAULTS = {
    "MIGRATION_LOCK_WAIT_SECONDS": DEFAULT_LOCK_WAIT_SECONDS,
    "MIGRATION_WAIT_FOR_HEAD_SECONDS": DEFAULT_WAIT_FOR_HEAD_SECONDS,
}


def parse_duration_ms(variable: str, value: str) -> int:
    """Milliseconds for a duration PostgreSQL itself would accept for statement_timeout."""
    match = _DURATION.fullmatch(value)
    if not match:
        raise ConfigError(variable, value, _DURATION_GRAMMAR)
    number, unit = float(match.group(1)), match.group(2)
    scaled: float = number
    if unit is not None:
        # As PostgreSQL's convert_to_base_unit: 0.1d is 2.4h, kept as a whole 2h.
        scaled = number * _MS_PER_UNIT[unit]
        if smaller := _SMALLER_UNIT.get(unit):
            scaled = round(scaled / _MS_PER_UNIT[smaller]) * _MS_PER_UNIT[smaller]
    ms = round(scaled)  # half to even, like the server's rint()
    if ms > _INT32_MAX or (ms == 0 and number != 0):
        # Rounding a tiny value down to 0 would silently switch the timeout off.
        raise ConfigError(variable, value, _DURATION_GRAMMAR)
    return ms


def parse_lock_key(value: str) -> int:
    """A signed 64-bit integer, the only kind pg_try_advisory_lock(bigint) takes."""
    text = value.strip()
    if not re.fullmatch(r"-?[0-9]+", text) or not _INT64_MIN <= int(text) <= _INT64_MAX:
        raise ConfigError(
            "MIGRATION_LOCK_KEY", value, f"a signed 64-bit integer ({_INT64_MIN} to {_INT64_MAX})"
        )
    return int(text)


def default_lock_key(version_table: str = DEFAULT_VERSION_TABLE) -> int:
    """The first 8 bytes of SHA-256 of 'prosaas-migrate:<schema.table>', as a signed integer."""
    import hashlib  # not on the start-up path: the default is precomputed

    digest = hashlib.sha256(f"prosaas-migrate:{version_table}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def check_database_url(variable: str, url: str) -> str:
    """Return the URL in the postgresql:// form psycopg takes, or raise naming the variable."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep or scheme.lower() not in _URL_SCHEMES:
        raise ConfigError(variable, redact_url(url), _URL_GRAMMAR)
    normalised = f"postgresql://{rest}"
    # libpq's own parser is the judge (bad percent-encoding, a port that is no number...).
    from urllib.parse import urlsplit

    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(normalised)
        urlsplit(normalised).port  # noqa: B018 - libpq only fails on a bad port when connecting
    except (ProgrammingError, ValueError):
        raise ConfigError(variable, redact_url(url), _URL_GRAMMAR) from None
    return normalised


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, safe to log."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostpart}"


def migration_url(settings: Settings, ini_url: str | None) -> str:
    """The URL to migrate with: MIGRATION_DATABASE_URL > DATABASE_URL > the ini's sqlalchemy.url."""
    if settings.database_url is not None and settings.database_url_source is not None:
        return check_database_url(settings.database_url_source, settings.database_url)
    if ini_url is None or not ini_url.strip():
        raise ConfigError("DATABASE_URL", None, f"{_URL_GRAMMAR} (or MIGRATION_DATABASE_URL)")
    scheme = ini_url.strip().partition("://")[0].lower()
    if scheme not in _URL_SCHEMES:
        # Most often the driver://user:pass@localhost/dbname placeholder from `alembic init`.
        raise ConfigError(
            "DATABASE_URL",
            None,
            f"{_URL_GRAMMAR}; sqlalchemy.url in {settings.alembic_config} is not one "
            f"({redact_url(ini_url)!r})",
        )
    return check_database_url("DATABASE_URL", ini_url)


def _database_url(environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    for variable in URL_VARIABLES:
        value = _value(environ, variable)
        if value is not None:
            return variable, value
    return None, None


def _value(environ: Mapping[str, str], variable: str) -> str | None:
    """The variable's value, with empty or blank treated as unset (as Compose leaves them)."""
    value = environ.get(variable)
    return value if value is not None and value.strip() else None
