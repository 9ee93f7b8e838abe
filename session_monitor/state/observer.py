"""The events the monitor reports, and the protocol of what receives them.

The OpenTelemetry spans and metrics, the multiprocess Prometheus exporter and any observer an
application passes (``SessionMonitor(observers=[...])``) receive the same events, each with a
frozen view (`SessionView`, `CheckoutView`) rather than the monitor's own records: an observer can
keep a view as long as it likes, and nothing it does can change what the monitor counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..hooks.stacks import Location
from .views import CheckoutView, HolderView, SessionView


class Observer(Protocol):
    def session_opened(self, session: SessionView) -> None: ...

    def session_closed(self, session: SessionView, duration: float) -> None: ...

    def session_leaked(self, session: SessionView, reason: str) -> None: ...

    def transaction_ended(self, session: SessionView, outcome: str, duration: float) -> None: ...

    def connection_created(self, pool_name: str, seconds: float) -> None: ...

    def connection_checked_out(self, checkout: CheckoutView, wait: float) -> None: ...

    def connection_checked_in(self, checkout: CheckoutView, use: float) -> None: ...

    def connection_invalidated(
        self, pool_name: str, soft: bool, checkout: CheckoutView | None, reason: str
    ) -> None:
        """`reason`: "error", "pre_ping" or "explicit" (see `pool.PoolTracker._invalidated`)."""

    def connection_closed(self, pool_name: str, reason: str) -> None:
        """`reason`: one of `metric_table.CLOSE_REASONS`."""

    def server_limits(self, pool_name: str, allowed: int) -> None:
        """What the database server lets the pool's role open to its database
        (`server_view.py`), read once per process."""

    def server_view_failed(self, pool_name: str, reason: str) -> None:
        """A read of the server's view failed (`metric_table.SERVER_VIEW_FAILURE_REASONS`)."""

    def server_view_read(self, pool_name: str, holders: tuple[HolderView, ...]) -> None:
        """A pool timeout's holders, each with what the server said of it (`HolderView.server`)."""

    def checkout_timed_out(
        self, pool_name: str, waited: float, session: SessionView | None, holders: tuple[str, ...]
    ) -> None:
        """`holders`: who held the pool then, one line per opening location (`holders.py`)."""

    def checkout_waited(self, pool_name: str) -> None:
        """A checkout found no idle connection and no room to open one: it waits."""

    def wait_cancelled(self, pool_name: str, waited: float) -> None: ...

    def session_pitfall(self, session: SessionView, kind: str, location: Location | None) -> None:
        """A tutorial pitfall (`pitfalls.py`); `location` is the application line that did it."""

    def session_idle_in_transaction(self, session: SessionView, away: float) -> None:
        """Its connection is in a transaction, and its holder was elsewhere for `away` s."""

    def pool_usage(self, pool_name: str, idle: int, used: int) -> None: ...

    def pool_pending(self, pool_name: str, delta: int) -> None: ...

    def pool_capacity(self, pool_name: str, maximum: int | None) -> None:
        """The pool's bound (pool_size + max_overflow over its live engines; None: unbounded)."""

    def internal_error(self, listener: str) -> None: ...

    def close(self) -> None:
        """Release what the observer holds (called by uninstrument)."""


# What Fanout delivers; internal_error goes to each observer directly, so that a failing
# observer's error cannot report itself forever.
EVENTS = tuple(
    name
    for name in Observer.__dict__
    if not name.startswith("_") and name not in ("close", "internal_error")
)


class Fanout:
    """Deliver each event to every observer; one observer's failure reaches no other, nor the
    monitor's own bookkeeping, which always runs before the event is emitted.

    Built only when there are observers: without any, the monitor makes no call at all.
    """

    def __init__(self, observers: tuple[Observer, ...], failed: Callable[[str], None]) -> None:
        self.observers = observers
        self._failed = failed
        for name in EVENTS:
            setattr(self, name, self._deliver(name))

    def _deliver(self, event: str) -> Callable[..., None]:
        # An observer written before an event existed simply does not get it.
        receivers = tuple(
            receive
            for observer in self.observers
            if (receive := getattr(observer, event, None)) is not None
        )
        failed = self._failed

        def deliver(*args: Any) -> None:
            for receive in receivers:
                try:
                    receive(*args)
                except Exception:
                    failed(event)

        deliver.__name__ = event
        return deliver

    def close(self) -> None:
        for observer in self.observers:
            try:
                close = getattr(observer, "close", None)
                if close is not None:
                    close()
            except Exception:
                self._failed("close")

    # For the type checker: the events, as set in __init__.
    session_opened: Callable[[SessionView], None]
    session_closed: Callable[[SessionView, float], None]
    session_leaked: Callable[[SessionView, str], None]
    transaction_ended: Callable[[SessionView, str, float], None]
    connection_created: Callable[[str, float], None]
    connection_checked_out: Callable[[CheckoutView, float], None]
    connection_checked_in: Callable[[CheckoutView, float], None]
    connection_invalidated: Callable[[str, bool, CheckoutView | None, str], None]
    connection_closed: Callable[[str, str], None]
    server_limits: Callable[[str, int], None]
    server_view_failed: Callable[[str, str], None]
    server_view_read: Callable[[str, tuple[HolderView, ...]], None]
    checkout_timed_out: Callable[[str, float, SessionView | None, tuple[str, ...]], None]
    checkout_waited: Callable[[str], None]
    wait_cancelled: Callable[[str, float], None]
    session_idle_in_transaction: Callable[[SessionView, float], None]
    session_pitfall: Callable[[SessionView, str, Location | None], None]
    pool_usage: Callable[[str, int, int], None]
    pool_pending: Callable[[str, int], None]
    pool_capacity: Callable[[str, int | None], None]
