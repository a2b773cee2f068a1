"""Worker events (emitting) and worker-trace (reading), on realistic generated logs."""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import re
import subprocess
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prosaas_migrate import worker_events as events
from prosaas_migrate.worker_events import (
    DOWNLOAD_DONE,
    JOB_FAILED,
    MARKERS,
    PICKED,
    RELEASE_SLOT,
    SLOT_ACQUIRED,
)
from prosaas_migrate.worker_trace import (
    Event,
    Trace,
    earlier,
    parse_duration,
    parse_line,
    parse_timestamp,
    problems_found,
    render_text,
)
from tests.conftest import BIN, clean_env
from tests.worker_logs import LEAKED_FOR_GOOD, PLANTED, generate, generate_replicas


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = events.configure_logging("text", stream)
    yield stream
    events.LOGGER.removeHandler(handler)


def test_each_event_is_exactly_the_specs_line(captured: io.StringIO) -> None:
    events.picked("download_only", "CA123", 42)
    events.slot_acquired("CA123", 42)
    events.download_done("CA123", file="CA123.mp3", size=1234567)
    events.release_slot("CA123", 42, reason="success")
    events.job_failed("CA123", 42, error="timeout")
    assert captured.getvalue().splitlines() == [
        "🎯 [WORKER_PICKED] job_type=download_only call_sid=CA123 business_id=42",
        "✅ [WORKER_SLOT_ACQUIRED] call_sid=CA123 business_id=42",
        "✅ [WORKER_DOWNLOAD_DONE] call_sid=CA123 file=CA123.mp3 bytes=1234567",
        "🔓 [WORKER_RELEASE_SLOT] call_sid=CA123 business_id=42 reason=success",
        "❌ [WORKER_JOB_FAILED] call_sid=CA123 business_id=42 error=timeout",
    ]


def test_a_crafted_value_cannot_forge_a_line_or_a_field(captured: io.StringIO) -> None:
    forged = "CA1\n🎯 [WORKER_PICKED] job_type=x call_sid=FORGED business_id=1"
    events.picked("download_only", forged, 42)
    events.job_failed("CA2", 42, error='boom" call_sid=FORGED2 [WORKER_RELEASE_SLOT]')
    lines = captured.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (parse_line(line) for line in lines)
    assert first is not None and second is not None
    assert first.name == "WORKER_PICKED" and first.fields["call_sid"] == forged
    assert second.name == "WORKER_JOB_FAILED" and second.fields["call_sid"] == "CA2"
    trace = Trace().read(lines)
    assert set(trace.calls) == {forged, "CA2"}


@given(value=st.text(max_size=40), key=st.sampled_from(["call_sid", "error", "file"]))
def test_any_value_round_trips_through_a_line(value: str, key: str) -> None:
    line = events.format_line("WORKER_JOB_FAILED", {key: value, "business_id": 1})
    assert "\n" not in line and "\r" not in line
    parsed = parse_line(f"worker-1  | 2026-11-28T10:00:00Z {line}")
    assert parsed is not None and parsed.fields == {key: value, "business_id": "1"}


def test_json_format_is_one_object_a_line_with_the_fields() -> None:
    stream = io.StringIO()
    handler = events.configure_logging("json", stream)
    try:
        events.download_done("CA9", file="CA9.mp3", size=10)
    finally:
        events.LOGGER.removeHandler(handler)
    record = json.loads(stream.getvalue())
    assert record["event"] == "WORKER_DOWNLOAD_DONE"
    assert record["level"] == "info" and record["ts"].endswith("Z")
    assert record["call_sid"] == "CA9" and record["bytes"] == 10
    assert record["message"] == "✅ [WORKER_DOWNLOAD_DONE] call_sid=CA9 file=CA9.mp3 bytes=10"
    parsed = parse_line(stream.getvalue())
    assert parsed is not None and parsed.fields["file"] == "CA9.mp3"


def test_configure_logging_rejects_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="MIGRATION_LOG_FORMAT"):
        events.configure_logging("yaml")


def test_events_go_through_python_logging(caplog: pytest.LogCaptureFixture) -> None:
    events.LOGGER.propagate = True
    with caplog.at_level(logging.INFO, logger="prosaas.worker"):
        events.release_slot("CA1", 3, reason="success")
    assert caplog.records[0].getMessage().startswith("🔓 [WORKER_RELEASE_SLOT]")


# -- worker-trace ----------------------------------------------------------------------------


def findings(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What worker-trace found, in the shape of PLANTED."""
    return {
        "recording_loops": {x["call_sid"]: x["picks"] for x in report["recording_loops"]},
        "leaked_slots": {x["call_sid"]: x["why"] for x in report["leaked_slots"]},
        "double_releases": {x["call_sid"]: x["why"] for x in report["double_releases"]},
        "repeated_failures": {x["call_sid"]: x["failures"] for x in report["repeated_failures"]},
    }


def test_finds_exactly_the_planted_anomalies_among_thousands_of_jobs() -> None:
    report = Trace().read(generate(5000, seed=3)).report()
    loops = {x["call_sid"]: x["picks"] for x in report["recording_loops"]}
    assert loops == PLANTED["recording_loops"]
    leaks = {x["call_sid"]: x["why"] for x in report["leaked_slots"]}
    assert leaks == PLANTED["leaked_slots"]
    doubles = {x["call_sid"]: x["why"] for x in report["double_releases"]}
    assert doubles == PLANTED["double_releases"]
    failures = {x["call_sid"]: x["failures"] for x in report["repeated_failures"]}
    assert failures == PLANTED["repeated_failures"]
    assert report["jobs_completed"] >= 5000
    assert report["in_flight_at_end"] == report["started_before_log"] == 0
    assert 1 <= max(report["most_slots_held"].values()) <= 8  # the generator's concurrency
    loop = next(x for x in report["recording_loops"] if x["call_sid"] == "CALOOP1")
    assert [e["event"] for e in loop["lifecycle"]][:4] == [
        "WORKER_PICKED", "WORKER_SLOT_ACQUIRED", "WORKER_JOB_FAILED", "WORKER_RELEASE_SLOT",
    ]  # fmt: skip
    # Times where the lines carry them (JSON, or a leading timestamp); none are invented.
    stamps = [e["ts"] for e in loop["lifecycle"] if e["ts"]]
    assert stamps and all(stamp.startswith("2026-11-28T") for stamp in stamps)
    leak = next(x for x in report["leaked_slots"] if x["call_sid"] == LEAKED_FOR_GOOD)
    assert leak["held_seconds"] > 600 and leak["acquired"].startswith("2026-11-28T10:")


def test_a_clean_log_has_no_findings() -> None:
    report = Trace().read(generate(3000, seed=5, plant=False)).report()
    assert not (report["recording_loops"] or report["leaked_slots"])
    assert not (report["double_releases"] or report["repeated_failures"])
    assert report["jobs_completed"] == 3000
    assert report["in_flight_at_end"] == report["started_before_log"] == 0


def test_the_loop_threshold_is_honoured() -> None:
    report = Trace(loop_threshold=4).read(generate(500, seed=1)).report()
    assert {x["call_sid"] for x in report["recording_loops"]} == {"CALOOP1"}


def test_memory_stays_flat_as_the_log_grows() -> None:
    peaks = []
    for jobs in (4000, 20000):
        tracemalloc.start()
        trace = Trace().read(generate(jobs, seed=7, plant=False))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert trace.report()["jobs_completed"] == jobs
        assert len(trace.calls) <= 8  # only what is in flight is remembered
    assert peaks[1] < peaks[0] * 1.5, peaks  # 5x the lines, not 5x the memory


# -- logs cut at both ends -------------------------------------------------------------------


def expected_counts(lines: list[str]) -> dict[str, int]:
    """What a healthy log's slice shows, from its events alone: a job whose first event here is
    not its pick began before the log; one whose last is not a release is still in flight."""
    jobs: dict[str, list[str]] = {}
    for line in lines:
        event = parse_line(line)
        if event is not None:
            jobs.setdefault(event.fields["call_sid"], []).append(event.name)
    return {
        "started_before_log": sum(names[0] != PICKED for names in jobs.values()),
        "in_flight_at_end": sum(names[-1] != RELEASE_SLOT for names in jobs.values()),
        "jobs_completed": sum(
            DOWNLOAD_DONE in names and RELEASE_SLOT in names[names.index(DOWNLOAD_DONE) :]
            for names in jobs.values()
        ),
    }


HEALTHY = list(generate(1500, seed=13, plant=False))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_a_healthy_log_cut_anywhere_is_healthy(data: st.DataObject) -> None:
    start = data.draw(st.integers(0, len(HEALTHY) - 1), label="start")
    end = data.draw(st.integers(start + 1, len(HEALTHY)), label="end")
    cut = HEALTHY[start:end]
    report = Trace().read(cut).report()
    assert not problems_found(report), report
    assert not report["repeated_failures"]
    counts = {key: report[key] for key in ("started_before_log", "in_flight_at_end",
                                           "jobs_completed")}  # fmt: skip
    assert counts == expected_counts(cut)
    assert len(report["in_flight"]) == report["in_flight_at_end"]


def test_a_live_tail_exits_0_and_says_what_was_in_flight(tmp_path: Path) -> None:
    rng = random.Random(5)
    for _ in range(3):
        start = rng.randrange(len(HEALTHY) // 2)
        cut = HEALTHY[start : rng.randrange(start + 200, len(HEALTHY))]
        result = run_trace([], "\n".join(cut) + "\n", tmp_path)
        assert result.returncode == 0, result.stdout
        expected = expected_counts(cut)
        assert f"{expected['in_flight_at_end']:,} in flight at end of input" in result.stdout
        assert f"{expected['started_before_log']:,} started before the log" in result.stdout
        assert "Leaked slots: none" in result.stdout
        assert "Slots released twice (or never acquired): none" in result.stdout


PLANTED_LOG = list(generate(1500, seed=17))


def lines_of(call_sid: str, lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if f"call_sid={call_sid} " in line
            or f'"call_sid": "{call_sid}"' in line]  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_real_leaks_and_double_releases_survive_any_cut_around_them(data: st.DataObject) -> None:
    proofs = [i for call in ("CALEAK2", "CADOUBLE1", "CANOSLOT1")
              for i in lines_of(call, PLANTED_LOG)]  # fmt: skip
    start = data.draw(st.integers(0, min(proofs)), label="start")
    end = data.draw(st.integers(max(proofs) + 1, len(PLANTED_LOG)), label="end")
    cut = PLANTED_LOG[start:end]
    report = Trace().read(cut).report()
    doubles = {x["call_sid"]: x["why"] for x in report["double_releases"]}
    assert doubles == PLANTED["double_releases"]  # and no false ones from the cut
    leaks = {x["call_sid"]: x["why"] for x in report["leaked_slots"]}
    assert leaks.pop("CALEAK2") == PLANTED["leaked_slots"]["CALEAK2"]
    # The slot that is never released is a leak exactly when the cut shows it held over 10m.
    held = seconds_held_to_the_end(LEAKED_FOR_GOOD, cut)
    if held is not None and held > 600:
        assert leaks == {LEAKED_FOR_GOOD: PLANTED["leaked_slots"][LEAKED_FOR_GOOD]}
    else:
        assert leaks == {}
    assert problems_found(report)


def seconds_held_to_the_end(call_sid: str, lines: list[str]) -> float | None:
    """From the call's acquire to the log's latest event time (every line here has a UTC one)."""
    parsed = [event for event in map(parse_line, lines) if event is not None]
    acquired = [
        e.ts for e in parsed if e.name == SLOT_ACQUIRED and e.fields["call_sid"] == call_sid
    ]
    if not acquired or acquired[0] is None:
        return None
    times = [moment for e in parsed if e.ts and (moment := parse_timestamp(e.ts))]
    since = parse_timestamp(acquired[0])
    assert since is not None
    return (max(times) - since).total_seconds()


# -- replicas' logs out of time order --------------------------------------------------------


def ca7(worker: str, *names_and_seconds: tuple[str, int]) -> list[str]:
    """CA7's events as `kubectl logs --prefix --timestamps` shows them for one pod."""
    lines = []
    for name, second in names_and_seconds:
        fields: dict[str, object] = {"call_sid": "CA7", "business_id": 7}
        stamp = f"2026-11-28T10:00:{second:02d}.000000000Z"
        lines.append(f"[pod/{worker}/worker] {stamp} {events.format_line(name, fields)}")
    return lines


# worker-1 picks CA7 and fails; worker-2 retries it and succeeds. Without -f, kubectl prints
# one pod's log after the other's: here worker-2's, whose log begins at 10:00:10.
WORKER_1 = ca7("worker-1", (PICKED, 0), (SLOT_ACQUIRED, 1), (JOB_FAILED, 2), (RELEASE_SLOT, 3))
WORKER_2 = ca7("worker-2", (PICKED, 10), (SLOT_ACQUIRED, 10), (DOWNLOAD_DONE, 11),
               (RELEASE_SLOT, 11))  # fmt: skip


@pytest.mark.parametrize("cut", [0, 2], ids=["whole logs", "worker-1's log begins at 10:00:02"])
def test_one_pods_log_after_anothers_is_no_problem(cut: int, tmp_path: Path) -> None:
    reversed_order = WORKER_2 + WORKER_1[cut:]
    result = run_trace([], "\n".join(reversed_order) + "\n", tmp_path)
    assert result.returncode == 0, result.stdout
    assert "Slots released twice (or never acquired): none" in result.stdout
    assert f"Events out of time order: {4 - cut}, not judged" in result.stdout
    assert "sort the input by time for an exact trace" in result.stdout
    report = Trace().read(reversed_order).report()
    assert report["out_of_order_events"] == 4 - cut and report["jobs_completed"] == 1
    # In time order the same lines are exact, and nothing is out of order.
    in_order = Trace().read(WORKER_1[cut:] + WORKER_2).report()
    assert in_order["out_of_order_events"] == 0 and not problems_found(in_order)
    assert in_order["jobs_completed"] == 1


def test_a_real_double_release_is_found_whatever_came_before_it_late() -> None:
    doubled = ca7("worker-2", (PICKED, 10), (SLOT_ACQUIRED, 10), (DOWNLOAD_DONE, 11),
                  (RELEASE_SLOT, 11), (RELEASE_SLOT, 12))  # fmt: skip
    report = Trace().read(doubled + WORKER_1).report()
    assert [x["why"] for x in report["double_releases"]] == ["released twice"]
    assert report["out_of_order_events"] == 4 and report["findings_withdrawn"] == 0


def test_a_finding_an_event_shown_late_could_undo_is_withdrawn() -> None:
    # Chunks of two pods' logs, as `docker compose logs` (without -f) may interleave them:
    # worker-1's release comes after worker-2 picked the call again.
    chunks = WORKER_1[:2] + WORKER_2 + WORKER_1[2:]
    report = Trace().read(chunks).report()
    assert not problems_found(report), report
    assert report["out_of_order_events"] == 2 and report["findings_withdrawn"] == 1
    # A slot still held at the end, with an event shown late after it was taken: that event
    # may be its release, so the slot is in flight, not proven leaked.
    held = ca7("worker-1", (PICKED, 0), (SLOT_ACQUIRED, 1))
    later = ca7("worker-2", (JOB_FAILED, 30))  # its own job, begun before its log
    late = ca7("worker-1", (RELEASE_SLOT, 3))
    noise = ["[pod/worker-2/worker] 2026-11-28T10:30:00.000000000Z DEBUG polling queue"]
    report = Trace().read(held + later + late + noise).report()
    assert not report["leaked_slots"] and report["findings_withdrawn"] == 1
    assert report["in_flight_at_end"] == 1


def test_a_release_by_a_replica_whose_log_begins_later_proves_nothing() -> None:
    # `kubectl logs --tail` cuts each pod's log at its own place: worker-2's pick and acquire
    # of CA7 are cut off, its release is the first thing its log shows of CA7.
    worker_2 = ["[pod/worker-2/worker] 2026-11-28T10:00:09.000000000Z DEBUG polling queue",
                *WORKER_2[3:]]  # fmt: skip
    report = Trace().read(WORKER_1 + worker_2).report()
    assert not problems_found(report), report
    # A replica whose log began before the first release shows a real second release.
    worker_2 = ["[pod/worker-2/worker] 2026-11-28T10:00:02.000000000Z DEBUG polling queue",
                *WORKER_2[3:]]  # fmt: skip
    report = Trace().read(WORKER_1 + worker_2).report()
    assert [x["why"] for x in report["double_releases"]] == ["released twice"]


REPLICA_ORDERS = list(itertools.permutations(range(3)))


@pytest.mark.parametrize("kubectl", [True, False], ids=["kubectl --prefix", "cat *.log"])
@pytest.mark.parametrize("order", REPLICA_ORDERS, ids=map(str, REPLICA_ORDERS))
def test_a_healthy_log_replica_after_replica_is_healthy(kubectl: bool, order: tuple[int]) -> None:
    logs = generate_replicas(1500, seed=21, plant=False, kubectl=kubectl)
    report = Trace().read(line for replica in order for line in logs[replica]).report()
    assert not problems_found(report), findings(report)
    assert not report["repeated_failures"]
    assert report["jobs_completed"] == 1500
    assert report["out_of_order_events"] > 0  # retries on another replica, shown first
    merged = sorted((line for log in logs for line in log), key=time_of)
    assert Trace().read(merged).report()["out_of_order_events"] == 0


def time_of(line: str) -> str:
    event = parse_line(line)
    stamp = event.ts if event else re.search(r"20\d\d-\S+", line)
    return stamp if isinstance(stamp, str) else stamp.group(0) if stamp else ""


@pytest.mark.parametrize("kubectl", [True, False], ids=["kubectl --prefix", "cat *.log"])
@pytest.mark.parametrize("order", REPLICA_ORDERS, ids=map(str, REPLICA_ORDERS))
def test_planted_problems_are_found_replica_after_replica(kubectl: bool, order: tuple[int]) -> None:
    logs = generate_replicas(1500, seed=21, kubectl=kubectl)
    report = Trace().read(line for replica in order for line in logs[replica]).report()
    assert findings(report) == PLANTED


HEALTHY_REPLICAS = [generate_replicas(600, seed=seed, plant=False) for seed in range(3)]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_replicas_cut_and_interleaved_anyhow_are_healthy(data: st.DataObject) -> None:
    """`--tail` per pod, then the pods' logs in any order, whole or in chunks (`docker compose
    logs` without -f interleaves them as they arrive)."""
    logs = [
        log[data.draw(st.integers(0, len(log) // 2), label="tail") :]
        for log in data.draw(st.sampled_from(HEALTHY_REPLICAS), label="replicas")
    ]
    chunked = data.draw(st.booleans(), label="chunked")
    lines: list[str] = []
    pending = [list(log) for log in data.draw(st.permutations(logs), label="order")]
    while any(pending):
        log = pending[data.draw(st.integers(0, len(pending) - 1)) if chunked else 0]
        size = data.draw(st.integers(1, 300), label="chunk") if chunked else len(log)
        lines += log[:size]
        del log[:size]
        pending = [log for log in pending if log]
    report = Trace().read(lines).report()
    assert not problems_found(report), findings(report)


def job(call: str, *names: str, start: int = 0, step: int = 60, stamps: bool = True) -> list[str]:
    """One call's events, a minute apart from 10:00 (or without times)."""
    lines = []
    for i, name in enumerate(names):
        moment = datetime(2026, 11, 28, 10, tzinfo=UTC) + timedelta(seconds=start + i * step)
        stamp = moment.isoformat().replace("+00:00", "Z") + " " if stamps else ""
        lines.append(stamp + events.format_line(name, {"call_sid": call, "business_id": 1}))
    return lines


FULL_JOB = (PICKED, SLOT_ACQUIRED, DOWNLOAD_DONE, RELEASE_SLOT)


@pytest.mark.parametrize(
    ("names", "problem"),
    [
        ((RELEASE_SLOT,), None),  # acquired before the log began
        ((DOWNLOAD_DONE, RELEASE_SLOT), None),
        ((JOB_FAILED, RELEASE_SLOT), None),
        ((SLOT_ACQUIRED, DOWNLOAD_DONE, RELEASE_SLOT), None),  # picked before the log began
        ((RELEASE_SLOT, RELEASE_SLOT), "released twice"),  # the first release is proof enough
        ((*FULL_JOB, RELEASE_SLOT), "released twice"),
        ((PICKED, RELEASE_SLOT), "released but never acquired"),
        ((*FULL_JOB, PICKED, RELEASE_SLOT), "released but never acquired"),
    ],
)
def test_a_release_is_a_problem_only_when_the_log_proves_it(
    names: tuple[str, ...], problem: str | None
) -> None:
    report = Trace().read(job("CA1", *names)).report()
    assert [x["why"] for x in report["double_releases"]] == ([problem] if problem else [])
    assert report["started_before_log"] == int(names[0] != PICKED)


def test_a_second_release_long_after_the_first_is_still_seen() -> None:
    others = [line for n in range(500) for line in job(f"CA{n}", *FULL_JOB, stamps=False)]
    later = job("CA1", RELEASE_SLOT, start=600)  # after the first job's 10:03 release
    report = Trace().read([*job("CA1", *FULL_JOB), *others, *later]).report()
    assert [x["call_sid"] for x in report["double_releases"]] == ["CA1"]


def test_a_held_slot_leaks_only_past_leak_after_by_the_logs_own_clock() -> None:
    held = job("CA1", PICKED, SLOT_ACQUIRED)  # acquired at 10:01
    later = job("CA2", *FULL_JOB, start=20 * 60)  # the log goes on until 10:23
    report = Trace().read(held + later).report()
    assert [(x["call_sid"], x["held_seconds"]) for x in report["leaked_slots"]] == [("CA1", 1320)]
    report = Trace(leak_after=timedelta(minutes=30)).read(held + later).report()
    assert not report["leaked_slots"] and report["in_flight_at_end"] == 1
    in_flight = report["in_flight"][0]
    assert (in_flight["call_sid"], in_flight["slot_held"], in_flight["held_seconds"]) == (
        "CA1", True, 1320,
    )  # fmt: skip
    # Without times on its lines nothing proves how long it was held: in flight, not a leak.
    report = Trace().read(job("CA1", PICKED, SLOT_ACQUIRED, stamps=False) + later).report()
    assert not report["leaked_slots"] and report["in_flight_at_end"] == 1


def test_the_first_time_after_an_untimed_acquire_bounds_the_hold() -> None:
    lines = job("CA1", PICKED, SLOT_ACQUIRED, stamps=False) + job("CA1", DOWNLOAD_DONE)
    lines += job("CA2", *FULL_JOB, start=15 * 60)
    leak = Trace().read(lines).report()["leaked_slots"]
    assert [(x["call_sid"], x["acquired"], x["held_seconds"]) for x in leak] == [
        ("CA1", None, 1080)
    ]


def test_noise_lines_with_a_collector_timestamp_advance_the_clock() -> None:
    lines = job("CA1", PICKED, SLOT_ACQUIRED)
    lines.append("worker-1  | 2026-11-28T10:30:00.000000000Z DEBUG polling queue (depth=0)")
    assert [x["call_sid"] for x in Trace().read(lines).report()["leaked_slots"]] == ["CA1"]


def test_the_clock_is_the_latest_of_the_last_times_not_the_very_last() -> None:
    lines = job("CA1", PICKED, SLOT_ACQUIRED)  # acquired at 10:01
    lines.append("worker-1  | 2026-11-28T10:30:00.000000000Z DEBUG polling queue")
    lines.append("worker-2  | 2026-11-28T10:05:00.000000000Z DEBUG polling queue")  # behind
    report = Trace().read(lines).report()
    assert [x["held_seconds"] for x in report["leaked_slots"]] == [1740]
    assert report["last_timestamp"] == "2026-11-28T10:30:00+00:00"


def test_times_without_an_offset_are_compared_only_with_each_other() -> None:
    # The app logs local time without an offset, compose logs UTC: hours apart, yet no leak.
    lines = [
        "2026-11-28 05:00:00,000 INFO " + events.format_line(PICKED, {"call_sid": "CA1"}),
        "2026-11-28 05:00:01,000 INFO " + events.format_line(SLOT_ACQUIRED, {"call_sid": "CA1"}),
        "worker-1  | 2026-11-28T10:00:02.000000000Z DEBUG polling queue",
    ]
    report = Trace().read(lines).report()
    assert not report["leaked_slots"] and report["in_flight_at_end"] == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-28T10:00:00Z", datetime(2026, 11, 28, 10, tzinfo=UTC)),
        ("2026-11-28T10:00:00.123456789Z", datetime(2026, 11, 28, 10, 0, 0, 123456, UTC)),
        ("2026-11-28T11:00:00.5+01:00", datetime(2026, 11, 28, 10, 0, 0, 500000, UTC)),
        ("2026-11-28T05:30:00-0430", datetime(2026, 11, 28, 10, tzinfo=UTC)),
        ("2026-11-28T12:00:00+02", datetime(2026, 11, 28, 10, tzinfo=UTC)),
        ("2026-11-28 10:00:00,250", datetime(2026, 11, 28, 10, 0, 0, 250000)),
        ("2026-11-28t10:00:00z", datetime(2026, 11, 28, 10, tzinfo=UTC)),
        ("2026-13-28T10:00:00Z", None),
        ("2026-11-28T10:00:60Z", None),
        ("2026-11-28T10:00:00+25:00", None),
        ("yesterday", None),
        ("2026-11-28", None),
    ],
)
def test_log_timestamps_parse_in_every_iso_form(text: str, expected: datetime | None) -> None:
    assert parse_timestamp(text) == expected


def written(moment: datetime, form: tuple[str, str, int, str]) -> str:
    """`moment` as a log writes it: separator, fraction mark and digits, zone (or none)."""
    separator, mark, digits, zone = form
    text = moment.strftime(f"%Y-%m-%d{separator}%H:%M:%S")
    if digits:
        text += mark + f"{moment.microsecond:06d}"[:digits]
    if zone == "naive":
        return text
    offset = moment.utcoffset() or timedelta()
    if zone == "Z" and not offset:
        return text + "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return text + f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


FORMS = st.tuples(
    st.sampled_from(["T", " "]), st.sampled_from([".", ","]), st.sampled_from([0, 3, 6]),
    st.sampled_from(["Z", "offset", "naive"]),
)  # fmt: skip
MOMENTS = st.datetimes(
    min_value=datetime(2026, 11, 28, 9), max_value=datetime(2026, 11, 28, 11),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(-timedelta(hours=5))]),
)  # fmt: skip


@settings(max_examples=500)
@given(MOMENTS, FORMS, MOMENTS, FORMS)
def test_earlier_is_time_order_whatever_the_form(
    one: datetime, form: tuple[str, str, int, str], two: datetime, other: tuple[str, str, int, str]
) -> None:
    a, b = written(one, form), written(two, other)
    start, end = parse_timestamp(a), parse_timestamp(b)
    assert start is not None and end is not None
    comparable = (start.tzinfo is None) == (end.tzinfo is None)
    assert earlier(a, b) == (comparable and start < end), (a, b)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("1.5h", 5400), ("0.5s", 0.5),
     ("1h1m1s", 3661), ("2m30s", 150), ("0.001s", 0.001), ("0.0014s", 0.001), ("720h", 2592000),
     ("719h59m59.999s", 2591999.999)],
)  # fmt: skip
def test_leak_after_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize(
    "text",
    ["", "10", "10M", "10 m", "-5m", "1d", "m", "1h 30m", "1m1m", "30m1h", "1s1m", "1h1h",
     ".5h", "5.h", "1e3s", "\u0661\u0660m", "inf", "nans"],
)  # fmt: skip
def test_leak_after_rejects_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a duration; expected .* each at most once"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "why"),
    [("0s", "shorter than the shortest allowed, 0.001s"), ("0.0000001s", "shortest allowed"),
     ("0.0004s", "shortest allowed"), ("720.001h", "longer than the longest allowed, 720h"),
     ("999999999999h", "longest allowed"), ("9" * 400 + "s", "longest allowed")],
)  # fmt: skip
def test_leak_after_is_bounded(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_duration(text)


# -- whatever the lines hold -----------------------------------------------------------------


ECS = (
    '{"@timestamp":"2026-11-28T10:00:00.000Z","log.level":"info","message":"WORKER_PICKED x",'
    '"ecs.version":"1.6.0","event":{"kind":"event","category":["process"],"dataset":"worker"}}'
)
NASTY = [
    ECS,
    '["WORKER_PICKED", {"event": "WORKER_PICKED"}]',
    '{"event": ["WORKER_PICKED"], "call_sid": "CA1"}',
    '{"event": 7, "note": "WORKER_"}',
    '{"event": null, "note": "WORKER_"}',
    '{"event": "WORKER_STARTED", "pid": 7}',
    "12345 WORKER_",
    '"WORKER_PICKED"',
    '{"event": "WORKER_PICKED", "call_sid": ' + "1" * 5000 + "}",
    '{"event": "WORKER_PICKED", "n": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "[" * 100_000 + '"WORKER_PICKED"' + "]" * 100_000,
    '{"event": "WORKER_' + "{" * 50_000,
    '{"event": "WORKER_PICKED", "call_sid": NaN',
    "\x1b[" + "9" * 10_000 + " WORKER_",
    "worker-1  | 2026-11-28T10:00:00Z {not json} [WORKER_RELEASE_SLOT",
]


@pytest.mark.parametrize("line", NASTY, ids=range(len(NASTY)))
def test_foreign_or_broken_lines_are_noise(line: str) -> None:
    assert parse_line(line) is None
    report = Trace().read([line, line]).report()
    assert report["worker_events"] == 0 and not problems_found(report)


def test_odd_json_values_become_text() -> None:
    line = json.dumps({"ts": {"when": "now"}, "event": PICKED, "call_sid": {"a": [1, True]},
                       "business_id": 4, "note": None, "ok": False, "size": 1.5})  # fmt: skip
    event = parse_line(line)
    assert event == Event(PICKED, {"call_sid": '{"a": [1, true]}', "business_id": "4",
                                   "ok": "false", "size": "1.5"}, None)  # fmt: skip


def test_an_elastic_common_schema_log_exits_0(tmp_path: Path) -> None:
    result = run_trace([], ECS + "\n" + ECS.replace("info", "error") + "\n", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 lines, 0 worker events" in result.stdout


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from([*MARKERS, "WORKER_", "WORKER_STARTED", "[WORKER_PICKED] call_sid=CA1",
                       "2026-11-28T10:00:00Z", '{"event": "WORKER_RELEASE_SLOT", "call_sid": 1}']),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["event", "ts", "call_sid", "business_id", "kind",
                                       "message", "log", "@timestamp", "time"])
                      | st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)  # fmt: skip
ANY_LINE = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=' =[]"\\{}|:\x1b_-.0123456789TZWORKER_PICKEDabc\t', max_size=200),
    JSON_VALUES.map(json.dumps),
    st.builds("[{}] {}".format, st.sampled_from(list(MARKERS)), st.text(max_size=80)),
)
DECORATION = st.sampled_from(["", "worker-1  | ", "\x1b[36mworker-1  | \x1b[0m",
                              "2026-11-28T10:00:00.123456789Z ", "\x1b[1m", "[pod/w-1/w] ",
                              "[pod/w-1/w] 2026-11-28T10:00:00.5Z "])  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(DECORATION, ANY_LINE).map("".join), max_size=12))
def test_no_line_ever_crashes_it_or_becomes_a_problem_on_its_own(lines: list[str]) -> None:
    report = Trace().read(lines).report()
    render_text(report)
    json.dumps(report)
    parsed = [event for event in map(parse_line, lines) if event and event.fields.get("call_sid")]
    assert report["worker_events"] == len(parsed)
    if not any(event.name in (PICKED, SLOT_ACQUIRED, RELEASE_SLOT) for event in parsed):
        assert not problems_found(report)  # only slot and pick events can prove a problem


def test_an_event_without_a_call_sid_is_not_pinned_on_anyone() -> None:
    lines = ["docs: a release looks like [WORKER_RELEASE_SLOT] reason=success"] * 3
    report = Trace().read(lines).report()
    assert report["worker_events"] == 0 and not problems_found(report)


# -- what compose and terminals put around a line --------------------------------------------


ERROR = 'twilio 503: "service unavailable" [retry=2]'
FIELDS = {"call_sid": "CA1", "business_id": 7, "error": ERROR}
COMPOSE_STAMP = "2026-11-28T10:00:05.123456789Z"
APP_STAMP = "2026-11-28T10:00:04.120+00:00"


def decorated(prefix: str, stamp: bool, colour: str, form: str) -> str:
    if form == "json":
        message = events.format_line(JOB_FAILED, FIELDS)
        line = json.dumps(
            {"ts": APP_STAMP, "level": "error", "event": JOB_FAILED, "message": message, **FIELDS}
        )
    elif form == "text with its own time":
        line = f"{APP_STAMP} ERROR {events.format_line(JOB_FAILED, FIELDS)}"
    else:
        line = events.format_line(JOB_FAILED, FIELDS)
    if colour in ("app", "both"):
        line = f"\x1b[31m{line}\x1b[0m"
    if stamp:
        line = f"{COMPOSE_STAMP} {line}"
    if prefix.startswith("[pod/"):
        line = f"{prefix} {line}"  # kubectl never colours it
    elif prefix:
        line = f"{prefix:<10}| {line}"
        if colour in ("compose", "both"):  # compose colours its whole prefix, blank included
            line = f"\x1b[1;36m{line[:12]}\x1b[0m{line[12:]}"
    return line


DECORATIONS = itertools.product(
    ["", "worker-1", "worker_1", "app.worker-12", "[pod/worker-7c9d-x2/worker]"],  # compose
    # v2, v1, a long project name; `kubectl logs --prefix`
    [False, True],  # docker compose logs -t
    ["none", "compose", "app", "both"],  # who colours
    ["json", "text", "text with its own time"],
)


@pytest.mark.parametrize(("prefix", "stamp", "colour", "form"), list(DECORATIONS))
def test_prefix_timestamp_and_colour_never_change_the_event(
    prefix: str, stamp: bool, colour: str, form: str
) -> None:
    event = parse_line(decorated(prefix, stamp, colour, form))
    assert event is not None
    assert event.name == JOB_FAILED
    assert event.fields == {"call_sid": "CA1", "business_id": "7", "error": ERROR}
    own_time = form != "text"
    assert event.ts == (APP_STAMP if own_time else COMPOSE_STAMP if stamp else None)


def ecs(line: str, stamp: str) -> str:
    """The line as an Elastic Common Schema logger writes it."""
    return json.dumps({"@timestamp": stamp, "log.level": "info", "message": line,
                       "ecs.version": "1.6.0", "process": {"pid": 7},
                       "event": {"kind": "event", "dataset": "worker"}})  # fmt: skip


def json_file(line: str, stamp: str) -> str:
    """The line as Docker's json-file logging driver stores it."""
    return json.dumps({"log": line + "\n", "stream": "stderr", "time": stamp})


OURS_JSON = json.dumps({"ts": APP_STAMP, "level": "error", "event": JOB_FAILED,
                        "message": events.format_line(JOB_FAILED, FIELDS), **FIELDS})  # fmt: skip
WRAPPER_STAMP = "2026-11-28T10:00:07.5Z"


@pytest.mark.parametrize(
    ("line", "ts"),
    [
        (ecs(events.format_line(JOB_FAILED, FIELDS), WRAPPER_STAMP), WRAPPER_STAMP),
        (json_file(events.format_line(JOB_FAILED, FIELDS), WRAPPER_STAMP), WRAPPER_STAMP),
        (json_file(f"{APP_STAMP} ERROR " + events.format_line(JOB_FAILED, FIELDS),
                   WRAPPER_STAMP), APP_STAMP),  # the app's own time wins
        (json_file("\x1b[31m" + events.format_line(JOB_FAILED, FIELDS) + "\x1b[0m",
                   WRAPPER_STAMP), WRAPPER_STAMP),
        (json_file(OURS_JSON, WRAPPER_STAMP), APP_STAMP),
        (json_file(ecs(events.format_line(JOB_FAILED, FIELDS), APP_STAMP), WRAPPER_STAMP),
         APP_STAMP),
        (f"worker-1  | {COMPOSE_STAMP} " + ecs(events.format_line(JOB_FAILED, FIELDS), APP_STAMP),
         APP_STAMP),
        (ecs(events.format_line(JOB_FAILED, FIELDS), "yesterday"), None),  # no time is no time
        (json.dumps({"log": events.format_line(JOB_FAILED, FIELDS), "time": 7}), None),
    ],
    ids=["ecs", "json-file", "json-file, app time", "json-file, colour", "json-file around ours",
         "json-file around ecs", "compose around ecs", "ecs, no time", "json-file, no time"],
)  # fmt: skip
def test_a_worker_line_inside_another_loggers_json_is_read(line: str, ts: str | None) -> None:
    event = parse_line(line)
    assert event is not None
    assert (event.name, event.fields, event.ts) == (
        JOB_FAILED, {"call_sid": "CA1", "business_id": "7", "error": ERROR}, ts,
    )  # fmt: skip


@pytest.mark.parametrize(
    "line",
    [
        ecs("GET /healthz 200", WRAPPER_STAMP),
        json_file("[WORKER_STARTED] pid=7", WRAPPER_STAMP),
        json_file("WORKER_PICKED without brackets call_sid=CA1", WRAPPER_STAMP),
        json.dumps({"message": ["[WORKER_PICKED] call_sid=CA1"], "log": 7}),
        json.dumps({"message": None, "log": {"text": "[WORKER_PICKED] call_sid=CA1"}}),
        json_file(json_file(json_file(json_file(events.format_line(PICKED, FIELDS), "x"), "x"),
                            "x"), "x"),  # wrapped deeper than any logger does
        json_file('{"event": "WORKER_' + "[" * 50_000, WRAPPER_STAMP),
    ],
    ids=["ecs, not the worker", "json-file, a tag that is no event", "json-file, no tag",
         "not text", "not text either", "too deep", "broken inside"],
)  # fmt: skip
def test_foreign_json_without_a_worker_line_is_noise(line: str) -> None:
    assert parse_line(line) is None
    assert Trace().read([line]).report()["worker_events"] == 0


@pytest.mark.parametrize("wrap", [ecs, json_file], ids=["ecs", "json-file"])
def test_a_recording_loop_in_wrapped_lines_is_found(
    wrap: Callable[[str, str], str], tmp_path: Path
) -> None:
    lines = []
    for second, name in enumerate([PICKED, SLOT_ACQUIRED, JOB_FAILED, RELEASE_SLOT] * 3):
        line = events.format_line(name, {"call_sid": "CALOOP", "business_id": 3})
        lines.append(wrap(line, f"2026-11-28T10:00:{second:02d}.000Z"))
    result = run_trace([], "\n".join(lines) + "\n", tmp_path)
    assert result.returncode == 1, result.stdout
    assert "12 worker events" in result.stdout
    assert "CALOOP business_id=3 picked 3 times (first 2026-11-28T10:00:00.000Z" in result.stdout


# -- linear in the line's length -------------------------------------------------------------


LONG_LINES: dict[str, Callable[[int], str]] = {
    "bare token after a tag": lambda n: "[WORKER_PICKED] " + "a" * n,
    "keys without values": lambda n: "[WORKER_PICKED] " + "a.b-c_" * (n // 6),
    "many pairs": lambda n: "[WORKER_PICKED] " + "a=b " * (n // 4),
    "unterminated quote": lambda n: '[WORKER_PICKED] a="' + 'x\\" ' * (n // 4),
    "quotes and equals": lambda n: '[WORKER_PICKED] a="' + '=" a=' * (n // 5),
    "tag fragments": lambda n: "[WORKER_AAAA " * (n // 13),
    "long tag": lambda n: "[WORKER_" + "A" * n,
    "digits before a tag": lambda n: "2026-11-28T" + "1" * n + " [WORKER_PICKED] a=b",
    "a prefix that never ends": lambda n: "w" * n + " WORKER_",
    "colour codes": lambda n: "\x1b[1;" + "3" * n + "m WORKER_ \x1b[" * 3,
    "json": lambda n: json.dumps({"event": PICKED, "call_sid": "x" * n}),
}


def parse_seconds(line: str) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        parse_line(line)
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize("shape", LONG_LINES)
def test_parsing_is_linear_in_the_line_length(shape: str) -> None:
    make = LONG_LINES[shape]
    small, big = parse_seconds(make(100_000)), parse_seconds(make(1_000_000))
    # Ten times the line is ten times the work; a quadratic parser would take a hundred times.
    assert big < 40 * small + 0.05, (small, big)


# -- the command -----------------------------------------------------------------------------


def run_trace(args: list[str], log: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), "worker-trace", *args], input=log, env=clean_env(), cwd=tmp_path,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_cli_exits_1_on_findings_and_0_on_a_clean_log(tmp_path: Path) -> None:
    dirty = "\n".join(generate(800, seed=2)) + "\n"
    result = run_trace(["--leak-after", "5m"], dirty, tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Recording loops (picked 3+ times without a download): 2" in result.stdout
    assert "CALOOP1 business_id=7 picked 4 times" in result.stdout
    assert "CALEAK1: held longer than --leak-after 5m in the log" in result.stdout
    assert "CADOUBLE1: released twice" in result.stdout
    clean = "\n".join(generate(800, seed=2, plant=False)) + "\n"
    (tmp_path / "worker.log").write_text(clean)
    result = run_trace(["--json", "worker.log"], "", tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["jobs_completed"] == 800
    assert report["in_flight_at_end"] == report["started_before_log"] == 0
    assert report["leak_after_seconds"] == 600


def test_cli_bad_arguments_are_one_line(tmp_path: Path) -> None:
    result = run_trace(["missing.log"], "", tmp_path)
    assert result.returncode == 2
    assert "missing.log" in result.stderr and "Traceback" not in result.stderr
    result = run_trace(["--loop-threshold", "0"], "", tmp_path)
    assert result.returncode == 2
    for leak_after in ("10 minutes", "999999999999h", "0.0000001s", "1m1m", "30m1h"):
        result = run_trace(["--leak-after", leak_after], "", tmp_path)
        assert result.returncode == 2, result.stderr
        assert "--leak-after" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()[-1]) > 20  # says why, in one line


def test_the_readme_documents_every_json_field() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Worker events and `worker-trace`\n", 1)[1].split("\n## ", 1)[0]
    table = section.split("`--json` gives one document:", 1)[1]
    documented = {
        name for row in table.splitlines() if row.startswith("| `")
        for name in re.findall(r"`(\w+)`", row.split("|")[1])
    }  # fmt: skip
    # 300 jobs span a few minutes: CALEAK1 is in flight, CALEAK2 has leaked.
    report = Trace().read(generate(300, seed=4)).report()
    assert documented == set(report)
    for key in ("leaked_slots", "double_releases", "in_flight", "recording_loops"):
        row = next(row for row in table.splitlines() if row.startswith(f"| `{key}`"))
        assert set(re.findall(r"`(\w+)`", row.split("|")[2])) >= set(report[key][0]), key
