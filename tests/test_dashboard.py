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

from session_monitor.metric_table import ALL_METRICS

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
# The OpenTelemetry connection-pool conventions: the Pool row reads them in both label forms.
SEMCONV_METRICS = {m for m in POOL_METRICS if m.startswith("db_client_connection_")}
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
    **{m: INSTANCE_FILTERS for m in POOL_METRICS},  # + the pool, in one of the two forms
    **{m: {**INSTANCE_FILTERS, "route": '=~"$route"'} for m in SESSION_METRICS},
    **{m: INSTANCE_FILTERS for m in OTHER_METRICS},
}
# session_monitor's pool and state labels, and what OpenTelemetry's Prometheus exporter makes of
# the attributes db.client.connection.pool.name and db.client.connection.state.
OWN_POOL, OTEL_POOL = "pool_name", "db_client_connection_pool_name"
OWN_STATE, OTEL_STATE = "state", "db_client_connection_state"
RENAME_POOL = f'"{OWN_POOL}", "$1", "{OTEL_POOL}", "(.+)"'
RENAME_STATE = f'"{OWN_STATE}", "$1", "{OTEL_STATE}", "(.+)"'

ROWS = ("Overview", "Sessions", "Leaks", "Pool", "Transactions", "Pitfalls")
# Where each metric must be drawn (the Overview row repeats some of them).
METRIC_ROWS = {
    **{m: ("Pool",) for m in POOL_METRICS},
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
    "pool_name": ".+",  # its allValue: see test_pool_variable_finds_both_label_forms
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
    assert 36 <= DASHBOARD["schemaVersion"] <= 41


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
        if name == "pool_name":
            continue  # test_pool_variable_finds_both_label_forms
        assert variable["allValue"] == ".*", name
        query = variable_query(variable)
        match = re.fullmatch(rf"label_values\(({_IDENTIFIER})(\{{[^}}]*\}})?,\s*{name}\)", query)
        assert match, f"{name}: {query!r} is not label_values(<metric>, {name})"
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
    """The lists above are session_monitor.metric_table.ALL_METRICS: a new metric needs a panel."""
    names = {spec.name + ("_total" if spec.kind == "counter" else "") for spec in ALL_METRICS}
    assert names == CONTRACT, (
        f"not in the lists of this test: {sorted(names - CONTRACT)}; "
        f"no longer exported: {sorted(CONTRACT - names)}"
    )
    assert {spec.name for spec in ALL_METRICS if spec.kind == "histogram"} == HISTOGRAMS
    for spec in ALL_METRICS:
        name = spec.name + ("_total" if spec.kind == "counter" else "")
        if "pool_name" in spec.labels:
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
            if base in POOL_METRICS:
                # Semantic-convention metrics in either label form, session_monitor's own in its.
                forms = (OWN_POOL, OTEL_POOL) if base in SEMCONV_METRICS else (OWN_POOL,)
                pools = [label for label in forms if found.get(label) == '=~"$pool_name"']
                assert len(pools) == 1, f"{title}: {name}{selector} filters no pool by {forms}"


def semconv_exprs() -> list[tuple[str, str]]:
    return [
        (title, expr)
        for title, expr in all_exprs()
        if any(contract_base(name) in SEMCONV_METRICS for name in metric_names(expr))
    ]


@pytest.mark.parametrize(("title", "expr"), semconv_exprs())
def test_semconv_queries_read_both_label_forms(title: str, expr: str) -> None:
    """Every selector of a semantic-convention metric has a twin in the OpenTelemetry exporter's
    form (same filters, its state label for ours), and where the result is grouped by pool or
    state, that twin's labels are renamed to ours."""
    otel_selectors = 0
    for name in metric_names(expr):
        if contract_base(name) not in SEMCONV_METRICS:
            continue
        own, otel = [], []
        for selector in selectors(expr, name):
            found = label_matchers(selector)
            if OTEL_POOL in found:
                assert OWN_POOL not in found and OWN_STATE not in found, f"{title}: {selector}"
                otel.append((found.get(OTEL_STATE), found.pop(OTEL_POOL)))
            else:
                own.append((found.get(OWN_STATE), found.pop(OWN_POOL)))
        assert own, f"{title}: {name} is read only in the OpenTelemetry exporter's form"
        assert sorted(own, key=str) == sorted(otel, key=str), (
            f"{title}: {name} in session_monitor's form {own}, in the exporter's {otel}"
        )
        otel_selectors += len(otel)
    grouped = {
        label.strip()
        for labels in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
        for label in labels.split(",")
    }
    assert not grouped & {OTEL_POOL, OTEL_STATE}, f"{title}: grouped by {grouped}"
    if OWN_POOL in grouped:
        assert expr.count(RENAME_POOL) == otel_selectors, f"{title}: not every pool renamed"
    if OWN_STATE in grouped:
        assert expr.count(RENAME_STATE) == otel_selectors, f"{title}: not every state renamed"


def test_pool_variable_finds_both_label_forms(tmp_path: Path) -> None:
    """The Pool variable lists the pools of both forms, and its All is `.+`: no series lacks the
    pool label of its form, while `.*` would also match the label's absence, so that a query's
    session_monitor branch would take in the other form's series too (counted twice, once
    without a pool). Both forms at once, through promtool: no pool counted twice or lost."""
    variable = template_variables()["pool_name"]
    assert variable["allValue"] == ".+"
    query = variable_query(variable)
    assert variable["definition"] == query
    assert variable["query"]["qryType"] == 3  # query_result
    match = re.fullmatch(r"query_result\((.+)\)", query)
    assert match, query
    pools = match.group(1)
    assert metric_names(pools) == {"db_client_connection_count"}
    assert RENAME_POOL in pools
    regex = variable["regex"]
    assert regex.startswith("/") and regex.endswith("/"), regex
    # What Grafana matches it against: query_result's lines.
    for line, pool in (('{pool_name="db:5432/app"} 2 1712345678000', "db:5432/app"),):
        found = re.search(regex[1:-1], line)
        assert found and found.group(1) == pool

    own = 'job="app",instance="app:8000",pool_name="app.db"'
    otel = 'job="orders",instance="orders:9464",db_client_connection_pool_name="orders",otel_scope_name="pool"'

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
    tests = {
        "rule_files": [],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    series("db_client_connection_count", f'{own},state="idle"', "4x10"),
                    series("db_client_connection_count", f'{own},state="used"', "1x10"),
                    series("db_client_connection_max", own, "5x10"),
                    series("db_client_connection_timeouts_total", own, "0+1x10"),
                    series(
                        "db_client_connection_count",
                        f'{otel},db_client_connection_state="idle"',
                        "3x10",
                    ),
                    series(
                        "db_client_connection_count",
                        f'{otel},db_client_connection_state="used"',
                        "2x10",
                    ),
                    series("db_client_connection_max", otel, "8x10"),
                    series("db_client_connection_timeouts_total", otel, "0+2x10"),
                ],
                "promql_expr_test": [
                    case(
                        pools,
                        ".+",
                        ('{pool_name="app.db"}', 2),
                        ('{pool_name="orders"}', 2),
                    ),
                    case(
                        target_expr(connections),
                        ".+",
                        ('{pool_name="app.db",state="idle"}', 4),
                        ('{pool_name="app.db",state="used"}', 1),
                        ('{pool_name="orders",state="idle"}', 3),
                        ('{pool_name="orders",state="used"}', 2),
                    ),
                    case(
                        target_expr(connections),
                        "orders",
                        ('{pool_name="orders",state="idle"}', 3),
                        ('{pool_name="orders",state="used"}', 2),
                    ),
                    case(
                        target_expr(connections, "B"),
                        ".+",
                        ('{pool_name="app.db"}', 5),
                        ('{pool_name="orders"}', 8),
                    ),
                    case(
                        utilisation,
                        ".+",
                        ('{pool_name="app.db"}', 0.2),
                        ('{pool_name="orders"}', 0.25),
                    ),
                    case(timeouts, ".+", ("{}", 8 + 16)),
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
