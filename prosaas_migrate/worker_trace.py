"""Read worker logs and find recording loops, leaked slots and repeated failures, streaming.

Memory follows what is unusual or unfinished, not the number of lines: a call whose job ends
normally (downloaded, slot released) is counted and forgotten. A log is usually cut at both ends
(`docker compose logs --tail` or `--since`, a worker still running), so a job already under way
when the log begins, or still under way when it ends, is counted as such and is no problem: only
what the log itself proves is.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from typing import Any, NamedTuple

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
_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?[hms])+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)([hms])")
_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1}
HISTORY = 20  # lifecycle events kept for each call that is reported
ERRORS_KEPT = 5
FINISHED_KEPT = 1024  # finished calls remembered, so a second release of one is recognised
RECENT_STAMPS = 64  # the log's latest time is the latest of its last this many
DEFAULT_LEAK_AFTER = timedelta(minutes=10)


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


def parse_timestamp(text: str) -> datetime | None:
    """An ISO 8601 time as logs write it (`Z` or an offset, `.` or `,` fractions, up to
    nanoseconds), or None. Without an offset it is naive: compared only with other naive times."""
    match = _STAMP_ANYWHERE.fullmatch(text.strip())
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, zulu, sign, zone_h, zone_m = match.groups()
    try:
        zone = UTC if zulu else _offset(sign, zone_h, zone_m or "00") if sign else None
        micro = int(fraction[:6].ljust(6, "0")) if fraction else 0
        return datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micro, zone
        )
    except ValueError:  # month 13, second 60, offset +25:00
        return None


@lru_cache(maxsize=64)
def _offset(sign: str, hours: str, minutes: str) -> timezone:
    delta = timedelta(hours=int(hours), minutes=int(minutes))
    return timezone(-delta if sign == "-" else delta)


def parse_duration(text: str) -> timedelta:
    """`90s`, `10m`, `1h`, `1h30m`, `1.5h`: numbers with the unit h, m or s; more than zero."""
    if not _DURATION.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a duration; expected a number and a unit h, m or s, "
            "like 90s, 10m, 1h or 1h30m"
        )
    seconds = sum(
        float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(text)
    )
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a duration longer than zero")
    return timedelta(seconds=seconds)


def format_duration(seconds: float) -> str:
    """1h, 1h02m, 12m05s, 45s: how long, at a glance."""
    if seconds < 1:
        return f"{seconds:g}s"
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
    return f"{secs}s"


class Clock:
    """The log's own clock: the latest of its last few timestamps, parsed only when asked.

    Lines from several replicas arrive a little out of order, hence the latest of several rather
    than the very last. Times with an offset and times without one are kept apart: a log may mix
    compose's UTC with an app's local time, and comparing them would invent hours.
    """

    def __init__(self) -> None:
        self.recent: deque[str] = deque(maxlen=RECENT_STAMPS)
        self.see: Callable[[str], None] = self.recent.append  # once a line: keep it one C call

    def now(self) -> Now:
        moments = [m for m in map(parse_timestamp, self.recent) if m is not None]
        return Now(
            max((m for m in moments if m.tzinfo), default=None),
            max((m for m in moments if not m.tzinfo), default=None),
        )


class Now(NamedTuple):
    aware: datetime | None
    naive: datetime | None

    def since(self, stamp: str | None) -> float | None:
        """Seconds from `stamp` to now, when both are times of the same kind."""
        start = parse_timestamp(stamp) if stamp else None
        end = self.naive if start and not start.tzinfo else self.aware
        return round((end - start).total_seconds(), 3) if start and end else None


# What the log shows of a call's slot.
UNKNOWN = "unknown"  # no pick, acquire or release of it yet: its job began before the log
PICKED_ONLY = "picked"  # picked in the log, not acquired since
HELD = "held"
RELEASED = "released"


@dataclass(slots=True)
class Call:
    """What is known of one call_sid while it is unfinished or unusual."""

    call_sid: str
    business_id: str | None = None
    slot: str = UNKNOWN
    slot_business: str = "?"  # where the held slot is counted
    acquired: str | None = None  # the acquire's time, as the line wrote it
    held_since: str | None = None  # the acquire's, or the first later time of its job
    last_event: str = ""
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
    """Feed lines or events in log order; read the findings with report()."""

    loop_threshold: int = 3
    leak_after: timedelta = DEFAULT_LEAK_AFTER
    lines: int = 0
    events: int = 0
    completed: int = 0
    started_before_log: int = 0
    calls: dict[str, Call] = field(default_factory=dict)
    finished: OrderedDict[str, None] = field(default_factory=OrderedDict)
    holding: dict[str, int] = field(default_factory=dict)  # business -> slots held now
    most_held: dict[str, int] = field(default_factory=dict)
    leaks: list[dict[str, Any]] = field(default_factory=list)
    double_releases: list[dict[str, str | None]] = field(default_factory=list)
    clock: Clock = field(default_factory=Clock)  # the log's own, never the wall clock

    def read(self, lines: Iterable[str]) -> Trace:
        for line in lines:
            self.lines += 1
            body, stamp = unwrap(line)
            event = parse_body(body, stamp)
            if event is not None:
                self.feed(event)
            if stamp is not None and (event is None or event.ts != stamp):
                self.clock.see(stamp)
        return self

    def feed(self, event: Event) -> None:
        call_sid = event.fields.get("call_sid")
        if not call_sid:
            return  # no job to pin it on: a mention of a tag, not a worker event
        self.events += 1
        if event.ts:
            self.clock.see(event.ts)
        call = self._call(call_sid, event.name)
        business = event.fields.get("business_id") or call.business_id or "?"
        call.business_id = call.business_id or event.fields.get("business_id")
        call.history.append((event.name, event.ts))
        call.last_event = event.name
        if event.name == PICKED:
            self._picked(call, event.ts)
        elif event.name == SLOT_ACQUIRED:
            self._acquired(call, business, event.ts)
        elif event.name == RELEASE_SLOT:
            self._released(call, business, event.ts)
        else:
            if call.slot == HELD and call.held_since is None:
                call.held_since = event.ts  # the acquire had no time; it came before this
            if event.name == DOWNLOAD_DONE:
                call.downloaded = True
                call.picks_since_download = 0
            elif event.name == JOB_FAILED:
                call.failures += 1
                call.errors.append(event.fields.get("error", ""))
                call.flagged |= call.failures >= 2

    def _call(self, call_sid: str, first_event: str) -> Call:
        call = self.calls.get(call_sid)
        if call is None:
            call = self.calls[call_sid] = Call(call_sid)
            if call_sid in self.finished:
                del self.finished[call_sid]
                call.slot = RELEASED  # its last job ended in this log
            elif first_event != PICKED:
                self.started_before_log += 1
        return call

    def _picked(self, call: Call, ts: str | None) -> None:
        if call.slot == HELD:
            self._leak(call, "picked again before its slot was released")
        call.slot = PICKED_ONLY
        call.picks_total += 1
        call.picks_since_download += 1
        call.longest_streak = max(call.longest_streak, call.picks_since_download)
        call.first_picked = call.first_picked or ts
        call.last_picked = ts
        call.downloaded = False
        call.flagged |= call.picks_since_download >= self.loop_threshold

    def _acquired(self, call: Call, business: str, ts: str | None) -> None:
        if call.slot == HELD:
            self._leak(call, "acquired again before it was released")
        call.slot, call.slot_business = HELD, business
        call.acquired = call.held_since = ts
        held = self.holding[business] = self.holding.get(business, 0) + 1
        self.most_held[business] = max(self.most_held.get(business, 0), held)

    def _released(self, call: Call, business: str, ts: str | None) -> None:
        if call.slot == HELD:
            self._let_go(call)
        elif call.slot in (RELEASED, PICKED_ONLY):  # UNKNOWN: acquired before the log began
            why = "released twice" if call.slot == RELEASED else "released but never acquired"
            self.double_releases.append(
                {"business_id": business, "call_sid": call.call_sid, "ts": ts, "why": why}
            )
            call.flagged = True
        call.slot = RELEASED
        if call.flagged:
            return  # reported: keep it
        if call.downloaded:
            self.completed += 1  # a normal job: count it and forget it
        elif call.picks_since_download or call.failures:
            return  # due for a retry: a loop or a repeated failure may follow
        self._forget(call)

    def _forget(self, call: Call) -> None:
        del self.calls[call.call_sid]
        self.finished[call.call_sid] = None
        if len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)

    def _let_go(self, call: Call) -> None:
        left = self.holding[call.slot_business] - 1
        if left:
            self.holding[call.slot_business] = left
        else:
            del self.holding[call.slot_business]
        call.slot = RELEASED

    def _leak(self, call: Call, why: str) -> None:
        self.leaks.append(self._slot(call, self.clock.now()) | {"why": why})
        self._let_go(call)
        call.flagged = True

    def _slot(self, call: Call, now: Now) -> dict[str, Any]:
        return {
            "business_id": call.slot_business,
            "call_sid": call.call_sid,
            "acquired": call.acquired,
            "held_seconds": now.since(call.held_since),  # None when its lines lack times
        }

    def report(self) -> dict[str, Any]:
        limit = self.leak_after.total_seconds()
        now = self.clock.now()
        held_too_long, in_flight = [], []
        for call in self.calls.values():
            held = now.since(call.held_since) if call.slot == HELD else None
            if held is not None and held > limit:
                why = f"held longer than --leak-after {format_duration(limit)} in the log"
                held_too_long.append(self._slot(call, now) | {"why": why})
            elif not call.flagged and call.last_event != RELEASE_SLOT:
                in_flight.append(
                    {
                        "call_sid": call.call_sid,
                        "business_id": call.business_id,
                        "last_event": call.last_event,
                        "slot_held": call.slot == HELD,
                        "acquired": call.acquired if call.slot == HELD else None,
                        "held_seconds": held,
                    }
                )
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
        latest = now.aware or now.naive
        return {
            "lines": self.lines,
            "worker_events": self.events,
            "jobs_completed": self.completed,
            "in_flight_at_end": len(in_flight),
            "started_before_log": self.started_before_log,
            "last_timestamp": latest.isoformat() if latest else None,
            "loop_threshold": self.loop_threshold,
            "leak_after_seconds": limit,
            "recording_loops": sorted(loops, key=lambda x: -int(str(x["picks"]))),
            "leaked_slots": self.leaks + held_too_long,
            "double_releases": self.double_releases,
            "repeated_failures": sorted(failures, key=lambda x: -int(str(x["failures"]))),
            "in_flight": in_flight,
            "most_slots_held": dict(sorted(self.most_held.items())),
        }


def problems_found(report: dict[str, Any]) -> bool:
    """What gates CI: only what the log proves. In-flight and earlier jobs are not problems."""
    return bool(report["recording_loops"] or report["leaked_slots"] or report["double_releases"])


def render_text(report: dict[str, Any]) -> str:
    out = [
        f"worker-trace: {report['lines']:,} lines, {report['worker_events']:,} worker events, "
        f"{report['jobs_completed']:,} jobs completed normally, "
        f"{report['in_flight_at_end']:,} in flight at end of input, "
        f"{report['started_before_log']:,} started before the log"
    ]

    def section(title: str, rows: list[str]) -> None:
        out.append("")
        out.append(f"{title}: {len(rows) or 'none'}")
        out.extend(f"  {row}" for row in rows)

    def held(x: dict[str, Any]) -> str:
        seconds = x["held_seconds"]
        since = f"acquired {x['acquired'] or '?'}"
        return f"{since}, held {format_duration(seconds)}" if seconds is not None else since

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
            f"business_id={x['business_id']} {x['call_sid']}: {x['why']} ({held(x)})"
            for x in report["leaked_slots"]
        ],
    )
    section(
        "Slots released twice (or never acquired)",
        [
            f"business_id={x['business_id']} {x['call_sid']}: {x['why']} (at {x['ts'] or '?'})"
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
        "In flight at end of input (not a problem)",
        [
            f"{x['call_sid']} business_id={x['business_id']}: last {x['last_event']}"
            + (", holding a slot" if x["slot_held"] else "")
            + (f" ({held(x)})" if x["acquired"] else "")
            for x in report["in_flight"]
        ],
    )
    out.append("")
    out.append(f"Started before the log (not a problem): {report['started_before_log'] or 'none'}")
    section(
        "Most slots held at once, per business",
        [f"business_id={b}: {n}" for b, n in report["most_slots_held"].items()],
    )
    return "\n".join(out)
