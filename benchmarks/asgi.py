"""The HTTP app driven in process: no sockets and no load generator, bare and monitored blocks
alternating in one process, at 1 and at 8 concurrent requests.

No sockets or load generator between the two, and it shows what threads do to the monitor: an
in-process measurement like this one found a lock convoy (at 8 concurrent requests, +220 to
+250 µs per request, gone with the locks replaced by no-ops). Each block builds its app and
engine afresh; a monitored block removes its monitor afterwards, so bare blocks run without any
of session_monitor's hooks.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from .common import Table, delta, us
from .http_app import ITEM_ID, create_app, prepare_database


@dataclass(frozen=True)
class AsgiSettings:
    rounds: int
    requests: int  # per block
    concurrency: tuple[int, ...]


FULL = AsgiSettings(rounds=8, requests=800, concurrency=(1, 8))
QUICK = AsgiSettings(rounds=1, requests=16, concurrency=(1, 8))


async def _block(url: str, monitored: bool, requests: int, concurrency: int) -> float:
    """Microseconds of wall time per request."""
    app = create_app(url, monitored=monitored)
    transport = httpx.ASGITransport(app=app)
    path = f"/items/{ITEM_ID}"
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:

        async def worker(count: int) -> None:
            for _ in range(count):
                response = await client.get(path)
                response.raise_for_status()

        await worker(20)  # warm: the pool's connections, the route's caches
        started = time.perf_counter()
        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if monitored:
        app.state.monitor.uninstrument()
    app.state.session_factory.kw["bind"].dispose()
    return elapsed / (requests // concurrency * concurrency) * 1e6


def run(settings: AsgiSettings, workdir: Path, progress: Callable[[str], None]) -> list[Table]:
    url = f"sqlite:///{workdir / 'asgi.db'}"
    prepare_database(url)
    table = Table(
        "asgi",
        f"asgi: GET /items/{{id}} in process (httpx ASGITransport), {settings.requests} "
        f"requests per block, {settings.rounds} rounds of bare/monitored/bare",
        (
            "concurrent requests",
            "bare µs/request",
            "monitored µs/request",
            "Δ µs",
            "req/s ratio to bare (min-max)",
        ),
    )
    for concurrency in settings.concurrency:
        bare_times: list[float] = []
        ratios: list[float] = []
        monitored_times: list[float] = []
        for round_index in range(settings.rounds):
            blocks = [
                asyncio.run(_block(url, monitored, settings.requests, concurrency))
                for monitored in (False, True, False)
            ]
            bare_times += [blocks[0], blocks[2]]
            monitored_times.append(blocks[1])
            # req/s ratio: the bare blocks either side, over the monitored block between them
            ratios.append((blocks[0] + blocks[2]) / 2 / blocks[1])
            progress(f"asgi concurrency {concurrency}: round {round_index + 1}/{settings.rounds}")
        bare, monitored = statistics.median(bare_times), statistics.median(monitored_times)
        table.add(
            concurrency,
            us(bare),
            us(monitored),
            delta(monitored - bare),
            f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})",
        )
    table.notes.append(
        "Both apps are benchmarks/http_app.py; sync endpoints run in the threadpool, so 8 "
        "concurrent requests means up to 8 threads inside SQLAlchemy and the monitor at once."
    )
    return [table]
