"""Does the cost per event stay flat with more threads, smaller pools, and many open sessions?

Each configuration alternates bare and monitored blocks (``bare, mon, bare, mon, ..., bare``), a
fresh engine per block; the ratio is the monitored block over the mean of its bare neighbours.
"""

from __future__ import annotations

import gc
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from session_monitor import SessionMonitor

from .common import (
    SELECT_1,
    Paired,
    Table,
    Target,
    delta,
    file_engine,
    neighbour_mean,
    ratio_text,
    session_lifecycle,
    time_per_op,
    us,
    verdict,
)

FLAT_LIMIT = 1.05  # monitored/bare ratio with the most sessions held, over the one with 1 held


@dataclass(frozen=True)
class ScaleSettings:
    rounds: int
    lifecycles_per_block: int
    threads: tuple[int, ...]
    pool_sizes: tuple[int, ...]
    threads_for_pools: int
    held: tuple[int, ...]
    held_rounds: int
    held_iterations: int


FULL = ScaleSettings(
    rounds=3,
    lifecycles_per_block=640,
    threads=(1, 8, 64),
    pool_sizes=(1, 4, 16),
    threads_for_pools=16,
    held=(1, 100, 1000, 10000),
    held_rounds=3,
    held_iterations=250,
)
QUICK = ScaleSettings(
    rounds=1,
    lifecycles_per_block=16,
    threads=(1, 8),
    pool_sizes=(1, 4),
    threads_for_pools=4,
    held=(1, 100),
    held_rounds=1,
    held_iterations=10,
)


def _instrumenter(monitored: bool) -> Callable[..., Callable[[], None]]:
    def instrument(*engines: Engine) -> Callable[[], None]:
        if not monitored:
            return lambda: None
        return SessionMonitor(*engines, registry=CollectorRegistry()).uninstrument

    return instrument


def _alternate(measure: Callable[[bool], float], rounds: int) -> tuple[list[float], Paired]:
    """Run bare, monitored, bare, ..., bare; return the bare values and the paired monitored."""
    values = [measure(index % 2 == 1) for index in range(2 * rounds + 1)]
    monitored = Paired()
    for index in range(1, len(values), 2):
        monitored.add(values[index], neighbour_mean(values, index))
    return values[0::2], monitored


# -- threads and pool size ------------------------------------------------------------------


def _threaded(db_path: str, monitored: bool, threads: int, pool_size: int, total: int) -> float:
    """µs of wall time per lifecycle, `threads` threads sharing `total` lifecycles."""
    engine = file_engine(db_path, pool_size=pool_size, max_overflow=0)
    undo = _instrumenter(monitored)(engine)
    lifecycle = session_lifecycle(sessionmaker(bind=engine))
    per_thread = max(1, total // threads)
    ready = threading.Barrier(threads + 1)
    go = threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(3):
                lifecycle()
            ready.wait()
            go.wait()
            for _ in range(per_thread):
                lifecycle()
        except BaseException as error:  # reported by the main thread
            errors.append(error)
            ready.abort()

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    try:
        for thread in workers:
            thread.start()
        ready.wait()
        gc.collect()
        gc.disable()
        try:
            started = time.perf_counter_ns()
            go.set()
            for thread in workers:
                thread.join()
            elapsed = time.perf_counter_ns() - started
        finally:
            gc.enable()
    finally:
        go.set()
        undo()
        engine.dispose()
    if errors:
        raise errors[0]
    return elapsed / (per_thread * threads) / 1000.0


# -- sessions held open ---------------------------------------------------------------------


def _hold(factory: sessionmaker[Session], count: int) -> list[Session]:
    held = []
    for _ in range(count):
        session = factory()
        session.execute(SELECT_1)
        held.append(session)
    return held


def _release(held: list[Session]) -> None:
    for session in held:
        session.close()
    held.clear()


def _holder_engine() -> Engine:
    # In-memory SQLite behind NullPool: every held session has a connection of its own, and
    # no file descriptor is spent on it.
    return create_engine("sqlite://", poolclass=NullPool)


def _with_held(db_path: str, monitored: bool, count: int, iterations: int) -> tuple[float, int]:
    """µs per lifecycle on a pooled engine while `count` sessions hold connections open."""
    engine = file_engine(db_path)
    holder = _holder_engine()
    tracked = 0
    monitor = SessionMonitor(engine, holder, registry=CollectorRegistry()) if monitored else None
    held = _hold(sessionmaker(bind=holder), count)
    try:
        if monitor is not None:
            tracked = monitor.tracked_sessions
        cost = time_per_op(
            session_lifecycle(sessionmaker(bind=engine)), iterations, max(5, iterations // 10)
        )
    finally:
        _release(held)
        if monitor is not None:
            monitor.uninstrument()
        engine.dispose()
        holder.dispose()
    return cost, tracked


def _bytes_per_held(monitored: bool, count: int) -> float:
    holder = _holder_engine()
    monitor = SessionMonitor(holder, registry=CollectorRegistry()) if monitored else None
    factory = sessionmaker(bind=holder)
    _release(_hold(factory, 10))  # metric children, caches and imports exist before counting
    gc.collect()
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        held = _hold(factory, count)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    _release(held)
    if monitor is not None:
        monitor.uninstrument()
    holder.dispose()
    return (after - before) / count


# -- the section ----------------------------------------------------------------------------


def run(
    settings: ScaleSettings, db_path: str, progress: Callable[[str], None]
) -> tuple[list[Table], list[Target]]:
    headers = (
        "threads",
        "pool size",
        "bare µs/lifecycle",
        "monitored µs/lifecycle",
        "Δ µs",
        "ratio to bare (min-max)",
    )
    threads_table = Table(
        "scale-threads",
        "scale: wall time per session lifecycle vs threads (pool large enough for all)",
        headers,
    )
    pools_table = Table(
        "scale-pool",
        f"scale: wall time per session lifecycle vs pool size ({settings.threads_for_pools} "
        "threads)",
        headers,
    )
    configs = [(threads_table, threads, max(settings.threads)) for threads in settings.threads]
    configs += [(pools_table, settings.threads_for_pools, size) for size in settings.pool_sizes]
    for table, threads, pool_size in configs:
        progress(f"scale: {threads} threads, pool {pool_size}")

        def measure_threads(on: bool, t: int = threads, p: int = pool_size) -> float:
            return _threaded(db_path, on, t, p, settings.lifecycles_per_block)

        bare, monitored = _alternate(measure_threads, settings.rounds)
        bare_median = sorted(bare)[len(bare) // 2]
        table.add(
            threads,
            pool_size,
            us(bare_median),
            us(monitored.median),
            delta(monitored.median - bare_median),
            ratio_text(monitored.ratio, monitored.ratio_range),
        )
    threads_table.notes.append(
        "Wall time over lifecycles done: with the GIL and 2 cores this is the cost per "
        "lifecycle under contention, not latency."
    )
    pools_table.notes.append(
        "A pool smaller than the thread count makes threads wait for a connection, which the "
        "monitor times (wait histogram, pending gauge)."
    )

    held_table = Table(
        "scale-held",
        "scale: one more session lifecycle while N sessions are held open and tracked",
        (
            "sessions held",
            "tracked while timing",
            "bare µs/lifecycle",
            "monitored µs/lifecycle",
            "Δ µs",
            "ratio to bare (min-max)",
            "bytes/session bare",
            "bytes/session monitored",
            "Δ bytes per tracked session",
        ),
    )
    ratios: dict[int, float] = {}
    for count in settings.held:
        progress(f"scale: {count} sessions held")
        tracked_seen: list[int] = []

        def measure(on: bool, n: int = count, seen: list[int] = tracked_seen) -> float:
            cost, tracked = _with_held(db_path, on, n, settings.held_iterations)
            if on:
                seen.append(tracked)
            return cost

        bare, monitored = _alternate(measure, settings.held_rounds)
        bare_median = sorted(bare)[len(bare) // 2]
        # The least disturbed blocks of each kind: interference from other processes can only
        # add time, so the flatness check compares best with best.
        ratios[count] = min(monitored.values) / min(bare)
        bare_bytes = _bytes_per_held(False, count)
        monitored_bytes = _bytes_per_held(True, count)
        held_table.add(
            count,
            min(tracked_seen),
            us(bare_median),
            us(monitored.median),
            delta(monitored.median - bare_median),
            ratio_text(monitored.ratio, monitored.ratio_range),
            f"{bare_bytes:.0f}",
            f"{monitored_bytes:.0f}",
            f"{monitored_bytes - bare_bytes:.0f}",
        )
    held_table.notes.append(
        "Held sessions sit on an in-memory SQLite engine behind NullPool (a connection each), "
        "watched by the same monitor; the timed lifecycles run on the pooled file engine. "
        "Bytes are tracemalloc's (Python allocations only: SQLite's own memory is not seen)."
    )
    fewest, most = min(settings.held), max(settings.held)
    growth = ratios[most] / ratios[fewest]
    check = verdict(growth, FLAT_LIMIT)
    held_table.notes.append(
        f"flatness: best monitored over best bare block with {most} held, divided by the same "
        f"with {fewest} held = {growth:.3f} ({check})"
    )
    targets = [
        Target(
            f"flat: lifecycle cost ratio with {most} sessions held over {fewest} held",
            f"{growth:.3f}x",
            check,
        )
    ]
    return [threads_table, pools_table, held_table], targets
