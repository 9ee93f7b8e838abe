"""The monitor's background threads: one daemon thread per periodic scan, stopped on request.

A scan that fails is counted as an internal error under the thread's name, and the thread goes
on: a bug in a scan must not end the age watcher or the idle sampler for good.

``os.fork()`` copies only the thread that calls it: a forked child (gunicorn's preload, a
multiprocessing worker) would have the monitor without its threads. Each running scan starts
its thread again in the child (`os.register_at_fork`).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable


class PeriodicScan:
    def __init__(
        self, name: str, interval: float, scan: Callable[[], None], on_error: Callable[[str], None]
    ) -> None:
        self.name = name
        self.interval = interval
        self._scan = scan
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread = self._new_thread()

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(
            target=self._run, name=f"session_monitor-{self.name.replace('_', '-')}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        _running.add(self)

    def stop(self) -> None:
        _running.discard(self)
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def restart_in_child(self) -> None:
        # New objects: the parent's thread is gone here, and the event's lock may have been
        # held by it at the fork.
        self._stop = threading.Event()
        self._thread = self._new_thread()
        self._thread.start()

    def _run(self) -> None:
        stop = self._stop  # this thread's own: a forked child's thread waits on a new one
        while not stop.wait(self.interval):
            try:
                self._scan()
            except Exception:
                self._on_error(self.name)


# The scans started and not stopped; a scan whose monitor is gone leaves by itself.
_running: weakref.WeakSet[PeriodicScan] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for scan in list(_running):
        try:
            scan.restart_in_child()
        except Exception:
            scan._on_error(scan.name)


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
