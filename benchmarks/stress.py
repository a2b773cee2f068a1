"""Stress: many runners at once, and runners killed at random moments.

    .venv/bin/python -m benchmarks.stress            # 50 runners x 10 rounds, then kill rounds
    STRESS_RUNNERS=20 STRESS_ROUNDS=3 .venv/bin/python -m benchmarks.stress

Each clean round starts every runner at once on a fresh database and checks that every revision
ran exactly once, every runner started its service, and the database never saw more than
runners + 1 connections (the +1 is this script's monitor). Each kill round SIGKILLs runners at
random moments (connecting, waiting, migrating, releasing), then checks that nothing is
half-applied, no lock is left held, and one more runner completes the schema. Exits 1 on any
violation.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg

from tests import project
from tests.conftest import BIN, applied_revisions, clean_env, query, version
from tests.pgcluster import Cluster

REVISIONS = [f"r{n:03d}" for n in range(1, 6)]
SERVICE = ["sh", "-c", "echo started"]


class PeakConnections:
    """Samples pg_stat_activity for one database every 10 ms from its own connection."""

    def __init__(self, admin_url: str, dbname: str) -> None:
        self.conn = psycopg.connect(admin_url.rsplit("/", 1)[0] + f"/{dbname}", autocommit=True)
        self.dbname = dbname
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            row = self.conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [self.dbname]
            ).fetchone()
            self.peak = max(self.peak, int(row[0]) if row else 0)
            self.stop.wait(0.01)

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        self.conn.close()
        return self.peak


def spawn(app: Path, url: str, wait: int) -> subprocess.Popen[str]:
    env = clean_env(
        {"RUN_MIGRATIONS": "1", "DATABASE_URL": url, "MIGRATION_LOCK_WAIT_SECONDS": str(wait)}
    )
    return subprocess.Popen(
        [str(BIN), "run", "--", *SERVICE],
        env=env,
        cwd=app,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def clean_round(cluster: Cluster, app: Path, runners: int, number: int) -> tuple[float, int]:
    name = f"stress_{number}"
    url = cluster.create_database(name)
    monitor = PeakConnections(cluster.url(), name)
    started = time.monotonic()
    procs = [spawn(app, url, wait=120) for _ in range(runners)]
    results = [proc.communicate(timeout=300) for proc in procs]
    elapsed = time.monotonic() - started
    peak = monitor.close()
    problems = []
    codes = Counter(proc.returncode for proc in procs)
    if codes != Counter({0: runners}):
        problems.append(f"exit codes {dict(codes)}")
    if sum(out == "started\n" for out, _ in results) != runners:
        problems.append("not every runner started its service")
    if applied_revisions(url) != REVISIONS:
        problems.append(f"revisions applied {applied_revisions(url)}")
    # One per runner, the migrator's progress monitor, and this script's own sampler.
    if peak > runners + 2:
        problems.append(f"peak connections {peak} > {runners + 2}")
    migrators = sum("Migrations complete" in err for _, err in results)
    if migrators != 1:
        problems.append(f"{migrators} runners migrated")
    if problems:
        print(f"round {number}: FAILED: {'; '.join(problems)}")
        print(next((err for _, err in results if "Traceback" in err), results[0][1]))
        raise SystemExit(1)
    print(
        f"round {number}: {runners} runners, all started, each revision once, "
        f"peak {peak} connections, {elapsed:.1f}s",
        flush=True,
    )
    return elapsed, peak


TRIGGERS = (
    "Acquired migration lock",
    "Applying revision r003",
    "Migrations complete",  # between the upgrade's commit and the unlock
    "Released migration lock",
)


def phase(stderr: str) -> str:
    """Where a killed runner was, from the last thing it said."""
    if "Released" in stderr or "Schema is current" in stderr or "Starting service" in stderr:
        return "after release"
    if "Migrations complete" in stderr:
        return "releasing"
    if "Acquired" in stderr:
        return "migrating"
    if "statement_timeout" in stderr:
        return "waiting"
    return "connecting"


class Victim:
    """A runner to be killed after `delay` seconds, or as soon as it says `trigger`."""

    def __init__(self, proc: subprocess.Popen[str], trigger: str | None, delay: float) -> None:
        self.proc, self.trigger, self.delay = proc, trigger, delay
        self.said: list[str] = []
        self.killed_in: str | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.said.append(line)
            if self.trigger and self.trigger in line:
                self.kill()

    def kill(self) -> None:
        if self.killed_in is None and self.proc.poll() is None:
            self.killed_in = phase("".join(self.said))
            self.proc.kill()


def kill_round(cluster: Cluster, app: Path, runners: int, number: int) -> Counter[str]:
    name = f"kill_{number}"
    url = cluster.create_database(name)
    rng = random.Random(number)
    victims = []
    for index in range(runners):
        # Every other runner dies on this round's trigger line (whoever reaches it), so each
        # phase is hit on purpose, not only when a random moment happens to land in it.
        trigger = TRIGGERS[number % len(TRIGGERS)] if index % 2 else None
        victims.append(Victim(spawn(app, url, wait=120), trigger, rng.uniform(0, 4)))
    started = time.monotonic()
    for victim in sorted(victims, key=lambda v: v.delay):
        if victim.trigger is None:
            time.sleep(max(0.0, victim.delay - (time.monotonic() - started)))
            victim.kill()
    for victim in victims:
        victim.proc.wait(timeout=300)
        victim.reader.join(timeout=10)
    phases = Counter(v.killed_in for v in victims if v.killed_in and v.proc.returncode == -9)
    # Whatever happened, the schema is all or nothing, and the next runner finishes it.
    problems = []
    applied, at = applied_revisions(url), version(url)
    if (at == [] and applied != []) or (at != [] and applied != REVISIONS):
        problems.append(f"half-applied: version {at}, revisions {applied}")
    deadline = time.monotonic() + 15  # killed backends go within ~2 s (client check)
    while query(url, "SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"):
        if time.monotonic() > deadline:
            problems.append("the lock was still held 15 s after the kills")
            break
        time.sleep(0.1)
    final = spawn(app, url, wait=60)
    _, err = final.communicate(timeout=120)
    if final.returncode != 0 or applied_revisions(url) != REVISIONS:
        problems.append(f"the next runner did not complete the schema: {err[-500:]}")
    if problems:
        print(f"kill round {number}: FAILED: {'; '.join(problems)}")
        raise SystemExit(1)
    print(f"kill round {number}: killed {dict(phases)}; nothing half-applied", flush=True)
    return Counter({str(k): n for k, n in phases.items()})


def main() -> int:
    runners = int(os.environ.get("STRESS_RUNNERS", "50"))
    rounds = int(os.environ.get("STRESS_ROUNDS", "10"))
    kill_rounds = int(os.environ.get("STRESS_KILL_ROUNDS", "5"))
    cluster = Cluster(max_connections=runners * 3 + 20)
    cluster.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            app = Path(tmp) / "app"
            revisions = project.linear(len(REVISIONS), slow_seconds=0.5)
            revisions[2].sql.insert(0, "SELECT pg_sleep(0.5)")
            project.create(app, revisions)
            timings = [clean_round(cluster, app, runners, n) for n in range(1, rounds + 1)]
            phases: Counter[str] = Counter()
            for n in range(1, kill_rounds + 1):
                phases += kill_round(cluster, app, min(runners, 24), n)
    finally:
        cluster.destroy()
    elapsed = [t for t, _ in timings]
    print(
        f"\nSTRESS PASSED: {rounds} rounds x {runners} runners: every revision exactly once, "
        f"every service started; peak connections max {max(p for _, p in timings)} "
        f"(limit {runners + 2}); round time median {statistics.median(elapsed):.1f}s, "
        f"max {max(elapsed):.1f}s. {kill_rounds} kill rounds, runners killed while "
        f"{dict(phases)}: never half-applied, lock never left held.",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
