"""The Grafana dashboard: structure, variables, and PromQL that sticks to the metrics contract."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from _promtool import run_promtool
from dashboard_queries import (
    iter_panels,
    label_matchers,
    metric_names,
    panel_queries,
    substitute,
)

from session_monitor.exporters.metric_table import ALL_METRICS, POOL_LABEL, STATE_LABEL

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_PATH = ROOT / "grafana" / "dashboards" / "session_monitor.json"

POOL_METRICS = {
    "db_client_connection_count",
    "db_client_connection_max",
    "db_client_connection_pending_requests",
    "db_client_connection_timeouts_total",
    "db_client_connection_wait_time_seconds",
    "db_client_connection_use_time_seconds",
    "db_client_connection_create_time_seconds",
    "sqlalchemy_pool_invalidations_total",
    "sqlalchemy_pool_waited_checkouts_total",
    "sqlalchemy_pool_cancelled_waits_total",
    "sqlalchemy_pool_used_peak",
}
# The database server's side of a pool (docs/database.md), in a row of its own.
DATABASE_METRICS = {
    "sqlalchemy_pool_closed_connections_total",
    "session_monitor_server_connections_allowed",
    "session_monitor_server_view_failures_total",
}
POOL_METRICS |= DATABASE_METRICS
SESSION_METRICS = {
    "sqlalchemy_sessions_opened_total",
    "sqlalchemy_sessions_closed_total",
    "sqlalchemy_sessions_active",
    "sqlalchemy_session_duration_seconds",
    "sqlalchemy_sessions_leaked_total",
    "sqlalchemy_transactions_total",
    "sqlalchemy_transaction_duration_seconds",
    "sqlalchemy_sessions_idle_in_transaction_total",
    "sqlalchemy_session_pitfalls_total",
}
OTHER_METRICS = {"session_monitor_internal_errors_total"}
HISTOGRAMS = {
    "db_client_connection_wait_time_seconds",
    "db_client_connection_use_time_seconds",
    "db_client_connection_create_time_seconds",
    "sqlalchemy_session_duration_seconds",
    "sqlalchemy_transaction_duration_seconds",
}
CONTRACT = POOL_METRICS | SESSION_METRICS | OTHER_METRICS

INSTANCE_FILTERS = {"job": '=~"$job"', "instance": '=~"$instance"'}
REQUIRED_FILTERS = {
    **{m: {**INSTANCE_FILTERS, POOL_LABEL: '=~"$pool_name"'} for m in POOL_METRICS},
    **{m: {**INSTANCE_FILTERS, "route": '=~"$route"'} for m in SESSION_METRICS},
    **{m: INSTANCE_FILTERS for m in OTHER_METRICS},
}
# What session_monitor called its pool and state labels before it took the semantic
# conventions' (as OpenTelemetry's Prometheus exporter spells them).
OLD_LABELS = ("pool_name", "state")

ROWS = ("Overview", "Sessions", "Leaks", "Pool", "Database server", "Transactions", "Pitfalls")
# Where each metric must be drawn (the Overview row repeats some of them).
METRIC_ROWS = {
    **{m: ("Pool",) for m in POOL_METRICS - DATABASE_METRICS},
    **{m: ("Database server",) for m in DATABASE_METRICS},
    "sqlalchemy_sessions_opened_total": ("Sessions",),
    "sqlalchemy_sessions_closed_total": ("Sessions",),
    "sqlalchemy_sessions_active": ("Sessions",),
    "sqlalchemy_session_duration_seconds": ("Sessions",),
    "sqlalchemy_sessions_leaked_total": ("Leaks",),
    "sqlalchemy_transactions_total": ("Transactions",),
    "sqlalchemy_transaction_duration_seconds": ("Transactions",),
    "sqlalchemy_sessions_idle_in_transaction_total": ("Transactions",),
    "sqlalchemy_session_pitfalls_total": ("Pitfalls",),
    "session_monitor_internal_errors_total": ("Overview",),
}
UNITS = {"s", "percentunit", "ops", "reqps", "short"}
TRACEQL = "{ span.session_monitor.leaked = true }"
ALL_VARIABLES = {
    "job": ".*",
    "instance": ".*",
    "pool_name": ".*",
    "route": ".*",
    "__rate_interval": "1m",
    "__range": "1h",
    "__interval": "15s",
}

_IDENTIFIER = r"[A-Za-z_:][\w:]*"


def load_dashboard() -> dict[str, Any]:
    with DASHBOARD_PATH.open(encoding="utf-8") as f:
        dashboard: dict[str, Any] = json.load(f)
    return dashboard


DASHBOARD = load_dashboard()


def visualisations() -> list[dict[str, Any]]:
    return [p for p in iter_panels(DASHBOARD) if p.get("type") != "row"]


def all_exprs() -> list[tuple[str, str]]:
    return [
        (panel["title"], target.get("expr", ""))
        for panel in visualisations()
        for target in panel.get("targets", [])
    ]


def contract_base(name: str) -> str | None:
    if name in CONTRACT:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
            return name.removesuffix(suffix)
    return None


def selectors(expr: str, name: str) -> list[str]:
    """The label matchers ('' when there are none) of every selector of `name` in expr."""
    return [
        m.group(1) or ""
        for m in re.finditer(rf"(?<![\w:]){re.escape(name)}(?![\w:])\s*(\{{[^}}]*\}})?", expr)
    ]


def rows_and_children() -> dict[str, list[dict[str, Any]]]:
    """Row title -> its panels, for expanded rows (panels follow) and collapsed ones (nested)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] | None = None
    for panel in DASHBOARD["panels"]:
        if panel.get("type") == "row":
            current = rows.setdefault(panel["title"], [])
            current.extend(panel.get("panels", []))
        elif current is not None:
            current.append(panel)
    return rows


def test_identity() -> None:
    assert DASHBOARD["uid"] == "session-monitor"
    assert DASHBOARD["title"] == "SQLAlchemy sessions & pool"
    assert 36 <= DASHBOARD["schemaVersion"] <= 41  # Grafana 10.4 to 11.6


def template_variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in DASHBOARD["templating"]["list"]}


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def target_expr(title: str, ref_id: str = "A") -> str:
    (expr,) = [
        target["expr"]
        for panel in visualisations()
        if panel["title"] == title
        for target in panel["targets"]
        if target["refId"] == ref_id
    ]
    return str(expr)


def test_template_variables() -> None:
    variables = template_variables()
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"
    for name in ("job", "instance", "pool_name", "route"):
        variable = variables[name]
        assert variable["type"] == "query", name
        assert variable["datasource"]["uid"] == "${datasource}", name
        assert variable["multi"] is True, name
        assert variable["includeAll"] is True, name
        assert variable["allValue"] == ".*", name
        label = POOL_LABEL if name == "pool_name" else name
        query = variable_query(variable)
        match = re.fullmatch(rf"label_values\(({_IDENTIFIER})(\{{[^}}]*\}})?,\s*{label}\)", query)
        assert match, f"{name}: {query!r} is not label_values(<metric>, {label})"
        assert match.group(1) in CONTRACT, f"{name}: {match.group(1)} is not in the contract"


def test_rows_exist() -> None:
    rows = rows_and_children()
    for title in ROWS:
        assert rows.get(title), f"row {title!r} is missing or empty"


def test_every_panel_is_described_and_queried() -> None:
    panels = visualisations()
    assert len(panels) >= 20
    for panel in panels:
        title = panel.get("title")
        assert title, panel
        assert len(panel.get("description", "")) >= 60, f"{title}: description too short"
        targets = panel.get("targets", [])
        assert targets, f"{title}: no target"
        ref_ids = [t.get("refId") for t in targets]
        assert all(ref_ids), f"{title}: a target has no refId"
        assert len(set(ref_ids)) == len(ref_ids), f"{title}: duplicate refIds {ref_ids}"
        for target in targets:
            assert target.get("expr"), f"{title}: target {target.get('refId')} has no expr"
            assert target["datasource"]["uid"] == "${datasource}", title
        assert panel["datasource"]["uid"] == "${datasource}", title


def test_units_and_thresholds() -> None:
    for panel in visualisations():
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults.get("unit") in UNITS, f"{panel['title']}: unit {defaults.get('unit')}"
        steps = defaults.get("thresholds", {}).get("steps", [])
        assert steps, f"{panel['title']}: no thresholds"
        assert steps[0]["value"] is None, f"{panel['title']}: thresholds lack a base step"


def test_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in DASHBOARD["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_contract_is_the_metrics_table() -> None:
    """The lists above are session_monitor.exporters.metric_table.ALL_METRICS: a new metric needs a panel."""
    names = {spec.name + ("_total" if spec.kind == "counter" else "") for spec in ALL_METRICS}
    assert names == CONTRACT, (
        f"not in the lists of this test: {sorted(names - CONTRACT)}; "
        f"no longer exported: {sorted(CONTRACT - names)}"
    )
    assert {spec.name for spec in ALL_METRICS if spec.kind == "histogram"} == HISTOGRAMS
    for spec in ALL_METRICS:
        name = spec.name + ("_total" if spec.kind == "counter" else "")
        if POOL_LABEL in spec.labels:
            assert name in POOL_METRICS, name
        elif "route" in spec.labels:
            assert name in SESSION_METRICS, name
        else:
            assert name in OTHER_METRICS, name


@pytest.mark.parametrize("metric", sorted(CONTRACT))
def test_every_metric_is_drawn_in_its_row(metric: str) -> None:
    assert set(METRIC_ROWS) == CONTRACT
    rows = rows_and_children()
    for row in METRIC_ROWS[metric]:
        used = {
            contract_base(name)
            for panel in rows[row]
            for target in panel.get("targets", [])
            for name in metric_names(target.get("expr", ""))
        }
        assert metric in used, f"no panel of the {row} row queries {metric}"


@pytest.mark.parametrize(("title", "expr"), all_exprs())
def test_expr_uses_only_contract_metrics(title: str, expr: str) -> None:
    names = metric_names(expr)
    assert names, f"{title}: no metric found in {expr!r}"
    unknown = sorted(n for n in names if contract_base(n) is None)
    assert not unknown, f"{title}: not in the metrics contract: {unknown}"


@pytest.mark.parametrize(("title", "expr"), all_exprs())
def test_expr_filters_by_variables(title: str, expr: str) -> None:
    for name in metric_names(expr):
        base = contract_base(name)
        assert base is not None
        for selector in selectors(expr, name):
            found = label_matchers(selector)
            missing = {k: v for k, v in REQUIRED_FILTERS[base].items() if found.get(k) != v}
            assert not missing, f"{title}: {name}{selector} lacks {missing}"


@pytest.mark.parametrize(("title", "expr"), all_exprs())
def test_one_branch_and_the_conventions_labels(title: str, expr: str) -> None:
    """Every pool exported by session_monitor or by OpenTelemetry's Prometheus exporter carries
    the same labels: no query renames a label or reads the old ones."""
    assert "label_replace" not in expr, title
    matched = {
        label for selector in re.findall(r"\{[^}]*\}", expr) for label in label_matchers(selector)
    }
    grouped = {
        label.strip()
        for labels in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
        for label in labels.split(",")
    }
    assert not (matched | grouped) & set(OLD_LABELS), f"{title}: {expr}"
    reads_pools = any(contract_base(name) in POOL_METRICS for name in metric_names(expr))
    if reads_pools and grouped - {"job", "instance"}:
        # A pool query broken down by anything keeps each pool's series apart.
        assert POOL_LABEL in grouped, title


def test_pools_of_both_exporters_in_one_query(tmp_path: Path) -> None:
    """A pool that session_monitor exports and one that OpenTelemetry's Prometheus exporter
    writes (the same labels, and the instrumentation scope's besides), through promtool: with
    All selected each pool is counted once, and each can be selected alone."""
    own = f'job="app",instance="app:8000",{POOL_LABEL}="app.db"'
    otel = f'job="orders",instance="orders:9464",{POOL_LABEL}="orders",otel_scope_name="session_monitor",otel_scope_version="0.1.0"'

    def series(name: str, labels: str, values: str) -> dict[str, str]:
        return {"series": f"{name}{{{labels}}}", "values": values}

    def case(expr: str, pool: str, *expected: tuple[str, float]) -> dict[str, Any]:
        return {
            "expr": substitute(expr, {**ALL_VARIABLES, "pool_name": pool}),
            "eval_time": "2m",
            "exp_samples": [{"labels": labels, "value": value} for labels, value in expected],
        }

    connections = "Connections: used / idle vs max"
    utilisation = target_expr("Pool utilisation")
    timeouts = target_expr("Checkout timeouts (last 1h)")
    pools = variable_query(template_variables()["pool_name"])
    tests = {
        "rule_files": [],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    series("db_client_connection_count", f'{own},{STATE_LABEL}="idle"', "4x10"),
                    series("db_client_connection_count", f'{own},{STATE_LABEL}="used"', "1x10"),
                    series("db_client_connection_max", own, "5x10"),
                    series("db_client_connection_timeouts_total", own, "0+1x10"),
                    series("db_client_connection_count", f'{otel},{STATE_LABEL}="idle"', "3x10"),
                    series("db_client_connection_count", f'{otel},{STATE_LABEL}="used"', "2x10"),
                    series("db_client_connection_max", otel, "8x10"),
                    series("db_client_connection_timeouts_total", otel, "0+2x10"),
                ],
                "promql_expr_test": [
                    case(
                        f"count by ({POOL_LABEL}) ("
                        + pools.removeprefix("label_values(").rsplit(",", 1)[0]
                        + ")",
                        ".*",
                        (f'{{{POOL_LABEL}="app.db"}}', 2),
                        (f'{{{POOL_LABEL}="orders"}}', 2),
                    ),
                    case(
                        target_expr(connections),
                        ".*",
                        (f'{{{POOL_LABEL}="app.db",{STATE_LABEL}="idle"}}', 4),
                        (f'{{{POOL_LABEL}="app.db",{STATE_LABEL}="used"}}', 1),
                        (f'{{{POOL_LABEL}="orders",{STATE_LABEL}="idle"}}', 3),
                        (f'{{{POOL_LABEL}="orders",{STATE_LABEL}="used"}}', 2),
                    ),
                    case(
                        target_expr(connections),
                        "orders",
                        (f'{{{POOL_LABEL}="orders",{STATE_LABEL}="idle"}}', 3),
                        (f'{{{POOL_LABEL}="orders",{STATE_LABEL}="used"}}', 2),
                    ),
                    case(
                        target_expr(connections, "B"),
                        ".*",
                        (f'{{{POOL_LABEL}="app.db"}}', 5),
                        (f'{{{POOL_LABEL}="orders"}}', 8),
                    ),
                    case(
                        utilisation,
                        ".*",
                        (f'{{{POOL_LABEL}="app.db"}}', 0.2),
                        (f'{{{POOL_LABEL}="orders"}}', 0.25),
                    ),
                    case(timeouts, ".*", ("{}", 8 + 16)),
                    case(timeouts, "app.db", ("{}", 8)),
                    case(timeouts, "orders", ("{}", 16)),
                ],
            }
        ],
    }
    path = tmp_path / "pool_forms.test.json"
    path.write_text(json.dumps(tests), encoding="utf-8")  # JSON is YAML
    run_promtool("test", "rules", path)


def test_leak_panels_link_to_tempo() -> None:
    leak_panels = rows_and_children()["Leaks"]
    assert len(leak_panels) >= 3
    for panel in leak_panels:
        links = panel.get("links", []) + panel["fieldConfig"]["defaults"].get("links", [])
        urls = [unquote(link["url"]) for link in links]
        assert any(
            url.startswith("/explore") and '"uid":"tempo"' in url and json.dumps(TRACEQL) in url
            for url in urls
        ), f"{panel['title']}: no Explore link to Tempo with {TRACEQL}"


def test_panel_queries_covers_every_target() -> None:
    queries = panel_queries(DASHBOARD, ALL_VARIABLES)
    assert len(queries) == len(all_exprs())
    for title, expr in queries:
        assert not re.search(r"\$[A-Za-z_{]", expr), f"{title}: unsubstituted variable in {expr!r}"
    assert any("[1m]" in expr for _, expr in queries)
    assert any("offset 1h" in expr for _, expr in queries)


def test_panel_queries_reaches_into_collapsed_rows() -> None:
    target = {"refId": "A", "expr": 'rate(x{job=~"$job"}[$__rate_interval])'}
    dashboard = {
        "panels": [
            {"type": "row", "title": "Open", "collapsed": False, "panels": []},
            {"type": "timeseries", "title": "top", "targets": [target]},
            {
                "type": "row",
                "title": "Closed",
                "collapsed": True,
                "panels": [{"type": "stat", "title": "nested", "targets": [target]}],
            },
        ]
    }
    assert panel_queries(dashboard, {"job": "a|b", "__rate_interval": "2m"}) == [
        ("top", 'rate(x{job=~"a|b"}[2m])'),
        ("nested", 'rate(x{job=~"a|b"}[2m])'),
    ]


def test_substitute_handles_braces_and_refuses_unknown_variables() -> None:
    assert substitute("x[${__range}] offset $__range", {"__range": "5m"}) == "x[5m] offset 5m"
    assert substitute('{a=~"${job:regex}"}', {"$job": "j"}) == '{a=~"j"}'
    assert substitute('label_replace(x, "a", "$1", "b", "(.+)")', {}) == (
        'label_replace(x, "a", "$1", "b", "(.+)")'
    )
    with pytest.raises(KeyError, match="__interval"):
        substitute("x[$__interval]", {"__range": "5m"})


def test_panel_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every query, written out as recording rules."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(panel_queries(DASHBOARD, ALL_VARIABLES))
                ],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.json"
    path.write_text(json.dumps(rules), encoding="utf-8")  # JSON is YAML
    run_promtool("check", "rules", path)


def test_pitfall_panels_answer_before_the_first_pitfall(tmp_path: Path) -> None:
    """The pitfall counter has no series until its first count: the Pitfalls row's queries fall
    back to zeros (so the panels, and the end-to-end test, get an answer), which give way to the
    counted series, its first sample counted, once there is one."""
    queries = panel_queries({"panels": rows_and_children()["Pitfalls"]}, ALL_VARIABLES)
    assert len(queries) == 2, queries
    (_, by_interval), (_, last_hour) = queries
    clean, buggy = 'route="/items",method="GET"', 'route="/orders",method="POST"'
    pitfall = f'kind="nested_checkout",{buggy}'

    def series(name: str, labels: str, values: str) -> dict[str, str]:
        return {"series": f'{name}{{job="app",instance="app:8000",{labels}}}', "values": values}

    def case(expr: str, at: str, *expected: tuple[str, int]) -> dict[str, Any]:
        return {
            "expr": expr,
            "eval_time": at,
            "exp_samples": [{"labels": f"{{{labels}}}", "value": v} for labels, v in expected],
        }

    tests = {
        "rule_files": [],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    series("sqlalchemy_sessions_opened_total", clean, "0+1x40"),
                    series("sqlalchemy_sessions_opened_total", buggy, "0+1x40"),
                    series("sqlalchemy_session_pitfalls_total", pitfall, "_x12 1x28"),  # 1 at 3m
                ],
                "promql_expr_test": [
                    # Before: a zero line per route that opened sessions; one zero row.
                    case(by_interval, "2m", (clean, 0), (buggy, 0)),
                    case(last_hour, "2m", ("", 0)),
                    # The first sample counts, and replaces its route's zero line and the row.
                    case(by_interval, "3m", (clean, 0), (pitfall, 1)),
                    case(last_hour, "3m", (pitfall, 1)),
                    # Over the interval it is gone from the bars (nothing new), not from the hour.
                    case(by_interval, "5m", (clean, 0), (pitfall, 0)),
                    case(last_hour, "5m", (pitfall, 1)),
                ],
            }
        ],
    }
    path = tmp_path / "pitfall_panels.test.json"
    path.write_text(json.dumps(tests), encoding="utf-8")  # JSON is YAML
    run_promtool("test", "rules", path)
