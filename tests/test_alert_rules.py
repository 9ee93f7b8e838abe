"""The Prometheus alerting rules: valid, unit-tested both ways, documented in the runbook."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from _promtool import run_promtool

from session_monitor.findings.pitfalls import KINDS

ROOT = Path(__file__).resolve().parents[1]
RULE_FILES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
RULE_TEST_FILES = sorted((ROOT / "prometheus" / "tests").glob("*.yml"))
RUNBOOK = ROOT / "docs" / "runbook.md"

# alert -> (severity, for, the counter whose first sample must count, if any)
REQUIRED_ALERTS = {
    "SQLAlchemySessionLeaked": ("warning", "0m", "sqlalchemy_sessions_leaked_total"),
    "SQLAlchemyPoolNearSaturation": ("warning", "5m", None),
    "SQLAlchemyPoolCheckoutTimeouts": ("critical", "0m", "db_client_connection_timeouts_total"),
    "SQLAlchemySlowCheckouts": ("warning", "5m", None),
    "SQLAlchemyHighRollbackRatio": ("warning", "10m", None),
    "SQLAlchemySessionIdleInTransaction": (
        "warning",
        "0m",
        "sqlalchemy_sessions_idle_in_transaction_total",
    ),
    "SQLAlchemySessionPitfall": ("warning", "0m", "sqlalchemy_session_pitfalls_total"),
    "SessionMonitorInternalErrors": ("warning", "0m", "session_monitor_internal_errors_total"),
    "SessionMonitorPoolsExceedServerLimit": ("warning", "15m", None),
}


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def alerts() -> dict[str, dict[str, Any]]:
    return {
        rule["alert"]: rule
        for path in RULE_FILES
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def rule_tests() -> list[dict[str, Any]]:
    return [test for path in RULE_TEST_FILES for test in load_yaml(path)["tests"]]


def github_anchor(heading: str) -> str:
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def runbook_anchors() -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.+)$", RUNBOOK.read_text(encoding="utf-8"), re.MULTILINE)
    return {github_anchor(h) for h in headings}


def test_promtool_check_rules() -> None:
    assert RULE_FILES, "no rule file in prometheus/rules/"
    output = run_promtool("check", "rules", *RULE_FILES)
    assert "SUCCESS" in output


@pytest.mark.slow  # promtool's own test run: about 12 s on 2 cores
def test_promtool_unit_tests_pass() -> None:
    assert RULE_TEST_FILES, "no rule test file in prometheus/tests/"
    output = run_promtool("test", "rules", *RULE_TEST_FILES)
    assert "SUCCESS" in output


@pytest.mark.parametrize("name", REQUIRED_ALERTS)
def test_required_alert(name: str) -> None:
    severity, for_, _ = REQUIRED_ALERTS[name]
    rule = alerts().get(name)
    assert rule is not None, f"alert {name} is missing"
    assert rule["labels"]["severity"] == severity
    assert str(rule.get("for", "0m")) == for_
    annotations = rule["annotations"]
    assert annotations["summary"].strip()
    assert "$labels" in annotations["description"]


@pytest.mark.parametrize("name", REQUIRED_ALERTS)
def test_runbook_url_points_at_a_runbook_section(name: str) -> None:
    url = alerts()[name]["annotations"]["runbook_url"]
    path, _, anchor = url.partition("#")
    assert path == "docs/runbook.md", url
    assert anchor in runbook_anchors(), f"{url}: no heading with anchor #{anchor} in {RUNBOOK.name}"


@pytest.mark.parametrize("kind", KINDS)
def test_every_pitfall_kind_has_its_runbook_entry(kind: str) -> None:
    """SQLAlchemySessionPitfall's description sends the reader to docs/runbook.md#<kind>."""
    description = alerts()["SQLAlchemySessionPitfall"]["annotations"]["description"]
    assert "docs/runbook.md#{{ $labels.kind }}" in description
    assert kind in runbook_anchors(), f"no heading with anchor #{kind} in {RUNBOOK.name}"


@pytest.mark.parametrize("name", sorted(alerts()))
def test_every_alert_is_tested_firing_and_silent(name: str) -> None:
    cases = [
        case
        for test in rule_tests()
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == name
    ]
    assert any(case.get("exp_alerts") for case in cases), f"{name}: no case where it fires"
    assert any(not case.get("exp_alerts") for case in cases), f"{name}: no case where it is silent"
    for case in cases:
        for alert in case.get("exp_alerts") or []:
            assert alert.get("exp_labels"), name
            assert alert.get("exp_annotations"), name


@pytest.mark.parametrize(
    "name", [name for name, (_, _, counter) in REQUIRED_ALERTS.items() if counter]
)
def test_first_sample_of_a_counter_is_tested(name: str) -> None:
    """A test feeds a counter that is absent, then born at 1, and expects the alert."""
    counter = REQUIRED_ALERTS[name][2]
    assert counter is not None

    def born_at_one(series: dict[str, Any]) -> bool:
        values = str(series["values"]).split()
        return (
            series["series"].startswith(counter + "{")
            and values[0].startswith("_")
            and values[1].startswith("1")
        )

    assert any(
        any(born_at_one(series) for series in test["input_series"])
        and any(
            case["alertname"] == name and case.get("exp_alerts")
            for case in test.get("alert_rule_test", [])
        )
        for test in rule_tests()
    ), f"{name}: no test where {counter} first appears at 1 and the alert fires"
