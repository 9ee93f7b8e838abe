"""Validated, immutable settings of a :class:`~session_monitor.SessionMonitor`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field


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

    def __post_init__(self) -> None:
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


def excluded_path_set(paths: Iterable[str] | str | None) -> frozenset[str]:
    if paths is None:
        return frozenset()
    if isinstance(paths, str):
        raise ConfigurationError(
            "excluded_paths must be a collection of paths such as ['/health'], "
            f"not the string {paths!r}"
        )
    return frozenset(paths)
