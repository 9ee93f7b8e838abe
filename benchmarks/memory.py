"""Many lifecycles under the monitor: its tracked state returns to where it started, and
Python memory does not grow with the number of sessions it has seen."""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import sessionmaker

from .common import Table, Target, core_execute, file_engine, session_lifecycle
from .variants import monitor as new_monitor


@dataclass(frozen=True)
class MemorySettings:
    lifecycles: int
    core_every: int  # one Core connect()+execute after every this many session lifecycles
    warmup: int


FULL = MemorySettings(lifecycles=100_000, core_every=10, warmup=1000)
QUICK = MemorySettings(lifecycles=200, core_every=10, warmup=20)


def run(
    settings: MemorySettings, db_path: str, progress: Callable[[str], None]
) -> tuple[Table, list[Target]]:
    progress(f"memory: {settings.lifecycles} lifecycles under tracemalloc")
    engine = file_engine(db_path)
    monitor = new_monitor(engine)
    lifecycle = session_lifecycle(sessionmaker(bind=engine))
    core = core_execute(engine)
    try:
        for _ in range(settings.warmup):
            lifecycle()
            core()
        gc.collect()
        start = (monitor.tracked_sessions, monitor.tracked_checkouts)
        tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            started = time.perf_counter()
            for index in range(settings.lifecycles):
                lifecycle()
                if index % settings.core_every == 0:
                    core()
            seconds = time.perf_counter() - started
            gc.collect()
            after, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        end = (monitor.tracked_sessions, monitor.tracked_checkouts)
    finally:
        monitor.uninstrument()
        engine.dispose()

    cores = (settings.lifecycles + settings.core_every - 1) // settings.core_every
    growth = after - before
    state_ok = start == end
    check = "back to start PASS" if state_ok else "MISS"
    table = Table(
        "memory",
        "memory: session_monitor default settings, many lifecycles",
        (
            "lifecycles (+ Core connects)",
            "tracked sessions start→end",
            "tracked checkouts start→end",
            "tracemalloc growth bytes",
            "bytes per 1000 lifecycles",
            "peak above start bytes",
            "seconds",
            "state check",
        ),
    )
    table.add(
        f"{settings.lifecycles} (+{cores})",
        f"{start[0]}→{end[0]}",
        f"{start[1]}→{end[1]}",
        growth,
        f"{growth / settings.lifecycles * 1000:.1f}",
        peak - before,
        f"{seconds:.1f}",
        check,
    )
    table.notes.append(
        "Garbage collector on, as in an application; growth is traced memory after a full "
        "collection minus before (the monitor's caches and metric children are warmed first)."
    )
    target = Target(
        f"memory: tracked state back to start after {settings.lifecycles} lifecycles",
        f"sessions {start[0]}→{end[0]}, checkouts {start[1]}→{end[1]}, growth {growth} B",
        check,
    )
    return table, [target]
