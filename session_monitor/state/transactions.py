"""Transactions, ORM and Core alike: one per connection, from begin to commit, rollback or close
(the outcome), as the Connection and Transaction hooks (`_hooks.py`) report them.
`SessionTracker` inherits these: a transaction is counted for the session holding its connection.

`close` is the normal read path: a transaction ended without commit() or rollback(), by close(),
a `with` or `async with` block's end, or the pool taking its connection back. A transaction in
which a statement failed (an IntegrityError, a deadlock...) and that was not committed ends as
`rollback` however it ends: the database threw its work away, which is what an operator counts
rollbacks for."""

from __future__ import annotations

import threading
from bisect import bisect_left
from time import perf_counter
from typing import TYPE_CHECKING

from .stats import HOLD_BUCKETS, Histogram

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from ..hooks.guard import Guard
    from .observer import Fanout
    from .records import TrackedCheckout


class TransactionTracking:
    lock: threading.RLock
    _emit: Fanout | None
    _guard: Guard
    _by_proxy: dict[int, TrackedCheckout]
    _by_connection: dict[int, TrackedCheckout]

    def transaction_began(self, connection: Connection) -> None:
        try:
            proxy = connection._dbapi_connection
            checkout = None if proxy is None else self._by_proxy.get(id(proxy))
            if checkout is not None:
                self.begin_transaction(checkout)
                checkout.connection_key = key = id(connection)
                self._by_connection[key] = checkout
        except Exception:
            self._guard.failed("transaction_begin")

    def transaction_committed(self, connection: Connection) -> None:
        try:
            checkout = self._by_connection.get(id(connection))
            if checkout is not None and not checkout.returned:
                if checkout.owner is not None:
                    checkout.owner.flushed_uncommitted = False
                self.end_transaction(checkout, "commit")
        except Exception:
            self._guard.failed("transaction_commit")

    def transaction_rolling_back(self, connection: Connection) -> None:
        try:
            checkout = self._by_connection.get(id(connection))
            if checkout is not None and not checkout.returned:
                outcome = "close" if checkout.transaction_closing else "rollback"
                if checkout.owner is not None and outcome == "rollback":
                    checkout.owner.flushed_uncommitted = False  # asked for: discarded on purpose
                self.end_transaction(checkout, outcome)
        except Exception:
            self._guard.failed("transaction_rollback")

    def statement_failed(self, connection: Connection) -> None:
        try:
            checkout = self._by_connection.get(id(connection))
            if checkout is not None and checkout.transaction_started_at is not None:
                checkout.statement_failed = True
        except Exception:
            self._guard.failed("statement_failed")

    def transaction_closing(self, connection: Connection, closing: bool) -> None:
        """Around Transaction.close(): a rollback it makes ends the transaction as `close`."""
        try:
            checkout = self._by_connection.get(id(connection))
            if checkout is not None and not checkout.returned:
                open_transaction = checkout.transaction_started_at is not None
                checkout.transaction_closing = closing and open_transaction
        except Exception:
            self._guard.failed("transaction_close")

    def begin_transaction(self, checkout: TrackedCheckout) -> None:
        if checkout.transaction_started_at is not None:
            self.end_transaction(checkout, "close")
        checkout.transaction_started_at = perf_counter()
        checkout.transaction_closing = False
        checkout.statement_failed = False
        owner = checkout.owner
        if owner is not None:
            owner.transaction_count += 1

    def end_transaction(self, checkout: TrackedCheckout, outcome: str) -> None:
        started = checkout.transaction_started_at
        if started is None:
            return
        duration = perf_counter() - started
        if outcome == "close" and checkout.statement_failed:
            outcome = "rollback"
        checkout.transaction_started_at = None
        checkout.transaction_closing = False
        checkout.statement_failed = False
        owner = checkout.owner
        if owner is None:
            return
        by_outcome = owner.stats.transactions
        histogram = by_outcome.get(outcome)
        if histogram is None:
            new = Histogram(HOLD_BUCKETS)
            with self.lock:
                histogram = by_outcome.setdefault(outcome, new)
        bucket = bisect_left(histogram.bounds, duration)
        with self.lock:
            histogram.counts[bucket] += 1
            histogram.sum += duration
        if self._emit is not None:
            self._emit.transaction_ended(owner.view, outcome, duration)
