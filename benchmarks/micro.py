"""In-process cost per operation: bare and each instrumentation, interleaved in one run.

Every round runs ``bare, V1, bare, V2, ..., bare`` (the order of the Vs rotates from round to
round), each block on a fresh engine that is instrumented before and uninstrumented after it.
A variant's ratio in a round is its time over the mean of the two bare blocks around it; the
interior bare blocks, compared the same way with theirs, give the noise floor (A/A).

A fresh engine per block matters: SQLAlchemy never clears ``Engine._has_events`` when listeners
are removed, so an engine that was once instrumented keeps dispatching connection events.

A second table sets session_monitor's default cost beside each peer's (the other libraries in
``variants.PEERS``), operation by operation.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import sessionmaker

from .common import (
    WHY_BOOKKEEPING,
    WHY_NO_STATEMENT,
    Paired,
    Table,
    Target,
    core_connect,
    core_execute,
    delta,
    file_engine,
    neighbour_mean,
    pool_checkout,
    ratio_text,
    raw_checkout,
    request_session,
    session_lifecycle,
    time_per_op,
    us,
    verdict,
)
from .variants import BARE, DEFAULT, PEERS, Variant

# key, label shown in the table
WORKLOADS: tuple[tuple[str, str], ...] = (
    ("lifecycle", "session lifecycle"),
    ("request", "session of 5 statements"),
    ("core", "Core connect()+execute"),
    ("connect", "engine.connect().close()"),
    ("checkout", "pool.connect().close()"),
    ("raw", "engine.raw_connection().close()"),
)

# workload key, variant key, limit
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("lifecycle", "default", 1.10),
    ("lifecycle", "stacks", 1.15),
    ("connect", "default", 1.4),
    ("checkout", "default", 1.5),
    ("raw", "default", 1.5),
)
# engine.connect().close(): within this many µs of bare, as well as the ratio above.
CONNECT_DELTA_LIMIT_US = 3.0

# The peer comparison: on these operations session_monitor's default Δ µs must be below every
# peer's.
PEER_TARGET_WORKLOADS = ("lifecycle", "request", "core", "connect", "raw")


@dataclass(frozen=True)
class MicroSettings:
    rounds: int
    warmup_rounds: int
    iterations: dict[str, int]
    warmup_ops: int


FULL = MicroSettings(
    rounds=12,
    warmup_rounds=1,
    iterations={
        "lifecycle": 250,
        "request": 120,
        "core": 250,
        "connect": 1000,
        "checkout": 1000,
        "raw": 1000,
    },
    warmup_ops=100,
)
QUICK = MicroSettings(
    rounds=1,
    warmup_rounds=0,
    iterations={
        "lifecycle": 10,
        "request": 5,
        "core": 10,
        "connect": 30,
        "checkout": 30,
        "raw": 30,
    },
    warmup_ops=5,
)


def _block(variant: Variant, db_path: str, settings: MicroSettings) -> dict[str, float]:
    engine = file_engine(db_path)
    operations: dict[str, Callable[[], None]] = {
        "lifecycle": session_lifecycle(sessionmaker(bind=engine)),
        "request": request_session(sessionmaker(bind=engine)),
        "core": core_execute(engine),
        "connect": core_connect(engine),
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
) -> tuple[list[Table], list[Target], list[str]]:
    """Return the tables (every variant; session_monitor against the peers), the targets they
    check, and one noise line per workload."""
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

    table, targets, noise = _variants_table(settings, others, skipped, bare_all, aa, paired)
    peer_table, peer_targets = _peer_table(others, skipped, bare_all, aa, paired)
    return [table, peer_table], targets + peer_targets, noise


def _variants_table(
    settings: MicroSettings,
    others: list[Variant],
    skipped: dict[str, tuple[str, str]],
    bare_all: dict[str, list[float]],
    aa: dict[str, Paired],
    paired: dict[tuple[str, str], Paired],
) -> tuple[Table, list[Target], list[str]]:
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
            low, high = aa[key].ratio_range
            noise.append(f"{label}: bare vs bare {low:.3f}-{high:.3f}")
        table.add(label, BARE.label, us(bare_median), "—", _aa_text(aa[key]), "")
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
                        WHY_BOOKKEEPING,
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


def _aa_text(aa: Paired) -> str:
    if not aa.ratios:
        return "1.000 (A/A needs ≥2 variants)"
    return ratio_text(aa.ratio, aa.ratio_range) + " A/A"


def _peer_table(
    others: list[Variant],
    skipped: dict[str, tuple[str, str]],
    bare_all: dict[str, list[float]],
    aa: dict[str, Paired],
    paired: dict[tuple[str, str], Paired],
) -> tuple[Table, list[Target]]:
    """session_monitor default's Δ µs beside each peer's, operation by operation."""
    measured_peers = [peer for peer in PEERS if peer in others]
    table = Table(
        "micro-peers",
        "micro vs peers: Δ µs over bare per operation, session_monitor default and each peer",
        (
            "operation",
            f"{DEFAULT.label} Δ µs",
            *(f"{peer.label} Δ µs" for peer in PEERS),
            "lower than every peer",
            f"{DEFAULT.label} ratio to bare (min-max)",
            "bare A/A noise (min-max)",
            "target",
        ),
    )
    targets: list[Target] = []
    for key, label in WORKLOADS:
        bare_median = statistics.median(bare_all[key])
        own = paired[(key, DEFAULT.key)]
        own_delta = own.median - bare_median
        peer_deltas = {
            peer.key: paired[(key, peer.key)].median - bare_median for peer in measured_peers
        }
        peer_cells = [
            delta(peer_deltas[peer.key]) if peer.key in peer_deltas else "skipped" for peer in PEERS
        ]
        if peer_deltas:
            lower = all(own_delta < other for other in peer_deltas.values())
            lower_text = "yes" if lower else "no"
        else:
            lower = False
            lower_text = "— (no peer ran)"
        checks: list[str] = []
        if key in PEER_TARGET_WORKLOADS:
            partial = (
                f" ({len(peer_deltas)} of {len(PEERS)} peers ran)"
                if len(peer_deltas) < len(PEERS)
                else ""
            )
            lower_check = f"lower than every peer{partial} {'PASS' if lower else 'MISS'}"
            checks.append(lower_check)
            targets.append(
                Target(
                    f"{label}: {DEFAULT.label} Δ µs lower than every peer's",
                    f"{delta(own_delta)} µs vs "
                    + (
                        ", ".join(
                            f"{delta(peer_deltas[peer.key])} µs ({peer.label})"
                            for peer in measured_peers
                        )
                        or "no peer"
                    ),
                    lower_check,
                    WHY_NO_STATEMENT if key in ("connect", "raw") else WHY_BOOKKEEPING,
                )
            )
        if key == "connect":
            within = own_delta <= CONNECT_DELTA_LIMIT_US
            delta_check = f"≤+{CONNECT_DELTA_LIMIT_US:g} µs {'PASS' if within else 'MISS'}"
            checks.append(delta_check)
            targets.append(
                Target(
                    f"{label}, {DEFAULT.label} Δ µs over bare",
                    delta(own_delta),
                    delta_check,
                    WHY_BOOKKEEPING,
                )
            )
        table.add(
            label,
            delta(own_delta),
            *peer_cells,
            lower_text,
            ratio_text(own.ratio, own.ratio_range),
            _aa_text(aa[key]).removesuffix(" A/A"),
            "; ".join(checks),
        )
    table.notes.append(
        "Δ µs: the variant's median minus the median of all bare blocks, from the table above. "
        "lower than every peer: session_monitor default's Δ µs strictly below each peer's "
        "(medians; a difference inside the A/A range is not one this run can tell apart). "
        f"Targets on {', '.join(label for key, label in WORKLOADS if key in PEER_TARGET_WORKLOADS)}"
        f"; engine.connect().close() also within +{CONNECT_DELTA_LIMIT_US:g} µs of bare."
    )
    for peer in PEERS:
        if peer.key in skipped:
            table.notes.append(f"{peer.label} skipped: {skipped[peer.key][1]}")
    return table, targets
