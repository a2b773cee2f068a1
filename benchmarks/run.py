"""Benchmarks: each figure is a ratio against a baseline measured in the same run.

Run with `./scripts/bench` (or `.venv/bin/python -m benchmarks.run`). These machines are noisy,
so commands are interleaved with their baselines and medians are reported.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg

from prosaas_migrate.config import DEFAULT_LOCK_KEY
from tests import project
from tests.conftest import BIN, Running, clean_env
from tests.pgcluster import Cluster
from tests.worker_logs import generate

ALEMBIC = Path(sys.executable).parent / "alembic"


def timed(argv: Sequence[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{argv} failed: {result.stderr.decode()[-2000:]}")
    return elapsed


def compare(
    name: str, goal: str, ours: Callable[[], float], baseline: Callable[[], float], rounds: int
) -> None:
    ours(), baseline()  # warm the page cache and bytecode caches
    mine, base = [], []
    for _ in range(rounds):
        mine.append(ours())
        base.append(baseline())
    ratio = statistics.median(mine) / statistics.median(base)
    print(
        f"{name}: {ratio:.2f}x (goal {goal}); median {statistics.median(mine) * 1000:.0f} ms "
        f"vs {statistics.median(base) * 1000:.0f} ms baseline, {rounds} rounds",
        flush=True,
    )


def bench_disabled_path(work: Path, rounds: int) -> None:
    env = clean_env({"RUN_MIGRATIONS": "0"})
    compare(
        "disabled path vs python -c 'import click, dotenv'",
        "<= 1.15x",
        lambda: timed([str(BIN), "run", "--", "true"], env, work),
        lambda: timed([sys.executable, "-c", "import click, dotenv"], env, work),
        rounds,
    )


def bench_noop_at_head(cluster: Cluster, work: Path, rounds: int) -> None:
    url = cluster.create_database("noop")
    app = work / "noop"
    project.create(app, project.linear(20), env="stock", url=url)
    env = clean_env({"RUN_MIGRATIONS": "1", "DATABASE_URL": url})
    timed([str(BIN), "run"], env, app)  # bring the database to head
    compare(
        "no-op run at head vs alembic upgrade head",
        "<= 0.85x",
        lambda: timed([str(BIN), "run"], env, app),
        lambda: timed([str(ALEMBIC), "upgrade", "head"], env, app),
        rounds,
    )


def bench_status(cluster: Cluster, work: Path, rounds: int) -> None:
    url = cluster.create_database("status")
    app = work / "status"
    project.create(app, project.linear(1000), env="stock", url=url)
    env = clean_env({"RUN_MIGRATIONS": "1", "DATABASE_URL": url})
    timed([str(BIN), "run"], env, app)
    compare(
        "status on 1,000 revisions vs alembic current + alembic heads",
        "<= 1.0x",
        lambda: timed([str(BIN), "status"], env, app),
        lambda: (
            timed([str(ALEMBIC), "current"], env, app) + timed([str(ALEMBIC), "heads"], env, app)
        ),
        max(3, rounds // 3),
    )


def bench_handoff(cluster: Cluster, work: Path, rounds: int) -> None:
    """From the migrator's unlock to the waiting container's service printing its start time.

    Each round plays the real sequence: r003 is pending, so the runner waits for the lock; the
    holder (this script) "migrates" by recording r003, then unlocks; the runner re-reads the
    version under the lock, finds it current, releases and execs.
    """
    url = cluster.create_database("handoff")
    app = work / "handoff"
    project.create(app, project.linear(3))
    env = clean_env(
        {"RUN_MIGRATIONS": "1", "DATABASE_URL": url, "MIGRATION_LOCK_WAIT_SECONDS": "60"}
    )
    timed([str(BIN), "run"], env, app)
    service = [sys.executable, "-S", "-c", "import time; print(time.time())"]
    startup = statistics.median(timed(service, env, app) for _ in range(5))
    delays: list[float] = []
    key = DEFAULT_LOCK_KEY
    with psycopg.connect(url, autocommit=True) as holder:
        for _ in range(rounds):
            holder.execute("UPDATE alembic_version SET version_num = 'r002'")
            holder.execute("SELECT pg_advisory_lock(%s)", [key])
            proc = subprocess.Popen(
                [str(BIN), "run", "--", *service],
                env=env,
                cwd=app,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            wait_until_waiting(holder)
            time.sleep(0.5 + (len(delays) % 5) * 0.037)  # release at varied poll phases
            holder.execute("UPDATE alembic_version SET version_num = 'r003'")
            released = time.time()
            holder.execute("SELECT pg_advisory_unlock(%s)", [key])
            out, err = proc.communicate(timeout=30)
            if proc.returncode != 0 or "checked again under the lock" not in err:
                raise RuntimeError(f"the runner did not hand off as expected:\n{err}")
            delays.append(float(out.strip()) - released)
    median = statistics.median(delays)
    print(
        f"lock hand-off, unlock -> service running: median {median * 1000:.0f} ms (goal <= 150 ms; "
        f"peers poll every 1-10 s), p90 {sorted(delays)[int(len(delays) * 0.9)] * 1000:.0f} ms; "
        f"{median / startup:.2f}x the service's own start-up ({startup * 1000:.0f} ms), "
        f"{rounds} rounds",
        flush=True,
    )


def bench_dead_runner(cluster: Cluster, work: Path, rounds: int) -> None:
    """SIGKILL a runner mid-statement; how soon does the next (waiting) runner get the lock?"""
    for seconds in (10, 60):
        delays = []
        for attempt in range(max(2, rounds // 5)):
            url = cluster.create_database(f"dead_{seconds}_{attempt}")
            app = work / f"dead_{seconds}_{attempt}"
            project.create(app, [project.Revision("r001", sql=[f"SELECT pg_sleep({seconds})"])])
            env = clean_env(
                {"RUN_MIGRATIONS": "1", "DATABASE_URL": url, "MIGRATION_LOCK_WAIT_SECONDS": "120"}
            )
            victim = Running(["run"], env, app)
            victim.wait_for("Applying revision r001")
            successor = Running(["run"], env, app)
            successor.wait_for("Waiting for migration lock")
            time.sleep(0.3)
            killed = time.monotonic()
            victim.proc.kill()
            successor.wait_for("Acquired migration lock", timeout=seconds + 30)
            delays.append(time.monotonic() - killed)
            victim.finish()
            successor.proc.kill()
            successor.finish()
        median = statistics.median(delays)
        print(
            f"dead runner, {seconds} s statement: next runner has the lock {median:.1f} s after "
            f"the SIGKILL (goal ~2 s), {median / seconds:.2f}x the statement's length",
            flush=True,
        )


def bench_worker_trace(work: Path, rounds: int) -> None:
    """worker-trace over a million lines against grep -c WORKER_PICKED on the same file."""
    files = {}
    for lines in (200_000, 1_000_000):
        path = work / f"worker-{lines}.log"
        with path.open("w") as out:
            for count, line in enumerate(generate(lines // 5, seed=11), start=1):
                out.write(line + "\n")
                if count >= lines:
                    break
        files[lines] = path
    big = files[1_000_000]
    env = clean_env()
    trace = [str(BIN), "worker-trace", str(big)]
    grep = ["grep", "-c", "WORKER_PICKED", str(big)]

    def timed_any(argv: list[str]) -> float:  # both exit 1 by design on findings / no match
        started = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, check=False)
        return time.perf_counter() - started

    compare(
        "worker-trace on 1,000,000 lines vs grep -c WORKER_PICKED", "report only",
        lambda: timed_any(trace), lambda: timed_any(grep), max(3, rounds // 5),
    )  # fmt: skip
    rss = {}
    for lines, path in files.items():
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run([str(BIN), "worker-trace", str(path)], env=env, capture_output=True)
        rss[lines] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if rss[lines] <= before:  # ru_maxrss is the largest child so far: measure in order
            rss[lines] = before
    print(
        f"worker-trace peak memory: {rss[200_000] / 1024:.0f} MiB at 200,000 lines, "
        f"{rss[1_000_000] / 1024:.0f} MiB at 1,000,000 lines "
        f"({rss[1_000_000] / rss[200_000]:.2f}x for 5x the lines)",
        flush=True,
    )
    # One long bare token after a tag was quadratic (40,000 characters took seconds): a 1 MB
    # line must cost no more than a megabyte of ordinary lines.
    long_line = work / "worker-long-line.log"
    long_line.write_text("🎯 [WORKER_PICKED] " + "a" * 1_000_000 + "\n")
    ordinary = work / "worker-1mb.log"
    with ordinary.open("w") as out:
        for line in generate(10_000, seed=11):
            out.write(line + "\n")
            if out.tell() >= long_line.stat().st_size:
                break
    compare(
        "worker-trace on one 1 MB line vs on 1 MB of ordinary log lines", "<= 1.0x",
        lambda: timed_any([str(BIN), "worker-trace", str(long_line)]),
        lambda: timed_any([str(BIN), "worker-trace", str(ordinary)]), max(3, rounds // 3),
    )  # fmt: skip


def wait_until_waiting(holder: psycopg.Connection[tuple[object, ...]]) -> None:
    """Until a second session, the runner, is connected with our application_name."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        row = holder.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'prosaas-migrate:%'"
        ).fetchone()
        if row and int(str(row[0])) > 0:
            return
        time.sleep(0.01)
    raise RuntimeError("the runner never connected")


def main() -> None:
    rounds = int(os.environ.get("BENCH_ROUNDS", "15"))
    cluster = Cluster()
    cluster.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            bench_disabled_path(work, rounds)
            bench_noop_at_head(cluster, work, rounds)
            bench_status(cluster, work, rounds)
            bench_handoff(cluster, work, rounds)
            bench_dead_runner(cluster, work, rounds)
            bench_worker_trace(work, rounds)
            from benchmarks.busy import bench_queued_alter
            from benchmarks.lint import bench_lint  # it imports this module's helpers

            bench_lint(work, rounds)
            bench_queued_alter(cluster, work, max(rounds // 3, 3))
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
