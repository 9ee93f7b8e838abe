"""The live diagnostics page: pools, holders, the last leaks and timeouts, as HTML and JSON.

Opt-in (``diagnostics_path=``). It answers loopback clients only, unless a token is configured:
then every request needs it, as the ``X-Session-Monitor-Token`` header or a ``token`` query
parameter. The page is one self-contained document (no external asset: it works on an air-gapped
host) whose script fetches ``<path>/json`` every few seconds and builds the tables with
``textContent`` only, so no string from the app (a route, a file name) can inject markup. Nothing
in it comes from SQL parameters, URLs with credentials or the environment: pool names are built
without credentials, locations are file, line and function.

Under ``PROMETHEUS_MULTIPROC_DIR`` the JSON holds every worker of the server (`all_workers_data`):
the worker serving the page adds the answers of the others (`workers.py`), each row labelled with
its worker's pid, and says which workers did not answer within ``diagnostics_deadline``.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import parse_qs

from ..findings.holders import holder_from_dict
from ..hooks.stacks import format_location
from .workers import FAILED, WorkerAnswer, WorkerSocket, ask_workers

if TYPE_CHECKING:
    from ..findings.holders import PoolEvent, PoolUsage
    from ..findings.pitfalls import Pitfall
    from ..state.views import HolderView, SessionView

_T = TypeVar("_T")

_LOOPBACK = ("127.0.0.1", "::1", "localhost")
TOKEN_HEADER = b"x-session-monitor-token"


class Readings(Protocol):
    """What the page reads of the monitor that serves it (`SessionMonitor`'s public readings)."""

    def holders(self, server_view: bool = False) -> list[HolderView]: ...

    def database_report(self, holders: list[HolderView] | None = None) -> list[dict[str, Any]]: ...

    def pool_usage(self) -> list[PoolUsage]: ...

    def recent_leaks(self) -> list[tuple[float, str, SessionView]]: ...

    def recent_pitfalls(self) -> list[Pitfall]: ...

    def pool_events(self) -> list[PoolEvent]: ...


def diagnostics_data(monitor: Readings) -> dict[str, Any]:
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


def worker_answer(monitor: Readings) -> bytes:
    """What this worker sends the one serving the page: its data, with its pid."""
    return json.dumps({"pid": os.getpid(), **diagnostics_data(monitor)}).encode()


def all_workers_data(
    own: dict[str, Any], answers: list[WorkerAnswer], *, listening: str | None, asking: str | None
) -> dict[str, Any]:
    """This worker's data and the others' answers as one: every row labelled with its worker's
    pid, pools totalled over workers, and a plain note when a worker is missing.

    `listening`: why the others cannot ask this worker; `asking`: why it cannot ask them."""
    pid = os.getpid()
    shown: list[tuple[int, dict[str, Any]]] = [(pid, own)]
    shown += [(answer.pid, answer.data) for answer in answers if answer.data is not None]

    def rows(key: str) -> list[dict[str, Any]]:
        return [{"pid": worker, **row} for worker, data in shown for row in data[key]]

    def newest_first(key: str) -> list[dict[str, Any]]:
        return sorted(rows(key), key=lambda row: -row["at"])

    pools = sorted(rows("pools"), key=lambda pool: (pool["name"], pool["pid"]))
    totals: dict[str, dict[str, Any]] = {}
    for pool in pools:
        total = totals.setdefault(
            pool["name"],
            {"name": pool["name"], "used": 0, "idle": 0, "pending": 0, "maximum": 0, "workers": 0},
        )
        for count in ("used", "idle", "pending"):
            total[count] += pool[count]
        total["workers"] += 1
        if total["maximum"] is not None:  # unbounded in one worker: unbounded in all
            bound = pool["maximum"]
            total["maximum"] = None if bound is None else total["maximum"] + bound
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for worker, data in shown:
        for group in data["groups"]:
            key = (group["method"], group["route"], group["opened_at"], group["pool_name"])
            merged = groups.setdefault(key, {**group, "count": 0, "oldest": 0.0, "pids": []})
            merged["count"] += group["count"]
            merged["oldest"] = max(merged["oldest"], group["oldest"])
            merged["pids"].append(worker)
    missing = [answer for answer in answers if answer.data is None]
    if asking is not None:
        note = f"This page shows only this worker (pid {pid}): {asking}."
    elif missing:
        note = f"This page shows {len(shown)} of {len(shown) + len(missing)} workers: " + "; ".join(
            f"pid {answer.pid} is {answer.status} ({answer.detail})" for answer in missing
        ) + "."
    else:
        note = None
    return {
        "generated_at": own["generated_at"],
        "note": note,
        "workers": [
            {"pid": pid, "status": "this worker", "detail": listening or ""},
            *({"pid": a.pid, "status": a.status, "detail": a.detail} for a in answers),
        ],
        "pools": pools,
        "pool_totals": list(totals.values()),
        "holders": sorted(rows("holders"), key=lambda holder: -holder["held_for"]),
        "groups": sorted(groups.values(), key=lambda g: (-g["count"], -g["oldest"])),
        "leaks": newest_first("leaks"),
        "pitfalls": newest_first("pitfalls"),
        "pool_events": newest_first("pool_events"),
    }


def _every_worker(
    own: dict[str, Any], workers: WorkerSocket, deadline: float
) -> dict[str, Any]:
    try:
        answers, asking = ask_workers(workers.directory, deadline), None
    except OSError as error:
        answers, asking = [], f"the other workers cannot be asked ({error})"
    # A worker running another release of the package (during a deploy) may answer in
    # another shape: shown as failed rather than failing the page.
    answers = [
        answer
        if answer.data is None or own.keys() <= answer.data.keys()
        else answer._replace(status=FAILED, data=None, detail="its answer has another shape")
        for answer in answers
    ]
    return all_workers_data(own, answers, listening=workers.problem, asking=asking)


def _database(monitor: Readings, holders: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The server's view of every worker's holders: one reading per pool, made by the worker
    serving the page (`database_view.py`)."""
    return monitor.database_report([holder_from_dict(holder) for holder in holders])


async def _off_the_loop(call: Callable[[], _T]) -> _T:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio (trio, say): the deadline bounds the wait
        return call()
    return await loop.run_in_executor(None, call)


class DiagnosticsApp:
    """The ASGI app the middleware hands ``<path>`` and ``<path>/json`` to."""

    def __init__(
        self,
        monitor: Readings,
        path: str,
        token: str | None,
        failed: Callable[[str], None],
        *,
        workers: WorkerSocket | None = None,
        deadline: float = 1.0,
    ) -> None:
        self._monitor = monitor
        self.path = path.rstrip("/") or "/"
        self.json_path = self.path.rstrip("/") + "/json"
        self._token = token
        self._failed = failed
        self._workers = workers
        self._deadline = deadline

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
                data = diagnostics_data(self._monitor)
                workers = self._workers
                if workers is not None:
                    # Started by the lifespan; an app run without one starts it here.
                    workers.start()
                    data = await _off_the_loop(
                        functools.partial(_every_worker, data, workers, self._deadline)
                    )
                data["database"] = await _off_the_loop(
                    functools.partial(_database, self._monitor, data["holders"])
                )
                body = json.dumps(data).encode()
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
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:4px 6px;
text-align:left;vertical-align:top}th{background:#f3f3f3;cursor:default;white-space:nowrap}
th.sort{cursor:pointer}td{white-space:nowrap}
td.text{white-space:normal;overflow-wrap:break-word;min-width:10em}
summary{cursor:pointer}
code,pre{font:12px ui-monospace,monospace}pre{margin:2px 0;white-space:pre-wrap;
overflow-wrap:anywhere}
.warn{color:#a40}.muted{color:#777}#note{font-weight:600}
</style></head><body>
<h1>session_monitor: who holds the pool</h1>
<p class="muted" id="status">loading…</p>
<p class="warn" id="note" hidden></p>
<section id="workers-section" hidden><h2>Workers</h2>
<div class="scroll"><table id="workers"></table></div></section>
<h2>Pools</h2><div class="scroll"><table id="pools"></table></div>
<section id="worker-pools-section" hidden><h2>Pools by worker</h2>
<div class="scroll"><table id="worker-pools"></table></div></section>
<h2>Database server</h2><div class="scroll"><table id="database"></table></div>
<h2>Holders by where they were opened</h2><div class="scroll"><table id="groups"></table></div>
<h2>Holders</h2><div class="scroll"><table id="holders"></table></div>
<h2>Last pool timeouts and cancelled waits</h2><div class="scroll"><table id="events"></table>
</div>
<h2>Last leaks</h2><div class="scroll"><table id="leaks"></table></div>
<h2>Last pitfalls</h2><div class="scroll"><table id="pitfalls"></table></div>
<script>
"use strict";
const JSON_PATH = __JSON_PATH__;
let oldestFirst = true, last = null;
const opened = new Set();  // the stacks the reader expanded: they stay open across refreshes
// A column whose text is long (a location, a stack, a detail) wraps; the others stay on one line.
const TEXT = new Set(["opened at","holder","now at","held by","at line","detail","request",
  "why","the server says","advice","sizing","lost connections"]);
function loc(l){return l ? l.file + ":" + l.line + " in " + l.function : "<unknown>";}
// Text that may break after each "/" (a <wbr>, which copies as nothing): paths wrap whole.
function breakable(text){const f=document.createDocumentFragment();
  const parts=String(text).split("/");
  parts.forEach((part,i)=>{const last=i===parts.length-1;
    f.appendChild(document.createTextNode(last?part:part+"/"));
    if (!last) f.appendChild(document.createElement("wbr"));});
  return f;}
function cell(row, value, text){const td=document.createElement("td");
  if (value instanceof Node) td.appendChild(value);
  else if (text) td.appendChild(breakable(value)); else td.textContent = String(value);
  if (text) td.className="text"; row.appendChild(td); return td;}
function details(key, summary, lines){const d=document.createElement("details");
  d.open=opened.has(key); d.ontoggle=()=>{if (d.open) opened.add(key); else opened.delete(key);};
  const s=document.createElement("summary"); s.appendChild(breakable(summary)); d.appendChild(s);
  const p=document.createElement("pre"); p.textContent=lines.join("\\n"); d.appendChild(p);
  return d;}
function fill(id, headers, rows, onHeader){const t=document.getElementById(id);
  t.replaceChildren(); const h=t.insertRow();
  headers.forEach(name=>{const th=document.createElement("th"); th.textContent=name;
    if (onHeader && onHeader[name]) {th.className="sort"; th.onclick=onHeader[name];}
    h.appendChild(th);});
  if (!rows.length){const r=t.insertRow(); const td=cell(r,"none"); td.colSpan=headers.length;
    td.className="muted";}
  rows.forEach(values=>{const r=t.insertRow();
    values.forEach((v,i)=>cell(r,v,TEXT.has(headers[i])));});}
function secs(s){return s === null || s === undefined ? "—" : s.toFixed(1) + " s";}
function pad(n){return String(n).padStart(2,"0");}
// ISO 8601 date and time in the browser's zone, with its offset from UTC.
function when(t){const d=new Date(t*1000), off=-d.getTimezoneOffset(), a=Math.abs(off);
  return d.getFullYear()+"-"+pad(d.getMonth()+1)+"-"+pad(d.getDate())+" "+pad(d.getHours())+
    ":"+pad(d.getMinutes())+":"+pad(d.getSeconds())+(off<0?"-":"+")+pad(Math.floor(a/60))+
    ":"+pad(a%60);}
function request(x){return x.route==="<none>"?"outside any request":x.method+" "+x.route;}
function bound(m){return m===null?"unbounded":m;}
// A leaked connection's holder is nobody: say so once, not "nobody (…) (leaked)".
function holder(h){return h.activity==="leaked"?"nobody: leaked, its request ended"
  :h.holder+" ("+h.activity+")";}
function render(d){last=d;
  const many = Array.isArray(d.workers);  // under PROMETHEUS_MULTIPROC_DIR: every worker
  const W = many ? ["worker"] : [], w = x => many ? [x.pid] : [], k = x => many ? x.pid+":" : "";
  const note=document.getElementById("note"); note.hidden=!d.note; note.textContent=d.note||"";
  document.getElementById("workers-section").hidden=!many;
  document.getElementById("worker-pools-section").hidden=!many;
  if (many) {
    fill("workers",["worker","status","why"],d.workers.map(x=>[x.pid,x.status,x.detail||"—"]));
    fill("pools",["pool","used","idle","waiting","max","workers"],d.pool_totals.map(p=>[p.name,
      p.used,p.idle,p.pending,bound(p.maximum),p.workers]));
    fill("worker-pools",["worker","pool","used","idle","waiting","max"],d.pools.map(p=>[p.pid,
      p.name,p.used,p.idle,p.pending,bound(p.maximum)]));
  } else {
    fill("pools",["pool","used","idle","waiting","max"],d.pools.map(p=>[p.name,p.used,p.idle,
      p.pending,bound(p.maximum)]));
  }
  fill("database",["pool","the server says","advice","sizing","lost connections"],
    (d.database||[]).map(p=>[p.pool_name,
    p.error?p.error:p.holders.length?details("d"+p.pool_name,p.holders[0],p.holders)
      :"no connection held",
    p.advice.length?p.advice.join(" "):(p.available?"none: the pool looks healthy":"—"),
    p.sizing,
    !p.available?"—":!p.tagged?"— (with application_name= tagging)"
      :p.lost.length?details("x"+p.pool_name,p.lost[0],p.lost):"none"]));
  fill("groups",["held","request","opened at","oldest","pool",...(many?["workers"]:[])],
    d.groups.map(g=>[g.count,request(g),g.opened_at,secs(g.oldest),g.pool_name,
    ...(many?[g.pids.join(", ")]:[])]));
  const hs=d.holders.slice().sort((a,b)=>oldestFirst?b.held_for-a.held_for:a.held_for-b.held_for);
  const age="age "+(oldestFirst?"▼":"▲");
  fill("holders",[age,...W,"request","kind","pool","transaction","opened at","holder","now at"],
    hs.map(h=>[secs(h.held_for),...w(h),request(h),h.kind,h.pool_name,
    h.transaction_for===null?"none":"open "+secs(h.transaction_for),
    h.opened_stack.length?details("o"+k(h)+h.session_id,loc(h.opened_at),
      h.opened_stack.map(loc)):loc(h.opened_at),
    holder(h),
    h.now_at.length?details("n"+k(h)+h.session_id,loc(h.now_at[0]),h.now_at.map(loc)):"—"]),
    {[age]:()=>{oldestFirst=!oldestFirst; render(last);}});
  fill("events",["at",...W,"pool","what","waited","in use / max","idle","waiting","held by"],
    d.pool_events.map(e=>[when(e.at),...w(e),e.pool_name,e.kind,secs(e.waited),
    e.used+" / "+bound(e.maximum),e.idle,e.pending,
    e.holders.length?details("e"+k(e)+e.at,e.holders[0],e.holders):"—"]));
  fill("leaks",["at",...W,"reason","request","kind","pool","opened at"],d.leaks.map(l=>[
    when(l.at),...w(l),l.reason,request(l),l.kind,l.pool_name,
    l.stack.length?details("l"+k(l)+l.at,l.opened_at,l.stack):l.opened_at]));
  fill("pitfalls",["at",...W,"kind","request","pool","at line","detail"],d.pitfalls.map(p=>[
    when(p.at),...w(p),p.kind,request(p),p.pool_name,p.at_line,p.detail||"—"]));
  const answered = many ? d.workers.filter(x=>x.status!=="not answering"&&x.status!=="failed")
    .length : 0;
  const s=document.getElementById("status"); s.className="muted";
  s.textContent="updated "+when(d.generated_at)+
    " (local time, UTC offset shown)"+(many?"; "+answered+" of "+d.workers.length+
    " workers shown":"")+"; refreshes every 5 s";}
function load(){fetch(JSON_PATH+location.search,{cache:"no-store"}).then(r=>{
  if(!r.ok) throw new Error(r.status+" "+r.statusText); return r.json();}).then(render)
  .catch(e=>{const s=document.getElementById("status"); s.textContent="refresh failed: "+e;
  s.className="warn";});}
load(); setInterval(load, 5000);
</script></body></html>
"""
