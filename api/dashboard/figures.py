"""The figures page: the numbers of GET /v1/figures as tables, each with a bar chart drawn here (inline SVG,
no chart library) and a CSV download.

Every number comes from the services behind the API: ``GatewayService.figures`` (the route's service) and
``decision_counts`` (the campaigns page's, for how many times a campaign was evaluated and fired). The page
only lays them out; the one thing it computes is the lift's 95 % interval, from the counts the figures give.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import math
from dataclasses import dataclass
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response
from sqlalchemy import select, union

from api.dashboard.routes import PATH, PageSession, _ctx, _page, dashboard_of, viewer
from api.deps import ApiContext
from gateway.errors import Invalid
from gateway.storage.models import Decision, Visit

router = APIRouter(prefix=PATH, include_in_schema=False)
STORE_MAX = 64
Cell = str | int | float | None
FUNNEL = ("evaluated", "fired", "notified", "delivered", "opened", "clicked", "redeemed", "converted")
Z95 = 1.959964  # the normal quantile of a two-sided 95 % interval


@dataclass(frozen=True)
class Table:
    name: str
    """Its CSV file's name and its id on the page."""
    title: str
    columns: tuple[str, ...]
    rows: list[tuple[Cell, ...]]


@dataclass(frozen=True)
class Part:
    """One segment of a stacked bar: its name, value, and where it is drawn."""
    name: str
    value: float
    x: float
    width: float


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    y: float
    width: float
    parts: tuple[Part, ...] = ()
    """A stacked bar's segments, left to right, adding up to ``value`` (none: one plain bar)."""


@dataclass(frozen=True)
class Chart:
    table: str
    title: str
    bars: list[Bar]
    height: float


CHART_W, LABEL_W, ROW_H = 420.0, 140.0, 22.0


def chart(table: str, title: str, pairs: list[tuple[str, float | None]]) -> Chart:
    """Horizontal bars, one a row, scaled to the largest value (a missing one draws as 0)."""
    values = [(label, float(v or 0.0)) for label, v in pairs]
    top = max((v for _, v in values), default=0.0) or 1.0
    span = CHART_W - LABEL_W - 60.0
    bars = [Bar(label, v, i * ROW_H, round(span * max(v, 0.0) / top, 1)) for i, (label, v) in enumerate(values)]
    return Chart(table, title, bars, max(ROW_H, len(bars) * ROW_H))


def stacked(table: str, title: str, names: tuple[str, ...], rows: list[tuple[str, tuple[float | None, ...]]]
            ) -> Chart:
    """Horizontal bars of segments (``names``, in order), each bar as long as their sum, scaled to the largest."""
    values = [(label, [max(float(v or 0.0), 0.0) for v in parts]) for label, parts in rows]
    top = max((sum(p) for _, p in values), default=0.0) or 1.0
    span = CHART_W - LABEL_W - 60.0
    bars = []
    for i, (label, parts) in enumerate(values):
        x, segs = LABEL_W, []
        for name, v in zip(names, parts, strict=True):
            w = round(span * v / top, 1)
            segs.append(Part(name, v, x, w))
            x += w
        bars.append(Bar(label, sum(parts), i * ROW_H, round(x - LABEL_W, 1), tuple(segs)))
    return Chart(table, title, bars, max(ROW_H, len(bars) * ROW_H))


def lift_interval(arm_converted: int, arm_n: int, hold_rate_pct: float | None, hold_n: int
                  ) -> tuple[float, float] | None:
    """The 95 % (Wald) interval of the arm's conversion minus the holdout's, in percentage points; None
    when either side has nobody (no interval can be said)."""
    if arm_n == 0 or hold_n == 0 or hold_rate_pct is None:
        return None
    p1, p0 = arm_converted / arm_n, hold_rate_pct / 100.0
    half = Z95 * math.sqrt(p1 * (1 - p1) / arm_n + p0 * (1 - p0) / hold_n)
    return round(100 * (p1 - p0 - half), 2), round(100 * (p1 - p0 + half), 2)


def evaluated_between(since_start: dict[str, dict[str, int]], since_end: dict[str, dict[str, int]]
                      ) -> dict[str, dict[str, int]]:
    """Per campaign, decisions in [start, end): the counts since the start less those since the end."""
    out = {}
    for cid, c in since_start.items():
        later = since_end.get(cid, {})
        fired = c.get("fired", 0) - later.get("fired", 0)
        suppressed = c.get("suppressed", 0) - later.get("suppressed", 0)
        out[cid] = {"evaluated": fired + suppressed, "fired": fired}
    return out


def tables(fig: dict[str, Any], decided: dict[str, dict[str, int]]) -> list[Table]:
    """Every table of the page, from the figures as GET /v1/figures gives them (``hours`` only for a range
    of one day)."""
    out = [Table("totals", "The range", ("figure", "value"), [
        ("footfall", fig["footfall"]), ("unique visitors", fig["unique_visitors"]),
        ("enrolled visits", fig["enrolled_visits"]), ("anonymous visits", fig["anonymous_visits"]),
        ("new visits", fig["new_visits"]), ("returning visits", fig["returning_visits"]),
        ("average visit (s)", fig["avg_visit_s"]), ("bounce rate, enrolled (%)", fig["bounce_rate"]),
        ("bounce rate, everyone (%)", fig.get("bounce_rate_all"))])]
    out.append(Table("days", "Footfall per day", ("day", "footfall", "enrolled", "anonymous", "unique enrolled",
                                                   "new", "returning", "bounce enrolled (%)", "bounce all (%)"),
                     [(d["day"], d["footfall"], d["enrolled_visits"], d["anonymous_visits"],
                       d["unique_enrolled_visitors"], d["new_visits"], d["returning_visits"], d["bounce_rate"],
                       d.get("bounce_rate_all")) for d in fig.get("days", [])]))
    if fig.get("hours") is not None:
        out.append(Table("hours", "Footfall per hour", ("hour", "footfall", "enrolled", "anonymous"),
                         [(h["hour"], h["footfall"], h["enrolled_visits"], h["anonymous_visits"])
                          for h in fig["hours"]]))
    out.append(Table("zones", "Per zone", ("zone", "footfall", "enrolled", "anonymous", "unique enrolled",
                                           "average dwell (s)", "bounce rate (%)"),
                     [(z, f["footfall"], f["enrolled"], f["anonymous"], f["unique_enrolled_visitors"],
                       f["avg_dwell_s_all"], f.get("bounce_rate")) for z, f in fig["zones"].items()]))
    campaigns = fig["notifications"]["campaigns"]
    funnel: list[tuple[Cell, ...]] = []
    for cid in sorted(set(campaigns) | set(decided)):
        n, d = campaigns.get(cid, {}), decided.get(cid, {})
        funnel.append((cid, d.get("evaluated", 0), d.get("fired", 0), n.get("notified", 0), n.get("delivered", 0),
                       n.get("opened", 0), n.get("clicked", 0), n.get("redeemed", 0), n.get("conversions", 0)))
    out.append(Table("funnel", "Campaign funnel", ("campaign", *FUNNEL), funnel))
    arms: list[tuple[Cell, ...]] = []
    for cid, n in campaigns.items():
        exp = n.get("experiment")
        if not exp:
            continue
        hold = exp["holdout"]
        for arm, a in exp["variants"].items():
            ci = lift_interval(a["converted_within_window"], a["notified"], hold["conversion_rate"], hold["profiles"])
            arms.append((cid, arm, a["notified"], a["converted_within_window"], a["converted_rate"],
                         hold["profiles"], hold["conversion_rate"], a["lift_vs_holdout"],
                         ci[0] if ci else None, ci[1] if ci else None))
    out.append(Table("experiments", "Experiment arms against the holdout",
                     ("campaign", "arm", "notified", "converted", "conversion (%)", "holdout profiles",
                      "holdout conversion (%)", "lift (points)", "lift 95% low", "lift 95% high"), arms))
    return out


def charts(by_name: dict[str, Table]) -> dict[str, list[Chart]]:
    """The charts drawn beside each table, from the table's own cells (so the two cannot disagree)."""
    totals = dict((str(r[0]), r[1]) for r in by_name["totals"].rows)
    out: dict[str, list[Chart]] = {"totals": [chart("totals", "New vs returning visits", [
        ("new", _num(totals["new visits"])), ("returning", _num(totals["returning visits"]))])]}
    if "days" in by_name:
        out["days"] = [chart("days", "Footfall per day", [(str(r[0]), _num(r[1])) for r in by_name["days"].rows])]
    if "hours" in by_name:
        out["hours"] = [stacked("hours", "Footfall per hour, enrolled and anonymous", ("enrolled", "anonymous"),
                                [(str(r[0]), (_num(r[2]), _num(r[3]))) for r in by_name["hours"].rows])]
    zones = by_name["zones"].rows
    out["zones"] = [chart("zones", "Footfall per zone", [(str(r[0]), _num(r[1])) for r in zones]),
                    chart("zones", "Average dwell per zone (s)", [(str(r[0]), _num(r[5])) for r in zones]),
                    chart("zones", "Bounce rate per zone (%)", [(str(r[0]), _num(r[6])) for r in zones])]
    out["funnel"] = [chart("funnel", f"Funnel of {r[0]}", list(zip(FUNNEL, (_num(c) for c in r[1:]), strict=True)))
                     for r in by_name["funnel"].rows]
    out["experiments"] = [chart("experiments", "Conversion per arm (%)",
                                [(f"{r[0]} · {r[1]}", _num(r[4])) for r in by_name["experiments"].rows])]
    return out


def _num(cell: Cell) -> float | None:
    return float(cell) if isinstance(cell, int | float) else None


def as_csv(table: Table) -> str:
    """The table as shown, one header row; an empty cell for a figure that has no value."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.columns)
    writer.writerows(["" if c is None else c for c in row] for row in table.rows)
    return buf.getvalue()


def stores_of(ctx: ApiContext) -> list[str]:
    """The stores whose gateways wrote visits or decisions to this database (off the loop)."""
    q = union(select(Visit.store_id).where(Visit.store_id.is_not(None)),
              select(Decision.store_id).where(Decision.store_id.is_not(None)))
    with ctx.service.db.session() as s:
        found = {str(x) for x in s.scalars(q)}
    own = ctx.service.store_id
    return sorted(found | ({own} if own else set()))


def hour_edges(day: str, timezone: str) -> list[tuple[str, float, float]]:
    """The local hours of ``day``, as the figures count them (gateway.engine.figures.hour_edges)."""
    from gateway.engine.figures import hour_edges as edges

    return edges(day, timezone)


def load(ctx: ApiContext, day_from: str | None, day_to: str | None, store: str | None) -> tuple[
        dict[str, Any], list[Table]]:
    """The figures and the page's tables for a range (the service's defaults: today, this store)."""
    from gateway.engine.figures import day_bounds

    fig = ctx.service.figures(day_from, day_to, ctx.service.timezone, store=store)
    start, _ = day_bounds(fig["from"], ctx.service.timezone)
    _, end = day_bounds(fig["to"], ctx.service.timezone)
    own = store is None or store == ctx.service.store_id  # decision_counts counts this gateway's store
    decided = evaluated_between(ctx.service.decision_counts(start), ctx.service.decision_counts(end)) if own else {}
    return fig, tables(fig, decided)


def _today(ctx: ApiContext, now: float) -> str:
    return dt.datetime.fromtimestamp(now, ZoneInfo(ctx.service.timezone)).date().isoformat()


DateQ = Annotated[dt.date | None, Query(alias="from")]
ToQ = Annotated[dt.date | None, Query(alias="to")]
StoreQ = Annotated[str, Query(max_length=STORE_MAX)]


@router.get("/figures")
async def figures_page(request: Request, session: PageSession, day_from: DateQ = None, day_to: ToQ = None,
                       store: StoreQ = "") -> Response:
    ctx = _ctx(request)
    chosen = store.strip() or ctx.service.store_id
    first = day_from.isoformat() if day_from else None
    last = day_to.isoformat() if day_to else None
    stores = await asyncio.to_thread(stores_of, ctx)
    try:
        fig, found = await asyncio.to_thread(load, ctx, first, last, chosen)
    except Invalid as exc:
        today = _today(ctx, dashboard_of(request).clock.now())
        return _page(request, "figures.html", 422, session=session, error=str(exc), tables=[], charts={},
                     range={"from": first or today, "to": last or first or today}, stores=stores, store=chosen,
                     active="figures")
    by_name = {t.name: t for t in found}
    return _page(request, "figures.html", session=session, error=None, tables=found, charts=charts(by_name),
                 range={"from": fig["from"], "to": fig["to"]}, stores=stores, store=chosen, tz=fig["timezone"],
                 active="figures")


@router.get("/figures/{name}.csv")
async def figures_csv(request: Request, name: str, day_from: DateQ = None, day_to: ToQ = None,
                      store: StoreQ = "") -> Response:
    """One table of the page as CSV, for the same range and store."""
    await viewer(request)
    ctx = _ctx(request)
    try:
        fig, found = await asyncio.to_thread(load, ctx, day_from.isoformat() if day_from else None,
                                             day_to.isoformat() if day_to else None,
                                             store.strip() or ctx.service.store_id)
    except Invalid as exc:
        raise HTTPException(422, str(exc)) from None
    table = next((t for t in found if t.name == name), None)
    if table is None:
        raise HTTPException(404, f"no table {name!r} on the figures page for this range")
    filename = f"{name}-{fig['from']}-{fig['to']}.csv"
    return Response(as_csv(table), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"})
