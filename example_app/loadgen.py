"""Send a realistic mix of traffic to the example app and summarise what session_monitor saw.

    python -m example_app.loadgen --base-url http://127.0.0.1:8000 --duration 30
    python -m example_app.loadgen --requests 2000 --concurrency 8 --seed 1 --no-failures

Most requests list, read and create items. Unless `--no-failures` is given, a few hit each
`/demo` failure, including bursts of concurrent `/demo/hold` calls larger than the pool, which
make other requests wait and some time out with 503. `/metrics` is scraped before and after, and
the summary shows what the run changed: sessions opened, closed and leaked, transactions by
outcome, pool timeouts.

From Python: `summary = await run_load("http://127.0.0.1:8000", requests=200)`.
The exit code is 0 unless the app could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

# The pool size to exceed when /metrics does not say: the example's default 5 + 5 overflow.
DEFAULT_POOL_CAPACITY = 10
# Longer than the example's POOL_TIMEOUT (2 s), so that requests queued behind a burst time out.
HOLD_SECONDS = 3.0
# Share of item reads that ask for an id that does not exist, answered 404.
MISSING_ITEM_SHARE = 0.1
# Leaked sessions each keep a connection; release them before they starve the whole pool.
MAX_OUTSTANDING_LEAKS = 2
KNOWN_IDS_KEPT = 1000

NO_RESPONSE = 0
"""The status recorded for a request that got no HTTP response (connection error, timeout)."""

_Snapshot = dict[tuple[str, frozenset[tuple[str, str]]], float]


class AppUnreachableError(Exception):
    """The app did not answer at the base URL."""


@dataclass
class EndpointStats:
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def percentile(self, q: float) -> float:
        """Return the nearest-rank `q` quantile of the latencies, in seconds."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True)
class MetricDeltas:
    """How much session_monitor's counters grew during the run, summed over pools and routes."""

    sessions_opened: float
    sessions_closed: float
    sessions_leaked: dict[str, float]
    transactions: dict[str, float]
    connection_timeouts: float

    @classmethod
    def between(cls, before: _Snapshot, after: _Snapshot) -> MetricDeltas:
        def total(name: str) -> float:
            return _sum(after, name) - _sum(before, name)

        def by(name: str, label: str) -> dict[str, float]:
            earlier = _by_label(before, name, label)
            grown = {
                key: value - earlier.get(key, 0.0)
                for key, value in _by_label(after, name, label).items()
            }
            return {key: value for key, value in sorted(grown.items()) if value}

        return cls(
            sessions_opened=total("sqlalchemy_sessions_opened_total"),
            sessions_closed=total("sqlalchemy_sessions_closed_total"),
            sessions_leaked=by("sqlalchemy_sessions_leaked_total", "reason"),
            transactions=by("sqlalchemy_transactions_total", "outcome"),
            connection_timeouts=total("db_client_connection_timeouts_total"),
        )


@dataclass
class LoadSummary:
    base_url: str
    concurrency: int
    seed: int
    elapsed: float = 0.0
    requests_sent: int = 0
    endpoints: dict[str, EndpointStats] = field(default_factory=dict)
    metrics: MetricDeltas | None = None
    """None when /metrics did not answer 200 before and after the run."""
    lost_connection: bool = False
    """The app stopped accepting connections during the run, which then ended early."""

    def statuses(self) -> Counter[int]:
        counts: Counter[int] = Counter()
        for stats in self.endpoints.values():
            counts.update(stats.statuses)
        return counts

    def render(self) -> str:
        rate = self.requests_sent / self.elapsed if self.elapsed else 0.0
        lines = [
            f"{self.requests_sent} requests to {self.base_url} in {self.elapsed:.1f} s "
            f"({rate:.1f}/s), concurrency {self.concurrency}, seed {self.seed}",
            "",
            f"{'endpoint':<28} {'requests':>8}  {'statuses':<24} {'p50 ms':>8} {'p95 ms':>8}",
        ]
        for label, stats in sorted(self.endpoints.items()):
            statuses = " ".join(
                f"{_status_name(code)}:{count}" for code, count in sorted(stats.statuses.items())
            )
            lines.append(
                f"{label:<28} {stats.requests:>8}  {statuses:<24} "
                f"{stats.percentile(0.5) * 1000:>8.1f} {stats.percentile(0.95) * 1000:>8.1f}"
            )
        overall = " ".join(
            f"{_status_name(code)}:{count}" for code, count in sorted(self.statuses().items())
        )
        lines.append(f"{'all':<28} {sum(self.statuses().values()):>8}  {overall}")
        lines.append("")
        if self.metrics is None:
            lines.append(
                "No session_monitor metrics: /metrics did not answer 200 before and after."
            )
        else:
            m = self.metrics
            lines.append("session_monitor, change during the run:")
            lines.append(f"  {'sessions opened':<32} {m.sessions_opened:>8.0f}")
            lines.append(f"  {'sessions closed':<32} {m.sessions_closed:>8.0f}")
            for reason, value in m.sessions_leaked.items() or {"(none)": 0.0}.items():
                lines.append(f"  {'sessions leaked, ' + reason:<32} {value:>8.0f}")
            for outcome, value in m.transactions.items() or {"(none)": 0.0}.items():
                lines.append(f"  {'transactions, ' + outcome:<32} {value:>8.0f}")
            lines.append(f"  {'connection timeouts':<32} {m.connection_timeouts:>8.0f}")
        if self.lost_connection:
            lines.append("")
            lines.append("The app stopped accepting connections; the run ended early.")
        return "\n".join(lines)


def _status_name(code: int) -> str:
    return "error" if code == NO_RESPONSE else str(code)


def _labelled(snapshot: _Snapshot, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(labels), value) for (sample, labels), value in snapshot.items() if sample == name]


def _sum(snapshot: _Snapshot, name: str) -> float:
    return sum(value for _, value in _labelled(snapshot, name))


def _by_label(snapshot: _Snapshot, name: str, label: str) -> dict[str, float]:
    sums: dict[str, float] = {}
    for labels, value in _labelled(snapshot, name):
        key = labels.get(label, "")
        sums[key] = sums.get(key, 0.0) + value
    return sums


async def _scrape(client: httpx.AsyncClient) -> _Snapshot | None:
    response = await client.get("/metrics")
    if response.status_code != 200:
        return None
    snapshot: _Snapshot = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            snapshot[sample.name, frozenset(sample.labels.items())] = sample.value
    return snapshot


@dataclass(frozen=True)
class _Request:
    label: str
    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Mapping[str, Any] | None = None


class _Run:
    """The state shared by the workers of one run."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        summary: LoadSummary,
        *,
        rng: random.Random,
        budget: int | None,
        deadline: float | None,
        failures: bool,
        burst_size: int,
        bar: tqdm[Any],
    ) -> None:
        self.client = client
        self.summary = summary
        self.rng = rng
        self.budget = budget
        self.deadline = deadline
        self.burst_size = burst_size
        self.known_ids: list[int] = []
        self.outstanding_leaks = 0
        self.bar = bar
        actions: dict[Callable[[], Awaitable[None]], float] = {
            self.list_items: 30,
            self.read_item: 25,
            self.create_item: 20,
            self.core: 5,
        }
        if failures:
            actions |= {
                self.slow: 4,
                self.rollback: 3,
                self.leak_on_error: 2,
                self.gc_leak: 2,
                self.leak: 2,
                self.hold_burst: 1,
                self.invalidate: 1,
                self.pitfall: 2,
            }
        self.actions = list(actions)
        self.weights = list(actions.values())

    def take(self, count: int = 1) -> int:
        """Reserve up to `count` requests of the budget; 0 means the run is over."""
        if self.over():
            return 0
        if self.budget is None:
            return count
        taken = min(count, self.budget)
        self.budget -= taken
        return taken

    def over(self) -> bool:
        return (
            self.summary.lost_connection
            or self.budget == 0
            or (self.deadline is not None and time.monotonic() >= self.deadline)
        )

    async def worker(self) -> None:
        while not self.over():
            (action,) = self.rng.choices(self.actions, self.weights)
            await action()

    async def send(self, request: _Request) -> httpx.Response | None:
        stats = self.summary.endpoints.setdefault(request.label, EndpointStats())
        self.summary.requests_sent += 1
        started = time.perf_counter()
        try:
            response = await self.client.request(
                request.method, request.path, params=request.params, json=request.json
            )
        except httpx.HTTPError as error:
            if isinstance(error, httpx.ConnectError):
                self.summary.lost_connection = True
            stats.statuses[NO_RESPONSE] += 1
            return None
        finally:
            stats.latencies.append(time.perf_counter() - started)
            self.bar.update(1)
        stats.statuses[response.status_code] += 1
        return response

    async def single(self, request: _Request) -> httpx.Response | None:
        if not self.take():
            return None
        return await self.send(request)

    async def list_items(self) -> None:
        params = {"skip": self.rng.randrange(0, 50), "limit": self.rng.choice([10, 20, 50])}
        await self.single(_Request("GET /items", "GET", "/items", params=params))

    async def read_item(self) -> None:
        if self.rng.random() < MISSING_ITEM_SHARE:
            item_id = 1_000_000_000 + self.rng.randrange(1_000_000)
        elif self.known_ids:
            item_id = self.rng.choice(self.known_ids)
        else:
            # Until this run has created items, guess the ids earlier runs are likely to have left.
            item_id = self.rng.randrange(1, 100)
        await self.single(_Request("GET /items/{item_id}", "GET", f"/items/{item_id}"))

    async def create_item(self) -> None:
        body = {
            "name": f"item {self.rng.randrange(1_000_000)}",
            "description": self.rng.choice([None, "made by the load generator"]),
        }
        response = await self.single(_Request("POST /items", "POST", "/items", json=body))
        if response is not None and response.status_code == 201:
            self.known_ids.append(int(response.json()["id"]))
            del self.known_ids[:-KNOWN_IDS_KEPT]

    async def core(self) -> None:
        await self.single(_Request("GET /demo/core", "GET", "/demo/core"))

    async def slow(self) -> None:
        params = {"seconds": round(self.rng.uniform(0.1, 0.5), 2)}
        await self.single(_Request("GET /demo/slow", "GET", "/demo/slow", params=params))

    async def rollback(self) -> None:
        await self.single(_Request("GET /demo/rollback", "GET", "/demo/rollback"))

    async def leak_on_error(self) -> None:
        await self.single(_Request("GET /demo/leak-on-error", "GET", "/demo/leak-on-error"))

    async def invalidate(self) -> None:
        await self.single(_Request("GET /demo/invalidate", "GET", "/demo/invalidate"))

    async def pitfall(self) -> None:
        # One of the tutorials' pitfalls (example_app/pitfalls.py), in turn.
        kind = self.rng.choice(("shared", "blocking", "forgot-commit", "nested"))
        path = f"/demo/pitfall/{kind}"
        await self.single(_Request(f"GET {path}", "GET", path))

    async def gc_leak(self) -> None:
        await self.single(_Request("GET /demo/gc-leak", "GET", "/demo/gc-leak"))

    async def leak(self) -> None:
        # Release before leaking more rather than right after a leak: session_monitor checks
        # for leaks once the request's cleanup is over, just after the response went out, and
        # a session closed by then would not be counted.
        if self.outstanding_leaks >= MAX_OUTSTANDING_LEAKS:
            await self.release_leaks()
        response = await self.single(_Request("GET /demo/leak", "GET", "/demo/leak"))
        if response is not None and response.status_code == 200:
            self.outstanding_leaks += 1

    async def release_leaks(self) -> None:
        # Outside the budget: it undoes what /demo/leak did rather than being traffic of its own.
        self.outstanding_leaks = 0
        await self.send(_Request("POST /demo/leak/release", "POST", "/demo/leak/release"))

    async def hold_burst(self) -> None:
        size = self.take(self.burst_size)
        request = _Request("GET /demo/hold", "GET", "/demo/hold", params={"seconds": HOLD_SECONDS})
        await asyncio.gather(*(self.send(request) for _ in range(size)))


async def run_load(
    base_url: str,
    *,
    requests: int | None = None,
    duration: float | None = None,
    concurrency: int = 8,
    seed: int = 0,
    failures: bool = True,
    progress: bool = False,
) -> LoadSummary:
    """Send `requests` requests, or keep sending for `duration` seconds (default 30 s)."""
    if requests is not None and duration is not None:
        raise ValueError("give requests or duration, not both")
    if requests is not None and requests < 1:
        raise ValueError(f"requests must be at least 1, got {requests}")
    if duration is not None and duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if requests is None and duration is None:
        duration = 30.0

    summary = LoadSummary(base_url=base_url, concurrency=concurrency, seed=seed)
    # trust_env=False: the app under load is reached directly, never through a configured proxy.
    async with httpx.AsyncClient(
        base_url=base_url,
        timeout=30.0,
        limits=httpx.Limits(max_connections=None),
        trust_env=False,
    ) as client:
        try:
            before = await _scrape(client)
        except httpx.TransportError as error:
            raise AppUnreachableError(f"no answer from {base_url}: {error!r}") from error

        with tqdm(
            total=requests,
            disable=not progress,
            file=sys.stderr,
            unit="req",
            desc="load",
        ) as bar:
            run = _Run(
                client,
                summary,
                rng=random.Random(seed),
                budget=requests,
                deadline=None if duration is None else time.monotonic() + duration,
                failures=failures,
                burst_size=_pool_capacity(before) + 4,
                bar=bar,
            )
            started = time.monotonic()
            await asyncio.gather(*(run.worker() for _ in range(concurrency)))
            summary.elapsed = time.monotonic() - started
            # A request's session is closed, and checked for leaks, only after its response went
            # out; let the last requests get there before releasing leaks and scraping.
            await asyncio.sleep(0.2)
            if run.outstanding_leaks and not summary.lost_connection:
                await run.release_leaks()

        if before is not None and not summary.lost_connection:
            with contextlib.suppress(httpx.TransportError):
                after = await _scrape(client)
                if after is not None:
                    summary.metrics = MetricDeltas.between(before, after)
    return summary


def _pool_capacity(snapshot: _Snapshot | None) -> int:
    if snapshot is not None:
        capacity = _sum(snapshot, "db_client_connection_max")
        if capacity > 0:
            return int(capacity)
    return DEFAULT_POOL_CAPACITY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m example_app.loadgen",
        description="Send a realistic mix of traffic to the example app and summarise it.",
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--duration", type=float, help="seconds to run (default 30)")
    amount.add_argument("--requests", type=int, help="number of requests to send")
    parser.add_argument("--concurrency", type=int, default=8, help="parallel clients (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument(
        "--no-failures",
        dest="failures",
        action="store_false",
        help="only well-behaved endpoints, none of /demo's failures",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        summary = asyncio.run(
            run_load(
                args.base_url,
                requests=args.requests,
                duration=args.duration,
                concurrency=args.concurrency,
                seed=args.seed,
                failures=args.failures,
                progress=not args.quiet and sys.stderr.isatty(),
            )
        )
    except ValueError as error:
        parser.error(str(error))
    except AppUnreachableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary.render())
    return 1 if summary.lost_connection else 0


if __name__ == "__main__":
    sys.exit(main())
