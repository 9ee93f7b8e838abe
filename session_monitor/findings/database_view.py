"""The database's view, put together for each PostgreSQL pool: when the server is read, what it
is asked, and what becomes of the answer (holders joined, connections lost, sizing advice).

Reads happen only on demand (`server_view.py`): a pool timeout's report (the reporter already
logs at most one per pool per interval), the diagnostics page and ``holders(server_view=True)``
(both share one reading per pool per ``server_view_interval``), and once per process and pool
after its first connection, for the server's limits: its verdict is logged (a WARNING when the
workers can open more connections than the server allows) and its limit is a gauge, so the alert
can compare it with the sum of every worker's pool.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from ..hooks.forking import Stage, in_child, new_lock
from ..state.backends import application_name, process_prefix
from ..state.views import HolderView
from .holders import holder_views
from .server_holders import join, lost_connections, pids_of, summarize
from .server_view import ServerReading, read_server
from .sizing import PoolFacts, advice, summary

if TYPE_CHECKING:
    from ..hooks.guard import Guard
    from ..state.observer import Fanout
    from ..state.pool import PoolTracker
    from ..state.pool_state import PoolState

logger = logging.getLogger("session_monitor")
_WORKER_FILE = re.compile(r"_(\d+)\.db$")


def live_workers(directory: str | None) -> int:
    """Processes with live files in prometheus_client's multiprocess directory; 0 without it."""
    if not directory:
        return 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    pids = {int(m.group(1)) for name in names if (m := _WORKER_FILE.search(name))}
    alive = 0
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        alive += 1
    return alive


class DatabaseView:
    def __init__(
        self,
        pools: PoolTracker,
        emit: Fanout | None,
        guard: Guard,
        *,
        enabled: bool,
        interval: float,
        service: str | None,
        deadline: float = 3.0,
    ) -> None:
        self._pools = pools
        self._emit = emit
        self._guard = guard
        self.enabled = enabled
        self.interval = interval
        self.service = service  # application_name tagging's service name; None: off
        self.deadline = deadline
        self._cache: dict[str, ServerReading] = {}
        self._checked: set[str] = set()
        self._lock = new_lock()
        in_child(Stage.FORGET, self.forked)

    def forked(self) -> None:
        self._cache = {}
        self._checked = set()  # the child checks its own pools' fit

    # -- what can be read -----------------------------------------------------------------------

    def unavailable(self, state: PoolState) -> str | None:
        """Why the server's view cannot be read for a pool; None when it can."""
        if not self.enabled:
            return "switched off (server_view=False)"
        if state.db_system != "postgresql":
            return f"available for PostgreSQL only; this pool's database is {state.db_system}"
        if _engine_of(state) is None:
            return "no live engine uses this pool"
        return None

    def tagged_as(self) -> str | None:
        return None if self.service is None else application_name(self.service)

    def read(self, state: PoolState, pids: set[int], *, with_limits: bool = False) -> ServerReading:
        """A fresh reading for one pool; failures are counted and said in `reading.error`."""
        reason = self.unavailable(state)
        engine = _engine_of(state)
        if reason is not None or engine is None:
            return ServerReading(time.time(), {}, None, reason, frozenset(pids))
        reading, failure = read_server(
            engine,
            pids,
            tagged_as=self.tagged_as(),
            service_prefix=None if self.service is None else f"{self.service}:",
            with_limits=with_limits,
            deadline=self.deadline,
        )
        if failure is not None:
            failures = state.stats.server_failures
            with state.lock:
                failures[failure] = failures.get(failure, 0) + 1
            if self._emit is not None:
                self._emit.server_view_failed(state.name, failure)
        if reading.limits is not None:
            state.server_allowed = reading.limits.allowed
            if self._emit is not None:
                self._emit.server_limits(state.name, reading.limits.allowed)
        return reading

    def recent(self, state: PoolState, pids: set[int]) -> ServerReading:
        """A reading at most `interval` old that was asked about every PID in `pids` and every
        backend the pools know now."""
        wanted = self._known(state) | pids
        with self._lock:
            kept = self._cache.get(state.name)
        if kept is not None and time.time() - kept.at < self.interval and wanted <= kept.asked:
            return kept
        reading = self.read(state, wanted, with_limits=True)
        with self._lock:
            self._cache[state.name] = reading
        return reading

    def _known(self, state: PoolState) -> set[int]:
        with state.lock:
            return set(state.backends.values())

    # -- the holders ----------------------------------------------------------------------------

    def joined(self, holders: list[HolderView]) -> list[HolderView]:
        """Holders with what the server says of them, read per pool (`recent`)."""
        by_pool: dict[str, list[HolderView]] = {}
        for holder in holders:
            by_pool.setdefault(holder.pool_name, []).append(holder)
        states = {state.name: state for state in self._pools.states()}
        out: list[HolderView] = []
        for name, members in by_pool.items():
            state = states.get(name)
            if state is None or self.unavailable(state) is not None:
                out.extend(members)
                continue
            out.extend(join(members, self.recent(state, pids_of(members))))
        out.sort(key=lambda view: -view.held_for)
        return out

    def timeout_lines(self, state: PoolState) -> Any:
        """For the pool-timeout report: a function of the holders that reads the server now and
        says what it sees; None where there is nothing to read."""
        if self.unavailable(state) is not None:
            return None

        def lines(holders: list[HolderView]) -> list[str]:
            try:
                reading = self.read(state, pids_of(holders))
                with self._lock:
                    self._cache[state.name] = reading
                joined = join(holders, reading)
                if self._emit is not None and reading.error is None:
                    self._emit.server_view_read(state.name, tuple(joined))
                return summarize(joined, reading, self._prefix())
            except Exception:
                self._guard.failed("server_view")
                return ["unavailable: session_monitor failed to read it (see the log)"]

        return lines

    def _prefix(self) -> str | None:
        return None if self.service is None else process_prefix(self.service)

    # -- per pool, for the page -----------------------------------------------------------------

    def pool_report(
        self, state: PoolState, holders: list[HolderView] | None = None
    ) -> dict[str, Any]:
        """What the page shows of one pool's server side: the holders' summary, lost
        connections and the sizing verdicts. `holders`: every worker's holders of the pool
        (the page's), read in one go; by default this process's."""
        reason = self.unavailable(state)
        report: dict[str, Any] = {
            "pool_name": state.name,
            "available": reason is None,
            "tagged": self.service is not None,
            "error": reason,
            "holders": [],
            "lost": [],
        }
        if reason is None:
            if holders is None:
                holders = holder_views(self._pools.checkouts(), self._pools.backend_pids())
            holders = [h for h in holders if h.pool_name == state.name]
            reading = self.recent(state, pids_of(holders))
            with state.lock:
                known = set(state.backends.values())
                out_keys = {key for w in state.pools.values() for key in w.checked_out}
                checked_out = {pid for key, pid in state.backends.items() if key in out_keys}
            report.update(
                error=reading.error,
                read_at=reading.at,
                holders=summarize(join(holders, reading), reading, self._prefix()),
                lost=lost_connections(reading, known, checked_out, self.tagged_as()),
            )
        facts = self.facts(state)  # after the reading: with the server's limits it brought
        report.update(sizing=summary(facts), advice=advice(facts))
        return report

    def facts(self, state: PoolState) -> PoolFacts:
        sizes, overflows = [], []
        for watched in state.live_pools():
            pool = watched.pool_ref()
            if isinstance(pool, QueuePool):
                sizes.append(pool.size())
                overflows.append(pool._max_overflow)
        size = sum(sizes) if sizes else None
        overflow = None if not overflows or min(overflows) < 0 else sum(overflows)
        with self._lock:
            kept = self._cache.get(state.name)
        limits = None if kept is None else kept.limits
        workers = live_workers(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        seen_by = "live workers in the multiprocess directory"
        tagged = 0 if limits is None or limits.tagged_processes is None else limits.tagged_processes
        if tagged > workers:
            workers, seen_by = tagged, "processes of this service connected to the server"
        if workers == 0:
            workers, seen_by = 1, "this process: no multiprocess directory, no tagging"
        with state.lock:
            stats = state.stats.copy()
            peak = max(state.peak_ever, stats.peak_used, state.used)
            held = [c for watched in state.pools.values() for c in watched.checked_out.values()]
        # Connections out now count towards the demand for as long as they have been out.
        now = time.perf_counter()
        holding = sum(now - checkout.checked_out_at for checkout in held)
        leaked = sum(1 for checkout in held if checkout.outlived_its_request)
        return PoolFacts(
            pool_name=state.name,
            pool_size=size,
            max_overflow=overflow,
            workers=workers,
            workers_seen_by=seen_by,
            limits=limits,
            peak=peak,
            checkouts=stats.wait.count,
            elapsed=time.monotonic() - state.since,
            hold_seconds=stats.use.sum + holding,
            wait=stats.wait,
            timeouts=stats.timeouts,
            overflow_closed=stats.closed.get("overflow", 0),
            leaked_holding=leaked,
        )

    # -- at startup -----------------------------------------------------------------------------

    def first_connected(self, state: PoolState) -> None:
        """After a pool's first connection: check once, on a thread, whether the workers'
        pools fit in what the server allows."""
        with self._lock:
            if state.name in self._checked or self.unavailable(state) is not None:
                return
            self._checked.add(state.name)
        threading.Thread(
            target=self._check_fit, args=(state,), name="session_monitor-fit", daemon=True
        ).start()

    def _check_fit(self, state: PoolState) -> None:
        try:
            reading = self.read(state, self._known(state), with_limits=True)
            with self._lock:
                self._cache[state.name] = reading
            if reading.error is not None:
                logger.info(
                    "session_monitor: pool %r: the server's limits are unknown: %s",
                    state.name,
                    reading.error,
                )
                return
            facts = self.facts(state)
            over = [verdict for verdict in advice(facts) if verdict.startswith("over")]
            if over:
                logger.warning("session_monitor: pool %r is %s", state.name, over[0])
            else:
                logger.info("session_monitor: pool %r fits: %s", state.name, summary(facts))
        except Exception:
            self._guard.failed("server_view")


def _engine_of(state: PoolState) -> Engine | None:
    for entry in list(state.engines.values()):
        engine = entry.engine_ref()
        if engine is not None:
            return engine
    return None
