"""Validated, immutable settings of a :class:`~session_monitor.SessionMonitor`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine


class ConfigurationError(ValueError):
    """An option given to SessionMonitor cannot work; the message says what to change."""


@dataclass(frozen=True)
class MonitorConfig:
    pool_name: str | None = None
    leak_threshold: float | None = None
    capture_stacks: bool = False
    stack_depth: int = 12
    excluded_paths: frozenset[str] = field(default_factory=frozenset)
    metrics_path: str | None = "/metrics"
    log_leaks: bool = True
    # 5 s: far above a healthy request's time between two statements of one transaction, well
    # under the 30 s pool_timeout after which a starved pool starts failing requests.
    idle_in_transaction_threshold: float | None = 5.0
    timeout_log_interval: float = 10.0
    diagnostics_path: str | None = None
    diagnostics_token: str | None = None
    # Under PROMETHEUS_MULTIPROC_DIR: how long, in all, the page waits for the other workers.
    diagnostics_deadline: float = 1.0
    # Modules (and their submodules) whose frames are never the application's line.
    library_packages: tuple[str, ...] = ()
    # The database's view (PostgreSQL): read on demand, shared for this many seconds.
    server_view: bool = True
    server_view_interval: float = 5.0
    # Tagging: connections named "<application_name>:<host>:<pid>"; None: off.
    application_name: str | None = None

    def __post_init__(self) -> None:
        for name in self.library_packages:
            if not isinstance(name, str) or not all(
                part.isidentifier() for part in name.split(".")
            ):
                raise ConfigurationError(
                    "library_packages takes module names as you import them, such as "
                    "('myorg_db_helpers', 'myorg.db'), whose frames then count as a library's "
                    f"rather than as the application's line; got {name!r}"
                    + (" (a distribution's name? use its module's)" if _dashed(name) else "")
                )
        if self.diagnostics_path is not None and (
            not isinstance(self.diagnostics_path, str)
            or not self.diagnostics_path.startswith("/")
            or self.diagnostics_path.rstrip("/") == (self.metrics_path or "").rstrip("/")
        ):
            raise ConfigurationError(
                "diagnostics_path must be a URL path starting with '/' other than metrics_path "
                f"(for example '/_session_monitor'), or None, got {self.diagnostics_path!r}"
            )
        if self.diagnostics_token is not None and (
            not isinstance(self.diagnostics_token, str) or len(self.diagnostics_token) < 16
        ):
            raise ConfigurationError(
                "diagnostics_token must be a string of at least 16 characters (for example "
                "secrets.token_urlsafe()), or None to answer loopback clients only"
            )
        if not isinstance(self.server_view, bool):
            raise ConfigurationError(
                "server_view must be True (read PostgreSQL's pg_stat_activity on demand: pool "
                f"timeouts, the diagnostics page) or False, got {self.server_view!r}"
            )
        if self.application_name is not None and (
            not isinstance(self.application_name, str)
            or not self.application_name.strip()
            or not self.application_name.isprintable()
            or not self.application_name.isascii()
            or len(self.application_name) > 40
        ):
            raise ConfigurationError(
                "application_name names your service in each PostgreSQL connection's "
                "application_name as '<name>:<host>:<pid>': give a short printable ASCII name "
                f"(for example 'orders'), or None to leave connections untagged; got "
                f"{self.application_name!r}"
            )
        for name in (
            "idle_in_transaction_threshold",
            "timeout_log_interval",
            "server_view_interval",
            "diagnostics_deadline",
        ):
            seconds = getattr(self, name)
            if (seconds is not None or not name.startswith("idle")) and not _positive(seconds):
                raise ConfigurationError(
                    f"{name} must be a positive number of seconds"
                    + (" or None to switch it off" if name.startswith("idle") else "")
                    + f", got {seconds!r}"
                )
        if self.pool_name is not None and (
            not isinstance(self.pool_name, str) or not self.pool_name.strip()
        ):
            raise ConfigurationError(
                f"pool_name must be a non-empty string or None, got {self.pool_name!r}"
            )
        threshold = self.leak_threshold
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)
            or threshold <= 0
        ):
            raise ConfigurationError(
                "leak_threshold must be a positive number of seconds (for example 30.0) "
                f"or None to switch age-based leak detection off, got {threshold!r}"
            )
        if not isinstance(self.capture_stacks, bool):
            raise ConfigurationError(
                f"capture_stacks must be True or False, got {self.capture_stacks!r}"
            )
        if (
            isinstance(self.stack_depth, bool)
            or not isinstance(self.stack_depth, int)
            or not 1 <= self.stack_depth <= 200
        ):
            raise ConfigurationError(
                f"stack_depth must be an integer from 1 to 200 frames, got {self.stack_depth!r}"
            )
        for path in self.excluded_paths:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ConfigurationError(
                    f"excluded_paths must hold URL paths starting with '/', got {path!r}"
                )
        if self.metrics_path is not None and (
            not isinstance(self.metrics_path, str) or not self.metrics_path.startswith("/")
        ):
            raise ConfigurationError(
                "metrics_path must be a URL path starting with '/' (for example '/metrics') "
                f"or None to serve no metrics endpoint, got {self.metrics_path!r}"
            )


def _positive(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _dashed(name: object) -> bool:
    return isinstance(name, str) and "-" in name


def package_names(names: Iterable[str] | str | None) -> tuple[str, ...]:
    if names is None:
        return ()
    if isinstance(names, str):
        raise ConfigurationError(
            "library_packages takes a collection of module names such as ('myorg_db_helpers',), "
            f"not the string {names!r}"
        )
    return tuple(names)


def excluded_path_set(paths: Iterable[str] | str | None) -> frozenset[str]:
    if paths is None:
        return frozenset()
    if isinstance(paths, str):
        raise ConfigurationError(
            "excluded_paths must be a collection of paths such as ['/health'], "
            f"not the string {paths!r}"
        )
    return frozenset(paths)


def sync_engines_of(engines: Iterable[Any]) -> list[Engine]:
    """The sync engines SessionMonitor(*engines) names; an AsyncEngine is its sync_engine."""
    found: list[Engine] = []
    for candidate in engines:
        if isinstance(candidate, (list, tuple, set, frozenset)):
            found.extend(sync_engines_of(candidate))
        elif isinstance(candidate, Engine):
            found.append(candidate)
        elif isinstance(getattr(candidate, "sync_engine", None), Engine):
            # An AsyncEngine, recognised without importing SQLAlchemy's asyncio extension,
            # which needs greenlet.
            found.append(candidate.sync_engine)
        else:
            raise ConfigurationError(
                "SessionMonitor watches SQLAlchemy engines: pass Engine or AsyncEngine objects "
                "(SessionMonitor(engine) or SessionMonitor(engine_a, engine_b)), or none at all "
                f"to watch every engine in the process; got {type(candidate).__name__}"
            )
    return found
