"""Worker events (emitting) and worker-trace (reading), on realistic generated logs."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prosaas_migrate import worker_events as events
from prosaas_migrate.worker_trace import Trace, parse_line
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
