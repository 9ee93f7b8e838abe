"""In-process cost per operation: bare and each instrumentation, interleaved in one run.

Every round runs ``bare, V1, bare, V2, ..., bare`` (the order of the Vs rotates from round to
round), each block on a fresh engine that is instrumented before and uninstrumented after it.
A variant's ratio in a round is its time over the mean of the two bare blocks around it; the
interior bare blocks, compared the same way with theirs, give the noise floor (A/A).

A fresh engine per block matters: SQLAlchemy never clears ``Engine._has_events`` when listeners
are removed, so an engine that was once instrumented keeps dispatching connection events.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import sessionmaker

from .common import (
    Paired,
    Table,
    Target,
    core_execute,
    delta,
    file_engine,
    neighbour_mean,
    pool_checkout,
    ratio_text,
    raw_checkout,
    session_lifecycle,
    time_per_op,
    us,
    verdict,
)
from .variants import BARE, Variant

# key, label shown in the table
WORKLOADS: tuple[tuple[str, str], ...] = (
    ("lifecycle", "session lifecycle"),
    ("core", "Core connect()+execute"),
    ("checkout", "pool.connect().close()"),
    ("raw", "engine.raw_connection().close()"),
)

# workload key, variant key, limit
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("lifecycle", "default", 1.05),
    ("lifecycle", "stacks", 1.15),
    ("checkout", "default", 1.5),
    ("raw", "default", 1.5),
)


@dataclass(frozen=True)
class MicroSettings:
    rounds: int
    warmup_rounds: int
    iterations: dict[str, int]
    warmup_ops: int


FULL = MicroSettings(
    rounds=12,
    warmup_rounds=1,
    iterations={"lifecycle": 250, "core": 250, "checkout": 1000, "raw": 1000},
    warmup_ops=100,
)
QUICK = MicroSettings(
    rounds=1,
    warmup_rounds=0,
    iterations={"lifecycle": 10, "core": 10, "checkout": 30, "raw": 30},
    warmup_ops=5,
)


def _block(variant: Variant, db_path: str, settings: MicroSettings) -> dict[str, float]:
    engine = file_engine(db_path)
    operations: dict[str, Callable[[], None]] = {
        "lifecycle": session_lifecycle(sessionmaker(bind=engine)),
        "core": core_execute(engine),
        "checkout": pool_checkout(engine),
        "raw": raw_checkout(engine),
    }
    undo = variant.instrument(engine)
    try:
        return {
            key: time_per_op(operations[key], settings.iterations[key], settings.warmup_ops)
            for key, _ in WORKLOADS
        }
    finally:
        undo()
        engine.dispose()


def run(
    settings: MicroSettings,
    db_path: str,
    variants: list[Variant],
    skipped: dict[str, tuple[str, str]],
    progress: Callable[[str], None],
) -> tuple[Table, list[Target], list[str]]:
    """Return the table, the targets it checks, and one noise line per workload."""
    others = [variant for variant in variants if variant is not BARE]
    bare_all: dict[str, list[float]] = {key: [] for key, _ in WORKLOADS}
    aa: dict[str, Paired] = {key: Paired() for key, _ in WORKLOADS}
    paired: dict[tuple[str, str], Paired] = {
        (key, variant.key): Paired() for key, _ in WORKLOADS for variant in others
    }
    for round_index in range(settings.warmup_rounds + settings.rounds):
        shift = round_index % len(others) if others else 0
        order = others[shift:] + others[:shift]
        sequence = [BARE]
        for variant in order:
            sequence += [variant, BARE]
        blocks = [(variant, _block(variant, db_path, settings)) for variant in sequence]
        warm = round_index < settings.warmup_rounds
        progress(
            f"micro round {round_index + 1}/{settings.warmup_rounds + settings.rounds}"
            + (" (warm-up)" if warm else "")
        )
        if warm:
            continue
        for key, _ in WORKLOADS:
            values = [times[key] for _, times in blocks]
            bare_values = values[0::2]
            bare_all[key] += bare_values
            for index in range(1, len(bare_values) - 1):
                aa[key].add(bare_values[index], neighbour_mean(bare_values, index))
            for index in range(1, len(blocks), 2):
                variant = blocks[index][0]
                paired[(key, variant.key)].add(values[index], neighbour_mean(values, index))

    table = Table(
        "micro",
        f"micro: µs per operation, median of {settings.rounds} rounds (SQLite file, QueuePool)",
        ("operation", "variant", "median µs", "Δ µs vs bare", "ratio to bare (min-max)", "target"),
    )
    limits = {(workload, variant): limit for workload, variant, limit in TARGETS}
    targets: list[Target] = []
    noise: list[str] = []
    for key, label in WORKLOADS:
        bare_median = statistics.median(bare_all[key])
        if aa[key].ratios:
            aa_text = ratio_text(aa[key].ratio, aa[key].ratio_range) + " A/A"
            low, high = aa[key].ratio_range
            noise.append(f"{label}: bare vs bare {low:.3f}-{high:.3f}")
        else:
            aa_text = "1.000 (A/A needs ≥2 variants)"
        table.add(label, BARE.label, us(bare_median), "—", aa_text, "")
        for variant in others:
            measured = paired[(key, variant.key)]
            limit = limits.get((key, variant.key))
            check = "" if limit is None else verdict(measured.ratio, limit)
            table.add(
                label,
                variant.label,
                us(measured.median),
                delta(measured.median - bare_median),
                ratio_text(measured.ratio, measured.ratio_range),
                check,
            )
            if limit is not None:
                targets.append(
                    Target(
                        f"{label}, {variant.label}",
                        f"{measured.ratio:.3f}x ({delta(measured.median - bare_median)} µs)",
                        check,
                    )
                )
        for variant_label, _reason in skipped.values():
            table.add(label, variant_label, "skipped", "—", "—", "")
    for variant_label, reason in skipped.values():
        table.notes.append(f"{variant_label} skipped: {reason}")
    table.notes.append(
        "µs: per block, the fastest of 5 timed batches (gc off); median over rounds. ratio: "
        "the variant's time over the mean of the bare blocks run just before and after it, "
        "median over rounds; A/A compares bare blocks with their neighbours (noise floor)."
    )
    return table, targets, noise
