"""How long an application query waits behind a migration's queued ALTER TABLE, with the DDL lock
timeout (the default) and without it, in the same run: `.venv/bin/python -m benchmarks.busy`.

Each round: a report holds ACCESS SHARE on `leads` in an open transaction for HOLD seconds; the
runner's revision runs `ALTER TABLE leads ADD COLUMN ...`, which queues for ACCESS EXCLUSIVE
behind it; one second in, the app runs a plain `SELECT` on `leads` and we time it.
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psycopg

from tests import project
from tests.conftest import Running
from tests.pgcluster import Cluster

HOLD = 3.0  # how long the report keeps its transaction open
APP_QUERY_AT = 1.0  # when the app's query arrives, after the report began


def app_wait(cluster: Cluster, work: Path, name: str, lock_timeout: str) -> float:
    url = cluster.create_database(name)
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("CREATE TABLE leads (id int)")
        admin.execute("INSERT INTO leads SELECT generate_series(1, 1000)")
    root = work / name
    with contextlib.redirect_stdout(io.StringIO()):  # alembic init's chatter
        project.create(
            root, [project.Revision("r001", sql=["ALTER TABLE leads ADD COLUMN src text"])]
        )
    report = psycopg.connect(url)
    report.execute("SELECT count(*) FROM leads")  # ACCESS SHARE until commit
    began = time.monotonic()
    threading.Timer(HOLD, report.commit).start()
    env = {
        "RUN_MIGRATIONS": "1",
        "DATABASE_URL": url,
        "MIGRATION_DDL_LOCK_TIMEOUT": lock_timeout,
        "MIGRATION_DDL_LOCK_RETRIES": "20",
    }
    runner = Running(["run"], env, root)
    runner.wait_for("Applying revision r001")
    time.sleep(max(APP_QUERY_AT - (time.monotonic() - began), 0.0))
    with psycopg.connect(url, autocommit=True) as app:
        started = time.monotonic()
        app.execute("SELECT count(*) FROM leads").fetchone()
        waited = time.monotonic() - started
    if runner.finish(timeout=60) != 0:
        raise RuntimeError(runner.stderr)
    report.close()
    return waited


def bench_queued_alter(cluster: Cluster, work: Path, rounds: int) -> None:
    with_timeout, without = [], []
    for n in range(rounds):  # interleaved, so both see the same machine
        with_timeout.append(app_wait(cluster, work, f"busy_on_{n}", "500ms"))
        without.append(app_wait(cluster, work, f"busy_off_{n}", "0"))
    ours, base = statistics.median(with_timeout), statistics.median(without)
    print(
        f"app query behind a queued ALTER, lock timeout 500ms vs off: {ours / base:.2f}x "
        f"(goal: well under 1); median {ours * 1000:.0f} ms vs {base * 1000:.0f} ms "
        f"(the report holds its lock for {HOLD:.0f} s; the query arrives {APP_QUERY_AT:.0f} s in)"
    )


def main() -> None:
    rounds = int(os.environ.get("BENCH_ROUNDS", "5"))
    cluster = Cluster()
    cluster.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bench_queued_alter(cluster, Path(tmp), rounds)
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
