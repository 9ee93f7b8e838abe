"""The first law, checked the way SQLAlchemy's own dialects and extensions check themselves: run
SQLAlchemy's test suite (the release installed here) without and with a monitor watching every
engine, and require the same outcome for every test and no internal error of the monitor.

`python -m tests.upstream.run` does the work (see its docstring); this runs it in a subprocess,
so the monitor's hooks never touch this process. The suite is fetched once with pip into
`.cache/upstream/`; without it (no network) these tests skip and say why.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_bed

# About 2 minutes on SQLite and 1.5 on PostgreSQL on 2 cores; the limit is for a hung run only.
TIMEOUT = 1800

pytestmark = [pytest.mark.upstream, pytest.mark.slow]


def compare(tmp_path: Path, *args: str) -> None:
    run_bed(
        tmp_path,
        "tests.upstream.run",
        "--compare",
        *args,
        timeout=TIMEOUT,
        suite="SQLAlchemy's test suite",
    )


def test_sqlalchemy_suite_on_sqlite(tmp_path: Path) -> None:
    compare(tmp_path, "--db", "sqlite")


@pytest.mark.postgres
def test_sqlalchemy_suite_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    # Only the backend tests: the others use no database, or SQLite whatever the URL, and
    # have run in the SQLite test already. run.py reads the URL from the same variable.
    compare(tmp_path, "--db", "postgresql", "--backend-only")
