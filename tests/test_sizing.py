"""Sizing advice against scenarios whose answer is known: over-subscribed workers, a pool too
small for its demand, churn, and a healthy pool that gets no advice."""

import os
import subprocess
import sys
from bisect import bisect_left
from pathlib import Path
from typing import Any

import pytest

from session_monitor.findings.database_view import live_workers
from session_monitor.findings.server_view import ServerLimits
from session_monitor.findings.sizing import PoolFacts, advice, percentile
from session_monitor.state.stats import WAIT_BUCKETS, Histogram


def waits(*seconds: float) -> Histogram:
    histogram = Histogram(WAIT_BUCKETS)
    for value in seconds:
        histogram.counts[bisect_left(WAIT_BUCKETS, value)] += 1
        histogram.sum += value
    return histogram


def facts(**changes: object) -> PoolFacts:
    healthy = PoolFacts(
        pool_name="db:5432/app",
        pool_size=5,
        max_overflow=10,
        workers=1,
        workers_seen_by="this process",
        limits=ServerLimits(100, 3, None, None, 12),
        peak=4,
        checkouts=10_000,
        elapsed=600.0,
        hold_seconds=1200.0,  # 2 connections in use on average
        wait=waits(*[0.0002] * 1000),
        timeouts=0,
        overflow_closed=0,
    )
    return healthy._replace(**changes)


def test_a_healthy_pool_gets_no_advice() -> None:
    assert advice(facts()) == []


def test_workers_that_may_open_more_than_the_server_allows_are_over_subscribed() -> None:
    (verdict,) = advice(facts(workers=8))
    assert verdict.startswith(
        "over-subscribed: 8 workers x (5 + 10) = 120 connections may be opened; the server "
        "allows 97 (100 - 3 reserved), and 12 are connected now"
    )
    assert advice(facts(workers=6)) == []  # 90 of 97


def test_a_role_limit_caps_what_the_server_allows() -> None:
    limits = ServerLimits(100, 3, 20, None, 5)
    assert limits.allowed == 20
    (verdict,) = advice(facts(workers=2, limits=limits))
    assert "= 30 connections may be opened; the server allows 20 (100 - 3 reserved, the role's limit 20)" in verdict


def test_a_pool_that_timed_out_is_too_small_and_told_how_big_by_its_demand() -> None:
    (verdict,) = advice(
        facts(peak=15, timeouts=7, hold_seconds=600.0 * 14, wait=waits(*[2.0] * 100))
    )
    # Little's law: 14 in use on average; 1.5 x 14 = 21 in all, and the server has room.
    assert verdict.startswith("too small: peak use 15 of 15 with p95 wait 2.5 s, 7 checkouts timed out;")
    assert "demand by Little's law 14.0 connections" in verdict
    assert "raise pool_size and max_overflow to about 21 in all (the server leaves room for 97 per worker)" in verdict


def test_a_full_pool_whose_callers_queue_is_too_small_even_without_timeouts() -> None:
    assert advice(facts(peak=15, wait=waits(*[0.0002] * 90, *[0.4] * 10))) != []
    assert advice(facts(peak=15, wait=waits(*[0.0002] * 99, 0.4))) == []  # p95 is fast


def test_a_pool_full_of_leaked_sessions_is_told_to_fix_the_leaks_not_to_grow() -> None:
    (verdict,) = advice(facts(peak=15, timeouts=1, leaked_holding=12))
    assert verdict.startswith("too small: peak use 15 of 15 with p95 wait 0.0005 s, 1 checkout timed out;")
    assert verdict.endswith(
        "2.0 connections; 12 of the connections in use are held by leaked sessions: fix the leaks first "
        "(the Leaks row, the holders)"
    )


def test_too_small_with_no_room_at_the_server_says_pooler() -> None:
    (over, small) = advice(facts(workers=8, peak=15, timeouts=1))
    assert over.startswith("over-subscribed")
    assert small.endswith("or hold connections for less time (see the holders)")
    assert "the server allows only 12 per worker: add a pooler" in small


def test_connections_opened_and_closed_again_under_steady_load_are_churn() -> None:
    (verdict,) = advice(facts(overflow_closed=600, hold_seconds=600.0 * 6.5))
    assert verdict.startswith(
        "churn: 600 connections were opened beyond pool_size 5 and closed again (60.0 a minute, "
        "for 10000 checkouts): raise pool_size to about 8"
    )
    assert advice(facts(overflow_closed=9)) == []  # a peak, not a pattern
    assert advice(facts(overflow_closed=150)) == []  # 1.5 % of checkouts


def test_percentile_reads_the_bucket_bound() -> None:
    assert percentile(waits(), 0.95) is None
    assert percentile(waits(*[0.0002] * 95, *[3.0] * 5), 0.95) == 0.0005


def test_workers_are_counted_from_live_files_of_the_multiprocess_directory(tmp_path: Path) -> None:
    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(3)]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for process in [*sleepers, dead]:
            (tmp_path / f"counter_{process.pid}.db").write_bytes(b"")
            (tmp_path / f"gauge_livesum_{process.pid}.db").write_bytes(b"")
        (tmp_path / f"counter_{os.getpid()}.db").write_bytes(b"")
        assert live_workers(str(tmp_path)) == 4  # three sleepers and this process
    finally:
        for process in sleepers:
            process.kill()
            process.wait()
    assert live_workers(str(tmp_path)) == 1
    assert live_workers(None) == 0


def test_a_pool_held_by_leaked_sessions_is_told_so_by_the_holders_and_the_sizing(
    sqlite_url: str, make_engine: Any, make_monitor: Any
) -> None:
    """Through a real app: two requests leak their sessions, a third checkout times out."""
    from _apps import build_app
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    engine = make_engine(sqlite_url, pool_size=2, max_overflow=0, pool_timeout=0.2)
    monitor = make_monitor(engine, registry=CollectorRegistry())
    test_app = build_app(engine)
    monitor.instrument_app(test_app.app)
    client = TestClient(test_app.app)
    for _ in range(2):
        assert client.get("/leak").status_code == 200
    assert [h.activity for h in monitor.holders()] == ["leaked", "leaked"]
    with pytest.raises(Exception, match="QueuePool limit"):
        engine.connect()  # the pool is empty: this one times out
    (pool,) = monitor.database_report()
    (verdict,) = pool["advice"]
    assert verdict.endswith(
        "2 of the connections in use are held by leaked sessions: fix the leaks first "
        "(the Leaks row, the holders)"
    )
    for session in test_app.leaked:
        session.close()
