"""The advisory lock on a real server; time is injected so deadlines are tested without waiting."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from prosaas_migrate import lock
from prosaas_migrate.errors import LockLost


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db_url, autocommit=True, application_name="prosaas-migrate:me") as c:
        yield c


@pytest.fixture
def other(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db_url, autocommit=True, application_name="prosaas-migrate:holder") as c:
        yield c


KEYS = [1, -1, 2**31, 2**32, 2**32 + 7, 2**63 - 1, -(2**63), 7214607257041625889]


@pytest.mark.parametrize("key", KEYS)
def test_holder_is_found_for_any_signed_64_bit_key(
    conn: psycopg.Connection[Any], other: psycopg.Connection[Any], key: int
) -> None:
    assert lock.holder(conn, key) is None
    assert lock.try_acquire(other, key)
    found = lock.holder(conn, key)
    assert found is not None
    assert found.pid == other.info.backend_pid
    assert found.application_name == "prosaas-migrate:holder"
    assert found.client_addr == "127.0.0.1"
    assert f"pid {other.info.backend_pid} (prosaas-migrate:holder, 127.0.0.1)" in found.describe()
    # A neighbouring key held by someone else is not mistaken for ours.
    assert lock.holder(conn, key ^ 1) is None


def test_acquire_within_gives_up_at_the_deadline_with_short_jittered_polls(
    conn: psycopg.Connection[Any],
    other: psycopg.Connection[Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = FakeClock()
    assert lock.try_acquire(other, 42)
    acquired, waited = lock.acquire_within(conn, 42, clock() + 12, clock=clock, sleep=clock.sleep)
    assert acquired is False
    assert waited == pytest.approx(12, abs=0.01)
    assert clock.sleeps and max(clock.sleeps) <= 0.15
    assert len(set(clock.sleeps)) > 10  # jittered, not a fixed beat
    lines = [line for line in capsys.readouterr().err.splitlines() if "Waiting" in line]
    assert len(lines) == 3  # at 0 s, ~5 s and ~10 s
    assert all(f"pid {other.info.backend_pid}" in line for line in lines)
    # No transaction (so no snapshot) was left open while waiting.
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_zero_wait_is_exactly_one_try(
    conn: psycopg.Connection[Any], other: psycopg.Connection[Any]
) -> None:
    clock = FakeClock()
    assert lock.try_acquire(other, 42)
    acquired, _ = lock.acquire_within(conn, 42, clock(), clock=clock, sleep=clock.sleep)
    assert acquired is False
    assert clock.sleeps == []


def test_acquire_within_takes_a_freed_lock(
    conn: psycopg.Connection[Any], other: psycopg.Connection[Any]
) -> None:
    clock = FakeClock()
    assert lock.try_acquire(other, 42)

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now > 1003:
            other.execute("SELECT pg_advisory_unlock(42)")

    acquired, waited = lock.acquire_within(conn, 42, clock() + 30, clock=clock, sleep=sleep)
    assert acquired is True
    assert 3 < waited < 3.3
    assert lock.holder(other, 42) is not None


def test_releasing_releases_on_error_without_hiding_it(conn: psycopg.Connection[Any]) -> None:
    assert lock.try_acquire(conn, 42)
    with pytest.raises(ZeroDivisionError), lock.releasing(conn, 42):
        assert lock.holder(conn, 42) is not None
        _ = 1 / 0
    assert lock.holder(conn, 42) is None


def test_releasing_reports_a_lost_lock_but_raises_the_first_error(
    conn: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ZeroDivisionError), lock.releasing(conn, 42):  # never acquired
        _ = 1 / 0
    assert "MIGRATION LOCK LOST" in capsys.readouterr().err


def test_release_of_a_lock_not_held_is_lock_lost(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(LockLost, match="pg_advisory_unlock returned false"):
        lock.release(conn, 42)


def test_release_on_a_terminated_connection_is_lock_lost(
    conn: psycopg.Connection[Any], other: psycopg.Connection[Any]
) -> None:
    assert lock.try_acquire(conn, 42)
    other.execute("SELECT pg_terminate_backend(%s)", [conn.info.backend_pid])
    with pytest.raises(LockLost, match="lock connection failed"):
        lock.release(conn, 42)
    assert lock.holder(other, 42) is None
