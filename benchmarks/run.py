"""``python -m benchmarks``: run every section, print the tables, write benchmarks/RESULTS.md."""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from . import asgi, http_load, instructions, memory, micro, scale
from .common import Table, Target
from .variants import available

SECTIONS = ("micro", "instructions", "http", "asgi", "scale", "memory")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS.md"
PACKAGES = (
    "sqlalchemy",
    "prometheus-client",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-sqlalchemy",
    "fastapi-sqlalchemy-monitor",
    "fastapi",
    "uvicorn",
)


def _progress(message: str) -> None:
    print(f"[benchmarks] {message}", file=sys.stderr, flush=True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _command_output(*command: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "unavailable"


def machine() -> list[str]:
    """One line per fact about where and with what the benchmark ran."""
    root = Path(__file__).resolve().parent.parent
    commit = _command_output("git", "-C", str(root), "rev-parse", "--short", "HEAD")
    try:
        dirty = (
            subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "session_monitor"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
            != ""
        )
    except (OSError, subprocess.TimeoutExpired):
        dirty = False
    try:
        with open("/proc/loadavg", encoding="utf-8") as loadavg:
            load = " ".join(loadavg.read().split()[:3])
    except OSError:
        load = "unknown"
    versions = ", ".join(f"{package} {_version(package)}" for package in PACKAGES)
    return [
        f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"CPU: {_cpu_model()}, {os.cpu_count()} cores; load average at start {load}",
        f"Python {platform.python_version()} ({platform.python_implementation()}) on "
        f"{platform.system()} {platform.release()}",
        f"{versions}, wrk {_command_output('wrk', '-v').split(' [')[0].removeprefix('wrk ')}",
        f"session_monitor at commit {commit}"
        + (" with uncommitted changes in session_monitor/" if dirty else ""),
    ]


def _targets_table(targets: Sequence[Target]) -> Table:
    table = Table(
        "targets",
        "targets (ratios to bare measured in the same run)",
        ("target", "measured", "verdict", "why it is missed"),
    )
    for target in targets:
        why = target.why if target.verdict.endswith("MISS") else ""
        table.add(target.name, target.measured, target.verdict, why)
    return table


def render(
    tables: Sequence[Table],
    targets: Sequence[Target],
    facts: Sequence[str],
    noise: Sequence[str],
    command: str,
    seconds: float,
    durations: Sequence[str],
) -> str:
    parts = [
        "# session_monitor benchmark results",
        "",
        f"Written by `{command}` in {seconds:.0f} s ({', '.join(durations)}). "
        "See benchmarks/README.md for how to read the tables.",
        "",
        *(f"- {fact}" for fact in facts),
        "",
        _targets_table(targets).render(),
        "",
    ]
    if noise:
        parts += ["### noise (bare blocks against their bare neighbours, micro)", ""]
        parts += [f"- {line}" for line in noise]
        parts.append("")
    for table in tables:
        parts += [table.render(), ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure what session_monitor costs per session, checkout and request.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny iteration counts: checks that everything runs (seconds)",
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"write the results here (default {DEFAULT_OUTPUT.name} next to "
        "this file, or nowhere with --quick)",
    )
    parser.add_argument("--no-output", action="store_true", help="write no results file")
    args = parser.parse_args(argv)
    sections = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {SECTIONS}")
    output: Path | None = args.output
    if output is None and not args.quick:
        output = DEFAULT_OUTPUT
    if args.no_output:
        output = None

    quick = args.quick
    command = "python -m benchmarks" + (" --quick" if quick else "")
    if args.only != ",".join(SECTIONS):
        command += f" --only {args.only}"
    # What exists now (modules, the app's imports) is never garbage: keep collections short.
    gc.collect()
    gc.freeze()
    started = time.perf_counter()
    facts = machine()
    for fact in facts:
        _progress(fact)
    tables: list[Table] = []
    targets: list[Target] = []
    noise: list[str] = []
    durations: list[str] = []

    section_started = time.perf_counter()

    def show(section: str, new: Sequence[Table]) -> None:
        nonlocal section_started
        seconds = time.perf_counter() - section_started
        for table in new:
            print(table.render(), end="\n\n", flush=True)
        tables.extend(new)
        durations.append(f"{section} {seconds:.0f} s")
        section_started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="session-monitor-bench-") as scratch:
        workdir = Path(scratch)
        db_path = str(workdir / "bench.db")
        if "micro" in sections:
            variants, skipped = available(str(workdir / "probe.db"))
            for label, reason in skipped.values():
                _progress(f"micro: skipping {label}: {reason}")
            new, found, noise = micro.run(
                micro.QUICK if quick else micro.FULL, db_path, variants, skipped, _progress
            )
            show("micro", new)
            targets += found
        if "instructions" in sections:
            variants, _ = available(str(workdir / "probe.db"))
            new, found = instructions.run(
                instructions.QUICK if quick else instructions.FULL, variants, _progress
            )
            show("instructions", new)
            targets += found
        if "http" in sections:
            new, found = http_load.run(
                http_load.QUICK if quick else http_load.FULL, workdir, _progress
            )
            show("http", new)
            targets += found
        if "asgi" in sections:
            new, found = asgi.run(asgi.QUICK if quick else asgi.FULL, workdir, _progress)
            show("asgi", new)
            targets += found
        if "scale" in sections:
            new, found = scale.run(scale.QUICK if quick else scale.FULL, db_path, _progress)
            show("scale", new)
            targets += found
        if "memory" in sections:
            table, found = memory.run(memory.QUICK if quick else memory.FULL, db_path, _progress)
            show("memory", [table])
            targets += found

    seconds = time.perf_counter() - started
    print(_targets_table(targets).render(), end="\n\n")
    if noise:
        print("noise (micro, bare vs bare): " + "; ".join(noise))
    if output is not None:
        text = render(tables, targets, facts, noise, command, seconds, durations)
        output.write_text(text, encoding="utf-8")
        _progress(f"wrote {output}")
    _progress(f"done in {seconds:.0f} s ({', '.join(durations)})")
    return 0
