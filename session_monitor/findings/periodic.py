"""The monitor's background threads: one daemon thread per periodic scan, stopped on request.

A scan that fails is counted as an internal error under the thread's name, and the thread goes
on: a bug in a scan must not end the age watcher or the idle sampler for good.

``os.fork()`` copies only the thread that calls it: a forked child (gunicorn's preload, a
multiprocessing worker) would have the monitor without its threads. Each running scan starts
its thread again in the child (`forking.py`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..hooks.forking import Stage, in_child


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
        self._running = False
        in_child(Stage.THREADS, self.restart_in_child)

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(
            target=self._run, name=f"session_monitor-{self.name.replace('_', '-')}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        self._running = True

    def stop(self) -> None:
        self._running = False
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def restart_in_child(self) -> None:
        if not self._running:
            return
        try:
            # New objects: the parent's thread is gone here, and the event's lock may have
            # been held by it at the fork.
            self._stop = threading.Event()
            self._thread = self._new_thread()
            self._thread.start()
        except Exception:
            self._on_error(self.name)

    def _run(self) -> None:
        stop = self._stop  # this thread's own: a forked child's thread waits on a new one
        while not stop.wait(self.interval):
            try:
                self._scan()
            except Exception:
                self._on_error(self.name)

