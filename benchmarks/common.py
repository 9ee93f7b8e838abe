"""What every section shares: engines, the timed loop, paired statistics and the tables."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, TextClause, create_engine, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

SELECT_1: TextClause = text("SELECT 1")

# Timed loops run this many frames below the benchmark's entry point, so a stack walk meets a
# realistic number of application frames (capture_stacks then records its full default depth).
CALL_DEPTH = 20
# Each timed block is split into this many batches, and the fastest counts.
BATCHES = 5


def file_engine(path: str, *, pool_size: int = 5, max_overflow: int = 10) -> Engine:
    """A SQLite file database behind a QueuePool, usable from any thread."""
    return create_engine(
        f"sqlite:///{path}",
        poolclass=QueuePool,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=60,
        connect_args={"check_same_thread": False},
    )


# -- the operations measured ----------------------------------------------------------------


def session_lifecycle(factory: sessionmaker[Session]) -> Callable[[], None]:
    def lifecycle() -> None:
        session = factory()
        session.execute(SELECT_1)
        session.commit()
        session.close()

    return lifecycle


# Statements in the request-sized session: a typical endpoint reads a few rows and writes one.
REQUEST_STATEMENTS = 5


def request_session(factory: sessionmaker[Session]) -> Callable[[], None]:
    def request() -> None:
        session = factory()
        for _ in range(REQUEST_STATEMENTS):
            session.execute(SELECT_1)
        session.commit()
        session.close()

    return request


def core_execute(engine: Engine) -> Callable[[], None]:
    def connect_execute() -> None:
        with engine.connect() as connection:
            connection.execute(SELECT_1)

    return connect_execute


def core_connect(engine: Engine) -> Callable[[], None]:
    def connect_close() -> None:
        engine.connect().close()

    return connect_close


def pool_checkout(engine: Engine) -> Callable[[], None]:
    pool = engine.pool

    def checkout() -> None:
        pool.connect().close()

    return checkout


def raw_checkout(engine: Engine) -> Callable[[], None]:
    def checkout() -> None:
        engine.raw_connection().close()

    return checkout


# -- timing ---------------------------------------------------------------------------------


def at_depth(depth: int, call: Callable[[], float]) -> float:
    """Call `call` `depth` frames further down the stack."""
    if depth <= 0:
        return call()
    return at_depth(depth - 1, call)


def time_per_op(
    operation: Callable[[], None], iterations: int, warmup: int, batches: int = BATCHES
) -> float:
    """Run `operation` `warmup` times untimed, then `iterations` times in `batches` timed
    batches with the garbage collector off; return the fastest batch's microseconds per call.

    The fastest batch is the one least disturbed by other processes, as with `timeit`; the
    rounds of a section then give the spread.
    """
    for _ in range(warmup):
        operation()
    per_batch = max(1, iterations // batches)

    def timed() -> float:
        best = float("inf")
        gc.collect()
        for _ in range(batches):
            gc.disable()
            try:
                started = time.perf_counter_ns()
                for _ in range(per_batch):
                    operation()
                elapsed = time.perf_counter_ns() - started
            finally:
                gc.enable()
            best = min(best, elapsed / per_batch / 1000.0)
        return best

    return at_depth(CALL_DEPTH, timed)


# -- paired statistics ----------------------------------------------------------------------


@dataclass
class Paired:
    """Measurements of one variant, each with the bare measurement taken around it."""

    values: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    def add(self, value: float, bare: float) -> None:
        self.values.append(value)
        self.ratios.append(value / bare)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def ratio_range(self) -> tuple[float, float]:
        return min(self.ratios), max(self.ratios)


def neighbour_mean(values: Sequence[float], index: int) -> float:
    """The mean of the values just before and after `index` (bare blocks around a variant)."""
    around = [values[i] for i in (index - 1, index + 1) if 0 <= i < len(values)]
    return statistics.fmean(around)


def verdict(ratio: float, limit: float, *, at_least: bool = False) -> str:
    ok = ratio >= limit if at_least else ratio <= limit
    sign = "≥" if at_least else "≤"
    return f"{sign}{limit:g}x {'PASS' if ok else 'MISS'}"


def us(value: float) -> str:
    return f"{value:.1f}"


def delta(value: float) -> str:
    return f"{value:+.1f}"


def ratio_text(ratio: float, span: tuple[float, float]) -> str:
    return f"{ratio:.3f} ({span[0]:.3f}-{span[1]:.3f})"


# -- output ---------------------------------------------------------------------------------


@dataclass
class Table:
    """A Markdown table with a title and notes, printed and written to RESULTS.md alike."""

    key: str
    title: str
    headers: Sequence[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append([str(cell) for cell in cells])

    def render(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "|".join("---" for _ in self.headers) + "|")
        for row in self.rows:
            padded = row + [""] * (len(self.headers) - len(row))
            lines.append("| " + " | ".join(padded) + " |")
        if self.notes:
            lines.append("")
            lines.extend(f"- {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass
class Target:
    name: str
    measured: str
    verdict: str
    why: str = ""  # shown where the target is missed: what stands between it and the bar


# Why the structural misses are missed: said beside each MISS in RESULTS.md.
WHY_NO_STATEMENT = (
    "fastapi-sqlalchemy-monitor listens to statements only: where no statement runs it adds "
    "nothing, and a monitor that times and counts every checkout cannot cost less than nothing"
)
WHY_BOOKKEEPING = (
    "the bookkeeping each session and checkout needs (two records, the opening line's frame "
    "walk, five short lock sections, seven interception points); docs/costs.md breaks it down "
    "by interception point"
)
