"""instructions: what each variant costs per operation in CPU instructions, counted by callgrind.

Timings on a shared 2-core machine move by tens of percent between runs (see the micro section's
A/A rows); instruction counts do not: for the same interpreter, packages and inputs they repeat
to a fraction of a percent, whatever else the machine does. So the comparisons that must not be
decided by noise — session_monitor against the bare baseline and against every peer, op by op —
are also made here. Each (variant, operation) runs in a fresh interpreter under
``valgrind --tool=callgrind`` twice, with `SHORT` and `LONG` operations after the same warm-up;
the difference divided by ``LONG - SHORT`` is the cost of one operation, start-up excluded.

Run alone: ``python -m benchmarks.instructions OP VARIANT N`` runs N operations (no valgrind).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .common import (
    WHY_BOOKKEEPING,
    WHY_NO_STATEMENT,
    Table,
    Target,
    core_connect,
    core_execute,
    file_engine,
    pool_checkout,
    raw_checkout,
    request_session,
    session_lifecycle,
    verdict,
)
from .variants import BARE, DEFAULT, PEERS, Variant

OPERATIONS: tuple[tuple[str, str], ...] = (
    ("lifecycle", "session lifecycle"),
    ("request", "session of 5 statements"),
    ("core", "Core connect()+execute"),
    ("connect", "engine.connect().close()"),
    ("checkout", "pool.connect().close()"),
    ("raw", "engine.raw_connection().close()"),
    ("http", "HTTP GET /items/{id} in process"),
)
# On these, session_monitor default's added instructions must be below every peer's.
PEER_TARGETS = ("lifecycle", "request", "core", "connect", "raw", "http")
WARMUP = 200
# A request is some 20 times a session's instructions: fewer of them, for the same run time.
HTTP_SCALE = 10


@dataclass(frozen=True)
class Settings:
    short: int
    long: int
    operations: tuple[str, ...]  # keys of OPERATIONS
    peers: bool


FULL = Settings(short=100, long=600, operations=tuple(k for k, _ in OPERATIONS), peers=True)
# Each op's session_monitor cost is compared with the peers'; these are the issue's bars.
LIFECYCLE_LIMIT = 1.10
CONNECT_LIMIT = 1.4
# Each run starts an interpreter under valgrind (seconds): the smoke test runs four.
QUICK = Settings(short=5, long=15, operations=("lifecycle",), peers=False)

_COLLECTED = re.compile(r"Collected : (\d+)")


def _http_operation(variant_key: str, db_path: str) -> Callable[[], None]:
    """One GET /items/{id} through benchmarks/http_app.py in process (httpx's ASGI transport,
    one event loop for all): bare, monitored, fastapi-sqlalchemy-monitor's middleware as its
    README configures it, or the bare app with opentelemetry-instrumentation-sqlalchemy on its
    engine."""
    import asyncio

    import httpx

    from .http_app import BARE_APP, ITEM_ID, MONITORED_APP, PEER_APP, create_app, prepare_database
    from .variants import FASTAPI_SQLALCHEMY_MONITOR

    url = f"sqlite:///{db_path}"
    prepare_database(url)
    app_variant = {DEFAULT.key: MONITORED_APP, FASTAPI_SQLALCHEMY_MONITOR.key: PEER_APP}
    app = create_app(url, variant=app_variant.get(variant_key, BARE_APP))
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench")
    path = f"/items/{ITEM_ID}"

    def request() -> None:
        loop.run_until_complete(client.get(path)).raise_for_status()

    request.engine = app.state.session_factory.kw["bind"]  # type: ignore[attr-defined]
    request.app_instrumented = variant_key in app_variant  # type: ignore[attr-defined]
    return request


def _operation(key: str, db_path: str) -> Callable[[], None]:
    from sqlalchemy.orm import sessionmaker

    engine = file_engine(db_path)
    made = {
        "lifecycle": lambda: session_lifecycle(sessionmaker(bind=engine)),
        "request": lambda: request_session(sessionmaker(bind=engine)),
        "core": lambda: core_execute(engine),
        "connect": lambda: core_connect(engine),
        "checkout": lambda: pool_checkout(engine),
        "raw": lambda: raw_checkout(engine),
    }
    operation = made[key]()
    operation.engine = engine  # type: ignore[attr-defined]
    return operation


def _count(variant: Variant, key: str, n: int, db_path: str) -> int:
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "benchmarks.instructions",
        key,
        variant.key,
        str(n),
        db_path,
    ]
    # A fixed hash seed: with random ones, start-up alone varies by millions of instructions.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent.parent,
        env=env,
    )
    found = _COLLECTED.search(result.stderr)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run failed ({variant.key} {key}):\n{result.stderr[-2000:]}")
    return int(found.group(1))


def per_operation(variant: Variant, key: str, settings: Settings, db_path: str) -> float:
    scale = HTTP_SCALE if key == "http" else 1
    short, long = max(settings.short // scale, 1), max(settings.long // scale, 2)
    return (_count(variant, key, long, db_path) - _count(variant, key, short, db_path)) / (
        long - short
    )


def run(
    settings: Settings,
    variants: Sequence[Variant],
    progress: Callable[[str], None],
) -> tuple[list[Table], list[Target]]:
    if shutil.which("valgrind") is None:
        table = Table("instructions", "instructions: skipped", ["reason"])
        table.add("valgrind is not installed (Debian: apt-get install valgrind)")
        return [table], []
    chosen = [v for v in variants if v in (BARE, DEFAULT, *(PEERS if settings.peers else ()))]
    operations = [(k, label) for k, label in OPERATIONS if k in settings.operations]
    counts: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory(prefix="session-monitor-instructions-") as scratch:
        db_path = str(Path(scratch) / "bench.db")
        for key, label in operations:
            for variant in chosen:
                progress(f"instructions: {label}, {variant.label}")
                counts[key, variant.key] = per_operation(variant, key, settings, db_path)
    peers = [v for v in chosen if v in PEERS]
    table = Table(
        "instructions",
        "instructions: CPU instructions per operation (callgrind), added over bare",
        [
            "operation",
            "bare",
            *(f"{v.label} Δ" for v in chosen if v is not BARE),
            "session_monitor ratio to bare",
            "lower than every peer",
        ],
    )
    targets: list[Target] = []
    for key, label in operations:
        bare = counts[key, BARE.key]
        added = {v.key: counts[key, v.key] - bare for v in chosen if v is not BARE}
        ours = added[DEFAULT.key]
        lower = all(ours < added[p.key] for p in peers)
        table.add(
            label,
            f"{bare:,.0f}",
            *(f"{added[v.key]:+,.0f}" for v in chosen if v is not BARE),
            f"{counts[key, DEFAULT.key] / bare:.3f}",
            ("yes" if lower else "no") if peers else "—",
        )
        limit = {"lifecycle": LIFECYCLE_LIMIT, "connect": CONNECT_LIMIT}.get(key)
        if limit is not None:
            ratio = counts[key, DEFAULT.key] / bare
            targets.append(
                Target(
                    f"{label}: session_monitor default's instructions, ratio to bare",
                    f"{ratio:.3f}x ({ours:+,.0f})",
                    verdict(ratio, limit),
                    WHY_BOOKKEEPING,
                )
            )
        if key in PEER_TARGETS and peers:
            targets.append(
                Target(
                    f"{label}: session_monitor default's added instructions below every peer's",
                    f"{ours:+,.0f} vs "
                    + ", ".join(f"{p.label} {added[p.key]:+,.0f}" for p in peers),
                    "PASS" if lower else "MISS",
                    WHY_NO_STATEMENT if key in ("connect", "raw") else WHY_BOOKKEEPING,
                )
            )
    table.notes.append(
        f"Per operation: (instructions for {settings.long} ops - for {settings.short} ops) / "
        f"{settings.long - settings.short} (a tenth of each for the HTTP request), each in a "
        f"fresh interpreter after {WARMUP} warm-up ops, SQLite file database, QueuePool. For the "
        "same code and inputs a count repeats to a fraction of a percent; between builds of the "
        "code (other file paths, other object addresses) bare moves by up to ~1 %: a difference "
        "of a few thousand instructions is inside that."
    )
    return [table], targets


def _main(argv: Sequence[str]) -> None:
    key, variant_key, n_text, db_path = argv
    from .variants import FASTAPI_SQLALCHEMY_MONITOR, OTEL_CONTRIB

    variant = {v.key: v for v in (BARE, DEFAULT, OTEL_CONTRIB, FASTAPI_SQLALCHEMY_MONITOR)}[
        variant_key
    ]
    if key == "http":
        operation = _http_operation(variant.key, db_path)
        if not operation.app_instrumented:  # type: ignore[attr-defined]
            variant.instrument(operation.engine)  # type: ignore[attr-defined]
    else:
        operation = _operation(key, db_path)
        variant.instrument(operation.engine)  # type: ignore[attr-defined]
    for _ in range(WARMUP // (HTTP_SCALE if key == "http" else 1)):
        operation()
    import gc

    gc.disable()  # a collection in one run and not the other would be noise
    for _ in range(int(n_text)):
        operation()


if __name__ == "__main__":
    _main(sys.argv[1:])
