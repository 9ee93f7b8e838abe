"""Listener bookkeeping: remove exactly what was added, and never let a failure reach the app."""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import event

logger = logging.getLogger("session_monitor")


class ListenerSet:
    """Every `event.listen` made through it, so `remove_all` undoes precisely those."""

    def __init__(self) -> None:
        self._entries: list[tuple[weakref.ref[Any], str, Callable[..., Any]]] = []
        self._lock = threading.Lock()

    def listen(self, target: Any, identifier: str, fn: Callable[..., Any], **kw: Any) -> None:
        event.listen(target, identifier, fn, **kw)
        with self._lock:
            self._entries.append((weakref.ref(target), identifier, fn))

    def remove_all(self) -> None:
        with self._lock:
            entries, self._entries = self._entries, []
        for target_ref, identifier, fn in entries:
            target = target_ref()
            if target is not None and event.contains(target, identifier, fn):
                event.remove(target, identifier, fn)


class Guard:
    """Swallow and count a listener's failure; log each listener's first failure once."""

    def __init__(self, count: Callable[[str], None]) -> None:
        self._count = count
        self._logged: set[str] = set()

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
