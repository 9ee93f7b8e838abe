"""The events the monitor reports, and the protocol of what receives them.

The Prometheus metrics and the OpenTelemetry spans and metrics are both observers of the same
events, so the two can never disagree about what happened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .records import TrackedCheckout, TrackedSession


class Observer(Protocol):
    def session_opened(self, session: TrackedSession) -> None: ...

    def session_closed(self, session: TrackedSession, duration: float) -> None: ...

    def session_leaked(self, session: TrackedSession, reason: str) -> None: ...

    def transaction_ended(self, session: TrackedSession, outcome: str, duration: float) -> None: ...

    def connection_created(self, pool_name: str, seconds: float) -> None: ...

    def connection_checked_out(self, checkout: TrackedCheckout, wait: float) -> None: ...

    def connection_checked_in(self, checkout: TrackedCheckout, use: float) -> None: ...

    def connection_invalidated(
        self, pool_name: str, soft: bool, checkout: TrackedCheckout | None
    ) -> None: ...

    def checkout_timed_out(
        self, pool_name: str, waited: float, session: TrackedSession | None
    ) -> None: ...

    def pool_usage(self, pool_name: str, idle: int, used: int) -> None: ...

    def pool_pending(self, pool_name: str, delta: int) -> None: ...

    def pool_capacity(self, pool_name: str, maximum: int) -> None: ...

    def internal_error(self, listener: str) -> None: ...

    def close(self) -> None:
        """Release what the observer holds (called by uninstrument)."""


class Fanout:
    """Deliver each event to every observer; one observer's failure reaches no other, nor the
    monitor's own bookkeeping, which always runs before the event is emitted."""

    def __init__(self, observers: tuple[Observer, ...], failed: Callable[[str], None]) -> None:
        self.observers = observers
        self._failed = failed

    def session_opened(self, session: TrackedSession) -> None:
        for observer in self.observers:
            try:
                observer.session_opened(session)
            except Exception:
                self._failed("session_opened")

    def session_closed(self, session: TrackedSession, duration: float) -> None:
        for observer in self.observers:
            try:
                observer.session_closed(session, duration)
            except Exception:
                self._failed("session_closed")

    def session_leaked(self, session: TrackedSession, reason: str) -> None:
        for observer in self.observers:
            try:
                observer.session_leaked(session, reason)
            except Exception:
                self._failed("session_leaked")

    def transaction_ended(self, session: TrackedSession, outcome: str, duration: float) -> None:
        for observer in self.observers:
            try:
                observer.transaction_ended(session, outcome, duration)
            except Exception:
                self._failed("transaction_ended")

    def connection_created(self, pool_name: str, seconds: float) -> None:
        for observer in self.observers:
            try:
                observer.connection_created(pool_name, seconds)
            except Exception:
                self._failed("connection_created")

    def connection_checked_out(self, checkout: TrackedCheckout, wait: float) -> None:
        for observer in self.observers:
            try:
                observer.connection_checked_out(checkout, wait)
            except Exception:
                self._failed("connection_checked_out")

    def connection_checked_in(self, checkout: TrackedCheckout, use: float) -> None:
        for observer in self.observers:
            try:
                observer.connection_checked_in(checkout, use)
            except Exception:
                self._failed("connection_checked_in")

    def connection_invalidated(
        self, pool_name: str, soft: bool, checkout: TrackedCheckout | None
    ) -> None:
        for observer in self.observers:
            try:
                observer.connection_invalidated(pool_name, soft, checkout)
            except Exception:
                self._failed("connection_invalidated")

    def checkout_timed_out(
        self, pool_name: str, waited: float, session: TrackedSession | None
    ) -> None:
        for observer in self.observers:
            try:
                observer.checkout_timed_out(pool_name, waited, session)
            except Exception:
                self._failed("checkout_timed_out")

    def pool_usage(self, pool_name: str, idle: int, used: int) -> None:
        for observer in self.observers:
            try:
                observer.pool_usage(pool_name, idle, used)
            except Exception:
                self._failed("pool_usage")

    def pool_pending(self, pool_name: str, delta: int) -> None:
        for observer in self.observers:
            try:
                observer.pool_pending(pool_name, delta)
            except Exception:
                self._failed("pool_pending")

    def pool_capacity(self, pool_name: str, maximum: int) -> None:
        for observer in self.observers:
            try:
                observer.pool_capacity(pool_name, maximum)
            except Exception:
                self._failed("pool_capacity")

    def close(self) -> None:
        for observer in self.observers:
            try:
                observer.close()
            except Exception:
                self._failed("close")
