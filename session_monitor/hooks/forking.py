"""A forked child (gunicorn's preload, multiprocessing's fork start method), and the package's one
at-fork handler.

``os.fork()`` copies the whole process but only the thread that called it. A lock another thread
held at that moment stays held in the child for good, and the sessions, connections and waiting
callers of the parent's threads are copied with them. A forked child is a new process, so it
counts as one: from zero at the fork, as prometheus_client's multiprocess mode has it too.

One handler (`os.register_at_fork`) prepares the child before ``os.fork()`` returns there, in a
fixed order:

1. every lock of the monitor's (made by `new_lock` / `new_rlock`) is made free again, in place,
   before any code of ours can take one (the stdlib's own way: `threading`, `logging`);
2. ``FORGET``: each owner drops what is the parent's: open sessions, checkouts, waiting callers,
   counts, open spans;
3. ``THREADS``: the background threads are started again;
4. ``PUBLISH``: observers are told the child's own state, from a thread of its own: an
   observer's library (OpenTelemetry, prometheus_client) has locks of its own that a thread of
   the parent may have held, and only that thread may then wait, never ``os.fork()``.

Within a step, owners run in the order they registered. An owner is held weakly, and a failure
of one is its own to count (its `Guard`): nothing may reach the fork.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import threading
import types
import weakref
from collections.abc import Callable

_locks: weakref.WeakSet[threading.Lock | threading.RLock] = weakref.WeakSet()


def new_lock() -> threading.Lock:
    """A Lock that is free again in a forked child."""
    lock = threading.Lock()
    _locks.add(lock)
    return lock


def new_rlock() -> threading.RLock:
    """An RLock that is free again in a forked child."""
    lock = threading.RLock()
    _locks.add(lock)
    return lock


class Stage(enum.IntEnum):
    FORGET = 1
    THREADS = 2
    PUBLISH = 3


_order = itertools.count()
# Per stage, by registration order: a callable returning the action, or None once its owner
# is gone.
_actions: dict[Stage, dict[int, Callable[[], Callable[[], None] | None]]] = {
    stage: {} for stage in Stage
}


def in_child(stage: Stage, action: Callable[[], None]) -> None:
    """Run `action` in every forked child, at `stage`. A bound method is held weakly: its
    object is not kept alive for this, and leaves the list when it is collected."""
    key = next(_order)
    actions = _actions[stage]
    if isinstance(action, types.MethodType):
        actions[key] = weakref.WeakMethod(action, lambda _: actions.pop(key, None))
    else:
        actions[key] = lambda: action


def _due(stage: Stage) -> list[Callable[[], None]]:
    return [action for ref in list(_actions[stage].values()) if (action := ref()) is not None]


def _run(actions: list[Callable[[], None]]) -> None:
    for action in actions:
        # Each action counts its own failures (its owner's Guard): nothing more to do here.
        with contextlib.suppress(Exception):
            action()


def _after_fork_in_child() -> None:
    for lock in list(_locks):
        with contextlib.suppress(Exception):
            lock._at_fork_reinit()  # type: ignore[union-attr]
    for stage in (Stage.FORGET, Stage.THREADS):
        _run(_due(stage))
    publish = _due(Stage.PUBLISH)
    if publish:
        with contextlib.suppress(Exception):
            threading.Thread(
                target=_run, args=(publish,), name="session_monitor-fork", daemon=True
            ).start()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
