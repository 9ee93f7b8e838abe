"""Cheap code locations: the application frame that opened a session, or a short stack of them.

A frame is the application's unless its file lives where installed code lives, whatever the
package is called, so SQLModel, a driver or a framework between the app and SQLAlchemy is
skipped without being named:

- never the application's: the standard library, frozen modules and other ``<...>`` pseudo-files,
  this package, and SQLAlchemy;
- libraries: the site directories (purelib and platlib of ``sys.prefix`` and of
  ``sys.base_prefix``, the user's site-packages, every ``sys.path`` entry named ``site-packages``
  or ``dist-packages``) and the modules named by ``SessionMonitor(library_packages=...)``.

Everything else is the application's: its modules wherever they are, in the current directory
or installed editable (their files stay in the source tree). When a stack has no application
frame at all (an app installed into site-packages, say), its innermost library frame stands in
rather than nothing.

A file's kind is worked out the first time it is seen and cached by file name, so walking a
stack costs a dict lookup a frame. Frames are walked, not formatted: formatting happens only
when a leak is reported.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from collections.abc import Iterable
from types import FrameType
from typing import NamedTuple

import sqlalchemy

from .forking import new_rlock

Location = tuple[str, int, str]  # filename, line number, function

_APPLICATION, _LIBRARY, _NEVER = 0, 1, 2  # what a file is; _NEVER: not even a stand-in
_SITE_DIRECTORY_NAMES = ("site-packages", "dist-packages")
# session_monitor/, with every layer's folder: none of our frames is the application's.
_PACKAGE_DIRECTORY = os.path.dirname(os.path.dirname(__file__))

_kinds: dict[str, int] = {}  # file name -> its kind; the only thing the hot path reads
# For a file seen the first time and for new library_packages; re-entrant because a garbage
# collection inside it may run a weak-reference callback that walks a stack.
_lock = new_rlock()  # free again in a forked child
_named: set[str] = set()  # every library_packages given to a monitor in this process


class _Places(NamedTuple):
    sys_path: list[str]  # the sys.path they were read from: a new site directory may join it
    named_found: frozenset[str]  # library_packages imported then: the others are looked for again
    never: tuple[str, ...]
    library: tuple[str, ...]
    stdlib: tuple[str, ...]  # after `library`: a system Python's site-packages may be inside


_places: _Places | None = None


def add_library_packages(names: Iterable[str]) -> None:
    """Count the files of these modules (and their submodules) as a library's, process-wide.

    A module not imported yet is looked for again when a file is seen the first time."""
    global _places
    with _lock:
        new = set(names) - _named
        if new:
            _named.update(new)
            _places = None
            _kinds.clear()  # files seen already may be the named modules'


def _prefixes(paths: Iterable[str]) -> tuple[str, ...]:
    """Directory prefixes ending in a separator, as spelt and with symbolic links resolved."""
    found: set[str] = set()
    for path in paths:
        if path and os.path.isabs(path):
            for spelling in (path, os.path.realpath(path)):
                prefix = os.path.join(spelling, "")
                if prefix != os.sep:
                    found.add(prefix)
    return tuple(sorted(found))


def _base_paths() -> dict[str, str]:
    """The install paths of the interpreter a virtual environment was made from."""
    base, platbase = sys.base_prefix, sys.base_exec_prefix
    return sysconfig.get_paths(
        vars={
            "base": base,
            "installed_base": base,
            "platbase": platbase,
            "installed_platbase": platbase,
        }
    )


def _site_directories(sys_path: list[str]) -> set[str]:
    found: set[str] = set()
    for paths in (sysconfig.get_paths(), _base_paths()):
        found.update((paths["purelib"], paths["platlib"]))
    # Not in every site module (old virtualenvs' own site.py lacks them).
    found.update(getattr(site, "getsitepackages", list)())
    user_site = getattr(site, "getusersitepackages", None)
    if user_site is not None:
        found.add(user_site())
    found.update(
        entry
        for entry in sys_path
        if os.path.basename(entry.rstrip("/" + os.sep)) in _SITE_DIRECTORY_NAMES
    )
    return found


def _named_locations(names: Iterable[str]) -> list[str]:
    locations: list[str] = []
    for name in names:
        module = sys.modules.get(name)
        path = getattr(module, "__path__", None)
        file = getattr(module, "__file__", None)
        if path is not None:  # a package, perhaps a namespace package without __file__
            locations.extend(_prefixes(path))
        elif isinstance(file, str):
            locations.append(file)  # a module's own file, not its directory's other files
    return locations


def _current_places() -> _Places:
    global _places
    places = _places
    sys_path = list(sys.path)
    if (
        places is not None
        and places.sys_path == sys_path
        and not any(n in sys.modules for n in _named - places.named_found)
    ):
        return places
    base = _base_paths()
    found = frozenset(name for name in _named if name in sys.modules)
    never = _prefixes((_PACKAGE_DIRECTORY, os.path.dirname(sqlalchemy.__file__ or "")))
    library = _prefixes(_site_directories(sys_path)) + tuple(_named_locations(found))
    stdlib = _prefixes(
        (base["stdlib"], base["platstdlib"], os.path.dirname(getattr(os, "__file__", "")))
    )
    _places = places = _Places(sys_path, found, never, library, stdlib)
    return places


def _kind(filename: str) -> int:
    """A file seen the first time: what it is, cached."""
    with _lock:
        places = _current_places()
        if filename.startswith("<") or filename.startswith(places.never):
            kind = _NEVER
        elif filename.startswith(places.library):
            kind = _LIBRARY
        elif filename.startswith(places.stdlib):
            kind = _NEVER
        else:
            kind = _APPLICATION
        _kinds[filename] = kind
    return kind


def _outer_frame() -> FrameType | None:
    """Where a frame chain that ended inside a greenlet continues: the frame that switched in.

    SQLAlchemy's asyncio extension runs Session code in a greenlet whose frames do not link to
    the application's awaiting frames; those are the parent greenlet's suspended frames.
    """
    greenlet = sys.modules.get("greenlet")
    if greenlet is None:
        return None
    parent = greenlet.getcurrent().parent
    return None if parent is None else parent.gr_frame


def _location(frame: FrameType) -> Location:
    return (frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name)


def application_location(frame: FrameType | None) -> Location | None:
    """Return the innermost application frame at or above `frame`, one of the current thread."""
    start = frame
    known = _kinds.get
    crossed = False
    while True:
        # On every session's first checkout: a few steps per frame (a file seen before is one
        # dict lookup), the greenlet's parent looked at only where the chain ends.
        while frame is not None:
            code = frame.f_code
            kind = known(code.co_filename)
            if kind is None:
                kind = _kind(code.co_filename)
            if kind == _APPLICATION:
                return (code.co_filename, frame.f_lineno, code.co_name)
            frame = frame.f_back
        if crossed:
            break
        crossed, frame = True, _outer_frame()
    # Rare (an app installed like a library): walked again rather than slowing every walk.
    stand_in = application_stack(start, 1)
    return stand_in[0] if stand_in else None


def application_stack(
    frame: FrameType | None, depth: int, *, cross_greenlet: bool = True
) -> tuple[Location, ...]:
    """Return up to `depth` application frames at or above `frame`, innermost first.

    `cross_greenlet`: continue into the current greenlet's parent, for a frame of the current
    thread only (another thread's greenlets are not this one's)."""
    found: list[Location] = []
    stand_in = None
    crossed = not cross_greenlet
    known = _kinds.get
    while frame is not None and len(found) < depth:
        code = frame.f_code
        filename = code.co_filename
        kind = known(filename)
        if kind is None:
            kind = _kind(filename)
        if not kind:  # _APPLICATION
            found.append((filename, frame.f_lineno, code.co_name))
        elif stand_in is None and kind == _LIBRARY:
            stand_in = frame
        frame = frame.f_back
        if frame is None and not crossed:
            crossed, frame = True, _outer_frame()
    if not found and stand_in is not None:
        return (_location(stand_in),)
    return tuple(found)


def application_frames(frames: Iterable[FrameType], depth: int) -> tuple[Location, ...]:
    """Up to `depth` application frames of `frames` (innermost first), without following any
    frame's callers: an await chain links coroutines, not frames."""
    found: list[Location] = []
    stand_in = None
    known = _kinds.get
    for frame in frames:
        filename = frame.f_code.co_filename
        kind = known(filename)
        if kind is None:
            kind = _kind(filename)
        if kind == _APPLICATION:
            found.append(_location(frame))
            if len(found) >= depth:
                break
        elif stand_in is None and kind == _LIBRARY:
            stand_in = frame
    if not found and stand_in is not None:
        return (_location(stand_in),)
    return tuple(found)


def format_location(location: Location | None) -> str:
    if location is None:
        return "<unknown>"
    filename, line, function = location
    return f"{filename}:{line} in {function}"


def format_stack(stack: tuple[Location, ...]) -> str:
    return "\n".join(f'  File "{f}", line {n}, in {fn}' for f, n, fn in stack)
