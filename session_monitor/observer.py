"""The events the monitor reports, and the protocol of what receives them.

The Prometheus metrics and the OpenTelemetry spans and metrics are both observers of the same
events, so the two can never disagree about what happened.
"""

from __future__ import annotations

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
