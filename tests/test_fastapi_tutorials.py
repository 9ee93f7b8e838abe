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

from pathlib import Path

import pytest
from conftest import run_bed

# About 10 s on 2 cores; the limit is for a hung run only.
TIMEOUT = 600

pytestmark = [pytest.mark.tutorials, pytest.mark.slow]


def test_fastapi_tutorials_same_with_the_monitor(tmp_path: Path) -> None:
    run_bed(
        tmp_path, "tests.fastapi_tutorials.run", timeout=TIMEOUT, suite="FastAPI's tutorial tests"
    )
