"""The live diagnostics page: pools, holders, the last leaks and timeouts, as HTML and JSON.

Opt-in (``diagnostics_path=``). It answers loopback clients only, unless a token is configured:
then every request needs it, as the ``X-Session-Monitor-Token`` header or a ``token`` query
parameter. The page is one self-contained document (no external asset: it works on an air-gapped
host) whose script fetches ``<path>/json`` every few seconds and builds the tables with
``textContent`` only, so no string from the app (a route, a file name) can inject markup. Nothing
in it comes from SQL parameters, URLs with credentials or the environment: pool names are built
without credentials, locations are file, line and function.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from .stacks import format_location

if TYPE_CHECKING:
    from .monitor import SessionMonitor

_LOOPBACK = ("127.0.0.1", "::1", "localhost")
TOKEN_HEADER = b"x-session-monitor-token"


def diagnostics_data(monitor: SessionMonitor) -> dict[str, Any]:
    """Everything the page shows, as plain JSON types."""
    holders = monitor.holders()
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for holder in holders:
        opened = format_location(holder.opened_at)
        key = (holder.method, holder.route, opened)
        group = groups.setdefault(
            key,
            {"method": holder.method, "route": holder.route, "opened_at": opened, "count": 0,
             "oldest": 0.0, "pool_name": holder.pool_name},
        )
        group["count"] += 1
        group["oldest"] = max(group["oldest"], holder.held_for)
    wall = time.time()
    return {
        "generated_at": wall,
        "pools": [pool._asdict() for pool in monitor.pool_usage()],
        "holders": [holder.as_dict() for holder in holders],
        "groups": sorted(groups.values(), key=lambda g: (-g["count"], -g["oldest"])),
        "leaks": [
            {
                "at": at,
                "reason": reason,
                "kind": view.kind,
                "pool_name": view.pool_name,
                "route": view.route,
                "method": view.method,
                "opened_at": format_location(view.location),
                "stack": [format_location(frame) for frame in view.stack],
            }
            for at, reason, view in reversed(monitor.recent_leaks())
        ],
        "pitfalls": [
            {
                "at": pitfall.at,
                "kind": pitfall.kind,
                "route": pitfall.route,
                "method": pitfall.method,
                "pool_name": pitfall.pool_name,
                "at_line": format_location(pitfall.location),
                "detail": pitfall.detail,
            }
            for pitfall in reversed(monitor.recent_pitfalls())
        ],
        "pool_events": [
            {**event._asdict(), "holders": list(event.holders)}
            for event in reversed(monitor.pool_events())
        ],
    }


class DiagnosticsApp:
    """The ASGI app the middleware hands ``<path>`` and ``<path>/json`` to."""

    def __init__(
        self, monitor: SessionMonitor, path: str, token: str | None, failed: Callable[[str], None]
    ) -> None:
        self._monitor = monitor
        self.path = path.rstrip("/") or "/"
        self.json_path = self.path.rstrip("/") + "/json"
        self._token = token
        self._failed = failed

    def handles(self, path: str) -> bool:
        return path in (self.path, self.json_path)

    def _allowed(self, scope: dict[str, Any]) -> bool:
        if self._token is not None:
            given = dict(scope.get("headers") or []).get(TOKEN_HEADER, b"").decode("latin-1")
            if not given:
                query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
                given = (query.get("token") or [""])[0]
            return hmac.compare_digest(given.encode(), self._token.encode())
        client = scope.get("client")
        return client is not None and client[0] in _LOOPBACK

    async def __call__(self, scope: Any, receive: Any, send: Any, path: str) -> None:
        if not self._allowed(scope):
            advice = (
                "session_monitor diagnostics: forbidden. Send the token (X-Session-Monitor-Token "
                "header or ?token=)."
                if self._token is not None
                else "session_monitor diagnostics answer loopback clients only; configure "
                "diagnostics_token= to reach them from elsewhere."
            )
            await _respond(send, 403, "text/plain; charset=utf-8", advice.encode())
            return
        try:
            if path == self.json_path:
                body = json.dumps(diagnostics_data(self._monitor)).encode()
                content_type = "application/json"
            else:
                body = _page(self.json_path).encode()
                content_type = "text/html; charset=utf-8"
        except Exception:
            self._failed("diagnostics")
            await _respond(send, 500, "text/plain; charset=utf-8", b"diagnostics failed: see log")
            return
        await _respond(send, 200, content_type, body)


async def _respond(send: Any, status: int, content_type: str, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"cache-control", b"no-store"),
                (b"x-content-type-options", b"nosniff"),
                (b"content-security-policy",
                 b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                 b"connect-src 'self'"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _page(json_path: str) -> str:
    # The JSON path is ours (validated at construction), and goes through json.dumps anyway.
    return _PAGE.replace("__JSON_PATH__", json.dumps(json_path).replace("<", "\\u003c"))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>session_monitor: who holds the pool</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:4px 6px;
text-align:left;vertical-align:top}th{background:#f3f3f3;cursor:default}th.sort{cursor:pointer}
th,td{white-space:nowrap}#groups td:nth-child(3),#holders td:nth-child(n+6),
#events td:nth-child(8),#leaks td:nth-child(6){white-space:normal;overflow-wrap:break-word}
summary{cursor:pointer}
code,pre{font:12px ui-monospace,monospace}pre{margin:2px 0;white-space:pre-wrap}
.warn{color:#a40}.muted{color:#777}
</style></head><body>
<h1>session_monitor: who holds the pool</h1>
<p class="muted" id="status">loading…</p>
<h2>Pools</h2><table id="pools"></table>
<h2>Holders by where they were opened</h2><table id="groups"></table>
<h2>Holders</h2><table id="holders"></table>
<h2>Last pool timeouts and cancelled waits</h2><table id="events"></table>
<h2>Last leaks</h2><table id="leaks"></table>
<h2>Last pitfalls</h2><table id="pitfalls"></table>
<script>
"use strict";
const JSON_PATH = __JSON_PATH__;
let oldestFirst = true, last = null;
const opened = new Set();  // the stacks the reader expanded: they stay open across refreshes
function loc(l){return l ? l.file + ":" + l.line + " in " + l.function : "<unknown>";}
function cell(row, value){const td=document.createElement("td");
  if (value instanceof Node) td.appendChild(value); else td.textContent = String(value);
  row.appendChild(td); return td;}
function details(key, summary, lines){const d=document.createElement("details");
  d.open=opened.has(key); d.ontoggle=()=>{if (d.open) opened.add(key); else opened.delete(key);};
  const s=document.createElement("summary"); s.textContent=summary; d.appendChild(s);
  const p=document.createElement("pre"); p.textContent=lines.join("\\n"); d.appendChild(p);
  return d;}
function fill(id, headers, rows, onHeader){const t=document.getElementById(id);
  t.replaceChildren(); const h=t.insertRow();
  headers.forEach(name=>{const th=document.createElement("th"); th.textContent=name;
    if (onHeader && onHeader[name]) {th.className="sort"; th.onclick=onHeader[name];}
    h.appendChild(th);});
  if (!rows.length){const r=t.insertRow(); const td=cell(r,"none"); td.colSpan=headers.length;
    td.className="muted";}
  rows.forEach(values=>{const r=t.insertRow(); values.forEach(v=>cell(r,v));});}
function secs(s){return s === null || s === undefined ? "—" : s.toFixed(1) + " s";}
function when(t){return new Date(t*1000).toLocaleTimeString();}
function render(d){last=d;
  fill("pools",["pool","used","idle","waiting","max"],d.pools.map(p=>[p.name,p.used,p.idle,
    p.pending,p.maximum===null?"unbounded":p.maximum]));
  fill("groups",["held","request","opened at","oldest","pool"],d.groups.map(g=>[g.count,
    g.route==="<none>"?"outside any request":g.method+" "+g.route,g.opened_at,secs(g.oldest),
    g.pool_name]));
  const hs=d.holders.slice().sort((a,b)=>oldestFirst?b.held_for-a.held_for:a.held_for-b.held_for);
  fill("holders",["age "+(oldestFirst?"▼":"▲"),"request","kind","pool","transaction",
    "opened at","holder","now at"],hs.map(h=>[secs(h.held_for),
    h.route==="<none>"?"outside any request":h.method+" "+h.route,h.kind,h.pool_name,
    h.transaction_for===null?"none":"open "+secs(h.transaction_for),
    h.opened_stack.length?details("o"+h.session_id,loc(h.opened_at),h.opened_stack.map(loc))
    :loc(h.opened_at),
    h.holder+" ("+h.activity+")",
    h.now_at.length?details("n"+h.session_id,loc(h.now_at[0]),h.now_at.map(loc)):"—"]),
    {["age "+(oldestFirst?"▼":"▲")]:()=>{oldestFirst=!oldestFirst; render(last);}});
  fill("events",["at","pool","what","waited","in use / max","idle","waiting","held by"],
    d.pool_events.map(e=>[when(e.at),e.pool_name,e.kind,secs(e.waited),
    e.used+" / "+(e.maximum===null?"unbounded":e.maximum),e.idle,e.pending,
    e.holders.length?details("e"+e.at,e.holders[0],e.holders):"—"]));
  fill("leaks",["at","reason","request","kind","pool","opened at"],d.leaks.map(l=>[when(l.at),
    l.reason,l.route==="<none>"?"outside any request":l.method+" "+l.route,l.kind,l.pool_name,
    l.stack.length?details("l"+l.at,l.opened_at,l.stack):l.opened_at]));
  fill("pitfalls",["at","kind","request","pool","at line","detail"],d.pitfalls.map(p=>[
    when(p.at),p.kind,p.route==="<none>"?"outside any request":p.method+" "+p.route,p.pool_name,
    p.at_line,p.detail||"—"]));
  document.getElementById("status").textContent="updated "+when(d.generated_at)+
    "; refreshes every 5 s";}
function load(){fetch(JSON_PATH+location.search,{cache:"no-store"}).then(r=>{
  if(!r.ok) throw new Error(r.status+" "+r.statusText); return r.json();}).then(render)
  .catch(e=>{const s=document.getElementById("status"); s.textContent="refresh failed: "+e;
  s.className="warn";});}
load(); setInterval(load, 5000);
</script></body></html>
"""
