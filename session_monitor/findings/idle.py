"""Idle in transaction: a connection inside a transaction whose holder is busy elsewhere.

A transaction left open while the code that holds it calls another service, renders a report or
sleeps keeps its connection (and its locks) from everyone else: PostgreSQL calls it "idle in
transaction". Nothing on the hot path can see it, so a daemon thread samples the holders of
connections whose transaction has been open longer than one sampling interval (`holders.where_now`)
and notes since when each was seen anywhere but SQLAlchemy or its driver. Past the threshold it is
reported once per transaction. A leaked session is not idle in transaction: its holder is gone
(its request ended) or it was already reported as a leak, and the leak's report is the one fact.
With no transaction older than the interval a sample costs one pass over the checked-out
connections.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from ..hooks.stacks import Location, format_location
from ..state.records import TrackedCheckout
from .holders import where_now
from .leaks import describe
from .periodic import PeriodicScan

logger = logging.getLogger("session_monitor")


class IdleInTransactionSampler(PeriodicScan):
    def __init__(
        self,
        threshold: float,
        checkouts: Callable[[], Iterable[TrackedCheckout]],
        report: Callable[[TrackedCheckout, float], None],
        on_error: Callable[[str], None],
        log: bool,
    ) -> None:
        self.threshold = threshold
        self._checkouts = checkouts
        self._report = report  # the session tracker counts it and tells the observers
        self._log = log
        # Samples often enough to report within a fifth of the threshold past it.
        super().__init__("idle_sampler", min(max(threshold / 5, 0.02), 1.0), self.sample, on_error)

    def sample(self) -> None:
        now = time.perf_counter()
        for checkout in self._checkouts():
            started = checkout.transaction_started_at
            owner = checkout.owner
            if (
                started is None
                or checkout.returned
                or owner is None
                # A leak, already said as one: the same connection is one report, not two.
                or owner.leak_reason is not None
                or checkout.idle_reported == started
                or now - started < self.interval
            ):
                continue
            _, activity, _ = where_now(checkout)
            if activity == "leaked":
                # Its request is over: nobody is coming back to end the transaction, so it is
                # no idle transaction but a leak, which the request's end reports.
                continue
            if activity in ("database", "unknown"):
                checkout.away_since = None
                continue
            away_since = checkout.away_since
            if away_since is None or away_since < started:
                # First seen elsewhere in this transaction: since now, as far as we know.
                checkout.away_since = now
            elif now - away_since >= self.threshold:
                checkout.idle_reported = started
                away = now - away_since
                if self._log:
                    logger.warning(idle_message(checkout, away))
                self._report(checkout, away)


def idle_message(checkout: TrackedCheckout, away: float) -> str:
    """The WARNING: what holds the connection, where it opened, and where its holder is now."""
    holder, activity, now_at = where_now(checkout)
    started = checkout.transaction_started_at
    open_for = 0.0 if started is None else time.perf_counter() - started
    assert checkout.owner is not None
    now: Location | None = now_at[0] if now_at else None
    return (
        f"Connection idle in transaction: {describe(checkout.owner)}; its transaction has been "
        f"open {open_for:.1f}s and its holder ({holder}) has been elsewhere for at least "
        f"{away:.1f}s, now at {format_location(now)} ({activity}). Commit or roll back before "
        "slow work, or do the slow work before opening the transaction."
    )
