"""The log vocabulary: the lines operators and tests grep for, exactly."""

from __future__ import annotations

import pytest

from prosaas_migrate import logs


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    assert captured.out == ""  # logs never touch stdout: it belongs to the service
    return captured.err.splitlines()


def test_the_design_notes_lines_are_printed_exactly(capsys: pytest.CaptureFixture[str]) -> None:
    logs.checkpoint("RUN_MIGRATIONS", "1")
    logs.statement_timeout_set("120s")
    logs.lock_timeout(30)
    logs.disabled("RUN_MIGRATIONS", "0")
    got = lines(capsys)
    for expected in [
        "🔧 MIGRATION CHECKPOINT: Starting apply_migrations()",
        "✅ Set statement_timeout to 120s for migration connection",
        "⚠️ MIGRATION CHECKPOINT: Could not acquire lock in time -> skipping migrations",
        "   Waited 30s but another process is running migrations",
        "   This is SAFE - migrations will run in another container",
        "🚫 MIGRATIONS_DISABLED: RUN_MIGRATIONS is not set to '1'",
        "   Migrations are disabled for this service",
    ]:
        assert expected in got


def test_lock_lines_start_with_the_markers(capsys: pytest.CaptureFixture[str]) -> None:
    logs.lock_acquired(42, 0.5)
    logs.lock_released(42)
    got = lines(capsys)
    assert got[0].startswith("✅ Acquired migration lock")
    assert got[1].startswith("✅ Released migration lock")


def test_every_event_is_one_line_per_detail(capsys: pytest.CaptureFixture[str]) -> None:
    logs.waiting(42, 5, None)
    logs.applying("abc", "add leads")
    logs.ran("abc", None)
    logs.migration_failed("def", "ValueError: boom", rolled_back=["abc", "def"])
    logs.exec_service(["gunicorn", "app:app"])
    assert lines(capsys) == [
        "⏳ Waiting for migration lock 42 (5s so far); held by no holder visible "
        "(it may have just released)",
        "🔧 Applying revision abc (add leads)",
        "☑️ Ran revision abc: not committed yet",
        "❌ MIGRATION FAILED in revision def: ValueError: boom",
        "   Rolled back: abc, def (nothing of them is in the database)",
        "   The service is not started",
        "🚀 Starting service: gunicorn app:app",
    ]


def test_a_hidden_secret_never_reaches_a_line_or_a_field(
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = 'p"\\ä@ss'  # quotes, a backslash and an accent: JSON would escape each
    logs.hide([secret])
    try:
        for log_format in ("text", "json"):
            logs.configure(log_format)
            logs.error(f"could not parse postgresql://u:{secret}@h/db")
            logs.connect_retry(f"postgresql://u:{secret}@h", 1, f"no: {secret}", 3)
    finally:
        logs.configure("text")
        logs._secrets = ()
    err = capsys.readouterr().err
    assert 'p"' not in err and secret not in err and "ss@h" not in err.replace("***@h", "")
    assert err.count("***") == 9  # 3 text, 6 JSON (message and fields)
