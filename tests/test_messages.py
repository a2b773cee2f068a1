"""Messages that say what is true (issue 16, point 11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import cli


@pytest.mark.parametrize("service", [["-x"], ["--help"], ["-", "a"]])
def test_a_service_after_dashdash_that_starts_with_a_dash_is_execd_not_refused(
    tmp_path: Path, service: list[str]
) -> None:
    result = cli(["run", "--", *service], {}, tmp_path)
    assert result.returncode == 127, result.stderr
    assert "put the service after --" not in result.stderr
    assert f"cannot exec {service[0]}: No such file or directory (ENOENT)" in result.stderr


@pytest.mark.parametrize(
    "args", [["-x"], ["-x", "--", "gunicorn"], ["--config", "alembic.ini", "--bogus", "x"]]
)
def test_an_unknown_option_before_dashdash_is_a_usage_error(
    tmp_path: Path, args: list[str]
) -> None:
    result = cli(["run", *args], {}, tmp_path)
    assert result.returncode == 2, result.stderr
    bad = next(arg for arg in args if arg.startswith("-") and arg != "--config")
    assert f"no such option: {bad} (put the service after --)" in result.stderr


def test_a_dash_service_after_dashdash_with_options_before_it(tmp_path: Path) -> None:
    (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = migrations\n")
    result = cli(["run", "--config", "alembic.ini", "--", "-x"], {}, tmp_path)
    assert result.returncode == 127, result.stderr


def test_no_progress_line_follows_the_outcome(tmp_path: Path, db_url: str) -> None:
    """The monitor reports a running revision every 5 s; once the upgrade is over it says
    nothing more: it is stopped before the outcome is logged."""
    import json

    from tests import project

    project.create(tmp_path, project.linear(2, slow_seconds=5.6))
    env = {"RUN_MIGRATIONS": "1", "DATABASE_URL": db_url, "MIGRATION_LOG_FORMAT": "json"}
    result = cli(["run"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line)["event"] for line in result.stderr.splitlines() if line]
    assert "revision_progress" in events  # the guard: the monitor did report
    done = events.index("migrations_complete")
    assert "revision_progress" not in events[done:]


@pytest.mark.parametrize("env", ["stock", "cookbook"])
def test_a_server_crash_mid_revision_is_one_verdict(tmp_path: Path, env: str) -> None:
    """The crash fails the migration and ends the lock's session with it: one event. Before,
    the stock env.py printed MIGRATION LOCK LOST ("another runner may have migrated") and then
    MIGRATION FAILED ("nothing of them is in the database")."""
    from tests import project
    from tests.conftest import Running
    from tests.pgcluster import Cluster

    server = Cluster()
    try:
        server.start()
        project.create(tmp_path, project.linear(2, slow_seconds=30), env=env, url=server.url())
        proc = Running(["run"], {"RUN_MIGRATIONS": "1", "DATABASE_URL": server.url()}, tmp_path)
        proc.wait_for("Applying revision r001")
        server.kill()
        assert proc.finish() == 1, proc.stderr
    finally:
        server.destroy()
    headlines = [line for line in proc.lines if line.startswith("❌")]
    assert len(headlines) == 1, headlines
    if env == "stock":  # env.py's own connection failed: the migration's verdict
        assert headlines[0].startswith("❌ MIGRATION FAILED in revision r001:")
        assert "released with its session" in proc.stderr
    else:  # the migration ran on the lock's session: losing it is the verdict
        assert headlines[0].startswith("❌ MIGRATION LOCK LOST:")
        assert "nothing of them is in the database" not in proc.stderr
