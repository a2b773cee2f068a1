"""Realistic worker logs with known anomalies planted among normal, interleaved jobs."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from prosaas_migrate.worker_events import (
    DOWNLOAD_DONE,
    JOB_FAILED,
    PICKED,
    RELEASE_SLOT,
    SLOT_ACQUIRED,
    format_line,
)

# What generate(..., plant=True) hides among the normal jobs, and what worker-trace must find
# (with the default --leak-after of 10m: a log of 5,000 jobs spans about an hour).
PLANTED: dict[str, Any] = {
    "recording_loops": {"CALOOP1": 4, "CALOOP2": 3},
    "leaked_slots": {"CALEAK1": "held longer than --leak-after 10m in the log",
                     "CALEAK2": "picked again before its slot was released"},
    "double_releases": {"CADOUBLE1": "released twice",
                        "CANOSLOT1": "released but never acquired"},
    "repeated_failures": {"CAFAIL1": 2, "CALOOP1": 4},  # CALOOP1 failed on every pick
}  # fmt: skip
# Its slot is taken as the log begins and never released; its lines always carry their time.
LEAKED_FOR_GOOD = "CALEAK1"

NOISE = [
    "INFO  [werkzeug] 127.0.0.1 - - GET /healthz HTTP/1.1 200 -",
    "DEBUG [worker] polling queue recordings (depth=3)",
    "config: WORKER_CONCURRENCY=8 WORKER_TIMEOUT=30",
    "[WORKER_STARTED] pid=7",  # a tag that is not an event
    "Traceback (most recent call last):",
]


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)

    def tick(self, rng: random.Random) -> str:
        self.now += timedelta(milliseconds=rng.randint(1, 400))
        return self.now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _render(
    event: str,
    fields: dict[str, object],
    ts: str,
    rng: random.Random,
    *,
    stamped: bool = False,
    compose: bool = True,
    replica_of: dict[object, int] | None = None,
) -> str:
    style = rng.random()
    if style < 0.15:  # a JSON-lines worker (MIGRATION_LOG_FORMAT=json)
        line = json.dumps({"ts": ts, "level": "info", "event": event,
                           "message": format_line(event, fields), **fields})  # fmt: skip
    else:
        line = format_line(event, fields)
        if style < 0.55 or stamped:
            line = f"{ts} INFO {line}"
    # As `docker compose logs` shows it: -t adds RFC3339Nano, --ansi colour.
    if compose and rng.random() < 0.3:
        replica = rng.randint(1, 3)
        if replica_of is not None:  # the replica of the call's first prefixed line, this attempt
            replica = replica_of.setdefault(fields["call_sid"], replica)
        prefix = f"worker-{replica}  | "
        if rng.random() < 0.3:
            prefix = f"\x1b[3{rng.randint(1, 6)}m{prefix}\x1b[0m"
        if rng.random() < 0.5:
            prefix += ts.replace("Z", "000000Z") + " "
        line = prefix + line
    return line


def _job(call_sid: str, business: int, *, fail_first: bool, rng: random.Random) -> list[Step]:
    steps: list[Step] = []
    attempts = [False, True] if fail_first else [True]
    for succeeds in attempts:
        steps.append((PICKED, {"job_type": "download_only", "call_sid": call_sid,
                               "business_id": business}))  # fmt: skip
        steps.append((SLOT_ACQUIRED, {"call_sid": call_sid, "business_id": business}))
        if succeeds:
            steps.append((DOWNLOAD_DONE, {"call_sid": call_sid, "file": f"{call_sid}.mp3",
                                          "bytes": rng.randint(10_000, 9_000_000)}))  # fmt: skip
            reason = "success"
        else:
            steps.append((JOB_FAILED, {"call_sid": call_sid, "business_id": business,
                                       "error": "twilio 503: service unavailable"}))  # fmt: skip
            reason = "error"
        steps.append((RELEASE_SLOT, {"call_sid": call_sid, "business_id": business,
                                     "reason": reason}))  # fmt: skip
    return steps


Step = tuple[str, dict[str, object]]


def _ev(event: str, call: str, **more: object) -> Step:
    fields: dict[str, object] = {"call_sid": call}
    if event == PICKED:
        fields = {"job_type": "download_only", **fields}
    if event != DOWNLOAD_DONE:
        fields["business_id"] = 7
    return event, {**fields, **more}


def _failing_pick(call: str) -> list[Step]:
    return [
        _ev(PICKED, call),
        _ev(SLOT_ACQUIRED, call),
        _ev(JOB_FAILED, call, error="timeout"),
        _ev(RELEASE_SLOT, call, reason="error"),
    ]


def _download(call: str) -> Step:
    return _ev(DOWNLOAD_DONE, call, file=f"{call}.mp3", bytes=1)


def _planted() -> list[list[Step]]:
    return [
        [step for _ in range(4) for step in _failing_pick("CALOOP1")],
        [
            _ev(PICKED, "CALOOP2"),
            _ev(SLOT_ACQUIRED, "CALOOP2"),
            _ev(RELEASE_SLOT, "CALOOP2", reason="skipped"),
        ]
        * 3,
        [_ev(PICKED, "CANOSLOT1"), _ev(RELEASE_SLOT, "CANOSLOT1", reason="skipped")],
        [
            _ev(PICKED, "CALEAK2"),
            _ev(SLOT_ACQUIRED, "CALEAK2"),
            _ev(JOB_FAILED, "CALEAK2", error="disk full"),
            _ev(PICKED, "CALEAK2"),
            _ev(SLOT_ACQUIRED, "CALEAK2"),
            _download("CALEAK2"),
            _ev(RELEASE_SLOT, "CALEAK2", reason="success"),
        ],
        [
            _ev(PICKED, "CADOUBLE1"),
            _ev(SLOT_ACQUIRED, "CADOUBLE1"),
            _download("CADOUBLE1"),
            _ev(RELEASE_SLOT, "CADOUBLE1", reason="success"),
            _ev(RELEASE_SLOT, "CADOUBLE1", reason="success"),
        ],
        _failing_pick("CAFAIL1") + _failing_pick("CAFAIL1"),
    ]


def _leaked_for_good() -> list[Step]:
    call = LEAKED_FOR_GOOD
    return [_ev(PICKED, call), _ev(SLOT_ACQUIRED, call), _download(call)]


# An event with its time, or a noise line.
Entry = tuple[str, dict[str, object], str] | str


def _timeline(
    jobs: int, rng: random.Random, *, plant: bool, concurrency: int, businesses: int
) -> Iterator[Entry]:
    """`jobs` normal jobs, interleaved, in time order, with noise and, if `plant`, the anomalies
    of PLANTED spread through them."""
    clock = Clock()
    started = 0
    planted = _planted() if plant else []
    active: list[list[Step]] = [_leaked_for_good()] if plant else []
    while True:
        while len(active) < concurrency and (started < jobs or planted):
            if planted and rng.random() < len(planted) / max(1, jobs - started + len(planted)):
                active.append(list(planted.pop()))
                continue
            if started >= jobs:
                active.append(list(planted.pop()))
                continue
            fail_first = rng.random() < 0.05  # one retry: normal, not a loop
            active.append(
                _job(
                    f"CA{started:010x}", rng.randint(1, businesses), fail_first=fail_first, rng=rng
                )
            )
            started += 1
        if not active:
            return
        if rng.random() < 0.3:
            yield rng.choice(NOISE)
        job = rng.choice(active)
        event, fields = job.pop(0)
        yield event, fields, clock.tick(rng)
        if not job:
            active.remove(job)


def generate(
    jobs: int, *, seed: int = 0, plant: bool = True, concurrency: int = 8, businesses: int = 25
) -> Iterator[str]:
    """Log lines (no newline) for `jobs` normal jobs, interleaved, with noise and, if `plant`,
    the anomalies of PLANTED spread through the log."""
    rng = random.Random(seed)
    replica_of: dict[object, int] = {}  # each attempt at a job runs on one replica
    for entry in _timeline(jobs, rng, plant=plant, concurrency=concurrency, businesses=businesses):
        if isinstance(entry, str):
            yield entry
            continue
        event, fields, ts = entry
        call = fields["call_sid"]
        yield _render(
            event, fields, ts, rng, stamped=call == LEAKED_FOR_GOOD, replica_of=replica_of
        )
        if event == RELEASE_SLOT:
            replica_of.pop(call, None)


def generate_replicas(
    jobs: int, *, replicas: int = 3, seed: int = 0, plant: bool = True, kubectl: bool = True
) -> list[list[str]]:
    """The same jobs run by `replicas` workers: each replica's own log, in time order.

    Every attempt at a job, from its pick to its release, runs on one replica, and a retry on
    any (a job picked again while its slot is held stays where the slot is). Every line carries
    its time: `kubectl logs --prefix --timestamps` puts `[pod/worker-2/worker] <RFC 3339>` in
    front of each (`kubectl`), or each replica's file has the app's own times (`cat`-ed files).
    """
    rng = random.Random(seed)
    logs: list[list[str]] = [[] for _ in range(replicas)]
    replica_of: dict[object, int] = {}
    holding: set[object] = set()
    ts = Clock().tick(rng)
    for entry in _timeline(jobs, rng, plant=plant, concurrency=8, businesses=25):
        if isinstance(entry, str):
            replica, line = rng.randrange(replicas), entry
        else:
            event, fields, ts = entry
            call = fields["call_sid"]
            if event == PICKED and call not in holding:
                replica_of[call] = rng.randrange(replicas)
            if event == SLOT_ACQUIRED:
                holding.add(call)
            elif event == RELEASE_SLOT:
                holding.discard(call)
            replica = replica_of.setdefault(call, rng.randrange(replicas))
            line = _render(event, fields, ts, rng, stamped=True, compose=False)
        if kubectl:
            line = f"[pod/worker-{replica + 1}/worker] {ts.replace('Z', '000000Z')} {line}"
        logs[replica].append(line)
    return logs
