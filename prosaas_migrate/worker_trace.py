"""Read worker logs and find recording loops, leaked slots and repeated failures, streaming.

Memory follows what is unusual or unfinished, not the number of lines: a call whose job ends
normally (downloaded, slot released) is counted and forgotten. A log is usually cut at both ends
(`docker compose logs --tail` or `--since`, a worker still running), so a job already under way
when the log begins, or still under way when it ends, is counted as such and is no problem: only
what the log itself proves is.

A log need not be in time order: `kubectl logs -l app=worker --prefix` (without -f) or
`cat worker-1.log worker-2.log` prints one replica after another, and a call retried on another
replica then shows a later attempt before an earlier one. Each call remembers the latest time of
its events; an event earlier than that is out of time order: it is counted, never judged against
the later state, and a finding it could undo (a release inside the span of a "picked again before
its slot was released", say) is withdrawn. Without times on the lines, input order is time order.
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
# Who wrote the line: "worker-1  | " from `docker compose logs`, "[pod/worker-7c9/worker] " from
# `kubectl logs --prefix`.
_PREFIX = re.compile(r"(?:([\w.-]++) *+\||\[pod/([^\s\]/]++/[^\s\]/]++)\]) ?")
_STAMP = (
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:[.,]([0-9]++))?(?:([Zz])|([+-])([0-9]{2})(?::?([0-9]{2}))?)?"
)
_STAMP_ANYWHERE = re.compile(_STAMP)  # .search() for one in a line, .fullmatch() for a field
# `docker compose logs -t` and `docker logs -t` put one in front of the line; so do many apps.
_LEADING_STAMP = re.compile(rf"(?:{_STAMP})(?=\s)")
_TAG = re.compile(r"\[(WORKER_[A-Z_]++)\]")
# A pair starts a whitespace-separated token; anything else in the token is skipped at once.
# A quoted value runs to its closing quote (or, cut short, to the end of the line).
_PAIR = re.compile(r'(?<!\S)([A-Za-z_][\w.-]*+)=(?:(")((?:[^"\\]++|\\.)*+)"?|(\S*+))')
_UNESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|.)")
_JSON_ENVELOPE = ("ts", "level", "event", "message")
# Another logger's JSON around the worker's line: Elastic Common Schema keeps it in `message`
# and its time in `@timestamp`; Docker's json-file driver in `log` and `time`.
_WRAPPED_LINE = ("message", "log")
_WRAPPER_TIME = ("@timestamp", "time")
WRAPPING_DEPTH = 3  # a json-file line around an ECS document around our JSON line, at most
# Each unit at most once, largest first: 1h30m, 90s, 1.5h; never 30m1h or 1m1m.
_NUMBER = r"([0-9]++(?:\.[0-9]++)?)"
_DURATION = re.compile(rf"(?=[0-9])(?:{_NUMBER}h)?+(?:{_NUMBER}m)?+(?:{_NUMBER}s)?+")
LEAK_AFTER_MAX = timedelta(hours=720)  # 30 days: longer than any log worth reading in one go
LEAK_AFTER_RESOLUTION = timedelta(milliseconds=1)  # held times are measured to the millisecond
HISTORY = 20  # lifecycle events kept for each call that is reported
ERRORS_KEPT = 5
FINISHED_KEPT = 1024  # finished calls remembered, so a second release of one is recognised
SOURCES_KEPT = 4096  # replicas whose log's beginning is remembered (a pod name each)
RECENT_STAMPS = 64  # the log's latest time is the latest of its last this many
DEFAULT_LEAK_AFTER = timedelta(minutes=10)


@dataclass(frozen=True)
class Event:
    name: str
    fields: dict[str, str]
    ts: str | None


def parse_line(line: str) -> Event | None:
    """The worker event on this line, or None (unrelated lines are common and fine)."""
    body, stamp, _ = unwrap(line)
    return parse_body(body, stamp)


def unwrap(line: str) -> tuple[str, str | None, str | None]:
    """The line as the worker wrote it, the timestamp in front of it, and the replica whose log
    it is when a prefix names it (a plain tuple: this runs once a line).

    Takes off what is put around a line on its way to the reader: colour codes (compose colours
    its prefix, an app may colour its line), the `service-1  | ` prefix of `docker compose logs`
    or the `[pod/name/container] ` of `kubectl logs --prefix`, and one leading timestamp (`-t`
    or `--timestamps`, RFC 3339 with nanoseconds, or the app's own).
    """
    body = line.rstrip("\r\n")
    if "\x1b" in body:
        body = _ANSI.sub("", body)
    source = None
    prefix = _PREFIX.match(body)
    if prefix:
        body, source = body[prefix.end() :], prefix[1] or prefix[2]
    if body[:1].isdigit():
        stamp = _LEADING_STAMP.match(body)
        if stamp:
            return body[stamp.end() :].lstrip(), stamp.group(0), source
    return body, None, source


def parse_body(body: str, stamp: str | None = None, *, depth: int = 0) -> Event | None:
    """The worker event in an unwrapped line; `stamp` is its time when it carries none itself."""
    if "WORKER_" not in body:
        return None
    stripped = body.lstrip()
    if stripped.startswith("{"):
        return _parse_json(stripped, stamp, depth)
    tag = _TAG.search(body)  # the first tag is the event: a value can never hold a bare one
    if not tag or tag.group(1) not in MARKERS:
        return None
    own = _STAMP_ANYWHERE.search(body, 0, tag.start())
    return Event(tag.group(1), _parse_pairs(body, tag.end()), own.group(0) if own else stamp)


def _parse_json(text: str, stamp: str | None, depth: int) -> Event | None:
    """Our JSON line, or the worker line another logger's JSON holds (ECS `message`, Docker's
    json-file `log`), or None: any other JSON (arrays, numbers, Elastic's `event` object around
    no worker line), malformed or absurdly deep text is noise like any other line."""
    try:
        document = json.loads(text)
        if not isinstance(document, dict):
            return None
        name = document.get("event")
        if not isinstance(name, str) or name not in MARKERS:
            return _wrapped(document, stamp, depth)
        fields = {
            key: value if isinstance(value, str) else json.dumps(value)
            for key, value in document.items()
            if key not in _JSON_ENVELOPE and value is not None
        }
    except (ValueError, RecursionError):  # ValueError covers JSONDecodeError and huge numbers
        return None
    return Event(name, fields, _time_field(document, ("ts",)) or stamp)


def _wrapped(document: dict[str, Any], stamp: str | None, depth: int) -> Event | None:
    """The worker line in the text field of a foreign JSON document, timed by the document."""
    if depth >= WRAPPING_DEPTH:
        return None
    for key in _WRAPPED_LINE:
        line = document.get(key)
        if isinstance(line, str) and "WORKER_" in line:
            body, own, _ = unwrap(line)
            when = own or _time_field(document, _WRAPPER_TIME) or stamp
            return parse_body(body, when, depth=depth + 1)
    return None


def _time_field(document: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    """The first of `keys` that holds a timestamp (a field holding anything else is no time)."""
    for key in keys:
        value = document.get(key)
        if isinstance(value, str) and _STAMP_ANYWHERE.fullmatch(value):
            return value
    return None


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


def earlier(stamp: str, than: str) -> bool:
    """Whether time `stamp` is strictly before time `than`, both timestamps as a line writes them
    (what parse_timestamp reads); False when they cannot be compared: one with an offset and one
    without, or either not a time at all."""
    # When both share their zone (`Z`, or the same `+01:00`), text order is time order and no
    # datetime is built: this runs for nearly every event.
    if stamp[-1:] in _ZULU and than[-1:] in _ZULU:
        zone = 1
    elif len(stamp) >= 25 and stamp[-3] == ":" and stamp[-6] in "+-" and stamp[-6:] == than[-6:]:
        zone = 6
    else:
        start, end = parse_timestamp(stamp), parse_timestamp(than)
        if start is None or end is None or (start.tzinfo is None) != (end.tzinfo is None):
            return False
        return start < end
    if stamp[:10] != than[:10]:
        return stamp[:10] < than[:10]
    if stamp[11:19] != than[11:19]:  # [10] is the date-time separator: T, t or a blank
        return stamp[11:19] < than[11:19]
    mine = stamp[20 : len(stamp) - zone] if stamp[19] in ".," else ""
    theirs = than[20 : len(than) - zone] if than[19] in ".," else ""
    width = max(len(mine), len(theirs))
    return mine.ljust(width, "0") < theirs.ljust(width, "0")


_ZULU = ("Z", "z")


def parse_duration(text: str) -> timedelta:
    """`90s`, `10m`, `1h`, `1h30m`, `1.5h`: numbers with the units h, m and s, each unit at most
    once and largest first; rounded to the millisecond, from 0.001s up to 720h."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(
            f"{text!r} is not a duration; expected numbers with the units h, m and s, each "
            "at most once and largest first, like 90s, 10m, 1h30m or 1.5h"
        )
    hours, minutes, secs = (float(number or 0) for number in match.groups())
    seconds = hours * 3600 + minutes * 60 + secs
    if not seconds <= LEAK_AFTER_MAX.total_seconds():  # `not <=`: float() gives inf, never nan
        raise ValueError(f"{text!r} is a duration longer than the longest allowed, 720h")
    rounded = timedelta(seconds=round(seconds, 3))
    if rounded < LEAK_AFTER_RESOLUTION:
        raise ValueError(f"{text!r} is a duration shorter than the shortest allowed, 0.001s")
    return rounded


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
    slot_source: str | None = None  # the replica of its last pick, acquire or release
    acquired: str | None = None  # the acquire's time, as the line wrote it
    held_since: str | None = None  # the acquire's, or the first later time of its job
    released: str | None = None  # the last release's time
    last_event: str = ""
    picks_total: int = 0
    picks_since_download: int = 0
    longest_streak: int = 0  # most picks in a row without a download: a loop, even if it ended
    first_picked: str | None = None
    last_picked: str | None = None
    downloaded: bool = False
    last_download: str | None = None  # when its latest download was, at the latest
    failures: int = 0
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=ERRORS_KEPT))
    history: deque[tuple[str, str | None]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    seen: int = 0  # its events in the log; history holds them all while seen <= HISTORY
    whole: bool = True  # False when the call was forgotten once: history lacks its first job
    flagged: bool = False  # keep it after its job ends: it is reported
    latest: str | None = None  # the latest time among its events, as the line wrote it
    latest_late: str | None = None  # the latest time among its events out of time order
    proofs: list[Proof] | None = None  # what its findings rest on, should a late event undo it

    def lifecycle(self) -> list[dict[str, str | None]]:
        return [{"event": name, "ts": ts} for name, ts in self.history]


class Proof(NamedTuple):
    """A finding, and the span of time in which an event the log showed late could undo it."""

    start: str | None  # None: unknown, so any late event before `end` undoes it
    end: str | None
    finding: dict[str, Any]


@dataclass
class Trace:
    """Feed lines or events in log order; read the findings with report()."""

    loop_threshold: int = 3
    leak_after: timedelta = DEFAULT_LEAK_AFTER
    lines: int = 0
    events: int = 0
    completed: int = 0
    started_before_log: int = 0
    out_of_order: int = 0  # events earlier than a later event of the same call: not judged
    withdrawn: int = 0  # findings an event out of time order showed could be false
    calls: dict[str, Call] = field(default_factory=dict)
    # Finished calls remembered (their latest time and replica), so a second release of one is
    # recognised, and an earlier attempt shown after it is known to be out of time order.
    finished: OrderedDict[str, tuple[str | None, str | None]] = field(default_factory=OrderedDict)
    holding: dict[str, int] = field(default_factory=dict)  # business -> slots held now
    most_held: dict[str, int] = field(default_factory=dict)
    leaks: list[dict[str, Any]] = field(default_factory=list)
    double_releases: list[dict[str, str | None]] = field(default_factory=list)
    clock: Clock = field(default_factory=Clock)  # the log's own, never the wall clock
    sources: dict[str, str] = field(default_factory=dict)  # replica -> when its log begins

    def read(self, lines: Iterable[str]) -> Trace:
        sources, feed, see = self.sources, self.feed, self.clock.see  # once a line: look up once
        for line in lines:
            self.lines += 1
            body, stamp, source = unwrap(line)
            event = parse_body(body, stamp)
            if source is not None and source not in sources:
                self._begins(source, stamp or (event.ts if event else None))
            if event is not None:
                feed(event, source)
            if stamp is not None and (event is None or event.ts != stamp):
                see(stamp)
        return self

    def _begins(self, source: str, stamp: str | None) -> None:
        """Note when a replica's log begins in the input: its first time, or a later one."""
        if stamp is not None and len(self.sources) < SOURCES_KEPT:
            self.sources[source] = stamp

    def covers(self, source: str | None, since: str | None) -> bool:
        """Whether all that `source` logged after `since` is in the input: `docker compose logs
        --tail` and `kubectl logs --tail` cut each replica's log at its own place. A line without
        a prefix belongs to the one log, which began before."""
        if source is None:
            return True
        begins = self.sources.get(source)
        return begins is not None and since is not None and not earlier(since, begins)

    def feed(self, event: Event, source: str | None = None) -> None:
        call_sid = event.fields.get("call_sid")
        if not call_sid:
            return  # no job to pin it on: a mention of a tag, not a worker event
        self.events += 1
        ts = event.ts
        call = self.calls.get(call_sid)
        if ts:
            self.clock.see(ts)
            latest = call.latest if call is not None else self.finished.get(call_sid, _NEVER)[0]
            if latest is not None and latest != ts and earlier(ts, latest):
                self.out_of_order += 1
                if call is not None:  # else its job ended normally after this: nothing to undo
                    self._late(call, event.name, event.fields, ts)
                return
        if call is None:
            call = self._call(call_sid, event.name)
        if ts:
            call.latest = ts
        business = event.fields.get("business_id") or call.business_id or "?"
        call.business_id = call.business_id or event.fields.get("business_id")
        call.history.append((event.name, ts))
        call.seen += 1
        call.last_event = event.name
        if event.name == PICKED:
            self._picked(call, ts)
            call.slot_source = source
        elif event.name == SLOT_ACQUIRED:
            self._acquired(call, business, ts)
            call.slot_source = source
        elif event.name == RELEASE_SLOT:
            self._released(call, business, ts, source)
        else:
            if call.slot == HELD and call.held_since is None:
                call.held_since = ts  # the acquire had no time; it came before this
            if event.name == DOWNLOAD_DONE:
                call.downloaded = True
                call.picks_since_download = 0
                call.last_download = ts or call.latest
            elif event.name == JOB_FAILED:
                self._failed(call, event.fields)

    def _call(self, call_sid: str, first_event: str) -> Call:
        call = self.calls[call_sid] = Call(call_sid)
        if call_sid in self.finished:
            # Its last job ended in this log, normally: downloaded, then released.
            latest, call.slot_source = self.finished.pop(call_sid)
            call.latest = call.released = call.last_download = latest
            call.slot = RELEASED
            call.whole = False
        elif first_event != PICKED:
            self.started_before_log += 1
        return call

    def _picked(self, call: Call, ts: str | None) -> None:
        if call.slot == HELD:
            self._leak(call, "picked again before its slot was released", ts)
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
            self._leak(call, "acquired again before it was released", ts)
        call.slot, call.slot_business = HELD, business
        call.acquired = call.held_since = ts
        held = self.holding[business] = self.holding.get(business, 0) + 1
        self.most_held[business] = max(self.most_held.get(business, 0), held)

    def _released(self, call: Call, business: str, ts: str | None, source: str | None) -> None:
        if call.slot == HELD:
            self._let_go(call)
        elif call.slot != UNKNOWN:  # UNKNOWN: acquired before the log began
            twice = call.slot == RELEASED
            since = call.released if twice else call.last_picked
            # Proof needs the log to show where the slot was taken, if it was: another
            # replica's log may begin after `since`, its pick and acquire cut off (--tail).
            if call.slot_source is None or source == call.slot_source or self.covers(source, since):
                finding: dict[str, str | None] = {
                    "business_id": business,
                    "call_sid": call.call_sid,
                    "ts": ts,
                    "why": "released twice" if twice else "released but never acquired",
                }
                self.double_releases.append(finding)
                self._rests_on(call, since, ts, finding)
        call.slot = RELEASED
        call.released = ts
        call.slot_source = source
        if call.flagged:
            return  # reported: keep it
        if call.downloaded:
            self.completed += 1  # a normal job: count it and forget it
        elif call.picks_since_download or call.failures:
            return  # due for a retry: a loop or a repeated failure may follow
        self._forget(call)

    def _failed(self, call: Call, fields: dict[str, str]) -> None:
        call.failures += 1
        call.errors.append(fields.get("error", ""))
        call.flagged |= call.failures >= 2

    def _forget(self, call: Call) -> None:
        del self.calls[call.call_sid]
        self.finished[call.call_sid] = (call.latest, call.slot_source)
        if len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)

    def _let_go(self, call: Call) -> None:
        left = self.holding[call.slot_business] - 1
        if left:
            self.holding[call.slot_business] = left
        else:
            del self.holding[call.slot_business]
        call.slot = RELEASED

    def _leak(self, call: Call, why: str, ts: str | None) -> None:
        finding = self._slot(call, self.clock.now()) | {"why": why}
        self.leaks.append(finding)
        self._rests_on(call, call.held_since, ts, finding)
        self._let_go(call)

    def _rests_on(
        self, call: Call, start: str | None, end: str | None, finding: dict[str, Any]
    ) -> None:
        """Remember that `finding` holds only if no event of the call falls between the two."""
        call.flagged = True
        call.proofs = [*(call.proofs or ()), Proof(start, end, finding)]

    # -- events out of time order ---------------------------------------------------------

    def _late(self, call: Call, name: str, fields: dict[str, str], ts: str) -> None:
        """An event earlier than one already applied: judged against nothing, but counted, and
        every finding it could undo is withdrawn (the input order hid it when it was made)."""
        if call.latest_late is None or earlier(call.latest_late, ts):
            call.latest_late = ts
        self._into_history(call, name, ts)
        call.seen += 1
        if call.proofs:
            kept = []
            for proof in call.proofs:
                if _between(ts, proof.start, proof.end):
                    self._withdraw(proof.finding)
                else:
                    kept.append(proof)
            call.proofs = kept
        if name == JOB_FAILED:
            self._failed(call, fields)  # a count: whenever it was, it failed
        elif name == PICKED:
            call.picks_total += 1
            if call.first_picked is None or earlier(ts, call.first_picked):
                call.first_picked = ts
            if call.last_picked is None or earlier(call.last_picked, ts):
                call.last_picked = ts
        if name in (PICKED, DOWNLOAD_DONE):
            self._recount_streak(call, name, ts)

    def _into_history(self, call: Call, name: str, ts: str) -> None:
        """Put the event where its time puts it; the history stays in time order."""
        history = call.history
        at = len(history)
        while at:
            when = history[at - 1][1]
            if when is not None and not earlier(ts, when):
                break
            at -= 1
        if len(history) == history.maxlen:
            if at == 0:
                return  # older than anything kept
            history.popleft()
            at -= 1
        history.insert(at, (name, ts))

    def _recount_streak(self, call: Call, name: str, ts: str) -> None:
        """Picks in a row without a download, now that a late pick or download is known."""
        if call.whole and call.seen <= HISTORY:  # the history holds every event, in time order
            streak = longest = 0
            for event, _ in call.history:
                if event == PICKED:
                    streak += 1
                    longest = max(longest, streak)
                elif event == DOWNLOAD_DONE:
                    streak = 0
            if call.longest_streak >= self.loop_threshold > longest:
                self.withdrawn += 1
            call.picks_since_download, call.longest_streak = streak, longest
        elif name == PICKED:
            if call.last_download is None or earlier(call.last_download, ts):
                call.picks_since_download += 1  # after the latest download: this streak
                call.longest_streak = max(call.longest_streak, call.picks_since_download)
        else:
            # Where it falls among picks no longer kept is unknown: count only the picks the
            # history shows after it, and withdraw a longer streak it may have cut.
            after = sum(
                1 for event, when in call.history if event == PICKED and when and earlier(ts, when)
            )
            call.picks_since_download = min(call.picks_since_download, after)
            if call.longest_streak >= self.loop_threshold > call.picks_since_download:
                self.withdrawn += 1
            call.longest_streak = call.picks_since_download
            if call.last_download is None or earlier(call.last_download, ts):
                call.last_download = ts
        call.flagged |= call.longest_streak >= self.loop_threshold

    def _withdraw(self, finding: dict[str, Any]) -> None:
        self.withdrawn += 1
        self.leaks = [x for x in self.leaks if x is not finding]
        self.double_releases = [x for x in self.double_releases if x is not finding]

    def _slot(self, call: Call, now: Now) -> dict[str, Any]:
        return {
            "business_id": call.slot_business,
            "call_sid": call.call_sid,
            "acquired": call.acquired,
            "held_seconds": now.since(call.held_since),  # None when its lines lack times
        }

    @staticmethod
    def _late_while_held(call: Call) -> bool:
        """Whether an event shown late fell after the slot was taken: a release, perhaps."""
        late = call.latest_late
        return late is not None and (call.held_since is None or not earlier(late, call.held_since))

    def report(self) -> dict[str, Any]:
        limit = self.leak_after.total_seconds()
        now = self.clock.now()
        held_too_long, in_flight = [], []
        withdrawn = self.withdrawn
        for call in self.calls.values():
            held = now.since(call.held_since) if call.slot == HELD else None
            too_long = held is not None and held > limit
            if too_long and not self._late_while_held(call):
                why = f"held longer than --leak-after {format_duration(limit)} in the log"
                held_too_long.append(self._slot(call, now) | {"why": why})
                continue
            withdrawn += too_long  # an event shown late may be its release: not proven
            if not call.flagged and call.last_event != RELEASE_SLOT:
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
            "out_of_order_events": self.out_of_order,
            "findings_withdrawn": withdrawn,
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


_NEVER: tuple[str | None, str | None] = (None, None)


def _between(ts: str, start: str | None, end: str | None) -> bool:
    """Whether `ts` may fall within [start, end]: an end that is unknown is no bound."""
    return (start is None or not earlier(ts, start)) and (end is None or not earlier(end, ts))


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
    if report["out_of_order_events"]:
        withdrawn = report["findings_withdrawn"]
        out.append(
            f"Events out of time order: {report['out_of_order_events']:,}, not judged"
            + (f" ({withdrawn:,} findings they could undo withdrawn)" if withdrawn else "")
            + "; the input is not sorted by time (one replica's log after another's?): "
            "sort the input by time for an exact trace"
        )

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
