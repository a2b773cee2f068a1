"""Read worker logs and find recording loops, leaked slots and repeated failures, streaming.

Memory follows what is unusual or unfinished, not the number of lines: a call whose job ends
normally (downloaded, slot released) is counted and forgotten.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prosaas_migrate.worker_events import (
    DOWNLOAD_DONE,
    JOB_FAILED,
    MARKERS,
    PICKED,
    RELEASE_SLOT,
    SLOT_ACQUIRED,
)

# Every pattern must stay linear in the line's length, whatever the line holds: possessive
# quantifiers over disjoint classes, so a failed match never backtracks into what it consumed.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*+[ -/]*+[@-~]|[@-Z\\-_])")  # colour codes and friends
_COMPOSE_PREFIX = re.compile(r"[\w.-]++ *+\| ?")  # "worker-1  | " from `docker compose logs`
_STAMP = (
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:[.,]([0-9]++))?(?:([Zz])|([+-])([0-9]{2})(?::?([0-9]{2}))?)?"
)
_STAMP_ANYWHERE = re.compile(_STAMP)
# `docker compose logs -t` and `docker logs -t` put one in front of the line; so do many apps.
_LEADING_STAMP = re.compile(rf"(?:{_STAMP})(?=\s)")
_TAG = re.compile(r"\[(WORKER_[A-Z_]++)\]")
# A pair starts a whitespace-separated token; anything else in the token is skipped at once.
# A quoted value runs to its closing quote (or, cut short, to the end of the line).
_PAIR = re.compile(r'(?<!\S)([A-Za-z_][\w.-]*+)=(?:(")((?:[^"\\]++|\\.)*+)"?|(\S*+))')
_UNESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|.)")
_JSON_ENVELOPE = ("ts", "level", "event", "message")
HISTORY = 20  # lifecycle events kept for each call that is reported
ERRORS_KEPT = 5


@dataclass(frozen=True)
class Event:
    name: str
    fields: dict[str, str]
    ts: str | None


def parse_line(line: str) -> Event | None:
    """The worker event on this line, or None (unrelated lines are common and fine)."""
    body, stamp = unwrap(line)
    return parse_body(body, stamp)


def unwrap(line: str) -> tuple[str, str | None]:
    """The line as the worker wrote it, and the timestamp in front of it, if any.

    Takes off what is put around a line on its way to the reader: colour codes (compose colours
    its prefix, an app may colour its line), the `service-1  | ` prefix of `docker compose logs`
    and one leading timestamp (`-t`, RFC 3339 with nanoseconds, or the app's own).
    """
    body = line.rstrip("\r\n")
    if "\x1b" in body:
        body = _ANSI.sub("", body)
    prefix = _COMPOSE_PREFIX.match(body)
    if prefix:
        body = body[prefix.end() :]
    if body[:1].isdigit():
        stamp = _LEADING_STAMP.match(body)
        if stamp:
            return body[stamp.end() :].lstrip(), stamp.group(0)
    return body, None


def parse_body(body: str, stamp: str | None = None) -> Event | None:
    """The worker event in an unwrapped line; `stamp` is its time when it carries none itself."""
    if "WORKER_" not in body:
        return None
    stripped = body.lstrip()
    if stripped.startswith("{"):
        return _parse_json(stripped, stamp)
    tag = _TAG.search(body)  # the first tag is the event: a value can never hold a bare one
    if not tag or tag.group(1) not in MARKERS:
        return None
    own = _STAMP_ANYWHERE.search(body, 0, tag.start())
    return Event(tag.group(1), _parse_pairs(body, tag.end()), own.group(0) if own else stamp)


def _parse_json(text: str, stamp: str | None) -> Event | None:
    """Our JSON line, or None for anything else: foreign JSON (Elastic's `event` object, arrays,
    numbers), malformed or absurdly deep text is noise like any other line."""
    try:
        document = json.loads(text)
        if not isinstance(document, dict):
            return None
        name = document.get("event")
        if not isinstance(name, str) or name not in MARKERS:
            return None
        fields = {
            key: value if isinstance(value, str) else json.dumps(value)
            for key, value in document.items()
            if key not in _JSON_ENVELOPE and value is not None
        }
    except (ValueError, RecursionError):  # ValueError covers JSONDecodeError and huge numbers
        return None
    ts = document.get("ts")
    return Event(name, fields, ts if isinstance(ts, str) else stamp)


def _parse_pairs(text: str, start: int) -> dict[str, str]:
    """key=value pairs after `start`, left to right; a quoted value is taken whole, never searched
    inside, so no value can forge a field."""
    return {
        key: _unquote(inner) if quote else bare
        for key, quote, inner, bare in _PAIR.findall(text, start)
    }


def _unquote(inner: str) -> str:
    def replace(match: re.Match[str]) -> str:
        code = match.group(1)
        if code.startswith("x") and len(code) == 3:
            return chr(int(code[1:], 16))
        return {"n": "\n", "r": "\r", "t": "\t"}.get(code, code)

    return _UNESCAPE.sub(replace, inner)


@dataclass
class Call:
    """What is known of one call_sid while it is unfinished or unusual."""

    call_sid: str
    business_id: str | None = None
    picks_total: int = 0
    picks_since_download: int = 0
    longest_streak: int = 0  # most picks in a row without a download: a loop, even if it ended
    first_picked: str | None = None
    last_picked: str | None = None
    downloaded: bool = False
    failures: int = 0
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=ERRORS_KEPT))
    history: deque[tuple[str, str | None]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    flagged: bool = False  # keep it after its job ends: it is reported

    def lifecycle(self) -> list[dict[str, str | None]]:
        return [{"event": name, "ts": ts} for name, ts in self.history]


@dataclass
class Trace:
    """Feed events in log order; read the findings with report()."""

    loop_threshold: int = 3
    lines: int = 0
    events: int = 0
    completed: int = 0
    calls: dict[str, Call] = field(default_factory=dict)
    held: dict[str, dict[str, str | None]] = field(default_factory=dict)  # business -> call -> ts
    most_held: dict[str, int] = field(default_factory=dict)
    leaks: list[dict[str, str | None]] = field(default_factory=list)
    double_releases: list[dict[str, str | None]] = field(default_factory=list)

    def read(self, lines: Iterable[str]) -> Trace:
        for line in lines:
            self.lines += 1
            event = parse_line(line)
            if event is not None:
                self.feed(event)
        return self

    def feed(self, event: Event) -> None:
        self.events += 1
        call_sid = event.fields.get("call_sid", "?")
        call = self.calls.get(call_sid) or self.calls.setdefault(call_sid, Call(call_sid))
        business = event.fields.get("business_id") or call.business_id or "?"
        call.business_id = call.business_id or event.fields.get("business_id")
        call.history.append((event.name, event.ts))
        if event.name == PICKED:
            self._picked(call, business, event.ts)
        elif event.name == SLOT_ACQUIRED:
            self._acquired(call, business, event.ts)
        elif event.name == DOWNLOAD_DONE:
            call.downloaded = True
            call.picks_since_download = 0
        elif event.name == RELEASE_SLOT:
            self._released(call, business, event.ts)
        elif event.name == JOB_FAILED:
            call.failures += 1
            call.errors.append(event.fields.get("error", ""))
            call.flagged |= call.failures >= 2

    def _picked(self, call: Call, business: str, ts: str | None) -> None:
        if call.call_sid in self.held.get(business, {}):
            self._leak(business, call, "picked again before its slot was released")
        call.picks_total += 1
        call.picks_since_download += 1
        call.longest_streak = max(call.longest_streak, call.picks_since_download)
        call.first_picked = call.first_picked or ts
        call.last_picked = ts
        call.downloaded = False
        call.flagged |= call.picks_since_download >= self.loop_threshold

    def _acquired(self, call: Call, business: str, ts: str | None) -> None:
        slots = self.held.setdefault(business, {})
        if call.call_sid in slots:
            self._leak(business, call, "acquired again before it was released")
        slots[call.call_sid] = ts
        self.most_held[business] = max(self.most_held.get(business, 0), len(slots))

    def _released(self, call: Call, business: str, ts: str | None) -> None:
        slots = self.held.get(business, {})
        if slots.pop(call.call_sid, _MISSING) is _MISSING:
            self.double_releases.append(
                {"business_id": business, "call_sid": call.call_sid, "ts": ts}
            )
            call.flagged = True
        if call.downloaded and not call.flagged:
            self.completed += 1  # a normal job: count it and forget it
            del self.calls[call.call_sid]

    def _leak(self, business: str, call: Call, why: str) -> None:
        acquired = self.held[business].pop(call.call_sid)
        self.leaks.append(
            {"business_id": business, "call_sid": call.call_sid, "acquired": acquired, "why": why}
        )
        call.flagged = True

    def report(self) -> dict[str, Any]:
        loops = [
            {
                "call_sid": c.call_sid,
                "business_id": c.business_id,
                "picks": c.longest_streak,
                "downloaded_since": c.picks_since_download == 0,
                "first_picked": c.first_picked,
                "last_picked": c.last_picked,
                "lifecycle": c.lifecycle(),
            }
            for c in self.calls.values()
            if c.longest_streak >= self.loop_threshold
        ]
        still_held = [
            {"business_id": b, "call_sid": s, "acquired": ts, "why": "still held at end of input"}
            for b, slots in self.held.items()
            for s, ts in slots.items()
        ]
        failures = [
            {
                "call_sid": c.call_sid,
                "business_id": c.business_id,
                "failures": c.failures,
                "errors": list(c.errors),
                "lifecycle": c.lifecycle(),
            }
            for c in self.calls.values()
            if c.failures >= 2
        ]
        return {
            "lines": self.lines,
            "worker_events": self.events,
            "jobs_completed": self.completed,
            "loop_threshold": self.loop_threshold,
            "recording_loops": sorted(loops, key=lambda x: -int(str(x["picks"]))),
            "leaked_slots": self.leaks + still_held,
            "double_releases": self.double_releases,
            "repeated_failures": sorted(failures, key=lambda x: -int(str(x["failures"]))),
            "most_slots_held": dict(sorted(self.most_held.items())),
            "unfinished_calls": sum(
                1 for c in self.calls.values() if not c.flagged and not c.downloaded
            ),
        }


_MISSING = object()


def problems_found(report: dict[str, Any]) -> bool:
    return bool(report["recording_loops"] or report["leaked_slots"] or report["double_releases"])


def render_text(report: dict[str, Any]) -> str:
    out = [
        f"worker-trace: {report['lines']:,} lines, {report['worker_events']:,} worker events, "
        f"{report['jobs_completed']:,} jobs completed normally, "
        f"{report['unfinished_calls']:,} unfinished"
    ]

    def section(title: str, rows: list[str]) -> None:
        out.append("")
        out.append(f"{title}: {len(rows) or 'none'}")
        out.extend(f"  {row}" for row in rows)

    section(
        f"Recording loops (picked {report['loop_threshold']}+ times without a download)",
        [
            f"{x['call_sid']} business_id={x['business_id']} picked {x['picks']} times "
            f"(first {x['first_picked'] or '?'}, last {x['last_picked'] or '?'})"
            for x in report["recording_loops"]
        ],
    )
    section(
        "Leaked slots",
        [
            f"business_id={x['business_id']} {x['call_sid']}: {x['why']} "
            f"(acquired {x['acquired'] or '?'})"
            for x in report["leaked_slots"]
        ],
    )
    section(
        "Slots released twice (or never acquired)",
        [
            f"business_id={x['business_id']} {x['call_sid']} (at {x['ts'] or '?'})"
            for x in report["double_releases"]
        ],
    )
    section(
        "Repeated failures",
        [
            f"{x['call_sid']} business_id={x['business_id']} failed {x['failures']} times: "
            + "; ".join(x["errors"])
            for x in report["repeated_failures"]
        ],
    )
    section(
        "Most slots held at once, per business",
        [f"business_id={b}: {n}" for b, n in report["most_slots_held"].items()],
    )
    return "\n".join(out)
