"""Turn an environment mapping into frozen Settings; a bad value raises ConfigError naming it.

Every variable is one row of SETTINGS (name, default, parser, meaning): load(), problems(),
`status`, `run --help`, the typo guard and the README's table all read that one table.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from prosaas_migrate.errors import BothSet, ConfigError

if TYPE_CHECKING:
    from prosaas_migrate.conninfo import ConnInfo

LOG_FORMATS = ("text", "json")
UNKNOWN_REVISION_CHOICES = ("start", "fail")
LOCK_TIMEOUT_CHOICES = ("skip", "fail")
MIGRATING_ROLES = frozenset({"api", "prosaas-api"})

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_FLAG_GRAMMAR = "1 or 0 (also true/false, yes/no, on/off in any case; empty means unset)"

# The advisory-lock key is derived from the version table's schema-qualified name, so two
# Alembic histories with different version tables in one database never block each other.
DEFAULT_VERSION_TABLE = "public.alembic_version"
DEFAULT_LOCK_KEY = 7214607257041625889  # default_lock_key(DEFAULT_VERSION_TABLE), precomputed

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT32_MAX = 2**31 - 1  # a time setting's upper bound in PostgreSQL, in milliseconds

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


def parse_flag(variable: str, value: str) -> bool:
    """Read a yes/no variable with the grammar the design note and its users already use."""
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(variable, value, _FLAG_GRAMMAR)


def parse_whole(variable: str, value: str, *, meaning: str) -> int:
    """A whole, non-negative number written in ASCII digits that fits a signed 64-bit integer.

    Any such value works, however large ("wait for ever"): what reaches the server or a timer
    is clamped there (database.server_ms, database.timer_seconds).
    """
    text = value.strip()
    if not re.fullmatch(r"[0-9]+", text) or len(text) > 19 or int(text) > _INT64_MAX:
        raise ConfigError(variable, value, f"{meaning}, 0 to {_INT64_MAX}")
    return int(text)


def parse_duration_ms(variable: str, value: str) -> int:
    """Milliseconds for a duration PostgreSQL itself would accept for a time setting."""
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


def parse_lock_key(variable: str, value: str) -> int:
    """A signed 64-bit integer, the only kind pg_try_advisory_lock(bigint) takes."""
    text = value.strip()
    if not re.fullmatch(r"-?[0-9]+", text) or not _INT64_MIN <= int(text) <= _INT64_MAX:
        raise ConfigError(
            variable, value, f"a signed 64-bit integer ({_INT64_MIN} to {_INT64_MAX})"
        )
    return int(text)


def parse_choice(variable: str, value: str, *, choices: tuple[str, ...]) -> str:
    word = value.strip().lower()
    if word not in choices:
        raise ConfigError(variable, value, " or ".join(choices))
    return word


def parse_text(_variable: str, value: str) -> str:
    return value.strip()


def parse_url(variable: str, value: str) -> ConnInfo:
    from prosaas_migrate import conninfo  # imports psycopg: only when a URL is really read

    return conninfo.parse(variable, value)


def parse_url_file(variable: str, value: str) -> ConnInfo:
    """The connection string in the file `value` names, judged as the variable's own would be."""
    return parse_url(file_source(variable, value), read_secret_file(variable, value))


FILE_SUFFIX = "_FILE"
SECRET_FILE_LIMIT = 64 * 1024  # a connection string is a line; anything longer is another file
_SECRET_FILE_GRAMMAR = (
    "the path of a readable, non-empty file holding the connection string (a mounted secret)"
)


def read_secret_file(variable: str, path: str) -> str:
    """The text of the file that `variable` names (a Docker or Kubernetes secret), without the
    newline and blanks around it nor a leading byte-order mark. The one place the tool reads a
    file the environment names.

    ConfigError names the variable, the path and why; never a byte of what the file holds.
    """
    path = path.strip()

    def refuse(reason: str) -> ConfigError:
        return ConfigError(variable, path, f"{_SECRET_FILE_GRAMMAR} (here: {reason})")

    if "\0" in path:  # no file has such a name (os.open would raise ValueError)
        raise refuse("a NUL character in the path")
    try:
        # O_NONBLOCK: a FIFO or a device must not hang the start; fstat then refuses them.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise refuse(exc.strerror or type(exc).__name__) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise refuse("a directory")
        if not stat.S_ISREG(mode):
            raise refuse("not a regular file")
        data = b""
        while len(data) <= SECRET_FILE_LIMIT and (chunk := os.read(fd, 8192)):
            data += chunk
    except OSError as exc:
        raise refuse(exc.strerror or type(exc).__name__) from None
    finally:
        os.close(fd)
    if len(data) > SECRET_FILE_LIMIT:
        raise refuse(f"larger than {SECRET_FILE_LIMIT // 1024} KiB")
    try:
        # utf-8-sig: a byte-order mark (Notepad's UTF-8) is no part of the URL, and would
        # otherwise make it "neither a URL nor key=value".
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise refuse("not UTF-8 text") from None
    if "\0" in text:  # libpq reads a C string: it would drop what follows without a word
        raise refuse("a NUL character in the file")
    if not text.strip():
        raise refuse("empty")
    return text.strip()


def file_source(variable: str, path: str) -> str:
    """How a value read from a file is named in reports: `DATABASE_URL_FILE=/run/secrets/x`."""
    return f"{variable}={path.strip()}"


@dataclass(frozen=True)
class Setting:
    """One environment variable: its default as a user would write it, its parser, its meaning."""

    name: str
    default: str | None  # None: unset unless given
    parse: Callable[[str, str], object]  # (variable, text) -> value; raises ConfigError
    meaning: str  # one line, for `run --help`, `status` and the README table
    secret: bool = False  # shown with its password masked


_seconds = partial(parse_whole, meaning="whole seconds")
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "RUN_MIGRATIONS",
        None,
        parse_flag,
        "`1` migrate, `0` skip; also `true/false`, `yes/no`, `on/off`, any case",
    ),
    Setting(
        "RUN_MIGRATIONS_ON_START",
        None,
        parse_flag,
        "legacy, same grammar; read only when `RUN_MIGRATIONS` is unset",
    ),
    Setting(
        "SERVICE_ROLE",
        None,
        parse_text,
        "read only when both above are unset: `api` or `prosaas-api` (any case) migrates, "
        "anything else skips",
    ),
    Setting(
        "MIGRATION_LOCK_WAIT_SECONDS",
        "30",
        _seconds,
        "whole seconds to keep trying to connect and take the lock; `0` = one try",
    ),
    Setting(
        "MIGRATION_STATEMENT_TIMEOUT",
        "120s",
        parse_duration_ms,
        "PostgreSQL duration: number plus optional `us ms s min h d` (`120s`, `2min`, `0.5h`, "
        "`1500ms`; no unit = ms; `0` = none); `statement_timeout` of every migration connection",
    ),
    Setting(
        "MIGRATION_DDL_LOCK_TIMEOUT",
        "2s",
        parse_duration_ms,
        "PostgreSQL duration: `lock_timeout` of every migration connection, so a DDL statement "
        "queued behind a long query gives up (and is retried) instead of stalling the app's "
        "queries on that table; `0` = off. Not for the concurrent forms (`CREATE`/`DROP INDEX "
        "CONCURRENTLY`, `REINDEX ... CONCURRENTLY`, `DETACH PARTITION ... CONCURRENTLY`), which "
        "block no reader or writer while they wait",
    ),
    Setting(
        "MIGRATION_CONCURRENT_STATEMENT_TIMEOUT",
        "0",
        parse_duration_ms,
        "PostgreSQL duration: `statement_timeout` of each concurrent-form statement (which runs "
        "with no `lock_timeout`: it waits for old snapshots as long as it needs); `0` = none",
    ),
    Setting(
        "MIGRATION_DDL_LOCK_RETRIES",
        "10",
        partial(parse_whole, meaning="a whole number of retries"),
        "retries of the pending upgrade after a lock timeout (SQLSTATE 55P03), after a jittered "
        "delay of about 1 s, doubling, at most 30 s",
    ),
    Setting(
        "MIGRATION_UNKNOWN_REVISION",
        "start",
        partial(parse_choice, choices=UNKNOWN_REVISION_CHOICES),
        "the database is at a revision these scripts do not know (a newer image migrated: a "
        "rollback deploy): `start` warns and starts the service, `fail` exits 1",
    ),
    Setting(
        "MIGRATION_ON_LOCK_TIMEOUT",
        "skip",
        partial(parse_choice, choices=LOCK_TIMEOUT_CHOICES),
        "the lock is still busy when `MIGRATION_LOCK_WAIT_SECONDS` ran out: `skip` logs the "
        "graceful skip and starts the service (the design note's behaviour), `fail` exits 1 "
        "without starting it",
    ),
    Setting(
        "MIGRATION_LOCK_KEY",
        str(DEFAULT_LOCK_KEY),
        parse_lock_key,
        "signed 64-bit advisory-lock key; the default is derived from the version table's "
        "schema-qualified name, so histories with their own version tables never block each "
        "other",
    ),
    Setting(
        "DATABASE_URL",
        None,
        parse_url,
        "`postgresql://`, `postgres://` or `postgresql+psycopg://` URL, or a libpq keyword "
        "string; required when migrating (unless the ini has a real URL)",
        secret=True,
    ),
    Setting(
        "MIGRATION_DATABASE_URL",
        None,
        parse_url,
        "wins over `DATABASE_URL` for migrating: a direct connection that bypasses a "
        "transaction-pooling PgBouncer",
        secret=True,
    ),
    Setting(
        "DATABASE_URL_FILE",
        None,
        parse_url_file,
        "the path of a file holding `DATABASE_URL`'s value (a Docker or Kubernetes secret, "
        "`/run/secrets/...`), read in its place; blanks and the newline around it are dropped; "
        "setting both is an error",
    ),
    Setting(
        "MIGRATION_DATABASE_URL_FILE",
        None,
        parse_url_file,
        "the same for `MIGRATION_DATABASE_URL`",
    ),
    Setting(
        "ALEMBIC_CONFIG",
        "alembic.ini",
        parse_text,
        "Alembic's own variable: the ini file (or a `pyproject.toml`); `--config` wins over it",
    ),
    Setting(
        "MIGRATION_WAIT_FOR_HEAD_SECONDS",
        "0",
        _seconds,
        "in a container that does not migrate, or one that skipped because the lock stayed "
        "busy: wait up to this many whole seconds (reading only, without the lock) until the "
        "database is at the scripts' head; exit 4 if not; `0` = off",
    ),
    Setting(
        "MIGRATION_LOG_FORMAT",
        "text",
        partial(parse_choice, choices=LOG_FORMATS),
        "`text` or `json` (one JSON object a line on stderr)",
    ),
)
BY_NAME = {setting.name: setting for setting in SETTINGS}
KNOWN_VARIABLES = tuple(BY_NAME)
RUN_VARIABLES = ("RUN_MIGRATIONS", "RUN_MIGRATIONS_ON_START")
URL_VARIABLES = ("MIGRATION_DATABASE_URL", "DATABASE_URL")  # highest precedence first
# Each with its _FILE twin, which stands in for it: in precedence order, twins side by side.
URL_SETTINGS = tuple(name + suffix for name in URL_VARIABLES for suffix in ("", FILE_SUFFIX))
_OUR_PREFIXES = ("MIGRATION_", "RUN_MIGRATION")


@dataclass(frozen=True)
class Settings:
    """Everything `run` and `status` need to know, resolved from the environment alone."""

    run: bool
    decided_by: str  # the variable that decided, or "default"
    decided_value: str | None
    lock_wait_seconds: int
    statement_timeout: str  # as configured, for the log line
    statement_timeout_ms: int  # what is sent to the server
    lock_key: int | None  # None: derived from the version table's name
    lock_key_source: str  # "MIGRATION_LOCK_KEY" or "default"
    database_url: str | None  # as set; checked only when migrating (the app may use another driver)
    database_url_source: str | None  # the variable it came from; `VARIABLE_FILE=path` for a file
    alembic_config: str
    alembic_config_source: str  # "--config", "ALEMBIC_CONFIG" or "default"
    wait_for_head_seconds: int = 0  # 0 = do not wait
    log_format: str = "text"
    ddl_lock_timeout: str = "2s"  # as configured, for the log line
    ddl_lock_timeout_ms: int = 2000  # lock_timeout of every migration connection; 0 = off
    ddl_lock_retries: int = 10
    concurrent_statement_timeout_ms: int = 0  # statement_timeout of a concurrent form; 0 = none
    unknown_revision: str = "start"  # or "fail"
    on_lock_timeout: str = "skip"  # or "fail"


def load(environ: Mapping[str, str], *, config_option: str | None = None) -> Settings:
    """Resolve settings from environ alone; raise ConfigError naming the first bad variable."""
    run, decided_by, decided_value = decide_run(environ)
    url_source, url = _database_url(environ)
    if config_option is not None:
        alembic_config, alembic_source = config_option, "--config"
    elif (alembic_env := value_of(environ, "ALEMBIC_CONFIG")) is not None:
        alembic_config, alembic_source = alembic_env, "ALEMBIC_CONFIG"
    else:
        alembic_config, alembic_source = str(BY_NAME["ALEMBIC_CONFIG"].default), "default"
    key_given = value_of(environ, "MIGRATION_LOCK_KEY") is not None
    return Settings(
        run=run,
        decided_by=decided_by,
        decided_value=decided_value,
        lock_wait_seconds=_int(environ, "MIGRATION_LOCK_WAIT_SECONDS"),
        statement_timeout=_text(environ, "MIGRATION_STATEMENT_TIMEOUT"),
        statement_timeout_ms=_int(environ, "MIGRATION_STATEMENT_TIMEOUT"),
        lock_key=_int(environ, "MIGRATION_LOCK_KEY") if key_given else None,
        lock_key_source="MIGRATION_LOCK_KEY" if key_given else "default",
        database_url=url,
        database_url_source=url_source,
        alembic_config=alembic_config,
        alembic_config_source=alembic_source,
        wait_for_head_seconds=_int(environ, "MIGRATION_WAIT_FOR_HEAD_SECONDS"),
        log_format=log_format(environ),
        ddl_lock_timeout=_text(environ, "MIGRATION_DDL_LOCK_TIMEOUT"),
        ddl_lock_timeout_ms=_int(environ, "MIGRATION_DDL_LOCK_TIMEOUT"),
        ddl_lock_retries=_int(environ, "MIGRATION_DDL_LOCK_RETRIES"),
        concurrent_statement_timeout_ms=_int(environ, "MIGRATION_CONCURRENT_STATEMENT_TIMEOUT"),
        unknown_revision=str(parsed(environ, "MIGRATION_UNKNOWN_REVISION")),
        on_lock_timeout=str(parsed(environ, "MIGRATION_ON_LOCK_TIMEOUT")),
    )


def parsed(environ: Mapping[str, str], name: str) -> object:
    """The variable's parsed value, or its default's; ConfigError if it is invalid."""
    setting = BY_NAME[name]
    text = value_of(environ, name)
    if text is None:
        text = setting.default
    return None if text is None else setting.parse(name, text)


def _int(environ: Mapping[str, str], name: str) -> int:
    value = parsed(environ, name)
    assert isinstance(value, int)
    return value


def _text(environ: Mapping[str, str], name: str) -> str:
    text = value_of(environ, name)
    return (BY_NAME[name].default or "") if text is None else text.strip()


def log_format(environ: Mapping[str, str]) -> str:
    """MIGRATION_LOG_FORMAT, read on its own first so that even config errors use it."""
    return str(parsed(environ, "MIGRATION_LOG_FORMAT"))


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
    found: dict[str, ConfigError] = {}
    for both in both_set(environ):
        found[both.variable] = both  # under the _FILE name: its row says why
    url_in_use = url_variable(environ)
    for setting in SETTINGS:
        text = value_of(environ, setting.name)
        if text is None or setting.name in found:
            continue
        if setting.name in URL_SETTINGS and setting.name != url_in_use:
            continue  # a URL that MIGRATION_DATABASE_URL overrides is the app's business
        try:
            setting.parse(setting.name, text)
        except ConfigError as exc:
            found[setting.name] = exc
    return found


def decide_run(environ: Mapping[str, str]) -> tuple[bool, str, str | None]:
    """Apply the precedence RUN_MIGRATIONS > RUN_MIGRATIONS_ON_START > SERVICE_ROLE > skip."""
    for variable in RUN_VARIABLES:
        value = value_of(environ, variable)
        if value is not None:
            return parse_flag(variable, value), variable, value
    role = value_of(environ, "SERVICE_ROLE")
    if role is not None:
        return role.strip().lower() in MIGRATING_ROLES, "SERVICE_ROLE", role
    return False, "default", None


def lock_key(settings: Settings, version_table: str) -> int:
    """MIGRATION_LOCK_KEY, or the key derived from the version table's qualified name."""
    return settings.lock_key if settings.lock_key is not None else default_lock_key(version_table)


def default_lock_key(version_table: str = DEFAULT_VERSION_TABLE) -> int:
    """The first 8 bytes of SHA-256 of 'prosaas-migrate:<schema.table>', as a signed integer."""
    if version_table == DEFAULT_VERSION_TABLE:
        return DEFAULT_LOCK_KEY  # hashlib stays off the start-up path
    import hashlib

    digest = hashlib.sha256(f"prosaas-migrate:{version_table}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def migration_conninfo(settings: Settings, ini_url: str | None) -> ConnInfo:
    """What to migrate with: MIGRATION_DATABASE_URL > DATABASE_URL > the ini's sqlalchemy.url."""
    from prosaas_migrate import conninfo

    if settings.database_url is not None and settings.database_url_source is not None:
        return conninfo.parse(settings.database_url_source, settings.database_url)
    if ini_url is None or not ini_url.strip():
        raise ConfigError(
            "DATABASE_URL",
            None,
            f"{conninfo.GRAMMAR} (or DATABASE_URL_FILE, the path of a file holding one; "
            "MIGRATION_DATABASE_URL or MIGRATION_DATABASE_URL_FILE wins over both)",
        )
    scheme = conninfo.split_scheme(ini_url.strip())[0].lower()
    if scheme not in conninfo.URL_SCHEMES:
        # Most often the driver://user:pass@localhost/dbname placeholder from `alembic init`.
        raise ConfigError(
            "DATABASE_URL",
            None,
            f"{conninfo.GRAMMAR}; sqlalchemy.url in {settings.alembic_config} is not one "
            f"({conninfo.redact(ini_url)!r})",
        )
    return conninfo.parse(f"sqlalchemy.url in {settings.alembic_config}", ini_url)


def url_variable(environ: Mapping[str, str]) -> str | None:
    """The URL variable `run` migrates with, if set: MIGRATION_DATABASE_URL(_FILE) >
    DATABASE_URL(_FILE); of a variable and its _FILE twin both set (an error), the twin."""
    for name in URL_VARIABLES:
        for candidate in (name + FILE_SUFFIX, name):
            if value_of(environ, candidate) is not None:
                return candidate
    return None


def both_set(environ: Mapping[str, str]) -> list[BothSet]:
    """Each URL variable set together with its _FILE twin: neither can be said to win."""
    return [
        BothSet(name, name + FILE_SUFFIX)
        for name in URL_VARIABLES
        if value_of(environ, name) is not None and value_of(environ, name + FILE_SUFFIX) is not None
    ]


def _database_url(environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(where the URL to migrate with came from, its text); a _FILE variable's file is read."""
    for conflict in both_set(environ):
        raise conflict
    variable = url_variable(environ)
    if variable is None:
        return None, None
    value = value_of(environ, variable)
    assert value is not None
    if variable.endswith(FILE_SUFFIX):
        return file_source(variable, value), read_secret_file(variable, value)
    return variable, value


def value_of(environ: Mapping[str, str], variable: str) -> str | None:
    """The variable's value, with empty or blank treated as unset (as Compose leaves them)."""
    value = environ.get(variable)
    return value if value is not None and value.strip() else None
