"""Find and run promtool; skip without it, except on CI where its absence is a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def require_promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool is not on PATH (Debian/Ubuntu: apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must install it")
        pytest.skip(reason)
    return path


def run_promtool(*args: str | Path) -> str:
    """Run promtool from the repository root; fail with its output unless it succeeds."""
    command = [require_promtool(), *map(str, args)]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{output}", pytrace=False)
    return output
