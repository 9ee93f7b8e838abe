"""The one guard: a failure of the monitor's own code is counted and logged, never the app's."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

logger = logging.getLogger("session_monitor")

# What `Guard.count_once` has said in this process: one warning, however many monitors.
_said: set[str] = set()


class Guard:
    """The one guard: swallow and count a failure of ours; log each listener's first one once.

    Every hook, listener, observer call and the OpenTelemetry statement listeners go through it,
    so each failure reaches ``session_monitor_internal_errors_total``.
    """

    def __init__(self, count: Callable[[str], None]) -> None:
        self._count = count
        self._logged: set[str] = set()

    def count_once(self, listener: str, message: str) -> None:
        """Count a lasting condition once for this monitor, and say once per process what it
        means (a monitor built again by each test, or re-instrumented, repeats nothing)."""
        if listener in self._logged:
            return
        self._logged.add(listener)
        with contextlib.suppress(Exception):
            self._count(listener)
        if message not in _said:
            _said.add(message)
            logger.warning(message)

    def failed(self, listener: str) -> None:
        # If even the error metric fails there is nothing more to do safely.
        with contextlib.suppress(Exception):
            self._count(listener)
        if listener not in self._logged:
            self._logged.add(listener)
            logger.exception(
                "session_monitor listener %r failed; the application was not affected. "
                "Further failures of this listener are only counted in "
                "session_monitor_internal_errors_total.",
                listener,
            )
