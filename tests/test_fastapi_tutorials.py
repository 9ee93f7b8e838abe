"""FastAPI's own tutorial tests, on apps nobody here wrote: run them (the release installed here)
without and with one monitor watching every engine and instrumenting every app they build, and
require the same outcome for every test, no internal error and no WARNING of the monitor, and for
every request the route label FastAPI's own telemetry reports for it.

`python -m tests.fastapi_tutorials.run` does the work (see its docstring); this runs it in a
subprocess, so no hook of the monitor touches this process. The tests are fetched once with pip
into `.cache/fastapi_tutorials/`; without them (no network, or a release whose sdist does not
ship them) this skips and says why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# About 10 s on 2 cores; the limit is for a hung run only.
TIMEOUT = 600
SUITE_UNAVAILABLE = 3

pytestmark = pytest.mark.tutorials


def test_fastapi_tutorials_same_with_the_monitor(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    command = [sys.executable, "-m", "tests.fastapi_tutorials.run"]
    command += ["--summary-json", str(summary_path)]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    if done.returncode == SUITE_UNAVAILABLE:
        pytest.skip(f"FastAPI's tutorial tests could not be obtained: {done.stderr.strip()}")
    if done.returncode == 0:
        return
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        pytest.fail("\n".join(summary["report"]), pytrace=False)
    output = (done.stdout + done.stderr).strip().splitlines()
    pytest.fail(
        f"{' '.join(command)} exited {done.returncode}:\n" + "\n".join(output[-30:]),
        pytrace=False,
    )
