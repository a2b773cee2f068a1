"""The error classes and the one exit-code table; each message is written here, once."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from enum import IntEnum


class ExitCode(IntEnum):
    """What the process exits with before it execs the service (after exec, the service's own)."""

    OK = 0
    MIGRATION_FAILED = 1
    USAGE = 2
    UNREACHABLE = 3
    NOT_AT_HEAD = 4
    NOT_EXECUTABLE = 126
    NOT_FOUND = 127
    SIGINT = 128 + signal.SIGINT
    SIGTERM = 128 + signal.SIGTERM


# What each code means, for `run --help` and the README (a test keeps all three in step).
EXIT_MEANINGS = {
    ExitCode.OK: "done, no command given",
    ExitCode.MIGRATION_FAILED: "a migration failed, the scripts cannot be loaded, the database "
    "refused a read (no privilege), the lock was lost, or it stayed busy with "
    "`MIGRATION_ON_LOCK_TIMEOUT=fail`",
    ExitCode.USAGE: "configuration or usage error (including a transaction-pooling URL for "
    "migrating, and a connection the server refuses for good: a wrong password, an unknown "
    "database or role, a pg_hba.conf reject, an SSL mismatch; a server older than PostgreSQL "
    "13)",
    ExitCode.UNREACHABLE: "database unreachable within the wait budget",
    ExitCode.NOT_AT_HEAD: "waited for the schema to reach head and it did not (opt-in wait)",
    ExitCode.NOT_EXECUTABLE: "command not executable",
    ExitCode.NOT_FOUND: "command not found",
    ExitCode.SIGINT: "interrupted by SIGINT",
    ExitCode.SIGTERM: "interrupted by SIGTERM",
}


class CheckCode(IntEnum):
    """What `status --check` exits with: never "pending" when it could not tell."""

    AT_HEAD = 0
    PENDING = 1
    MISCONFIGURED = 2  # a bad variable, or a project Alembic cannot load
    UNKNOWN = 3  # could not tell: database unreachable, no privilege, version table locked
    AHEAD = 5  # the database is at a revision these scripts do not know (a rollback deploy?)


CHECK_MEANINGS = {
    CheckCode.AT_HEAD: "at head",
    CheckCode.PENDING: "migrations are pending",
    CheckCode.MISCONFIGURED: "misconfigured: an invalid variable, an unreadable `.env`, a "
    "project Alembic cannot load, or a connection the server refuses for good (a wrong password)",
    CheckCode.UNKNOWN: "could not tell: the database is unreachable, or its version table "
    "unreadable (no privilege) or locked by a running migration for more than 5 s",
    CheckCode.AHEAD: "the database is at a revision these scripts do not know: a newer image "
    "migrated (a rollback deploy?)",
}


class MigrateError(Exception):
    """Base of every error the tool reports as one line and an exit code."""

    exit_code: ExitCode = ExitCode.MIGRATION_FAILED


class ConfigError(MigrateError):
    """A variable or argument holds a value the tool cannot use."""

    exit_code = ExitCode.USAGE

    def __init__(self, variable: str, value: str | None, expected: str) -> None:
        self.variable = variable
        self.value = value
        self.expected = expected
        shown = "not set" if value is None else f"{value!r} is invalid"
        super().__init__(f"{variable}: {shown}; expected {expected}")


class BothSet(ConfigError):
    """A variable and its `_FILE` twin are both set: which one is meant cannot be told."""

    def __init__(self, variable: str, file_variable: str) -> None:
        self.variable = file_variable
        self.value = None
        self.expected = f"{variable} or {file_variable}, not both"
        MigrateError.__init__(
            self,
            f"{variable} and {file_variable} are both set; set only one of them "
            f"({file_variable} is the path of a file holding {variable}'s value)",
        )


class DotenvUnreadable(MigrateError):
    """The .env file exists but cannot be read."""

    exit_code = ExitCode.USAGE

    def __init__(self, path: str, cause: str) -> None:
        self.path = path
        self.cause = cause
        super().__init__(f"cannot read {path}: {cause}")


class DatabaseUnreachable(MigrateError):
    """No connection could be made within the wait budget."""

    exit_code = ExitCode.UNREACHABLE

    def __init__(self, url: str, waited: float, attempts: int, reason: str) -> None:
        self.url = url
        self.waited = waited
        self.attempts = attempts
        self.reason = reason
        super().__init__(
            f"database unreachable at {url} after {attempts} attempt(s) in {waited:.1f}s: {reason}"
        )


class ConnectionRejected(MigrateError):
    """The server (or libpq) refused the connection in a way no retry changes: say so at once."""

    exit_code = ExitCode.USAGE

    def __init__(self, variable: str, url: str, reason: str, meaning: str) -> None:
        self.variable = variable
        self.url = url
        self.reason = reason
        self.meaning = meaning
        super().__init__(
            f"{variable}: the connection to {url} was refused, and retrying cannot help "
            f"({meaning}): {reason}"
        )


class ServerTooOld(MigrateError):
    """The server is older than the oldest major the tool is tested on: refused before any work."""

    exit_code = ExitCode.USAGE
    OLDEST = 130000  # server_version_num of PostgreSQL 13, the oldest the suite runs on

    def __init__(self, variable: str, url: str, version_num: int) -> None:
        self.variable = variable
        self.url = url
        self.version_num = version_num
        if version_num >= 100000:
            shown = f"{version_num // 10000}.{version_num % 10000}"
        else:  # 9.6.24 is 90624
            shown = f"{version_num // 10000}.{version_num // 100 % 100}.{version_num % 100}"
        super().__init__(
            f"{variable}: {url} is PostgreSQL {shown}; prosaas-migrate needs PostgreSQL 13 or newer"
        )


class DatabaseError(MigrateError):
    """The database answered, but not as needed (no privilege, an unexpected error)."""

    exit_code = ExitCode.MIGRATION_FAILED

    def __init__(self, doing: str, cause: str) -> None:
        self.doing = doing
        self.cause = cause
        super().__init__(f"database error while {doing}: {cause}")


class VersionTableBusy(MigrateError):
    """A read of the version table ran out of time: a migration elsewhere holds it locked."""

    exit_code = ExitCode.MIGRATION_FAILED

    def __init__(self, waited_ms: int, cause: str) -> None:
        self.waited_ms = waited_ms
        self.cause = cause
        super().__init__(
            f"the version table stayed locked for {waited_ms / 1000:.1f}s "
            f"(a migration is running elsewhere): {cause}"
        )


class ProjectBroken(MigrateError):
    """The migration scripts cannot be loaded (a syntax error, a file without `revision`...)."""

    exit_code = ExitCode.MIGRATION_FAILED

    def __init__(self, where: str, cause: str) -> None:
        self.where = where
        self.cause = cause
        super().__init__(f"cannot load the migration scripts: {where}: {cause}")


class SessionSettingRejected(MigrateError):
    """The server did not keep a session setting the migration depends on."""

    exit_code = ExitCode.MIGRATION_FAILED

    def __init__(self, name: str, wanted: str, shown: str) -> None:
        self.name = name
        self.wanted = wanted
        self.shown = shown
        super().__init__(f"{name} is {shown!r} on the server, not {wanted!r} as configured")


class MigrationFailed(MigrateError):
    """A revision raised, or the upgrade did not leave the database at head."""

    exit_code = ExitCode.MIGRATION_FAILED

    def __init__(
        self,
        revision: str | None,
        cause: str,
        *,
        rolled_back: Sequence[str] = (),
        committed: Sequence[str] = (),
        partly: Sequence[str] = (),
        original: BaseException | None = None,
    ) -> None:
        self.revision = revision
        self.cause = cause
        self.rolled_back = tuple(rolled_back)  # revisions that ran and are not in the database
        self.committed = tuple(committed)  # revisions of this upgrade that stayed committed
        self.partly = tuple(partly)  # revisions whose autocommit_block work stays committed
        self.original = original
        where = f"revision {revision}" if revision else "upgrade"
        super().__init__(f"{where} failed: {cause}")


class LockLost(MigrateError):
    """The advisory lock stopped being ours before the migration ended."""

    exit_code = ExitCode.MIGRATION_FAILED

    def __init__(
        self,
        key: int,
        reason: str,
        consequence: str = "Another runner may have migrated concurrently; check the schema "
        "before trusting it",
    ) -> None:
        self.key = key
        self.reason = reason
        self.consequence = consequence
        super().__init__(f"migration lock {key} was lost: {reason}")


class LockTimeout(MigrateError):
    """The lock stayed busy for the whole wait, and MIGRATION_ON_LOCK_TIMEOUT=fail."""

    exit_code = ExitCode.MIGRATION_FAILED

    def __init__(self, waited: float, holder: str | None) -> None:
        self.waited = waited
        self.holder = holder
        held = f"; held by {holder}" if holder else ""
        super().__init__(
            f"the migration lock stayed busy for {waited:.0f}s{held}: not starting the "
            "service (MIGRATION_ON_LOCK_TIMEOUT=fail)"
        )


class DatabaseAhead(MigrateError):
    """The database is at revisions these scripts do not know, and the operator said: fail."""

    exit_code = ExitCode.MIGRATION_FAILED

    def __init__(self, unknown: Sequence[str], heads: Sequence[str]) -> None:
        self.unknown = tuple(unknown)
        self.heads = tuple(heads)
        super().__init__(
            f"the database is at {', '.join(unknown)}, which these scripts do not know "
            "(MIGRATION_UNKNOWN_REVISION=fail)"
        )


class TransactionPooling(MigrateError):
    """The migration URL goes through a pooler that does not keep one server session."""

    exit_code = ExitCode.USAGE

    def __init__(self, variable: str, reason: str) -> None:
        self.variable = variable
        self.reason = reason
        super().__init__(f"{variable} goes through a transaction-pooling pooler: {reason}")


class HeadNotReached(MigrateError):
    """A container told to wait for the schema gave up before it reached head."""

    exit_code = ExitCode.NOT_AT_HEAD

    def __init__(self, heads: tuple[str, ...], current: tuple[str, ...], waited: float) -> None:
        self.heads = heads
        self.current = current
        self.waited = waited
        super().__init__(
            f"the schema did not reach {', '.join(heads) or 'base'} within {waited:.0f}s "
            f"(still at {', '.join(current) or 'base'})"
        )


class ExecFailed(MigrateError):
    """The service command could not be started."""

    def __init__(self, command: str, errno_name: str, strerror: str, not_found: bool) -> None:
        self.command = command
        self.strerror = strerror
        self.exit_code = ExitCode.NOT_FOUND if not_found else ExitCode.NOT_EXECUTABLE
        super().__init__(f"cannot exec {command}: {strerror} ({errno_name})")


class RevisionsUnreadable(MigrateError):
    """A revision file does not load, so the history cannot be known (lint exits 2)."""

    exit_code = ExitCode.USAGE

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"cannot load the revisions: {where}: {reason}")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived before exec.

    A KeyboardInterrupt subclass on purpose: psycopg cancels the running statement on the server
    when one interrupts a query, and `except Exception` in a project's env.py cannot swallow it.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        self.after_commit = False  # set by the runner: the upgrade had committed already
        self.partly: tuple[str, ...] = ()  # revisions whose autocommit_block work stays
        super().__init__(f"interrupted by {self.signal_name}")
