"""The HTTP app driven in process: no sockets and no load generator, bare, monitored and
fastapi-sqlalchemy-monitor blocks alternating in one process, at 1 and at 8 concurrent requests.

No sockets or load generator between them, and it shows what threads do to the monitor: an
in-process measurement like this one found a lock convoy (at 8 concurrent requests, +220 to
+250 µs per request, gone with the locks replaced by no-ops). Each block builds its app and
engine afresh; a monitored block removes its monitor afterwards, so bare blocks run without any
of session_monitor's hooks (fastapi-sqlalchemy-monitor's listeners stay on their block's engine,
which is thrown away with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from .common import Table, Target, delta, us
from .http_app import BARE_APP, ITEM_ID, MONITORED_APP, PEER_APP, create_app, prepare_database
from .variants import peer_missing


@dataclass(frozen=True)
class AsgiSettings:
    rounds: int
    requests: int  # per block
    concurrency: tuple[int, ...]


FULL = AsgiSettings(rounds=8, requests=800, concurrency=(1, 8))
QUICK = AsgiSettings(rounds=1, requests=16, concurrency=(1, 8))


@contextlib.contextmanager
def _stdout_discarded(variant: str) -> Iterator[None]:
    """The README's PrintStatistics action prints every request's statistics to stdout: let it
    (it is part of what the configuration costs), into /dev/null rather than the tables."""
    if variant != PEER_APP:
        yield
        return
    with open(os.devnull, "w", encoding="utf-8") as sink, contextlib.redirect_stdout(sink):
        yield


async def _block(url: str, variant: str, requests: int, concurrency: int) -> float:
    """Microseconds of wall time per request."""
    app = create_app(url, variant=variant)
    transport = httpx.ASGITransport(app=app)
    path = f"/items/{ITEM_ID}"
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:

        async def worker(count: int) -> None:
            for _ in range(count):
                response = await client.get(path)
                response.raise_for_status()

        with _stdout_discarded(variant):
            await worker(20)  # warm: the pool's connections, the route's caches
            started = time.perf_counter()
            await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
    if variant == MONITORED_APP:
        app.state.monitor.uninstrument()
    app.state.session_factory.kw["bind"].dispose()
    return elapsed / (requests // concurrency * concurrency) * 1e6


def _ratio_text(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"


def run(
    settings: AsgiSettings, workdir: Path, progress: Callable[[str], None]
) -> tuple[list[Table], list[Target]]:
    url = f"sqlite:///{workdir / 'asgi.db'}"
    prepare_database(url)
    missing = peer_missing()
    variants = [MONITORED_APP] if missing else [MONITORED_APP, PEER_APP]
    table = Table(
        "asgi",
        f"asgi: GET /items/{{id}} in process (httpx ASGITransport), {settings.requests} "
        f"requests per block, {settings.rounds} rounds of "
        + "/".join([BARE_APP, *(f"{variant}/{BARE_APP}" for variant in variants)]),
        (
            "concurrent requests",
            "bare µs/request",
            "monitored µs/request",
            "Δ µs",
            "req/s ratio to bare (min-max)",
            f"{PEER_APP} µs/request",
            f"{PEER_APP} Δ µs",
            f"{PEER_APP} req/s ratio to bare (min-max)",
        ),
    )
    targets: list[Target] = []
    for concurrency in settings.concurrency:
        bare_times: list[float] = []
        times: dict[str, list[float]] = {variant: [] for variant in variants}
        ratios: dict[str, list[float]] = {variant: [] for variant in variants}
        for round_index in range(settings.rounds):
            shift = round_index % len(variants)
            sequence = [BARE_APP]
            for variant in variants[shift:] + variants[:shift]:
                sequence += [variant, BARE_APP]
            blocks = [
                asyncio.run(_block(url, variant, settings.requests, concurrency))
                for variant in sequence
            ]
            bare_times += blocks[0::2]
            for index in range(1, len(blocks), 2):
                variant = sequence[index]
                times[variant].append(blocks[index])
                # req/s ratio: the bare blocks either side, over the block between them
                ratios[variant].append((blocks[index - 1] + blocks[index + 1]) / 2 / blocks[index])
            progress(f"asgi concurrency {concurrency}: round {round_index + 1}/{settings.rounds}")
        bare = statistics.median(bare_times)
        cells: list[str] = []
        added: dict[str, float] = {}
        for variant in (MONITORED_APP, PEER_APP):
            if variant in times:
                median = statistics.median(times[variant])
                added[variant] = median - bare
                cells += [us(median), delta(median - bare), _ratio_text(ratios[variant])]
            else:
                cells += ["skipped", "—", "—"]
        table.add(concurrency, us(bare), *cells)
        if PEER_APP in added:
            lower = added[MONITORED_APP] < added[PEER_APP]
            targets.append(
                Target(
                    f"HTTP request in process, {concurrency} at once: monitored Δ µs lower than "
                    f"{PEER_APP}'s",
                    f"{delta(added[MONITORED_APP])} µs vs {delta(added[PEER_APP])} µs",
                    f"lower than every peer {'PASS' if lower else 'MISS'}",
                )
            )
    table.notes.append(
        "Every app is benchmarks/http_app.py; sync endpoints run in the threadpool, so 8 "
        "concurrent requests means up to 8 threads inside SQLAlchemy and the monitor at once."
    )
    table.notes.append(
        f"{PEER_APP}: its README's quick start (a BaseHTTPMiddleware with "
        "WarnMaxTotalInvocation(max_invocations=10) and PrintStatistics(), whose per-request "
        "print goes to /dev/null here)." + (f" Skipped: {missing}" if missing else "")
    )
    return [table], targets
