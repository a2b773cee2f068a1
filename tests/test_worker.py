"""Worker events (emitting) and worker-trace (reading), on realistic generated logs."""

from __future__ import annotations

import io
import itertools
import json
import logging
import subprocess
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prosaas_migrate import worker_events as events
from prosaas_migrate.worker_events import JOB_FAILED, MARKERS, PICKED, RELEASE_SLOT, SLOT_ACQUIRED
from prosaas_migrate.worker_trace import Event, Trace, parse_line, problems_found, render_text
from tests.conftest import BIN, clean_env
from tests.worker_logs import PLANTED, generate


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


def test_finds_exactly_the_planted_anomalies_among_thousands_of_jobs() -> None:
    report = Trace().read(generate(5000, seed=3)).report()
    loops = {x["call_sid"]: x["picks"] for x in report["recording_loops"]}
    assert loops == PLANTED["recording_loops"]
    leaks = {x["call_sid"]: x["why"] for x in report["leaked_slots"]}
    assert leaks == PLANTED["leaked_slots"]
    assert {x["call_sid"] for x in report["double_releases"]} == PLANTED["double_releases"]
    failures = {x["call_sid"]: x["failures"] for x in report["repeated_failures"]}
    assert failures == PLANTED["repeated_failures"]
    assert report["jobs_completed"] >= 5000
    assert report["unfinished_calls"] == 0
    assert 1 <= max(report["most_slots_held"].values()) <= 8  # the generator's concurrency
    loop = next(x for x in report["recording_loops"] if x["call_sid"] == "CALOOP1")
    assert [e["event"] for e in loop["lifecycle"]][:4] == [
        "WORKER_PICKED", "WORKER_SLOT_ACQUIRED", "WORKER_JOB_FAILED", "WORKER_RELEASE_SLOT",
    ]  # fmt: skip
    # Times where the lines carry them (JSON, or a leading timestamp); none are invented.
    stamps = [e["ts"] for e in loop["lifecycle"] if e["ts"]]
    assert stamps and all(stamp.startswith("2026-11-28T") for stamp in stamps)


def test_a_clean_log_has_no_findings() -> None:
    report = Trace().read(generate(3000, seed=5, plant=False)).report()
    assert not (report["recording_loops"] or report["leaked_slots"])
    assert not (report["double_releases"] or report["repeated_failures"])
    assert report["jobs_completed"] == 3000


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
    | st.sampled_from([*MARKERS, "WORKER_", "WORKER_STARTED"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["event", "ts", "call_sid", "business_id", "kind"])
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
                              "2026-11-28T10:00:00.123456789Z ", "\x1b[1m"])  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(DECORATION, ANY_LINE).map("".join), max_size=12))
def test_no_line_ever_crashes_it_or_becomes_a_problem_on_its_own(lines: list[str]) -> None:
    report = Trace().read(lines).report()
    render_text(report)
    json.dumps(report)
    parsed = [event for event in map(parse_line, lines) if event is not None]
    assert report["worker_events"] == len(parsed)
    if not any(event.name in (PICKED, SLOT_ACQUIRED, RELEASE_SLOT) for event in parsed):
        assert not problems_found(report)  # only slot and pick events can prove a problem


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
    if prefix:
        line = f"{prefix:<10}| {line}"
        if colour in ("compose", "both"):  # compose colours its whole prefix, blank included
            line = f"\x1b[1;36m{line[:12]}\x1b[0m{line[12:]}"
    return line


DECORATIONS = itertools.product(
    ["", "worker-1", "worker_1", "app.worker-12"],  # compose v2, v1, a long project name
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


def run_trace(args: list[str], log: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), "worker-trace", *args], input=log, env=clean_env(), cwd=tmp_path,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_cli_exits_1_on_findings_and_0_on_a_clean_log(tmp_path: Path) -> None:
    dirty = "\n".join(generate(800, seed=2)) + "\n"
    result = run_trace([], dirty, tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Recording loops (picked 3+ times without a download): 2" in result.stdout
    assert "CALOOP1 business_id=7 picked 4 times" in result.stdout
    assert "CALEAK1: still held at end of input" in result.stdout
    clean = "\n".join(generate(800, seed=2, plant=False)) + "\n"
    (tmp_path / "worker.log").write_text(clean)
    result = run_trace(["--json", "worker.log"], "", tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["jobs_completed"] == 800


def test_cli_bad_arguments_are_one_line(tmp_path: Path) -> None:
    result = run_trace(["missing.log"], "", tmp_path)
    assert result.returncode == 2
    assert "missing.log" in result.stderr and "Traceback" not in result.stderr
    result = run_trace(["--loop-threshold", "0"], "", tmp_path)
    assert result.returncode == 2
