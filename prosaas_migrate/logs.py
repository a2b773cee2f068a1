"""The log vocabulary: one function per event, one line per event detail, all on stderr.

Lines are written to the stream directly rather than through the logging module: a project's
env.py usually calls logging.config.fileConfig(), which disables every logger created before it,
and the lines after an upgrade ("Released migration lock") must never vanish.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prosaas_migrate.lock import Holder


def _emit(*lines: str) -> None:
    stream = sys.stderr
    for line in lines:
        stream.write(line + "\n")
    stream.flush()


def _decided(decided_by: str, value: str | None) -> str:
    if decided_by == "default":
        return (
            "   Decided by: default (none of RUN_MIGRATIONS, RUN_MIGRATIONS_ON_START, SERVICE_ROLE)"
        )
    return f"   Decided by: {decided_by}={value}"


def disabled(decided_by: str, value: str | None) -> None:
    _emit(
        "🚫 MIGRATIONS_DISABLED: RUN_MIGRATIONS is not set to '1'",
        "   Migrations are disabled for this service",
        _decided(decided_by, value),
    )


def checkpoint(decided_by: str, value: str | None) -> None:
    _emit("🔧 MIGRATION CHECKPOINT: Starting apply_migrations()", _decided(decided_by, value))


def connect_retry(url: str, attempt: int, reason: str, remaining: float) -> None:
    _emit(
        f"⏳ Database not reachable yet at {url} (attempt {attempt}): {reason}; "
        f"retrying for up to {remaining:.0f}s more"
    )


def statement_timeout_set(value: str) -> None:
    _emit(f"✅ Set statement_timeout to {value} for migration connection")


def waiting(key: int, waited: float, holder: Holder | None) -> None:
    held_by = holder.describe() if holder else "no holder visible (it may have just released)"
    _emit(f"⏳ Waiting for migration lock {key} ({waited:.0f}s so far); held by {held_by}")


def lock_acquired(key: int, waited: float) -> None:
    _emit(f"✅ Acquired migration lock (key {key}, after {waited:.1f}s)")


def lock_timeout(waited: float) -> None:
    _emit(
        "⚠️ MIGRATION CHECKPOINT: Could not acquire lock in time -> skipping migrations",
        f"   Waited {waited:.0f}s but another process is running migrations",
        "   This is SAFE - migrations will run in another container",
    )


def lock_released(key: int) -> None:
    _emit(f"✅ Released migration lock (key {key})")


def lock_lost(key: int, reason: str) -> None:
    _emit(
        f"❌ MIGRATION LOCK LOST: key {key} was no longer held at release: {reason}",
        "   Another runner may have migrated concurrently; check the schema before trusting it",
    )


def at_head(heads: Sequence[str], *, locked: bool) -> None:
    why = "checked again under the lock" if locked else "lock not needed"
    _emit(f"✅ Schema is current at {_revisions(heads)}: nothing to migrate ({why})")


def applying(revision: str, message: str | None) -> None:
    _emit(f"🔧 Applying revision {revision}{_message(message)}")


def applied(revision: str, message: str | None) -> None:
    _emit(f"✅ Applied revision {revision}{_message(message)}")


def migrations_done(count: int, heads: Sequence[str]) -> None:
    _emit(f"✅ Migrations complete: {count} revision(s) applied, now at {_revisions(heads)}")


def migration_failed(revision: str | None, error: str) -> None:
    where = f"revision {revision}" if revision else "the upgrade"
    _emit(
        f"❌ MIGRATION FAILED in {where}: {error}",
        "   Rolled back; the service is not started",
    )


def exec_service(argv: Sequence[str]) -> None:
    _emit(f"🚀 Starting service: {' '.join(argv)}")


def no_command() -> None:
    _emit("✅ No service command given: exiting 0")


def interrupted(signal_name: str) -> None:
    _emit(f"🛑 Interrupted by {signal_name} before the service started: rolled back, exiting")


def error(message: str) -> None:
    _emit(f"❌ prosaas-migrate: {message}")


def _revisions(revisions: Sequence[str]) -> str:
    return ", ".join(revisions) if revisions else "base (no revisions)"


def _message(message: str | None) -> str:
    return f" ({message})" if message else ""
