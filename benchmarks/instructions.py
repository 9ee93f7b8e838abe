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
    Table,
    Target,
    core_connect,
    core_execute,
    file_engine,
    pool_checkout,
    raw_checkout,
    request_session,
    session_lifecycle,
)
from .variants import BARE, DEFAULT, PEERS, Variant

OPERATIONS: tuple[tuple[str, str], ...] = (
    ("lifecycle", "session lifecycle"),
    ("request", "session of 5 statements"),
    ("core", "Core connect()+execute"),
    ("connect", "engine.connect().close()"),
    ("checkout", "pool.connect().close()"),
    ("raw", "engine.raw_connection().close()"),
)
# On these, session_monitor default's added instructions must be below every peer's.
PEER_TARGETS = ("lifecycle", "request", "core")
WARMUP = 200


@dataclass(frozen=True)
class Settings:
    short: int
    long: int
    operations: tuple[str, ...]  # keys of OPERATIONS
    peers: bool


FULL = Settings(short=100, long=600, operations=tuple(k for k, _ in OPERATIONS), peers=True)
# Each run starts an interpreter under valgrind (seconds): the smoke test runs four.
QUICK = Settings(short=5, long=15, operations=("lifecycle",), peers=False)

_COLLECTED = re.compile(r"Collected : (\d+)")


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
    short = _count(variant, key, settings.short, db_path)
    long = _count(variant, key, settings.long, db_path)
    return (long - short) / (settings.long - settings.short)


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
        if key in PEER_TARGETS and peers:
            targets.append(
                Target(
                    f"{label}: session_monitor default's added instructions below every peer's",
                    f"{ours:+,.0f} vs "
                    + ", ".join(f"{p.label} {added[p.key]:+,.0f}" for p in peers),
                    "PASS" if lower else "MISS",
                )
            )
    table.notes.append(
        f"Per operation: (instructions for {settings.long} ops - for {settings.short} ops) / "
        f"{settings.long - settings.short}, each in a fresh interpreter after {WARMUP} warm-up "
        "ops, SQLite file database, QueuePool. Counts repeat to well under 1 % between runs."
    )
    return [table], targets


def _main(argv: Sequence[str]) -> None:
    key, variant_key, n_text, db_path = argv
    from .variants import FASTAPI_SQLALCHEMY_MONITOR, OTEL_CONTRIB

    variant = {v.key: v for v in (BARE, DEFAULT, OTEL_CONTRIB, FASTAPI_SQLALCHEMY_MONITOR)}[
        variant_key
    ]
    operation = _operation(key, db_path)
    variant.instrument(operation.engine)  # type: ignore[attr-defined]
    for _ in range(WARMUP):
        operation()
    import gc

    gc.disable()  # a collection in one run and not the other would be noise
    for _ in range(int(n_text)):
        operation()


if __name__ == "__main__":
    _main(sys.argv[1:])
