"""The benchmark runs end to end (``python -m benchmarks --quick``) and prints every row.

Tiny iteration counts: this checks that each table is produced with numbers that parse, never
how fast anything is.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The quick run alone takes a minute and a half on 2 cores.
pytestmark = pytest.mark.slow

NUMBER = r"-?\d+(?:\.\d+)?"
RATIO = re.compile(rf"^({NUMBER}) \(({NUMBER})-({NUMBER})\)( A/A)?$")
DELTA = re.compile(rf"^[+-]{NUMBER}$")
VERDICT = re.compile(r"(PASS|MISS)$")

WORKLOADS = (
    "session lifecycle",
    "session of 5 statements",
    "Core connect()+execute",
    "engine.connect().close()",
    "pool.connect().close()",
    "engine.raw_connection().close()",
)
ALWAYS_RUN = ("bare", "session_monitor default", "session_monitor capture_stacks=True")
PEERS = ("opentelemetry-instrumentation-sqlalchemy", "fastapi-sqlalchemy-monitor")
OPTIONAL = ("session_monitor + OTel (tracing.py)", *PEERS)
# The operations on which session_monitor's cost is compared with the peers' against a target.
PEER_TARGETS = (
    "session lifecycle",
    "session of 5 statements",
    "Core connect()+execute",
    "engine.connect().close()",
    "engine.raw_connection().close()",
)


@dataclass
class Run:
    stdout: str
    results: Path
    tables: dict[str, list[list[str]]]

    def table(self, title_start: str) -> list[list[str]]:
        found = [rows for title, rows in self.tables.items() if title.startswith(title_start)]
        assert len(found) == 1, f"expected one table titled {title_start!r}:\n{self.stdout}"
        return found[0]


def _tables(stdout: str) -> dict[str, list[list[str]]]:
    """Markdown tables by title: their body rows, cells stripped."""
    tables: dict[str, list[list[str]]] = {}
    rows: list[list[str]] | None = None
    for line in stdout.splitlines():
        if line.startswith("### "):
            rows = tables[line[4:]] = []
        elif line.startswith("|") and rows is not None:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows.append(cells)
    # drop each table's header and separator
    return {title: body[2:] for title, body in tables.items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    results = tmp_path_factory.mktemp("bench") / "RESULTS.md"
    command = [sys.executable, "-m", "benchmarks", "--quick", "--output", str(results)]
    if shutil.which("wrk") is None:
        command += ["--only", "micro,instructions,asgi,scale,memory"]
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"benchmark failed:\n{done.stdout}\n{done.stderr}"
    return Run(done.stdout, results, _tables(done.stdout))


def _numbers(*cells: str) -> None:
    for cell in cells:
        float(cell)  # raises on anything but a number


def test_micro_has_every_operation_and_variant(run: Run) -> None:
    rows = run.table("micro:")
    by_key = {(row[0], row[1]): row for row in rows}
    for workload in WORKLOADS:
        for variant in ALWAYS_RUN:
            row = by_key[(workload, variant)]
            _numbers(row[2])
            assert row[3] == "—" or DELTA.match(row[3]), row
            assert RATIO.match(row[4]), row
        for variant in OPTIONAL:
            row = by_key[(workload, variant)]
            if row[2] != "skipped":
                _numbers(row[2])
                assert RATIO.match(row[4]), row
    targets = [row for row in rows if row[5]]
    assert len(targets) == 5  # lifecycle (default, stacks), connect, both checkouts
    assert all(VERDICT.search(row[5]) for row in targets)


def test_micro_peer_table(run: Run) -> None:
    rows = run.table("micro vs peers:")
    assert [row[0] for row in rows] == list(WORKLOADS)
    for row in rows:
        assert DELTA.match(row[1]), row
        for cell in row[2 : 2 + len(PEERS)]:
            assert cell == "skipped" or DELTA.match(cell), row
        lower, own_ratio, noise, target = row[2 + len(PEERS) :]
        assert lower in ("yes", "no", "— (no peer ran)"), row
        assert RATIO.match(own_ratio) and RATIO.match(noise), row
        if row[0] in PEER_TARGETS:
            assert "lower than every peer" in target and VERDICT.search(target), row
        else:
            assert target == "", row
    (connect,) = [row for row in rows if row[0] == "engine.connect().close()"]
    assert "≤+3 µs" in connect[-1]


def test_scale_tables(run: Run) -> None:
    threads = run.table("scale: wall time per session lifecycle vs threads")
    pools = run.table("scale: wall time per session lifecycle vs pool size")
    held = run.table("scale: one more session lifecycle")
    assert [int(row[0]) for row in threads] == [1, 8]
    assert [int(row[1]) for row in pools] == [1, 4]
    assert [int(row[0]) for row in held] == [1, 100]
    for row in threads + pools:
        _numbers(row[2], row[3])
        assert DELTA.match(row[4]) and RATIO.match(row[5]), row
    for row in held:
        assert row[1].isdigit(), row
        _numbers(row[2], row[3], row[6], row[7], row[8])
        assert DELTA.match(row[4]) and RATIO.match(row[5]), row


def test_memory_table(run: Run) -> None:
    (row,) = run.table("memory:")
    assert re.match(r"^\d+ \(\+\d+\)$", row[0])
    assert re.match(r"^\d+→\d+$", row[1]) and re.match(r"^\d+→\d+$", row[2])
    _numbers(row[3], row[4], row[5], row[6])
    assert VERDICT.search(row[7])


def test_asgi_table(run: Run) -> None:
    rows = run.table("asgi: GET")
    assert [int(row[0]) for row in rows] == [1, 8]
    for row in rows:
        _numbers(row[1], row[2])
        assert DELTA.match(row[3]) and RATIO.match(row[4]), row
        # fastapi-sqlalchemy-monitor's columns
        if row[5] == "skipped":
            assert row[6:] == ["—", "—"], row
        else:
            _numbers(row[5])
            assert DELTA.match(row[6]) and RATIO.match(row[7]), row


def test_http_tables(run: Run) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed: the HTTP benchmark needs it (apt-get install wrk)")
    summary = run.table("http: GET")
    assert [row[0] for row in summary] == ["bare", "monitored"]
    for row in summary:
        _numbers(row[1], row[2], row[3])
    assert RATIO.match(summary[1][4]) and VERDICT.search(summary[1][6])
    runs = run.table("http: every wrk run")
    assert len(runs) == 2
    for row in runs:
        _numbers(row[2], row[3], row[4], row[5], row[6])


def test_targets_and_results_file(run: Run) -> None:
    targets = run.table("targets")
    assert len(targets) >= 6
    assert all(VERDICT.search(row[2]) for row in targets), targets
    written = run.results.read_text(encoding="utf-8")
    assert written.startswith("# session_monitor benchmark results")
    for fact in ("CPU:", "cores", "Python", "sqlalchemy", "prometheus-client", "date:"):
        assert fact in written
    assert "### micro:" in written and "### memory:" in written


def test_instruction_counts_are_printed(run: Run) -> None:
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed: the instructions section is skipped")
    (lifecycle,) = run.table("instructions: CPU instructions per operation")
    assert lifecycle[0] == "session lifecycle"
    # --quick counts 10 operations: a number, not yet a meaningful one.
    assert lifecycle[1].replace(",", "").lstrip("-").isdigit()
