"""The devices, alarms and health pages: a view of the services behind ``/v1/alarms``, ``/v1/devices``,
``/v1/dead-letters``, ``/health`` and ``/metrics``.

Every verdict is the services': the alarm desk (``gateway.telemetry.alarms.AlarmDesk``) acknowledges, books and
records services, the device registry gives rollups and dead letters, and the health page reads the runtime's
own ``health``, ``readiness`` and metrics text. This module only lays them out (ages, a chart's geometry).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import RedirectResponse, Response

from api.dashboard import Dashboard
from api.dashboard.routes import (
    PATH,
    PageSession,
    _can_change,
    _changing,
    _ctx,
    _note,
    _page,
    _take_note,
    dashboard_of,
    live_view,
    session_stream,
    viewer,
)
from api.deps import ApiContext
from api.schemas import DB_ID_MAX
from gateway.errors import Conflict, Invalid, NotFound

router = APIRouter(prefix=PATH, include_in_schema=False)
CHART_W, CHART_H, CHART_PAD = 600.0, 200.0, 8.0
PERIODS = {"minute": 60.0, "hour": 3600.0}
MAX_ACTIVE = 500  # active alarms the page lists and acts on
SPAN_POINTS = 120  # buckets a chart shows: two hours of minutes, five days of hours
DeviceId = Annotated[str, Path(min_length=1, max_length=128)]
AlarmId = Annotated[int, Path(ge=1, le=DB_ID_MAX)]


def age_text(seconds: float) -> str:
    """An age a person reads at a glance: ``45 s``, ``12 min``, ``3 h 5 min``, ``2 d 4 h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def alarm_rows(alarms: Sequence[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """The desk's alarms with their age and what the owner did so far (acknowledged, booked)."""
    return [{**a, "age_s": max(0.0, now - a["created_at"]), "age": age_text(now - a["created_at"]),
             "state": "booked" if a["booked_at"] else "acknowledged" if a["acknowledged_at"] else "new"}
            for a in alarms]


LIVE_FIELDS = ("id", "device_id", "name", "rule", "severity", "state", "age", "last_value", "detail",
               "acknowledged_at", "booked_at")


def live_alarms(rows: Sequence[dict[str, Any]]) -> str:
    """What the open page is sent: the active alarms' visible fields; the same text means nothing changed
    but their ages."""
    return json.dumps([{k: r[k] for k in LIVE_FIELDS} for r in rows], separators=(",", ":"))


@dataclass(frozen=True)
class Chart:
    """One metric's line, in the SVG's own units (y grows downwards), with the range it spans."""

    metric: str
    points: str
    low: float
    high: float
    first: float
    last: float


def chart(rows: Sequence[dict[str, Any]], metric: str) -> Chart | None:
    """The mean of each bucket of ``metric`` as an SVG polyline across the chart; None without a value."""
    pts = [(r["start"], r["mean"]) for r in rows if r["metric"] == metric and r["mean"] is not None]
    pts = [(t, v) for t, v in pts if math.isfinite(v)]
    if not pts:
        return None
    t0, t1 = pts[0][0], pts[-1][0]
    low, high = min(v for _, v in pts), max(v for _, v in pts)
    span_t, span_v = (t1 - t0) or 1.0, (high - low) or 1.0
    w, h = CHART_W - 2 * CHART_PAD, CHART_H - 2 * CHART_PAD
    xy = [(CHART_PAD + (t - t0) / span_t * w if t1 > t0 else CHART_W / 2,
           CHART_PAD + (high - v) / span_v * h if high > low else CHART_H / 2) for t, v in pts]
    return Chart(metric, " ".join(f"{x:.1f},{y:.1f}" for x, y in xy), low, high, t0, t1)


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(text: str, family: str) -> list[tuple[dict[str, str], float]]:
    """A family's samples from the Prometheus text /metrics serves: (labels, value) in order."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m and m.group(1) == family:
            try:
                value = float(m.group(3))
            except ValueError:
                continue
            out.append((dict(_LABEL.findall(m.group(2) or "")), value))
    return out


def health_view(health: dict[str, Any], ready: dict[str, Any] | None, metrics: str) -> dict[str, Any]:
    """What /health, /health/ready and /metrics say, for a person: components, queues, drops and errors."""
    components = dict(health.get("components", {}))
    if ready is not None:
        components.update({k: v for k, v in ready.get("components", {}).items() if k != "db"})
    queues = [(labels.get("queue", "?"), int(v)) for labels, v in samples(metrics, "gateway_queue_depth")]
    counters = {name: int(sum(v for _, v in samples(metrics, name)))
                for name in ("gateway_adverts_dropped_total", "gateway_database_outages_total",
                             "gateway_dead_letters_total", "gateway_remote_sightings_total")}
    return {"status": health.get("status", "unknown"), "ready": None if ready is None else ready.get("status"),
            "components": components, "queues": queues, "counters": counters}


# ------------------------------------------------------------------ pages


@router.get("/devices")
async def devices_page(request: Request, session: PageSession) -> Response:
    ctx, dash = _ctx(request), dashboard_of(request)
    alarms = await asyncio.to_thread(ctx.alarms.list_alarms, "active", None, MAX_ACTIVE) if ctx.alarms else None
    devices = await asyncio.to_thread(ctx.devices.list_devices, None, 200, 0) if ctx.devices else None
    dead = await asyncio.to_thread(ctx.devices.dead_letters, None, None, 50) if ctx.devices else None
    return _page(request, "devices.html", session=session, active="devices", note=_take_note(request),
                 alarms=None if alarms is None else alarm_rows(alarms, dash.clock.now()), devices=devices,
                 dead=dead, can_change=_can_change(session))


@router.get("/devices/stream")
async def alarms_stream(request: Request) -> Response:
    """The devices page's one SSE stream: the active alarms whenever they change (the desk looked at every
    ``stream_every_s``), a heartbeat comment otherwise; it ends when the session does."""
    session = await viewer(request)
    ctx, dash = _ctx(request), dashboard_of(request)
    if ctx.alarms is None:
        raise HTTPException(503, "device rules are not running on this gateway")
    last = ""

    async def next_event() -> tuple[str, str] | None:
        nonlocal last
        rows = alarm_rows(await asyncio.to_thread(ctx.alarms.list_alarms, "active", None, MAX_ACTIVE),
                          dash.clock.now())
        key = live_alarms([{**r, "age": ""} for r in rows])  # the ages alone changing is no news
        if key == last:
            return None
        last = key
        return "alarms", live_alarms(rows)

    return session_stream(request, session, next_event)


@router.get("/devices/{device_id}")
async def device_page(request: Request, session: PageSession, device_id: DeviceId,
                      period: Annotated[str, Query(pattern="^(minute|hour)$")] = "minute") -> Response:
    """A device's telemetry: per metric, a line of its rollups' means (SVG) and the same numbers as a table."""
    ctx, dash = _ctx(request), dashboard_of(request)
    if ctx.devices is None:
        raise HTTPException(503, "the device registry is not running")
    since = dash.clock.now() - SPAN_POINTS * PERIODS[period]
    try:
        device = await asyncio.to_thread(ctx.devices.get_device, device_id)
        rows = await asyncio.to_thread(ctx.devices.rollups, device_id, period, None, since, None, 5000)
    except NotFound:
        raise HTTPException(404, f"no device {device_id!r}") from None
    alarms = await asyncio.to_thread(ctx.alarms.list_alarms, None, device_id, 20) if ctx.alarms else []
    metrics = sorted({r["metric"] for r in rows})
    charts = [c for c in (chart(rows, m) for m in metrics) if c is not None]
    return _page(request, "device.html", session=session, active="devices", device=device, period=period,
                 charts=charts, rows=rows, alarms=alarm_rows(alarms, dash.clock.now()),
                 can_change=_can_change(session), note=_take_note(request), w=CHART_W, h=CHART_H)


async def _alarm_action(request: Request, alarm_id: int, action: str) -> Response:
    """Staff record, for the owner, that an alarm was seen (ack) or a service booked: the desk's own calls,
    on behalf of the alarm's owner (the desk refuses what it would refuse the owner's app)."""
    await _changing(request)
    ctx = _ctx(request)
    if ctx.alarms is None:
        raise HTTPException(503, "device rules are not running on this gateway")
    found = await asyncio.to_thread(ctx.alarms.list_alarms, "active", None, MAX_ACTIVE)
    alarm = next((a for a in found if a["id"] == alarm_id), None)
    if alarm is None:  # the page offers these on active alarms only
        raise HTTPException(404, f"no active alarm {alarm_id}")
    try:
        if action == "ack":
            await asyncio.to_thread(ctx.alarms.acknowledge, alarm["profile_id"], alarm_id)
            _note(request, f"Alarm {alarm_id} acknowledged.")
        else:
            await asyncio.to_thread(ctx.alarms.book, alarm["profile_id"], alarm_id, None)
            _note(request, f"A service is booked for alarm {alarm_id}.")
    except (Conflict, Invalid, NotFound) as exc:
        _note(request, str(exc))
    return RedirectResponse(f"{PATH}/devices", 303)


@router.post("/alarms/{alarm_id}/ack")
async def alarm_ack(request: Request, alarm_id: AlarmId) -> Response:
    return await _alarm_action(request, alarm_id, "ack")


@router.post("/alarms/{alarm_id}/book")
async def alarm_book(request: Request, alarm_id: AlarmId) -> Response:
    return await _alarm_action(request, alarm_id, "book")


@router.post("/devices/{device_id}/service")
async def device_service(request: Request, device_id: DeviceId) -> Response:
    """A service done, as ``POST /v1/devices/{id}/service``: counters reset, the device's alarms resolved."""
    _, form = await _changing(request)
    ctx = _ctx(request)
    if ctx.alarms is None:
        raise HTTPException(503, "device rules are not running on this gateway")
    note = form.get("note", "").strip()[:500] or None
    try:
        done = await asyncio.to_thread(ctx.alarms.record_service, device_id, note)
        _note(request, f"Service recorded for {device_id}: {len(done['alarms_resolved'])} alarm(s) resolved.")
    except NotFound as exc:
        _note(request, str(exc))
    return RedirectResponse(f"{PATH}/devices/{quote(device_id, safe='')}", 303)


async def health_now(ctx: ApiContext, dash: Dashboard) -> dict[str, Any]:
    """The health page's facts: the runtime's own health, readiness and metrics (the functions behind
    /health and /metrics), the receivers, the newest dead letters."""
    health = await asyncio.to_thread(ctx.health)
    ready = await asyncio.to_thread(ctx.ready) if ctx.ready is not None else None
    metrics = await ctx.metrics() if ctx.metrics is not None else ""
    dead = await asyncio.to_thread(ctx.devices.dead_letters, None, None, 10) if ctx.devices else []
    return {**health_view(health, ready, metrics), "receivers": live_view(ctx, dash)["receivers"], "dead": dead}


@router.get("/health")
async def health_page(request: Request, session: PageSession) -> Response:
    now = await health_now(_ctx(request), dashboard_of(request))
    return _page(request, "health.html", session=session, active="health", view=now, receivers=now["receivers"],
                 dead=now["dead"])


@router.get("/health/stream")
async def health_stream(request: Request) -> Response:
    """The health page's one SSE stream: its facts whenever they change (looked at every ``stream_every_s``,
    one look shared by every open page), a heartbeat otherwise; it ends when the session does."""
    session = await viewer(request)
    ctx, dash = _ctx(request), dashboard_of(request)
    last = ""

    async def next_event() -> tuple[str, str] | None:
        nonlocal last
        body = await dash.shared(lambda: health_now(ctx, dash), "health")
        if body == last:
            return None
        last = body
        return "health", body

    return session_stream(request, session, next_event)
