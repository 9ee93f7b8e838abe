"""Cheap code locations: the application frame that opened a session, or a short stack of them.

Frames of SQLAlchemy, the web stack, the standard library and this package are skipped, so what
an on-call engineer reads is the application line. Frames are walked, not formatted: formatting
happens only when a leak is reported.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from types import FrameType

Location = tuple[str, int, str]  # filename, line number, function

_LIBRARY_PACKAGES = (
    "sqlalchemy",
    "session_monitor",
    "starlette",
    "fastapi",
    "anyio",
    "uvicorn",
    "greenlet",
    "opentelemetry",
    "httpx",
    "httpcore",
    "pydantic",
    "_pytest",
    "pytest",
    "pluggy",
)

_is_library: dict[str, bool] = {}
_prefixes: tuple[str, ...] | None = None


def _library_prefixes() -> tuple[str, ...]:
    prefixes = {sysconfig.get_paths()["stdlib"] + os.sep, os.path.dirname(__file__) + os.sep}
    for name in _LIBRARY_PACKAGES:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            prefixes.add(os.path.dirname(path) + os.sep)
        else:
            # A namespace package (opentelemetry) has no __file__, only its __path__ entries.
            prefixes.update(entry + os.sep for entry in getattr(module, "__path__", ()))
    return tuple(prefixes)


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


def _library_file(filename: str) -> bool:
    global _prefixes
    known = _is_library.get(filename)
    if known is None:
        if _prefixes is None:
            _prefixes = _library_prefixes()
        known = filename.startswith("<") or filename.startswith(_prefixes)
        _is_library[filename] = known
    return known


def application_location(frame: FrameType | None) -> Location | None:
    """Return the innermost application frame at or above `frame`."""
    crossed = False
    known = _is_library.get
    while frame is not None:
        code = frame.f_code
        filename = code.co_filename
        library = known(filename)
        if library is None:
            library = _library_file(filename)
        if not library:
            return (filename, frame.f_lineno, code.co_name)
        frame = frame.f_back
        if frame is None and not crossed:
            crossed, frame = True, _outer_frame()
    return None


def application_stack(frame: FrameType | None, depth: int) -> tuple[Location, ...]:
    """Return up to `depth` application frames, innermost first."""
    found: list[Location] = []
    crossed = False
    while frame is not None and len(found) < depth:
        code = frame.f_code
        if not _library_file(code.co_filename):
            found.append((code.co_filename, frame.f_lineno, code.co_name))
        frame = frame.f_back
        if frame is None and not crossed:
            crossed, frame = True, _outer_frame()
    return tuple(found)


def format_location(location: Location | None) -> str:
    if location is None:
        return "<unknown>"
    filename, line, function = location
    return f"{filename}:{line} in {function}"


def format_stack(stack: tuple[Location, ...]) -> str:
    return "\n".join(f'  File "{f}", line {n}, in {fn}' for f, n, fn in stack)
