"""A pytest plugin that fails each test that leaves a SQLAlchemy session or connection unclosed.

pytest loads this module for every run through the package's ``pytest11`` entry point, and
then it only adds its options and its marker, importing nothing else. With
``--session-monitor`` it registers `_pytest_leaks.LeakGuard`, which builds one `SessionMonitor`
watching every engine for the whole run.

A session belongs to whatever was running when it opened: the test (its setup, its call, its
teardown, its function-scoped fixtures) or a wider-scoped fixture, which may keep it for as
long as it lives. When a test's teardown is over (its function-scoped fixtures are torn down),
each session the test opened that is still open, or was dropped unclosed, is reported as an
error in the teardown phase, the way pytest reports a fixture whose teardown failed.

Threads and tasks: what the test starts is the test's (threads, a TestClient it opens, its
requests, the worker threads of the loop its async tests run in); background work a
wider-scoped fixture started is that fixture's, even while a test runs (a shared TestClient's
lifespan thread or task, a thread the fixture started), except the requests a test sends
through it. To know who started a thread, the plugin wraps ``threading.Thread.start`` while it
runs.
"""

from __future__ import annotations

import sys

import pytest

ALLOW_LEAKS = "session_monitor_allow_leaks"
ENTRY_POINT = "session_monitor"  # the pytest11 entry point's name, in pyproject.toml


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Called as this module is registered, under the entry point's name or its own (``-p
    session_monitor.pytest_plugin``, ``pytest_plugins = [...]`` in a conftest).

    pluggy refuses the same module under a second name, and pytest would stop with "Plugin
    already registered under a different name"; a blocked name is skipped instead."""
    registered_as = pluginmanager.get_name(sys.modules[__name__])
    other = __name__ if registered_as == ENTRY_POINT else ENTRY_POINT
    if not pluginmanager.has_plugin(other):
        pluginmanager.set_blocked(other)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("session_monitor", "SQLAlchemy session leaks (session_monitor)")
    group.addoption(
        "--session-monitor",
        action="store_true",
        default=False,
        help="fail each test that leaves a SQLAlchemy session or Core connection open, or "
        "drops one unclosed",
    )
    group.addoption(
        "--session-monitor-stacks",
        action="store_true",
        default=False,
        help="like --session-monitor, and show the application stack where each leaked "
        "session was opened",
    )
    parser.addini(
        "session_monitor_library_packages",
        type="args",
        default=[],
        help="module names (space-separated) whose frames are not the line a leak names, like "
        "an installed library's: helpers that open sessions for the tests",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Registered with or without the option: under --strict-markers a test carrying the
    # marker must still run when the plugin is off.
    config.addinivalue_line(
        "markers",
        f"{ALLOW_LEAKS}: --session-monitor does not fail this test for the database sessions "
        "it leaves unclosed",
    )
    stacks = bool(config.getoption("session_monitor_stacks"))
    if stacks or config.getoption("session_monitor"):
        # Imported only now: a run without the option never imports SQLAlchemy through here.
        from ._pytest_leaks import LeakGuard

        guard = LeakGuard(config, capture_stacks=stacks, allow_marker=ALLOW_LEAKS)
        config.pluginmanager.register(guard, LeakGuard.name)
