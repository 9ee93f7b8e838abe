"""One run of a project's suite in a pytest subprocess, without or with the monitor; the comparison
of the two runs, and the report lines every bed prints."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = Path(__file__).resolve().parent / "plugins"
# Each plugin of ours writes one JSON report, to the path its option names.
OUTCOMES = ("outcomes", "--upstream-outcomes")
MONITOR = ("inject", "--monitor-report")
BAD = frozenset({"failed", "error"})
GOOD = frozenset({"passed", "xpassed", "xfailed"})


class RunCrashed(Exception):
    """A run ended without its reports, or tested another copy of the package (exit 4)."""


@dataclass
class Run:
    mode: str  # "without" or "with"
    outcomes: dict[str, str]
    details: dict[str, str]
    seconds: float
    log: Path
    reports: dict[str, Any]  # each plugin's report, by plugin name
    monitor: dict[str, Any] = field(default_factory=dict)  # inject.py's, in the run with it

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts

    def line(self) -> str:
        counts = self.counts()
        order = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
        shown = ", ".join(f"{counts[o]} {o}" for o in order if counts.get(o))
        return f"{len(self.outcomes)} tests: {shown or 'none'} ({self.seconds:.1f}s)"

    @property
    def internal_errors(self) -> int:
        """What the monitor counted in session_monitor_internal_errors_total."""
        return sum(self.monitor["internal_errors"].values()) if self.monitor else 0

    @property
    def errors_logged(self) -> int:
        """ERROR records of the monitor's logger (its first failure of each listener)."""
        return int(self.monitor["error_log_records"]) if self.monitor else 0


def run_suite(
    suite: Path,
    package: str,
    mode: str,
    work: Path,
    targets: Sequence[str],
    options: Sequence[str] = (),
    *,
    monitor_options: Sequence[str] = (),
    plugins: Mapping[str, str] | None = None,
    monitored_plugins: Mapping[str, str] | None = None,
    plugin_dirs: Sequence[Path] = (),
    tag: str = "",
) -> Run:
    """Run `targets` (paths relative to `suite`) in a pytest of their own, `mode` "without" or
    "with" the injected monitor, and read back what the plugins wrote. `plugins` are the bed's own
    plugins in both runs, `monitored_plugins` in the run with the monitor (loaded after it), each
    with the option that takes its report's path; `plugin_dirs` are where they are. Raises
    RunCrashed when a report is missing or `package` was not the installed one."""
    work.mkdir(parents=True, exist_ok=True)
    loaded = [OUTCOMES, *(plugins or {}).items()]
    if mode == "with":
        loaded += [MONITOR, *(monitored_plugins or {}).items()]
    reports = {plugin: work / f"{plugin}-{mode}{tag}.json" for plugin, _ in loaded}
    log = work / f"pytest-{mode}{tag}.log"
    for stale in reports.values():
        stale.unlink(missing_ok=True)
    # Nothing of a pytest this may run under: its options, plugins or current test.
    inherited = ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_CURRENT_TEST")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    paths = [str(PLUGINS), *map(str, plugin_dirs), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    # No user site (-s): a suite's conftest then leaves sys.path alone. session_monitor's own
    # pytest plugin (its pytest11 entry point) stays out of both runs: only inject.py brings the
    # monitor in, and the run without it must not import the package at all.
    command = [sys.executable, "-s", "-m", "pytest", "--rootdir", str(suite)]
    command += ["-p", "no:cacheprovider", "-p", "no:session_monitor", "-q", "--tb=short"]
    for plugin, option in loaded:
        command += ["-p", plugin, option, str(reports[plugin])]
    command += ["--upstream-package", package]
    if mode == "with":
        command += monitor_options
    # Absolute targets and a working directory of the run's own (SQLite's test files, the
    # tutorials' log.txt are made in it). Node ids stay relative to the suite.
    command += [*options, *(str(suite / target) for target in targets)]
    cwd = work / f"cwd-{mode}{tag}"
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir()
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1) or not all(path.exists() for path in reports.values()):
        raise RunCrashed(f"the run {mode} the monitor exited {done.returncode}; see {log}")
    read = {plugin: json.loads(path.read_text()) for plugin, path in reports.items()}
    outcomes = read[OUTCOMES[0]]
    installed = str(Path(importlib.import_module(package).__file__ or "").resolve())
    if outcomes["package"].get("file") != installed:
        raise RunCrashed(f"the tests ran {outcomes['package']}, not {installed}")
    run = Run(mode, outcomes["outcomes"], outcomes["details"], seconds, log, read)
    run.monitor = read.get(MONITOR[0], {})
    return run


# -- comparing ---------------------------------------------------------------------------------


@dataclass
class Comparison:
    regressions: dict[str, tuple[str, str]]  # passes without the monitor, fails or errors with
    other: dict[str, tuple[str, str]]  # any other change (a test skipped only with it, ...)
    flaky: dict[str, tuple[str, str]] = field(default_factory=dict)  # not again on a rerun


def compare(without: Run, with_: Run) -> Comparison:
    regressions: dict[str, tuple[str, str]] = {}
    other: dict[str, tuple[str, str]] = {}
    for nodeid in sorted(set(without.outcomes) | set(with_.outcomes)):
        before = without.outcomes.get(nodeid, "missing")
        after = with_.outcomes.get(nodeid, "missing")
        if before == after:
            continue
        if before in GOOD and (after in BAD or after == "missing"):
            regressions[nodeid] = (before, after)
        else:
            other[nodeid] = (before, after)
    return Comparison(regressions, other)


# -- reporting ---------------------------------------------------------------------------------


def relative(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(ROOT))
    return str(path)


def first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:160] if lines else ""


def run_lines(*runs: Run | None) -> list[str]:
    """Each run's outcomes, time and log; then what the monitor counted in the run with it."""
    ran = [run for run in runs if run is not None]
    lines = [
        f"{run.mode} monitor:".ljust(16) + f"{run.line()}  log: {relative(run.log)}" for run in ran
    ]
    for run in ran:
        if run.mode == "with":
            lines += monitor_lines(run.monitor)
    return lines


def monitor_lines(monitor: dict[str, Any]) -> list[str]:
    totals = monitor["totals"]
    errors = monitor["internal_errors"]
    lines = [
        "monitor: sessions opened {sessions_opened} closed {sessions_closed}, checkouts "
        "{checkouts} checkins {checkins}, connections created {connections_created}, "
        "invalidations {invalidations}, timeouts {timeouts}".format(**totals),
        f"         leaks {monitor['leaks'] or '{}'}, transactions {monitor['transactions'] or '{}'}",
        f"internal errors: {sum(errors.values())} {errors or ''}".rstrip(),
    ]
    lines += [f"  {first_line(text)}" for text in monitor["error_logs"]]
    return lines


def change_lines(changes: dict[str, tuple[str, str]], details: dict[str, str]) -> list[str]:
    """A test's outcome without -> with the monitor, and the first line of why, if it failed."""
    lines = []
    for nodeid, (before, after) in changes.items():
        lines.append(f"  {before} -> {after}  {nodeid}")
        if nodeid in details:
            lines.append(f"      {first_line(details[nodeid])}")
    return lines


def runs_summary(*runs: Run | None) -> dict[str, Any]:
    """The runs' part of a bed's --summary-json."""
    return {
        run.mode: {"counts": run.counts(), "seconds": round(run.seconds, 1)}
        for run in runs
        if run is not None
    }
