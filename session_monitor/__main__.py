"""Write the dashboard or the alert rules shipped with session_monitor to standard output.

::

    python -m session_monitor dashboard > session_monitor.json        # Grafana, uid session-monitor
    python -m session_monitor rules > session_monitor.rules.yml       # Prometheus alerting rules
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.resources import files
from typing import NoReturn

# command -> (file in session_monitor/assets/, what it is)
ASSETS = {
    "dashboard": ("session_monitor.json", "the Grafana dashboard (JSON)"),
    "rules": ("session_monitor.rules.yml", "the Prometheus alerting rules (YAML)"),
}
ADVICE = (
    "name the file to write: `python -m session_monitor dashboard > session_monitor.json` "
    "or `python -m session_monitor rules > session_monitor.rules.yml`"
)


def asset(command: str) -> bytes:
    """The packaged file for `command` (``"dashboard"`` or ``"rules"``), byte for byte."""
    return files("session_monitor").joinpath("assets").joinpath(ASSETS[command][0]).read_bytes()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # advice first, then what was wrong, then usage
        self.exit(2, f"{self.prog}: {ADVICE} ({message})\n{self.format_usage()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m session_monitor",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="commands:\n"
        + "".join(f"  {name:<10} {what}\n" for name, (_, what) in ASSETS.items())
        + "\ne.g. python -m session_monitor dashboard > session_monitor.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", metavar="{" + ",".join(ASSETS) + "}", help="see commands")
    command = parser.parse_args(argv).command
    if command not in ASSETS:
        parser.error(f"{command!r} is not a command")
    try:
        sys.stdout.buffer.write(asset(command))
        sys.stdout.buffer.flush()
    except BrokenPipeError:  # `... | head`: the reader left; stay quiet at exit too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
