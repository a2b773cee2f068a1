"""The recording worker's structured events, one function each, through Python logging.

    from prosaas_migrate import worker_events as events
    events.configure_logging()                   # text, or JSON with MIGRATION_LOG_FORMAT=json
    events.picked("download_only", call_sid, business_id)
    events.slot_acquired(call_sid, business_id)
    events.download_done(call_sid, file="CA123.mp3", size=1234567)
    events.release_slot(call_sid, business_id, reason="success")
    events.job_failed(call_sid, business_id, error="timeout")

Each call logs exactly one line, `<emoji> [WORKER_<EVENT>] key=value ...`. A value with a blank,
a quote, a bracket, an `=` or any control character is written as a double-quoted string with
backslash escapes, so no value (a call_sid holding a newline and a fake `[WORKER_PICKED]`, say)
can forge a line or a field. `prosaas-migrate worker-trace` reads these lines back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime

LOGGER = logging.getLogger("prosaas.worker")

PICKED = "WORKER_PICKED"
SLOT_ACQUIRED = "WORKER_SLOT_ACQUIRED"
DOWNLOAD_DONE = "WORKER_DOWNLOAD_DONE"
RELEASE_SLOT = "WORKER_RELEASE_SLOT"
JOB_FAILED = "WORKER_JOB_FAILED"
MARKERS = {
    PICKED: "🎯",
    SLOT_ACQUIRED: "✅",
    DOWNLOAD_DONE: "✅",
    RELEASE_SLOT: "🔓",
    JOB_FAILED: "❌",
}

_PLAIN = re.compile(r"[^\s\"'\\=\[\]\x00-\x1f\x7f]+")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quote(value: object) -> str:
    """The value as it stands in a line: bare when harmless, else quoted with escapes."""
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    escaped = "".join(
        _ESCAPES.get(ch, f"\\x{ord(ch):02x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
        for ch in text
    )
    return f'"{escaped}"'


def format_line(event: str, fields: Mapping[str, object]) -> str:
    pairs = " ".join(f"{key}={quote(value)}" for key, value in fields.items())
    return f"{MARKERS[event]} [{event}] {pairs}"


def _log(event: str, level: int, **fields: object) -> None:
    LOGGER.log(level, format_line(event, fields), extra={"worker_event": event, "fields": fields})


def picked(job_type: str, call_sid: str, business_id: object) -> None:
    _log(PICKED, logging.INFO, job_type=job_type, call_sid=call_sid, business_id=business_id)


def slot_acquired(call_sid: str, business_id: object) -> None:
    _log(SLOT_ACQUIRED, logging.INFO, call_sid=call_sid, business_id=business_id)


def download_done(call_sid: str, *, file: str, size: int) -> None:
    _log(DOWNLOAD_DONE, logging.INFO, call_sid=call_sid, file=file, bytes=size)


def release_slot(call_sid: str, business_id: object, *, reason: str) -> None:
    _log(RELEASE_SLOT, logging.INFO, call_sid=call_sid, business_id=business_id, reason=reason)


def job_failed(call_sid: str, business_id: object, *, error: str) -> None:
    _log(JOB_FAILED, logging.ERROR, call_sid=call_sid, business_id=business_id, error=error)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, event, message and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "worker_event", None)
        document: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": event or record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            document.update({key: value for key, value in fields.items() if key not in document})
        return json.dumps(document, default=str)


def configure_logging(log_format: str | None = None, stream: object = None) -> logging.Handler:
    """Send the worker events to stderr as text or JSON (default: $MIGRATION_LOG_FORMAT)."""
    chosen = (log_format or os.environ.get("MIGRATION_LOG_FORMAT") or "text").strip().lower()
    if chosen not in ("text", "json"):
        raise ValueError(f"MIGRATION_LOG_FORMAT: {chosen!r} is invalid; expected text or json")
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(JsonFormatter() if chosen == "json" else logging.Formatter("%(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    return handler
