"""The monitor's background threads: one daemon thread per periodic scan, stopped on request.

A scan that fails is counted as an internal error under the thread's name, and the thread goes
on: a bug in a scan must not end the age watcher or the idle sampler for good.
"""

from __future__ import annotations

import threading
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
        self._thread = threading.Thread(
            target=self._run, name=f"session_monitor-{name.replace('_', '-')}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._scan()
            except Exception:
                self._on_error(self.name)
