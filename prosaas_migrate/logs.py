"""The log vocabulary: one function per event, rendered as text lines or one JSON object.

Lines are written to the stream directly rather than through the logging module: a project's
env.py usually calls logging.config.fileConfig(), which disables every logger created before it,
and the lines after an upgrade ("Released migration lock") must never vanish.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prosaas_migrate.lock import Holder

REPORT_EVERY_SECONDS = 5.0  # how often a wait (for the lock, for head) says where it stands
_format = "text"
_secrets: tuple[str, ...] = ()


def hide(secrets: Sequence[str]) -> None:
    """Mask these strings (a URL's password, in every form) in every later line and field."""
    global _secrets
    _secrets = tuple(sorted({*_secrets, *(s for s in secrets if s)}, key=len, reverse=True))


def _masked(text: str) -> str:
    # Only a URL that was read registers secrets, so conninfo is loaded by now: no cost here.
    from prosaas_migrate.conninfo import scrub

    return scrub(text, _secrets)


def configure(log_format: str) -> None:
    """Choose the renderer for every later event: "text" (default) or "json"."""
    global _format
    _format = log_format


def _emit(event: str, lines: Sequence[str], level: str = "info", **fields: Any) -> None:
    stream = _real_stderr or sys.stderr
    if _secrets:  # before rendering: JSON would escape a password's quotes or accents
        lines = [_masked(line) for line in lines]
        fields = {key: _masked_value(value) for key, value in fields.items()}
    text = (
        _json_line(event, level, lines, fields) + "\n"
        if _format == "json"
        else "".join(line + "\n" for line in lines)
    )
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError, AttributeError):
        # stderr closed (`2>&-`: None), full (/dev/full) or gone: there is nowhere to say it,
        # and a log line is never a reason not to migrate or not to start the service.
        pass


def _masked_value(value: Any) -> Any:
    if isinstance(value, str):
        return _masked(value)
    if isinstance(value, dict):
        return {key: _masked_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_masked_value(item) for item in value]
    return value


_real_stderr: Any = None  # the process's stderr while foreign output is wrapped


@contextmanager
def foreign_output_as_events(source: str) -> Iterator[None]:
    """Route what a project's env.py prints, to stdout or stderr, through the log: masked line by
    line, and in JSON mode as `output` events. Both go to stderr: stdout belongs to the service
    and to `status --json`'s document.

    Its logging.config.fileConfig() binds handlers to sys.stderr as it is at that moment, so
    swapping the streams for the upgrade catches Alembic's own log lines too.
    """
    global _real_stderr
    if _real_stderr is not None:  # nested: the outer wrapping already catches everything
        yield
        return
    real_stdout, real_stderr = sys.stdout, sys.stderr
    wrappers = _LineEvents(source, "stdout"), _LineEvents(source, "stderr")
    # stderr closed (`2>&-`) is None: the log then goes nowhere, not back into the wrappers.
    _real_stderr = real_stderr if real_stderr is not None else io.StringIO()
    sys.stdout, sys.stderr = wrappers
    try:
        yield
    finally:
        sys.stdout, sys.stderr = real_stdout, real_stderr
        _real_stderr = None
        for wrapper in wrappers:
            wrapper.flush_partial()


class _LineEvents(io.TextIOBase):
    """A text stream that logs each whole line written to it (a secret split over several writes
    is still seen whole, so still masked)."""

    encoding = "utf-8"  # some libraries read it before they print; every str is taken

    def __init__(self, source: str, stream: str) -> None:
        super().__init__()
        self.source = source
        self.stream = stream
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def flush_partial(self) -> None:
        if self.pending:
            self._line(self.pending)
        self.pending = ""

    def _line(self, line: str) -> None:
        if _format == "json" and not line.strip():
            return  # an event with nothing in it
        _emit("output", [line], source=self.source, stream=self.stream)


def _json_line(event: str, level: str, lines: Sequence[str], fields: dict[str, Any]) -> str:
    import json  # only when asked for: the text path stays light
    from datetime import UTC, datetime

    record = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": level,
        "event": event,
        "message": " ".join(line.strip() for line in lines),
        **fields,
    }
    # ensure_ascii: the emoji become \\u escapes, so no stream encoding can break a line.
    return json.dumps(record, default=str)


def _decided(decided_by: str, value: str | None) -> str:
    if decided_by == "default":
        return (
            "   Decided by: default (none of RUN_MIGRATIONS, RUN_MIGRATIONS_ON_START, SERVICE_ROLE)"
        )
    return f"   Decided by: {decided_by}={value}"


def disabled(decided_by: str, value: str | None) -> None:
    _emit(
        "migrations_disabled",
        [
            "🚫 MIGRATIONS_DISABLED: RUN_MIGRATIONS is not set to '1'",
            "   Migrations are disabled for this service",
            _decided(decided_by, value),
        ],
        decided_by=decided_by,
        value=value,
    )


def checkpoint(decided_by: str, value: str | None) -> None:
    _emit(
        "migration_checkpoint",
        ["🔧 MIGRATION CHECKPOINT: Starting apply_migrations()", _decided(decided_by, value)],
        decided_by=decided_by,
        value=value,
    )


def unknown_variable(name: str, suggestion: str) -> None:
    _emit(
        "unknown_variable",
        [f"⚠️ Unknown variable {name}: did you mean {suggestion}? (it is ignored)"],
        level="warning",
        variable=name,
        suggestion=suggestion,
    )


def connect_retry(url: str, attempt: int, reason: str, remaining: float) -> None:
    _emit(
        "database_retry",
        [
            f"⏳ Database not reachable yet at {url} (attempt {attempt}): {reason}; "
            f"retrying for up to {remaining:.0f}s more"
        ],
        level="warning",
        url=url,
        attempt=attempt,
        reason=reason,
        remaining_seconds=round(remaining, 1),
    )


def connection_lost(url: str, reason: str) -> None:
    _emit(
        "connection_lost",
        [f"⚠️ Lost the database connection: {reason}; reconnecting"],
        level="warning",
        url=url,
        reason=reason,
    )


def statement_timeout_set(value: str) -> None:
    _emit(
        "statement_timeout_set",
        [f"✅ Set statement_timeout to {value} for migration connection"],
        statement_timeout=value,
    )


def ddl_lock_timeout_set(value: str, ms: int, retries: int) -> None:
    if ms == 0:
        line = "⚠️ lock_timeout is off for migration connections (MIGRATION_DDL_LOCK_TIMEOUT=0)"
    else:
        line = (
            f"✅ Set lock_timeout to {value} for migration connections "
            f"(a DDL lock wait gives up after it and is retried, up to {retries} times; "
            "the concurrent forms wait without it)"
        )
    _emit("lock_timeout_set", [line], lock_timeout=value, retries=retries)


def database_ahead(unknown: Sequence[str], heads: Sequence[str], *, fail: bool) -> None:
    what = "not starting (MIGRATION_UNKNOWN_REVISION=fail)" if fail else "starting the service"
    _emit(
        "database_ahead",
        [
            f"⚠️ The database is ahead of this image: it is at {', '.join(unknown)}, which these "
            f"scripts do not know (their head: {_revisions(heads)}). A rollback deploy?",
            f"   Nothing is migrated and no lock is taken; {what}",
        ],
        level="error" if fail else "warning",
        unknown=list(unknown),
        heads=list(heads),
    )


def revision_progress(
    revision: str,
    elapsed: float,
    statement: str | None,
    waiting_for: str | None,
    progress: str | None,
    blockers: Sequence[str],
    blocker_fields: Sequence[dict[str, object]],
) -> None:
    doing = statement or "between statements"
    line = f"⏳ Revision {revision} running for {elapsed:.0f}s: {doing}"
    if progress:
        line += f" ({progress})"
    lines = [line]
    if blockers and waiting_for == "Lock:virtualxid":
        # A concurrent form waiting for old snapshots: it blocks no reader or writer meanwhile.
        lines.append(
            f"   Waiting for older transactions to end ({waiting_for}; no reader or writer "
            f"waits for it meanwhile): {'; '.join(blockers)}"
        )
    elif blockers:
        lines.append(f"   Waiting for a lock ({waiting_for}), blocked by {'; '.join(blockers)}")
    elif waiting_for:
        lines.append(f"   Waiting for {waiting_for}")
    _emit(
        "revision_progress",
        lines,
        revision=revision,
        elapsed_seconds=round(elapsed, 1),
        statement=statement,
        waiting_for=waiting_for,
        progress=progress,
        blockers=list(blocker_fields),
    )


def ddl_lock_retry(
    revision: str | None,
    attempt: int,
    retries: int,
    delay: float,
    blockers: Sequence[str],
    blocker_fields: Sequence[dict[str, object]],
) -> None:
    where = f"revision {revision}" if revision else "the upgrade"
    who = "; ".join(blockers) if blockers else "a session that was gone when checked"
    _emit(
        "ddl_lock_retry",
        [
            f"⏳ Lock timeout in {where} (attempt {attempt} of {retries + 1}): blocked by {who}",
            f"   Rolled back; trying again in {delay:.1f}s (meanwhile the app's queries on that "
            "table wait no longer than the lock timeout)",
        ],
        level="warning",
        revision=revision,
        attempt=attempt,
        retries=retries,
        delay_seconds=round(delay, 1),
        blockers=list(blocker_fields),
    )


def invalid_index_dropped(revision: str | None, index: str, why: str) -> None:
    where = f" (revision {revision})" if revision else ""
    _emit(
        "invalid_index_dropped",
        [
            f"🧹 Dropped the invalid index {index} an earlier failed build left, {why}{where} "
            "(DROP INDEX CONCURRENTLY)"
        ],
        level="warning",
        revision=revision,
        index=index,
    )


def invalid_index_cleanup(what: str) -> None:
    _emit("invalid_index_cleanup", [f"🧹 After the interruption: {what}"], level="warning")


def monitor_stopped(reason: str) -> None:
    _emit(
        "monitor_stopped",
        [f"⚠️ Stopped watching the migration's progress ({reason}); the migration goes on"],
        level="warning",
        reason=reason,
    )


def waiting(key: int, waited: float, holder: Holder | None) -> None:
    held_by = holder.describe() if holder else "no holder visible (it may have just released)"
    _emit(
        "lock_waiting",
        [f"⏳ Waiting for migration lock {key} ({waited:.0f}s so far); held by {held_by}"],
        key=str(key),
        waited_seconds=round(waited, 1),
        holder=holder.as_dict() if holder else None,
    )


def lock_acquired(key: int, waited: float) -> None:
    _emit(
        "lock_acquired",
        [f"✅ Acquired migration lock (key {key}, after {waited:.1f}s)"],
        key=str(key),
        waited_seconds=round(waited, 1),
    )


def lock_timeout(
    waited: float, holder: Holder | None = None, *, fail: bool = False, answered: bool = True
) -> None:
    """The lock stayed busy for the whole wait: the seed's graceful skip when a runner holds it
    (or when the version table stayed locked by one), and the plain truth when the holder is no
    runner of ours, or the database never answered, since then nothing shows anyone migrating."""
    outcome = (
        "not starting the service (MIGRATION_ON_LOCK_TIMEOUT=fail)"
        if fail
        else ("skipping migrations")
    )
    first = f"MIGRATION CHECKPOINT: Could not acquire lock in time -> {outcome}"
    lines = [f"❌ {first}" if fail else f"⚠️ {first}"]
    runner = holder.is_runner if holder else True
    if not answered:
        runner = None
        lines += [
            f"   Waited {waited:.0f}s for the database to answer, so the lock was never tried",
            "   Migrations did NOT run here, and nothing shows that another container is "
            "running them",
        ]
    elif runner:
        lines.append(f"   Waited {waited:.0f}s but another process is running migrations")
        if not fail:
            lines.append("   This is SAFE - migrations will run in another container")
    else:
        assert holder is not None
        what = (
            "which is not a prosaas-migrate runner"
            if runner is False
            else "which shows no application_name: it may not be a runner"
        )
        lines += [
            f"   Waited {waited:.0f}s; the lock is held by {holder.describe()}, {what}",
            "   Migrations did NOT run here, and nothing shows that another container is "
            "running them",
            f"   If that session is stale, end it (SELECT pg_terminate_backend({holder.pid})); "
            "if it uses this key for something else, set MIGRATION_LOCK_KEY",
        ]
    _emit(
        "lock_timeout",
        lines,
        level="error" if fail else "warning",
        waited_seconds=round(waited, 1),
        holder=holder.as_dict() if holder else None,
        holder_is_runner=runner,
        database_answered=answered,
        outcome="fail" if fail else "skip",
    )


def lock_released(key: int) -> None:
    _emit("lock_released", [f"✅ Released migration lock (key {key})"], key=str(key))


def lock_lost(key: int, reason: str, consequence: str) -> None:
    _emit(
        "lock_lost",
        [f"❌ MIGRATION LOCK LOST: key {key}: {reason}", f"   {consequence}"],
        level="error",
        key=str(key),
        reason=reason,
    )


def pooler_refused(reason: str) -> None:
    _emit(
        "transaction_pooling_refused",
        [
            f"❌ Refusing to migrate through this connection pooler: {reason}",
            "   An advisory lock is held by a server session from lock to unlock, and the",
            "   upgrade needs sessions of its own; transaction (or statement) pooling would take",
            "   the lock on one server connection and release it on another. Set",
            "   MIGRATION_DATABASE_URL to connect straight to PostgreSQL (or use a",
            "   session-pooling PgBouncer database with room for a few more clients).",
        ],
        level="error",
        reason=reason,
    )


def at_head(heads: Sequence[str], *, locked: bool) -> None:
    why = "checked again under the lock" if locked else "lock not needed"
    _emit(
        "schema_current",
        [f"✅ Schema is current at {_revisions(heads)}: nothing to migrate ({why})"],
        heads=list(heads),
        locked=locked,
    )


def waiting_for_head(target: Sequence[str], current: Sequence[str], waited: float) -> None:
    _emit(
        "waiting_for_head",
        [
            f"⏳ Waiting for the schema to reach {_revisions(target)} "
            f"(now at {_revisions(current)}, {waited:.0f}s so far)"
        ],
        heads=list(target),
        current=list(current),
        waited_seconds=round(waited, 1),
    )


def head_reached(target: Sequence[str], waited: float) -> None:
    _emit(
        "head_reached",
        [f"✅ Schema is at {_revisions(target)} (waited {waited:.1f}s): starting the service"],
        heads=list(target),
        waited_seconds=round(waited, 1),
    )


def head_not_reached(
    target: Sequence[str], current: Sequence[str], waited: float, problem: str | None = None
) -> None:
    lines = [
        f"❌ The schema did not reach {_revisions(target)} within {waited:.0f}s "
        f"(still at {_revisions(current)}): not starting the service"
    ]
    if problem:
        lines.append(f"   Last problem reading it: {problem}")
    _emit(
        "head_not_reached",
        lines,
        level="error",
        heads=list(target),
        current=list(current),
        waited_seconds=round(waited, 1),
        problem=problem,
    )


def read_problem(problem: str) -> None:
    _emit(
        "version_read_failed",
        [f"⚠️ Cannot read the schema's version yet: {problem}; trying again"],
        level="warning",
        reason=problem,
    )


def applying(revision: str, message: str | None) -> None:
    _emit(
        "revision_applying",
        [f"🔧 Applying revision {revision}{_message(message)}"],
        revision=revision,
        revision_message=message,
    )


def ran(revision: str, message: str | None, *, committed: bool = False) -> None:
    """A revision's upgrade() finished; `committed`: its transaction has committed too (with
    transaction_per_migration, each revision's own, before the next one starts)."""
    state = "committed (transaction_per_migration)" if committed else "not committed yet"
    _emit(
        "revision_ran",
        [f"☑️ Ran revision {revision}{_message(message)}: {state}"],
        revision=revision,
        revision_message=message,
        committed=committed,
    )


def migrations_done(committed: Sequence[str], heads: Sequence[str]) -> None:
    _emit(
        "migrations_complete",
        [
            f"✅ Migrations complete: {len(committed)} revision(s) applied, now at "
            f"{_revisions(heads)} (committed: {', '.join(committed)})"
        ],
        count=len(committed),
        revisions=list(committed),
        heads=list(heads),
    )


def migration_failed(
    revision: str | None,
    error: str,
    rolled_back: Sequence[str] = (),
    committed: Sequence[str] = (),
    partly: Sequence[str] = (),
) -> None:
    where = f"revision {revision}" if revision else "the upgrade"
    lines = [f"❌ MIGRATION FAILED in {where}: {error}"]
    if rolled_back:
        lines.append(
            f"   Rolled back: {', '.join(rolled_back)} (nothing of them is in the database)"
        )
    else:
        lines.append("   Rolled back")
    if partly:
        lines.append(
            f"   Except what {', '.join(partly)} ran outside a transaction (autocommit_block): "
            "that was committed as it ran and stays"
        )
    if committed:
        lines.append(f"   Committed before the failure, and kept: {', '.join(committed)}")
    lines.append("   The service is not started")
    _emit(
        "migration_failed",
        lines,
        level="error",
        revision=revision,
        error=error,
        rolled_back=list(rolled_back),
        committed=list(committed),
        partly_applied=list(partly),
    )


def version_table_busy(waited: float, cause: str) -> None:
    _emit(
        "version_table_busy",
        [
            f"⏳ The version table stayed locked for {waited:.1f}s: a migration is running "
            f"elsewhere ({cause})"
        ],
        level="warning",
        waited_seconds=round(waited, 1),
        reason=cause,
    )


def no_answer(waited: float) -> None:
    _emit(
        "no_answer",
        [
            f"⏳ The database did not answer within {waited:.1f}s (a pooler's queue full of "
            "busy servers, or a server that hangs)"
        ],
        level="warning",
        waited_seconds=round(waited, 1),
    )


def lock_released_with_session(key: int) -> None:
    _emit(
        "lock_released_with_session",
        [f"✅ Migration lock {key} released with its session (the connection was closed)"],
        key=str(key),
    )


def exec_service(argv: Sequence[str]) -> None:
    _emit("service_exec", [f"🚀 Starting service: {' '.join(argv)}"], command=list(argv))


def no_command() -> None:
    _emit("no_command", ["✅ No service command given: exiting 0"])


def interrupted(
    signal_name: str, *, after_commit: bool = False, partly: Sequence[str] = ()
) -> None:
    if after_commit:
        line = (
            f"🛑 Interrupted by {signal_name} after the migrations were committed: "
            "not starting the service, exiting"
        )
    else:
        line = f"🛑 Interrupted by {signal_name} before the service started: rolled back, exiting"
    lines = [line]
    if partly and not after_commit:
        lines.append(
            f"   Except what {', '.join(partly)} ran outside a transaction (autocommit_block): "
            "that was committed as it ran and stays"
        )
    _emit(
        "interrupted",
        lines,
        level="warning",
        signal=signal_name,
        after_commit=after_commit,
        partly_applied=list(partly),
    )


def error(message: str) -> None:
    _emit("error", [f"❌ prosaas-migrate: {message}"], level="error", error=message)


def _revisions(revisions: Sequence[str]) -> str:
    return ", ".join(revisions) if revisions else "base (no revisions)"


def _message(message: str | None) -> str:
    return f" ({message})" if message else ""
