"""The leak check of `pytest_plugin`, imported only when ``--session-monitor`` is given.

A session belongs to whatever was running when it opened: the test (its setup, its call, its
teardown, its function-scoped fixtures) or a wider-scoped fixture, which may keep it for as
long as it lives (see `Ledger` and `LeakGuard`). Background work a wider-scoped fixture started
(a shared TestClient's lifespan thread or task, a thread of its own) stays that fixture's while
tests run (see `Ledger.owner_now`).
"""

from __future__ import annotations

import gc
import os
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Generator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, scoped_session

from .hooks.forking import new_lock
from .hooks.guard import Guard
from .hooks.stacks import Location
from .monitor import SessionMonitor
from .state.views import CheckoutView, SessionView

# `python -m pytest` starts in the pytest package, which stacks.py does not count as a library.
_PYTEST_DIR = os.path.dirname(pytest.__file__) + os.sep


class Owner:
    """Who the sessions opened while it is current belong to. Mutable because a teardown's
    sessions are known to be a wider-scoped fixture's only once that fixture's teardown ends."""

    __slots__ = ("during", "test")

    def __init__(self, test: str | None, during: str) -> None:
        self.test = test  # the test's node id; None for a wider-scoped fixture
        self.during = during


class Leak(NamedTuple):
    session: SessionView
    owner: Owner
    dropped: bool  # garbage collected unclosed, rather than still open


# Who sent the work a context carries; asyncio, anyio, Starlette's threadpool and a TestClient's
# portal copy it into the tasks and worker threads they run that work in. `SENT_FROM_PYTEST`:
# pytest's thread while a test runs, whoever runs there when a session opens; an Owner: the setup
# of that wider-scoped fixture. A thread started with threading.Thread starts without any.
sent_by: ContextVar[Owner | None] = ContextVar("session_monitor_sent_by", default=None)
SENT_FROM_PYTEST = Owner(None, "pytest's thread")


class Ledger:
    """The monitor's observer: the sessions open now with their owners, and the dropped ones.

    Its events may come from any thread (a TestClient's app runs in one), so the bookkeeping
    is locked. `owner` is what runs on pytest's own thread; who a session opened elsewhere
    belongs to is `owner_now`."""

    def __init__(self) -> None:
        self.owner: Owner | None = None
        self._pytest_thread = threading.get_ident()
        # What ran on pytest's thread when each thread was started, inherited by the threads
        # those start (see `thread_starting`): weakly, a thread is not kept alive for us.
        self._threads: weakref.WeakKeyDictionary[threading.Thread, Owner] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = new_lock()  # free in a forked child (forking.py)
        self._open: dict[int, tuple[SessionView, Owner]] = {}
        self._dropped: list[tuple[SessionView, Owner]] = []

    def thread_starting(self, thread: threading.Thread) -> None:
        """Called in the thread that starts `thread`, before it runs."""
        if threading.get_ident() == self._pytest_thread:
            under = self.owner
        else:
            under = self._threads.get(threading.current_thread())
        if under is not None:
            self._threads[thread] = under

    def owner_now(self) -> Owner | None:
        """Who a session opening now, in this thread, belongs to.

        On pytest's thread, and on a thread started (directly, or through the threads it
        started) while a test ran there, whatever runs on pytest's thread now: the work a test
        hands to a thread, a TestClient it opened, the worker threads of the loop its async
        tests run in. Any other thread was started by a wider-scoped fixture, between tests or
        before the plugin: the work it does is the test's only when a test sent it (a request
        through a shared TestClient carries that in its context); a wider fixture's background
        work (a lifespan's thread or task, a thread of its own) stays that fixture's, and work
        nobody sent is nobody's."""
        if threading.get_ident() != self._pytest_thread:
            started_under = self._threads.get(threading.current_thread())
            if started_under is None or started_under.test is None:
                sender = sent_by.get()
                return self.owner if sender is SENT_FROM_PYTEST else sender
        return self.owner

    def session_opened(self, session: SessionView) -> None:
        owner = self.owner_now()
        if owner is not None:  # not opened by a test or a fixture: at import, by a plugin
            with self._lock:
                self._open[session.id] = (session, owner)

    def session_closed(self, session: SessionView, duration: float) -> None:
        with self._lock:
            self._open.pop(session.id, None)

    def session_leaked(self, session: SessionView, reason: str) -> None:
        if reason == "gc":  # comes before session_closed
            with self._lock:
                entry = self._open.get(session.id)
                if entry is not None:
                    self._dropped.append(entry)

    def holds_open(self, test: str) -> bool:
        with self._lock:
            return any(owner.test == test for _, owner in self._open.values())

    def hand_over(self, session: SessionView, owner: Owner) -> None:
        with self._lock:
            if session.id in self._open:
                self._open[session.id] = (session, owner)

    def leaks_of(self, test: str) -> list[Leak]:
        """The test's sessions still open or dropped, forgotten from here on: each is
        reported once, and a test that has ended cannot leak any more."""
        with self._lock:
            leaks = [Leak(s, o, True) for s, o in self._dropped if o.test == test]
            self._dropped = [(s, o) for s, o in self._dropped if o.test != test]
            for session_id, (session, owner) in list(self._open.items()):
                if owner.test == test:
                    leaks.append(Leak(session, owner, False))
                    del self._open[session_id]
        return sorted(leaks, key=lambda leak: leak.session.opened_at)

    # The rest of the Observer protocol: pool events say nothing about who leaked.

    def transaction_ended(self, session: SessionView, outcome: str, duration: float) -> None: ...

    def connection_created(self, pool_name: str, seconds: float) -> None: ...

    def connection_checked_out(self, checkout: CheckoutView, wait: float) -> None: ...

    def connection_checked_in(self, checkout: CheckoutView, use: float) -> None: ...

    def connection_invalidated(
        self, pool_name: str, soft: bool, checkout: CheckoutView | None, reason: str
    ) -> None: ...

    def connection_closed(self, pool_name: str, reason: str) -> None: ...

    def server_limits(self, pool_name: str, allowed: int) -> None: ...

    def server_view_failed(self, pool_name: str, reason: str) -> None: ...

    def server_view_read(self, pool_name: str, holders: tuple[Any, ...]) -> None: ...

    def checkout_timed_out(
        self, pool_name: str, waited: float, session: SessionView | None, holders: tuple[str, ...]
    ) -> None: ...

    def checkout_waited(self, pool_name: str) -> None: ...

    def wait_cancelled(self, pool_name: str, waited: float) -> None: ...

    def session_idle_in_transaction(self, session: SessionView, away: float) -> None: ...

    def session_pitfall(self, session: SessionView, kind: str, location: Location | None) -> None:
        ...

    def pool_usage(self, pool_name: str, idle: int, used: int) -> None: ...

    def pool_pending(self, pool_name: str, delta: int) -> None: ...

    def pool_capacity(self, pool_name: str, maximum: int | None) -> None: ...

    def internal_error(self, listener: str) -> None: ...

    def close(self) -> None: ...


def watch_thread_starts(
    starting: Callable[[threading.Thread], None], guard: Guard
) -> Callable[[], None]:
    """Wrap threading.Thread.start so that `starting` sees each thread, in the thread that
    starts it, before it runs: before Python 3.14 nothing a new thread has tells who started
    it. Returns what takes the wrapper off again."""
    original = threading.Thread.start
    watching = True

    def start(self: threading.Thread, *args: Any, **kw: Any) -> Any:
        if watching and self.ident is None:  # a thread started twice is refused by the original
            try:
                starting(self)
            except Exception:
                guard.failed("pytest:thread_start")
        return original(self, *args, **kw)

    def unwatch() -> None:
        nonlocal watching
        watching = False
        if threading.Thread.__dict__.get("start") is start:  # else wrapped again since: inert
            setattr(threading.Thread, "start", original)  # noqa: B010

    # setattr: a method cannot be assigned to under mypy.
    setattr(threading.Thread, "start", start)  # noqa: B010
    return unwatch


class LeakGuard:
    """The plugin's hooks when --session-monitor is on: who opens what, and the check after
    each test's teardown."""

    name = "session_monitor.leak_guard"

    def __init__(self, config: pytest.Config, *, capture_stacks: bool, allow_marker: str) -> None:
        self._root = config.rootpath
        self.allow_marker = allow_marker  # the plugin's marker: its leaks are counted, not failed
        self.ledger = Ledger()
        self.monitor = SessionMonitor(
            registry=CollectorRegistry(),
            metrics_path=None,
            log_leaks=False,
            capture_stacks=capture_stacks,
            # No sampler thread in the suite's process: being idle in a transaction is what
            # an outer-connection fixture does on purpose.
            idle_in_transaction_threshold=None,
            observers=[self.ledger],
            library_packages=config.getini("session_monitor_library_packages"),
        )
        # Set up wider-scoped fixtures, and the owner of what each opened: an ORM Session a
        # test merely used first (its first query opens it) is still the fixture's.
        self._wide_fixtures: dict[pytest.FixtureDef[Any], Owner] = {}
        self._teardown: Owner | None = None
        # For the run's summary line: a clean run says nothing else, and would look the same
        # as a run without the plugin.
        self._tests_checked = 0
        self._unclosed: Counter[str] = Counter()  # by kind, in the tests failed for them
        self._allowed = 0  # in tests marked with allow_marker
        # The monitor's registry is the plugin's own and nobody scrapes it: a failure of ours
        # in the wrapper is logged once, like the monitor's.
        self._unwatch_threads = watch_thread_starts(
            self.ledger.thread_starting, Guard(lambda listener: None)
        )

    def pytest_unconfigure(self) -> None:
        self._unwatch_threads()
        self.monitor.uninstrument()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, None, None]:
        self.ledger.owner = Owner(item.nodeid, "the setup")
        sending = sent_by.set(SENT_FROM_PYTEST)
        try:
            return (yield)
        finally:
            sent_by.reset(sending)
            self.ledger.owner = None

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        self.ledger.owner = Owner(item.nodeid, "the test")
        sending = sent_by.set(SENT_FROM_PYTEST)
        try:
            return (yield)
        finally:
            sent_by.reset(sending)
            self.ledger.owner = None

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(
        self, fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
    ) -> Generator[None, object, object]:
        name, scope = fixturedef.argname, fixturedef.scope
        if scope == "function":
            owner = Owner(request.node.nodeid, f"the setup of fixture {name!r}")
        else:
            owner = Owner(None, f"the setup of {scope}-scoped fixture {name!r}")
        outer, self.ledger.owner = self.ledger.owner, owner
        # What a wider fixture's setup starts (a TestClient's lifespan, its tasks) keeps working
        # for that fixture while later tests run.
        sending = sent_by.set(owner) if scope != "function" else None
        try:
            return (yield)
        finally:
            if sending is not None:
                sent_by.reset(sending)
            self.ledger.owner = outer
            if scope != "function":
                self._wide_fixtures[fixturedef] = owner

    def pytest_fixture_post_finalizer(self, fixturedef: pytest.FixtureDef[Any]) -> None:
        self._wide_fixtures.pop(fixturedef, None)
        ending = self._teardown
        if ending is None:  # a parametrized fixture torn down to be set up again
            return
        # Fixtures are torn down one after the other, each followed by this hook: what opened
        # since the previous one opened in this fixture's teardown.
        test = ending.test
        ending.during = f"the teardown of fixture {fixturedef.argname!r}"
        if fixturedef.scope != "function":
            ending.test = None
        self._teardown = self.ledger.owner = Owner(test, "the teardown")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, None, None]:
        self._teardown = self.ledger.owner = Owner(item.nodeid, "the teardown")
        sending = sent_by.set(SENT_FROM_PYTEST)
        try:
            result = yield  # a teardown that failed is reported as it is, without our check
        finally:
            sent_by.reset(sending)
            self._teardown = self.ledger.owner = None
            if self.ledger.holds_open(item.nodeid):
                gc.collect()  # a dropped Session sits in reference cycles until a collection
            self._hand_over_fixture_sessions()
            leaks = self.ledger.leaks_of(item.nodeid)
            self._tests_checked += 1
        if leaks and item.get_closest_marker(self.allow_marker) is not None:
            self._allowed += len(leaks)
        elif leaks:
            self._unclosed.update(leak.session.kind for leak in leaks)
            pytest.fail(self._describe(leaks), pytrace=False)
        return result

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        terminalreporter.write_line(self._summary())

    def _hand_over_fixture_sessions(self) -> None:
        for fixturedef, owner in list(self._wide_fixtures.items()):
            cached = fixturedef.cached_result
            value = None if cached is None else cached[0]
            if isinstance(value, scoped_session) and value.registry.has():
                value = value()
            value = getattr(value, "sync_session", value)  # an AsyncSession's Session
            if isinstance(value, Session):
                view = self.monitor.view_of(value)
                if view is not None:
                    self.ledger.hand_over(view, owner)

    # -- the report ---------------------------------------------------------------------------

    def _summary(self) -> str:
        line = (
            f"session_monitor: {_count(self._tests_checked, 'test')} checked, "
            f"{_count(self._unclosed['session'], 'session')} and "
            f"{_count(self._unclosed['connection'], 'Core connection')} left unclosed"
        )
        if self._allowed:
            line += f" ({self._allowed} more in tests marked {self.allow_marker})"
        return line

    def _describe(self, leaks: list[Leak]) -> str:
        count = f"{len(leaks)} database session" + ("s" if len(leaks) > 1 else "")
        lines = [f"session_monitor: this test left {count} unclosed:"]
        for leak in leaks:
            session = leak.session
            what = "session" if session.kind == "session" else "Core connection"
            state = (
                "was garbage collected without being closed"
                if leak.dropped
                else "is still open after the test and its function-scoped fixtures ended"
            )
            lines.append(f"- {what} on pool {session.pool_name!r} {state}")
            lines.append(
                f"  opened at {self._where(session.location)}, in {leak.owner.during}, "
                f"by {leak.owner.test}"
            )
            lines.extend(
                f'    File "{self._path(file)}", line {line}, in {function}'
                for file, line, function in session.stack
                if not file.startswith(_PYTEST_DIR)
            )
        lines.append(
            "Close each one (a `with` block, or the teardown of the fixture that opened it), or "
            f"mark the test @pytest.mark.{self.allow_marker}."
        )
        return "\n".join(lines)

    def _where(self, location: Location | None) -> str:
        if location is None:
            return "<unknown>"
        file, line, function = location
        return f"{self._path(file)}:{line} in {function}"

    def _path(self, file: str) -> str:
        try:
            return str(Path(file).relative_to(self._root))
        except ValueError:
            return file


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")
