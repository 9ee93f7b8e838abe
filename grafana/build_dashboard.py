"""Build the Grafana dashboard with Grafana's foundation SDK: `make dashboard`.

Writes grafana/dashboards/session_monitor.json (what operators import, and what docker compose
provisions) and its packaged copy session_monitor/assets/session_monitor.json. Both are
committed; tests/test_dashboard_build.py builds the dashboard again and compares byte for byte.
Metric names and label names come from session_monitor/metric_table.py; rows, units,
thresholds and links are said once, here. A dev tool: the package never imports it.

To add a panel, add a `timeseries(...)` (or `stat`, `gauge`, `table`) to its row's function;
panels fill a row left to right, `width` out of 24, and wrap. To add a row, write a function
that returns its panels and add it to ROWS.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import gauge as gauge_panel
from grafana_foundation_sdk.builders import prometheus
from grafana_foundation_sdk.builders import stat as stat_panel
from grafana_foundation_sdk.builders import table as table_panel
from grafana_foundation_sdk.builders import timeseries as timeseries_panel
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat, QueryEditorMode

from session_monitor.exporters import metric_table as metrics
from session_monitor.exporters.metric_table import POOL_LABEL, STATE_LABEL, MetricSpec

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = (
    ROOT / "grafana" / "dashboards" / "session_monitor.json",
    ROOT / "session_monitor" / "assets" / "session_monitor.json",
)
UID = "session-monitor"
TITLE = "SQLAlchemy sessions & pool"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
# The pool variable keeps its name (and so its URL parameter) while the label it lists is the
# semantic conventions' db_client_connection_pool_name.
POOL_VARIABLE = "pool_name"
POOL_LEGEND = "{{" + POOL_LABEL + "}}"
ROUTE_LEGEND = "{{method}} {{route}}"
LEAK_TRACES = "{ span.session_monitor.leaked = true }"

# -- PromQL: every selector filtered by the variables its metric's labels allow -------------


def series(spec: MetricSpec, suffix: str = "", **matchers: str) -> str:
    """`spec`'s samples (`suffix`: a counter's _total, a histogram's _bucket or _count),
    filtered by job and instance, and by pool or route when the metric has that label."""
    filters = ['job=~"$job"', 'instance=~"$instance"']
    if POOL_LABEL in spec.labels:
        filters.append(f'{POOL_LABEL}=~"${POOL_VARIABLE}"')
    if "route" in spec.labels:
        filters.append('route=~"$route"')
    filters += [f'{label}="{value}"' for label, value in matchers.items()]
    return f"{spec.name}{suffix}{{{','.join(filters)}}}"


def counter(spec: MetricSpec, **matchers: str) -> str:
    return series(spec, "_total", **matchers)


def counted_in(spec: MetricSpec, window: str) -> str:
    """What `spec` counted within `window`, a series' first sample included: increase() needs
    two samples, so a series born within the window counts with its whole value."""
    x = counter(spec)
    return f"({x} unless {x} offset {window}) or increase({x}[{window}])"


def rate(spec: MetricSpec, suffix: str = "_total", **matchers: str) -> str:
    return f"rate({series(spec, suffix, **matchers)}[$__rate_interval])"


def quantile(q: float, spec: MetricSpec, by: str = "") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(spec, '_bucket')}))"


def by_pool(expr: str) -> str:
    return f"sum by ({POOL_LABEL}) ({expr})"


class Target(NamedTuple):
    expr: str
    legend: str = ""


def quantiles(spec: MetricSpec, by: str = "", legend: str = "") -> list[Target]:
    suffix = f" {legend}" if legend else ""
    return [Target(quantile(q, spec, by), f"p{round(q * 100)}{suffix}") for q in (0.5, 0.95, 0.99)]


# -- panels -----------------------------------------------------------------------------------

Thresholds = Sequence[tuple[float, str]]  # (from value, colour) above the green base
Panel = Builder[model.Panel]


def thresholds(steps: Thresholds) -> builders.ThresholdsConfig:
    return (
        builders.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps(
            [
                model.Threshold(value=None, color="green"),
                *(model.Threshold(value=value, color=colour) for value, colour in steps),
            ]
        )
    )


def queries(targets: Sequence[Target], *, table_format: bool = False) -> list[Builder[Any]]:
    built: list[Builder[Any]] = []
    for ref_id, target in zip("ABCDEFGH", targets, strict=False):
        query = (
            prometheus.Dataquery()
            .ref_id(ref_id)
            .datasource(DATASOURCE)
            .editor_mode(QueryEditorMode.CODE)
            .expr(target.expr)
            .legend_format(target.legend)
        )
        if table_format:
            built.append(query.instant().format(PromQueryFormat.TABLE))
        else:
            built.append(query.range())
    return built


def leak_traces_link(title: str) -> builders.DashboardLink:
    """Grafana Explore on Tempo, searching the leaked sessions' spans over the panel's range."""
    pane = {
        "leaks": {
            "datasource": "tempo",
            "queries": [
                {
                    "refId": "A",
                    "datasource": {"type": "tempo", "uid": "tempo"},
                    "queryType": "traceql",
                    "query": LEAK_TRACES,
                    "limit": 50,
                    "tableType": "traces",
                }
            ],
            "range": {"from": "${__from}", "to": "${__to}"},
        }
    }
    panes = quote(json.dumps(pane, separators=(",", ":")), safe="")
    for variable in ("${__from}", "${__to}"):  # Grafana fills these in: left unescaped
        panes = panes.replace(quote(variable, safe=""), variable)
    url = f"/explore?schemaVersion=1&orgId=1&panes={panes}"
    return builders.DashboardLink(title).url(url).target_blank(True)


PanelBuilder = timeseries_panel.Panel | stat_panel.Panel | gauge_panel.Panel | table_panel.Panel


def common_options(
    panel: PanelBuilder,
    title: str,
    description: str,
    unit: str,
    steps: Thresholds,
    width: int,
    height: int,
) -> None:
    panel.title(title).description(description).datasource(DATASOURCE)
    panel.unit(unit).thresholds(thresholds(steps)).span(width).height(height)


def timeseries(
    title: str,
    description: str,
    targets: Sequence[Target],
    *,
    unit: str,
    width: int,
    steps: Thresholds = (),
    bars: bool = False,
    stacked: bool = False,
    maximum: float | None = None,
    overrides: Sequence[tuple[model.MatcherConfig, list[model.DynamicConfigValue]]] = (),
    links: Sequence[builders.DashboardLink] = (),
) -> Panel:
    """A time series panel, from 0 up; thresholds drawn dashed when there are any."""
    panel = timeseries_panel.Panel()
    common_options(panel, title, description, unit, steps, width, 8)
    panel.targets(queries(targets))
    panel.color_scheme(builders.FieldColor().mode(model.FieldColorModeId.PALETTE_CLASSIC))
    panel.min(0)
    if maximum is not None:
        panel.max(maximum)
    panel.draw_style(common.GraphDrawStyle.BARS if bars else common.GraphDrawStyle.LINE)
    panel.line_width(1).fill_opacity(60 if bars else 25 if stacked else 10)
    panel.show_points(common.VisibilityMode.NEVER).span_nulls(False).axis_soft_min(0)
    panel.stacking(
        common_builders.StackingConfig()
        .mode(common.StackingMode.NORMAL if stacked else common.StackingMode.NONE)
        .group("A")
    )
    panel.thresholds_style(
        common_builders.GraphThresholdsStyleConfig().mode(
            common.GraphThresholdsStyleMode.DASHED if steps else common.GraphThresholdsStyleMode.OFF
        )
    )
    panel.legend(
        common_builders.VizLegendOptions()
        .show_legend(True)
        .display_mode(common.LegendDisplayMode.LIST)
        .placement(common.LegendPlacement.BOTTOM)
        .calcs([])
    )
    panel.tooltip(
        common_builders.VizTooltipOptions()
        .mode(common.TooltipDisplayMode.MULTI)
        .sort(common.SortOrder.DESCENDING)
    )
    for matcher, properties in overrides:
        panel.with_override(matcher, properties)
    if links:
        panel.links(list(links))
    return panel


def reduce_to_last() -> common_builders.ReduceDataOptions:
    return common_builders.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False)


def stat(title: str, description: str, target: Target, *, width: int, steps: Thresholds) -> Panel:
    """A single number over a red (or yellow) background past its thresholds."""
    panel = stat_panel.Panel()
    common_options(panel, title, description, "short", steps, width, 5)
    panel.targets(queries([target])).decimals(0)
    panel.color_scheme(builders.FieldColor().mode(model.FieldColorModeId.THRESHOLDS))
    panel.reduce_options(reduce_to_last())
    panel.color_mode(common.BigValueColorMode.BACKGROUND).graph_mode(common.BigValueGraphMode.AREA)
    panel.justify_mode(common.BigValueJustifyMode.AUTO).text_mode(common.BigValueTextMode.AUTO)
    panel.orientation(common.VizOrientation.AUTO)
    return panel


def gauge(title: str, description: str, target: Target, *, width: int, steps: Thresholds) -> Panel:
    """A share from 0 to 1."""
    panel = gauge_panel.Panel()
    common_options(panel, title, description, "percentunit", steps, width, 5)
    panel.targets(queries([target])).min(0).max(1)
    panel.color_scheme(builders.FieldColor().mode(model.FieldColorModeId.THRESHOLDS))
    panel.reduce_options(reduce_to_last()).orientation(common.VizOrientation.AUTO)
    panel.show_threshold_labels(False).show_threshold_markers(True)
    return panel


def table(
    title: str,
    description: str,
    target: Target,
    *,
    width: int,
    columns: dict[str, str],
    value: str,
    links: Sequence[builders.DashboardLink] = (),
) -> Panel:
    """One row per series of an instant query: `columns` (label -> heading) then its value,
    under the heading `value`, coloured red from 1, most first."""
    panel = table_panel.Panel()
    common_options(panel, title, description, "short", [(1, "red")], width, 8)
    panel.targets(queries([target], table_format=True)).decimals(0)
    panel.color_scheme(builders.FieldColor().mode(model.FieldColorModeId.THRESHOLDS))
    panel.align(common.FieldTextAlignment.AUTO).cell_options(common.TableAutoCellOptions())
    panel.override_by_name(
        value,
        [
            model.DynamicConfigValue(
                id_val="custom.cellOptions",
                value=common.TableColoredBackgroundCellOptions(
                    mode=common.TableCellBackgroundDisplayMode.BASIC
                ),
            )
        ],
    )
    panel.show_header(True).cell_height(common.TableCellHeight.SM)
    panel.sort_by([common_builders.TableSortByFieldState().display_name(value).desc(True)])
    panel.footer(common_builders.TableFooterOptions().show(False).reducer(["sum"]))
    order = [*columns, "Value"]
    panel.with_transformation(
        model.DataTransformerConfig(
            id_val="organize",
            options={
                "excludeByName": {"Time": True},
                "indexByName": {name: index for index, name in enumerate(order)},
                "renameByName": {**columns, "Value": value},
            },
        )
    )
    if links:
        panel.links(list(links)).data_links(
            [leak_traces_link("Traces of leaked sessions in this time range")]
        )
    return panel


def by_ref(ref_id: str) -> model.MatcherConfig:
    return model.MatcherConfig(id_val="byFrameRefID", options=ref_id)


def by_name(name: str) -> model.MatcherConfig:
    return model.MatcherConfig(id_val="byName", options=name)


def fixed_colour(colour: str) -> model.DynamicConfigValue:
    return model.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": colour})


def dashed_line(colour: str, *, unstacked: bool) -> list[model.DynamicConfigValue]:
    """A limit drawn over a panel's series: the pool's maximum."""
    properties = []
    if unstacked:
        properties += [
            model.DynamicConfigValue(id_val="custom.stacking", value={"mode": "none", "group": "B"})
        ]
    properties += [model.DynamicConfigValue(id_val="custom.fillOpacity", value=0)]
    if unstacked:
        properties += [model.DynamicConfigValue(id_val="custom.lineWidth", value=2)]
    properties += [
        model.DynamicConfigValue(
            id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}
        ),
        fixed_colour(colour),
    ]
    return properties


# -- the rows ---------------------------------------------------------------------------------

ACTIVE_STEPS = ((10, "yellow"), (15, "red"))  # SQLAlchemy's default pool: 5 + 10 overflow
RED_FROM_ONE = ((1, "red"),)
SLOW_SESSION = ((1, "yellow"), (5, "red"))
SLOW_TRANSACTION = ((0.5, "yellow"), (2, "red"))
ANY_RATE = ((0.001, "red"),)


def overview() -> list[Panel]:
    pool_used = by_pool_job(series(metrics.CONNECTION_COUNT, **{STATE_LABEL: "used"}))
    pool_max = by_pool_job(series(metrics.CONNECTION_MAX))
    return [
        stat(
            "Active sessions",
            "Sessions open right now, across the selected instances and routes. Yellow and red "
            "mark 10 and 15, the capacity of SQLAlchemy's default pool (pool_size 5 + "
            "max_overflow 10): more open sessions than pooled connections means requests are "
            "queueing for the pool. When red, check Pool utilisation and the Leaks row, then the "
            "Sessions row for the routes that hold sessions open longest.",
            Target(f"sum({series(metrics.SESSIONS_ACTIVE)})", "active"),
            width=5,
            steps=ACTIVE_STEPS,
        ),
        stat(
            "Leaked sessions (last 1h)",
            "Sessions that were never closed, found in the last hour (at request end, by age, or "
            "by the garbage collector). Every leak held a pooled connection. Red from the first "
            "leak: open the Leaks row to find the route, then the linked traces for where the "
            "session was opened, and close it (try/finally or a with-block in the dependency).",
            Target(f"sum({counted_in(metrics.SESSIONS_LEAKED, '1h')}) or vector(0)", "leaks"),
            width=5,
            steps=RED_FROM_ONE,
        ),
        gauge(
            "Pool utilisation",
            "Checked-out connections divided by the pool's maximum (pool_size + max_overflow), "
            "per pool, on the busiest selected instance. Unbounded pools have no maximum and do "
            "not show. Above 90% the next burst waits for a connection: when red, look at Pool > "
            "pending requests and use time, and at the Leaks row, before raising the pool size.",
            Target(f"max by ({POOL_LABEL}) ({pool_used} / {pool_max})", POOL_LEGEND),
            width=5,
            steps=((0.7, "yellow"), (0.9, "red")),
        ),
        stat(
            "Checkout timeouts (last 1h)",
            "Connection checkouts that gave up waiting for the pool in the last hour: each one is "
            "a failed request. Red from the first timeout: the pool was exhausted. Check the Pool "
            "row (used vs max, pending requests, use time) and the Leaks row.",
            Target(f"sum({counted_in(metrics.TIMEOUTS, '1h')}) or vector(0)", "timeouts"),
            width=5,
            steps=RED_FROM_ONE,
        ),
        stat(
            "Monitor internal errors (last 1h)",
            "Failures inside session_monitor's own listeners in the last hour. They are "
            "swallowed, so the application is unaffected, but the metrics on this dashboard may "
            "be incomplete. When red, look for session_monitor tracebacks in the application log "
            "and report them.",
            Target(f"sum({counted_in(metrics.INTERNAL_ERRORS, '1h')}) or vector(0)", "errors"),
            width=4,
            steps=RED_FROM_ONE,
        ),
    ]


def by_pool_job(expr: str) -> str:
    return f"sum by (job, instance, {POOL_LABEL}) ({expr})"


def sessions() -> list[Panel]:
    by_route = "route, method"
    return [
        timeseries(
            "Sessions opened / closed per second",
            "Rate of sessions opened and closed. The two lines should overlap: a gap that stays "
            "open means sessions are not being closed (see the Leaks row). There is no red for a "
            "rate; compare with the usual traffic.",
            [
                Target(f"sum({rate(metrics.SESSIONS_OPENED)})", "opened"),
                Target(f"sum({rate(metrics.SESSIONS_CLOSED)})", "closed"),
            ],
            unit="ops",
            width=12,
        ),
        timeseries(
            "Session duration p50 / p95 / p99",
            "How long sessions stay open, from first use to close. A session holds its "
            "connection for most of that time. Red above 5s: find the route in 'Session p95 by "
            "route' and look for slow I/O (HTTP calls, file uploads) done while the session is "
            "open.",
            quantiles(metrics.SESSION_DURATION),
            unit="s",
            width=12,
            steps=SLOW_SESSION,
        ),
        timeseries(
            "Sessions opened by route",
            "Sessions opened per second, by route template and method (<none> = work outside "
            "any request, <unmatched> = requests that matched no route). Shows which endpoints "
            "drive database traffic; no red, compare with the usual traffic.",
            [Target(f"sum by ({by_route}) ({rate(metrics.SESSIONS_OPENED)})", ROUTE_LEGEND)],
            unit="ops",
            width=8,
        ),
        timeseries(
            "Session p95 duration by route",
            "95th percentile of session duration per route. Red above 5s: that route keeps its "
            "session (and connection) open too long; move slow non-database work out of the "
            "session or shorten its transaction.",
            [Target(quantile(0.95, metrics.SESSION_DURATION, by_route), ROUTE_LEGEND)],
            unit="s",
            width=8,
            steps=SLOW_SESSION,
        ),
        timeseries(
            "Active sessions by route",
            "Sessions open right now per route. A route whose line only grows is leaking "
            "sessions; red above 15 (the default pool capacity) means that route alone can "
            "exhaust the pool. Check the Leaks row for it.",
            [Target(f"sum by ({by_route}) ({series(metrics.SESSIONS_ACTIVE)})", ROUTE_LEGEND)],
            unit="short",
            width=8,
            steps=ACTIVE_STEPS,
        ),
    ]


def leaks() -> list[Panel]:
    traces = [leak_traces_link("Traces of leaked sessions (Tempo)")]
    in_interval = counted_in(metrics.SESSIONS_LEAKED, "$__rate_interval")
    bars = (
        " Each bar counts the sessions leaked in the trailing rate interval; a route's first "
        "leak counts too. Use the panel link for the traces of the leaked sessions in Tempo."
    )
    return [
        timeseries(
            "Leaks by reason",
            "Leaked sessions by how they were found: request_end = still open when the request "
            "finished, age = open longer than the configured maximum, gc = garbage-collected "
            "while open. Red from the first leak: find the route in 'Leaks by route', then close "
            "the session in every path (try/finally in the get_db dependency, or a with-block)."
            + bars,
            [Target(f"sum by (reason) ({in_interval})", "{{reason}}")],
            unit="short",
            width=12,
            steps=RED_FROM_ONE,
            bars=True,
            links=traces,
        ),
        timeseries(
            "Leaks by route",
            "Leaked sessions by the route that opened them (<none> = background work outside "
            "any request). Red from the first leak: open that route's handler and dependencies "
            "and make sure every session is closed on every path, errors included." + bars,
            [Target(f"sum by (route, method) ({in_interval})", ROUTE_LEGEND)],
            unit="short",
            width=12,
            steps=RED_FROM_ONE,
            bars=True,
            links=traces,
        ),
        table(
            "Top leaking routes over the time range",
            "The ten routes that leaked the most sessions over the dashboard's time range. Any "
            "row here is a bug to fix: the session is opened on that route and not closed on "
            "some path. Click a row (or the panel link) for the traces of leaked sessions in "
            "Tempo, which carry where the session was opened; add && span.http.route = "
            '"<route>" to the query to keep one route.',
            Target(
                "topk(10, sum by (route, method) "
                f"({counted_in(metrics.SESSIONS_LEAKED, '$__range')}) > 0)"
            ),
            width=24,
            columns={"method": "Method", "route": "Route"},
            value="Leaked sessions",
            links=traces,
        ),
    ]


def pool() -> list[Panel]:
    maximum = Target(by_pool(series(metrics.CONNECTION_MAX)), f"{POOL_LEGEND} max")
    return [
        timeseries(
            "Connections: used / idle vs max",
            "Pooled connections checked out (used) and waiting in the pool (idle), stacked, with "
            "the pool's maximum (pool_size + max_overflow) as a dashed red line. When 'used' "
            "reaches the line, new checkouts wait and then time out: look for leaks and long use "
            "times before raising pool_size (the database's max_connections must fit every "
            "process's pool). The labels are the OpenTelemetry semantic conventions' "
            f"({POOL_LABEL}, {STATE_LABEL}), so pools that OpenTelemetry's Prometheus exporter "
            "writes show here too.",
            [
                Target(
                    f"sum by ({POOL_LABEL}, {STATE_LABEL}) ({series(metrics.CONNECTION_COUNT)})",
                    f"{POOL_LEGEND} {{{{{STATE_LABEL}}}}}",
                ),
                maximum,
            ],
            unit="short",
            width=12,
            stacked=True,
            overrides=[(by_ref("B"), dashed_line("red", unstacked=True))],
        ),
        timeseries(
            "Pending checkout requests",
            "Callers waiting for a connection right now. Red as soon as anyone waits: the pool is "
            "exhausted. Check 'used vs max' and the Leaks row; if the pool is busy with "
            "legitimate work, shorten connection use or raise pool_size / max_overflow.",
            [Target(by_pool(series(metrics.PENDING_REQUESTS)), POOL_LEGEND)],
            unit="short",
            width=12,
            steps=RED_FROM_ONE,
        ),
        timeseries(
            "Checkout wait time p50 / p95 / p99",
            "Time to obtain a connection from the pool, including waiting for a free one. Near "
            "zero normally. Red above 0.5s (the SQLAlchemySlowCheckouts alert): the pool is too "
            "small for the load or connections are held too long; see use time and used vs max.",
            quantiles(metrics.WAIT_TIME, POOL_LABEL, POOL_LEGEND),
            unit="s",
            width=8,
            steps=((0.1, "yellow"), (0.5, "red")),
        ),
        timeseries(
            "Connection use time p50 / p95 / p99",
            "How long a connection stays checked out, from checkout to checkin. Red above 5s: "
            "some code holds a connection across slow work (HTTP calls, long transactions, "
            "streaming); release it earlier or split the transaction.",
            quantiles(metrics.USE_TIME, POOL_LABEL, POOL_LEGEND),
            unit="s",
            width=8,
            steps=SLOW_SESSION,
        ),
        timeseries(
            "Connection create time p50 / p95 / p99",
            "Time to open a new database connection (TCP, TLS, authentication). Red above 1s: "
            "the database or network is slow to accept connections; frequent creations also "
            "mean the pool churns (see invalidations, pool_recycle, overflow).",
            quantiles(metrics.CREATE_TIME, POOL_LABEL, POOL_LEGEND),
            unit="s",
            width=8,
            steps=((0.25, "yellow"), (1, "red")),
        ),
        timeseries(
            "Connection invalidations",
            "Connections invalidated per second, by reason: error (a statement saw a disconnect), "
            "pre_ping (a failed pre-ping at checkout) or explicit (the app's invalidate()); soft = "
            "retired when returned, hard = dropped at once. Red when error or pre_ping "
            "invalidations persist: the database drops connections (restarts, failover, idle "
            "timeouts); keep pool_pre_ping on and set a pool_recycle shorter than the server's idle"
            " timeout. Only session_monitor exports this metric: for another source's pools the "
            "panel stays empty.",
            [
                Target(
                    f"sum by ({POOL_LABEL}, reason, soft) ({rate(metrics.INVALIDATIONS)})",
                    f"{POOL_LEGEND} {{{{reason}}}} soft={{{{soft}}}}",
                )
            ],
            unit="ops",
            width=12,
            steps=((0.1, "red"),),
        ),
        timeseries(
            "Checkout timeouts",
            "Checkouts per second that gave up waiting for a connection (SQLAlchemy's "
            "TimeoutError): each is a failed request. Red at any timeout (the "
            "SQLAlchemyPoolCheckoutTimeouts alert): the pool is exhausted; look for leaks and "
            "long use times, then the pool size.",
            [Target(by_pool(rate(metrics.TIMEOUTS)), POOL_LEGEND)],
            unit="ops",
            width=12,
            steps=ANY_RATE,
        ),
        timeseries(
            "Checkouts that waited",
            "Checkouts per second that found no idle connection and no room to open one, and had to"
            " wait (solid), against all successful checkouts (dashed). A few waits in bursts are "
            "normal; when the solid line climbs towards the dashed one, most requests queue for the"
            " pool: Checkout wait time rises next, then timeouts. Look at Peak connections in use "
            'vs max and Connection use time, then follow the runbook section "Pool exhausted: who '
            "holds it\". Only session_monitor exports the waited count: for another source's pools "
            "the solid line stays empty.",
            [
                Target(by_pool(rate(metrics.WAITED)), f"{POOL_LEGEND} waited"),
                Target(by_pool(rate(metrics.WAIT_TIME, "_count")), f"{POOL_LEGEND} all checkouts"),
            ],
            unit="ops",
            width=8,
            overrides=[(by_ref("B"), dashed_line("text", unstacked=False))],
        ),
        timeseries(
            "Cancelled checkout waits",
            "Waits for a connection given up per second before one came: the waiting task was "
            "cancelled (the client disconnected, or a request timeout or asyncio.wait_for shorter "
            "than pool_timeout). Like a timeout, each is a request that failed because the pool was"
            ' exhausted; it just ended sooner. Red at any: read the app\'s "Pool ... exhausted" '
            'WARNING for who holds the connections (runbook: "Pool exhausted: who holds it"). '
            "Climbing while Checkout timeouts stays at zero means the clients give up before "
            "pool_timeout. Only session_monitor exports this metric: for another source's pools the"
            " panel stays empty.",
            [Target(by_pool(rate(metrics.CANCELLED_WAITS)), POOL_LEGEND)],
            unit="ops",
            width=8,
            steps=ANY_RATE,
        ),
        timeseries(
            "Peak connections in use vs max",
            "The most connections checked out at once between two scrapes, with the pool's maximum "
            "(pool_size + max_overflow) as a dashed red line. Connections: used / idle only sees "
            "the moment of each scrape; a burst that filled the pool for a second shows here. Peaks"
            " touching the line mean checkouts waited then (see Checkouts that waited): with short "
            "use times the pool is too small for the concurrency, with long ones find who holds the"
            ' connections (runbook: "Pool exhausted: who holds it"). Summed over the selected '
            "instances: select one instance to compare it with its own max. Only session_monitor "
            "exports the peak: for another source's pools the peak line stays empty.",
            [
                Target(
                    by_pool(f"max_over_time({series(metrics.USED_PEAK)}[$__rate_interval])"),
                    f"{POOL_LEGEND} peak used",
                ),
                maximum,
            ],
            unit="short",
            width=8,
            overrides=[(by_ref("B"), dashed_line("red", unstacked=True))],
        ),
    ]


def transactions() -> list[Panel]:
    everything = f"sum({rate(metrics.TRANSACTIONS)})"
    rollbacks = f"sum({rate(metrics.TRANSACTIONS, outcome='rollback')})"
    per_route = f"sum by (route, method) ({rate(metrics.TRANSACTIONS)})"
    route_rollbacks = f"sum by (route, method) ({rate(metrics.TRANSACTIONS, outcome='rollback')})"
    idle = counted_in(metrics.IDLE_IN_TRANSACTION, "$__rate_interval")
    return [
        timeseries(
            "Transactions by outcome",
            "Transactions ended per second: commit, rollback, or close (ended by close() without "
            "commit or rollback, the normal read path). A rising rollback line means failing "
            "requests; see the rollback ratio.",
            [Target(f"sum by (outcome) ({rate(metrics.TRANSACTIONS)})", "{{outcome}}")],
            unit="ops",
            width=8,
            stacked=True,
            overrides=[
                (by_name("commit"), [fixed_colour("green")]),
                (by_name("rollback"), [fixed_colour("red")]),
                (by_name("close"), [fixed_colour("blue")]),
            ],
        ),
        timeseries(
            "Rollback ratio",
            "Share of transactions that ended in a rollback, overall and per route. Red above "
            "20% (the SQLAlchemyHighRollbackRatio alert): requests on that route are failing "
            "(errors, constraint violations, deadlocks); look at the application's errors for "
            "it.",
            [
                # `or 0 * ...`: no rollback series yet is a ratio of 0, not no line.
                Target(f"({rollbacks} or 0 * {everything}) / {everything}", "all routes"),
                Target(f"({route_rollbacks} or 0 * {per_route}) / {per_route}", ROUTE_LEGEND),
            ],
            unit="percentunit",
            width=8,
            steps=((0.05, "yellow"), (0.2, "red")),
            maximum=1,
        ),
        timeseries(
            "Transaction duration p50 / p95 / p99",
            "How long transactions last, from begin to commit, rollback or close. A long "
            "transaction holds its connection and its locks. Red above 2s: find the outcome and "
            "route below and keep slow work out of the transaction.",
            quantiles(metrics.TRANSACTION_DURATION),
            unit="s",
            width=8,
            steps=SLOW_TRANSACTION,
        ),
        timeseries(
            "Transaction p95 duration by outcome",
            "95th percentile of transaction duration per outcome. Slow rollbacks often mean lock "
            "waits or timeouts before the error; slow commits mean large writes or contention. "
            "Red above 2s: look at the database's lock and slow-query views.",
            [Target(quantile(0.95, metrics.TRANSACTION_DURATION, "outcome"), "{{outcome}}")],
            unit="s",
            width=12,
            steps=SLOW_TRANSACTION,
        ),
        timeseries(
            "Transactions by route",
            "Transactions ended per second by route and outcome: which endpoints commit, read or "
            "roll back. No red; use it to find the route behind a change in the outcome mix.",
            [
                Target(
                    f"sum by (route, method, outcome) ({rate(metrics.TRANSACTIONS)})",
                    f"{ROUTE_LEGEND} {{{{outcome}}}}",
                )
            ],
            unit="ops",
            width=12,
        ),
        timeseries(
            "Idle in transaction by route",
            "Connections held inside an open transaction while the code holding them did "
            "something other than database work (an HTTP call, rendering, sleeping, or "
            "nothing: a leaked session) for longer than idle_in_transaction_threshold "
            "(default 5 s), by the route that opened them; each counted once. Red from the "
            "first (the SQLAlchemySessionIdleInTransaction alert): the app's \"Connection idle"
            ' in transaction:" WARNING says where it was opened and where its holder was; '
            "commit or roll back before the slow work, or do the slow work first. Zero lines "
            "are the routes that opened sessions without it.",
            [
                Target(
                    f"sum by (route, method) ({idle}) or 0 * sum by (route, method) "
                    f"({series(metrics.SESSIONS_OPENED, '_total')})",
                    ROUTE_LEGEND,
                )
            ],
            unit="short",
            width=24,
            steps=RED_FROM_ONE,
            bars=True,
        ),
    ]


def pitfalls() -> list[Panel]:
    opened = series(metrics.SESSIONS_OPENED, "_total")
    by_kind = "sum by (kind, route, method)"
    return [
        timeseries(
            "Pitfalls by kind and route",
            "Sessions caught in one of the tutorials' pitfalls, by kind and by the route "
            "where it happened; each bar counts the occurrences in the trailing rate interval"
            " (a series' first occurrence too). shared_session = a session opened in another "
            "request (a module-level session), blocking_event_loop = a sync session doing I/O"
            " in an async def endpoint or dependency, uncommitted_changes = closed with "
            "changes never committed (the forgotten commit: they were rolled back), "
            "nested_checkout = a request holding a connection asks the same pool for a second"
            " one (deadlocks the pool under load). Each is a code bug, red from the first "
            '(the SQLAlchemySessionPitfall alert): the app logged one WARNING "Pitfall '
            "(<kind>):\" per kind and line, naming the line and the fix; the runbook's "
            "Pitfalls section shows the correct code. Zero lines are the routes that opened "
            "sessions without any.",
            [
                Target(
                    f"{by_kind} ({counted_in(metrics.PITFALLS, '$__rate_interval')}) "
                    f"or on (route, method) 0 * sum by (route, method) ({opened})",
                    f"{ROUTE_LEGEND} {{{{kind}}}}",
                )
            ],
            unit="short",
            width=12,
            steps=RED_FROM_ONE,
            bars=True,
        ),
        table(
            "Pitfalls by kind and route (last hour)",
            "Every (kind, route) that hit a pitfall in the last hour, most occurrences first."
            " Any row here is a bug to fix in that route's handler or its dependencies: find "
            "the line in the app's WARNING \"Pitfall (<kind>): <method> <route>: session at "
            "<file:line>\", which also names the fix, and see the runbook's Pitfalls section "
            "for the correct code (get_db with try/yield/finally, with SessionLocal.begin(), "
            "a plain def endpoint or AsyncSession, the request's session passed down). One "
            "row at 0 with no kind means none in the last hour.",
            Target(
                f"({by_kind} ({counted_in(metrics.PITFALLS, '1h')}) > 0) or on () 0 * sum({opened})"
            ),
            width=12,
            columns={"kind": "Kind", "method": "Method", "route": "Route"},
            value="Occurrences",
        ),
    ]


def database() -> list[Panel]:
    possible = Target(by_pool(series(metrics.CONNECTION_MAX)), f"{POOL_LEGEND} may be opened")
    allowed = Target(
        f"max by ({POOL_LABEL}) ({series(metrics.SERVER_CONNECTIONS_ALLOWED)})",
        f"{POOL_LEGEND} the server allows",
    )
    return [
        timeseries(
            "Connections closed, by reason",
            "Pooled connections closed per second: overflow (opened beyond pool_size for a peak, "
            "closed when they came back; steady overflow closes are churn: raise pool_size), "
            "unpooled (NullPool closes every one), recycled (pool_recycle), invalidated, "
            "disposed. Compare with Connection create time: every close is a connect later.",
            [
                Target(
                    f"sum by ({POOL_LABEL}, reason) ({rate(metrics.CONNECTIONS_CLOSED)})",
                    f"{POOL_LEGEND} {{{{reason}}}}",
                )
            ],
            unit="ops",
            width=8,
        ),
        timeseries(
            "Connections the pools may open vs what the server allows",
            "Every selected instance's pool_size + max_overflow summed (workers included), against "
            "what PostgreSQL lets this pool's role open to its database (max_connections less the "
            "reserved slots, capped by the role's and the database's connection limits; read by "
            "each process at startup). Above the dashed red line (the "
            "SessionMonitorPoolsExceedServerLimit alert), a burst or a deploy that runs old and "
            "new workers side by side gets 'too many clients': lower max_overflow or put a "
            "pooler in front (runbook).",
            [possible, allowed],
            unit="short",
            width=8,
            overrides=[(by_ref("B"), dashed_line("red", unstacked=True))],
        ),
        timeseries(
            "Server view reads that failed",
            "Reads of pg_stat_activity (for a pool timeout's report, the diagnostics page) that "
            "failed, per second, by reason: connect (no free slot at the server, authentication), "
            "timeout, query (permission). The reports they served went out without the "
            "server's part; nothing reached the app.",
            [
                Target(
                    f"sum by ({POOL_LABEL}, reason) ({rate(metrics.SERVER_VIEW_FAILURES)})",
                    f"{POOL_LEGEND} {{{{reason}}}}",
                )
            ],
            unit="ops",
            width=8,
            steps=ANY_RATE,
        ),
    ]


ROWS: tuple[tuple[str, Callable[[], list[Panel]]], ...] = (
    ("Overview", overview),
    ("Sessions", sessions),
    ("Leaks", leaks),
    ("Pool", pool),
    ("Database server", database),
    ("Transactions", transactions),
    ("Pitfalls", pitfalls),
)

# -- the dashboard ----------------------------------------------------------------------------


def variable(name: str, label: str, query: str) -> builders.QueryVariable:
    """A multi-value variable listing one label's values, All meaning any value."""
    return (
        builders.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query({"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor"})
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )


def build() -> model.Dashboard:
    where = 'job=~"$job",instance=~"$instance"'
    pools = metrics.CONNECTION_COUNT.name
    built = (
        builders.Dashboard(TITLE)
        .uid(UID)
        .description(
            "Sessions, leaks, connection pool and transactions of applications instrumented "
            "with session_monitor."
        )
        .tags(["sqlalchemy", "session_monitor", "database"])
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .timezone("browser")
        .refresh("10s")
        .annotation(
            builders.AnnotationQuery()
            .name("Annotations & Alerts")
            .datasource(model.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
            .enable(True)
            .hide(True)
            .icon_color("rgba(0, 211, 255, 1)")
            .type("dashboard")
            .built_in(1)
        )
        .with_variable(
            builders.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(variable("job", "Job", f"label_values({pools}, job)"))
        .with_variable(
            variable("instance", "Instance", f'label_values({pools}{{job=~"$job"}}, instance)')
        )
        .with_variable(
            variable(POOL_VARIABLE, "Pool", f"label_values({pools}{{{where}}}, {POOL_LABEL})")
        )
        .with_variable(
            variable(
                "route",
                "Route",
                f"label_values({metrics.SESSIONS_OPENED.name}_total{{{where}}}, route)",
            )
        )
    )
    for title, row_panels in ROWS:
        built.with_row(builders.Row(title))
        for row_panel in row_panels():
            built.with_panel(row_panel)
    dashboard = built.build()
    for number, panel in enumerate(dashboard.panels or [], 1):
        panel.id_val = number
    return dashboard


def render() -> str:
    return json.dumps(build(), cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    text = render()
    for path in OUTPUTS:
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
