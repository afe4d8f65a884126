"""Engagement figures a marketer asks for, computed from the store's own tables.

Footfall counts every visit (enrolled visits are rows; anonymous ones are counts per day and hour with no
identity). Dwell comes from zone stays. Delivery figures are over notifications actually released (not
cancelled, expired or still scheduled).

Definitions (all rates in percent):
- new visit: the profile's first visit ever; returning: any later one.
- bounce rate: enrolled visits that saw at most one zone and lasted under ``bounce_s`` / enrolled visits
  that ended. ``bounce_rate_all`` adds the anonymous ones: (those + anonymous visits bounced) / (those +
  anonymous visits that ended). The gateway judges an anonymous visit when it ends, by the same rule, and
  counts it in the day it began; visits counted before migration 0013, or that began before the gateway
  last started, were not judged and are in neither count.
- zone bounce rate: the zone's stays that lasted under ``bounce_s`` / the zone's stays that ended (a stay is
  one zone, so the "at most one zone" half of the rule always holds), enrolled stays and anonymous ones
  together (anonymous ones judged, as above); enrolled stays by the time they began, anonymous ones by the
  day they ended (as their footfall).
- per hour (a one-day range): the visits beginning in each hour of the local day, enrolled + anonymous.
- engagement rate: notifications with an open, click or redemption / notified.
- CTR: notifications clicked / notifications delivered (acked by the app).
- redemption rate: notifications redeemed / notified.
- per zone: the delivery figures of the notifications whose triggering event was in that zone
  (enter, dwell, exit, visit start at the entrance); telemetry and schedule sends have no zone.
- store: every figure counts only the rows the store's gateway wrote (``store_id``), so stores sharing one
  database keep theirs apart; ``store=None`` (or ``*``) counts every store, ``"a,b"`` those stores (head
  office's database holds every store's rows: docs/scale-out.md). A visit is new when it is the profile's
  first at that store. A purchase is credited to the last notification its buyer got at any store (so it
  counts once across stores); a device alarm belongs to the store whose gateway prompted it.
- conversion: notifications credited with a purchase / notified. A purchase (a cart's checkout
  time) is credited to the last notification its buyer got before it, at most ``conversion_window_s``
  earlier (last touch), and only once; per experiment arm, lift is against the holdout's conversion
  (any purchase within the window after its holdout decision).
"""

from __future__ import annotations

import datetime as dt
import itertools
import statistics
from collections import defaultdict
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from gateway.storage.models import (
    Alarm,
    Cart,
    Decision,
    FootfallCount,
    FootfallHour,
    Interaction,
    InteractionKind,
    Notification,
    NotificationStatus,
    Purpose,
    Visit,
    ZoneStay,
)

RELEASED = (NotificationStatus.PENDING, NotificationStatus.SENT, NotificationStatus.ACKED)
ENGAGED = (InteractionKind.OPENED, InteractionKind.CLICKED, InteractionKind.REDEEMED)  # the customer acted on it


def day_bounds(day: str, timezone: str) -> tuple[float, float]:
    d = dt.date.fromisoformat(day)
    if d >= dt.date.max:
        raise ValueError(f"{day} is past the last day the calendar can end")
    tz = ZoneInfo(timezone)
    start = dt.datetime.combine(d, dt.time(0), tz)
    return start.timestamp(), (start + dt.timedelta(days=1)).timestamp()


def hour_edges(day: str, timezone: str) -> list[tuple[str, float, float]]:
    """Each local hour of ``day`` as (its local start "HH:MM", start, end): 23 or 25 of them on the days the
    clocks change, each labelled with the time a clock in the shop showed. The n-th is FootfallHour.hour n."""
    start, end = day_bounds(day, timezone)
    tz = ZoneInfo(timezone)
    edges = [start + 3600.0 * h for h in range(round((end - start) / 3600.0))] + [end]
    return [(dt.datetime.fromtimestamp(a, tz).strftime("%H:%M"), a, b) for a, b in itertools.pairwise(edges)]


def stores(store: str | None) -> list[str] | None:
    """``store=`` as given: one id, several separated by commas, or None / ``*`` for every store."""
    if store is None or store.strip() == "*":
        return None
    return [s for s in (p.strip() for p in store.split(",")) if s] or None


def _at(column: Any, store: str | None) -> list[ColumnElement[bool]]:
    """The condition that keeps the rows of ``store`` (one, several or every one: ``stores``)."""
    named = stores(store)
    return [] if named is None else [column == named[0]] if len(named) == 1 else [column.in_(named)]


def _pct(num: float, den: float) -> float | None:
    return round(100.0 * num / den, 2) if den else None


def visit_figures(session: Session, start: float, end: float, days: list[str], bounce_s: float = 60.0,
                  store: str | None = None) -> dict[str, Any]:
    visits = session.execute(select(Visit.id, Visit.profile_id, Visit.started_at, Visit.ended_at, Visit.zones)
                             .where(Visit.started_at >= start, Visit.started_at < end,
                                    *_at(Visit.store_id, store))).all()
    first_visit = dict(session.execute(
        select(Visit.profile_id, func.min(Visit.started_at))
        .where(Visit.profile_id.in_({v.profile_id for v in visits}), *_at(Visit.store_id, store))
        .group_by(Visit.profile_id)).all())
    new = sum(1 for v in visits if first_visit.get(v.profile_id) == v.started_at)
    anonymous = 0
    judged, anon_bounced = 0, 0  # anonymous visits that ended (and were judged), and those that bounced
    for n, e, b in session.execute(select(FootfallCount.anonymous_visits, FootfallCount.anonymous_ended,
                                          FootfallCount.anonymous_bounces).where(
            FootfallCount.day.in_(days), FootfallCount.zone == "", *_at(FootfallCount.store_id, store))):
        anonymous += int(n or 0)
        judged += int(e or 0)
        anon_bounced += int(b or 0)
    bounced = sum(1 for v in visits if len(v.zones or []) <= 1 and v.ended_at is not None
                  and v.ended_at - v.started_at < bounce_s)
    stays = session.execute(select(ZoneStay.zone, ZoneStay.entered_at, ZoneStay.exited_at).where(
        ZoneStay.entered_at >= start, ZoneStay.entered_at < end, ZoneStay.exited_at.is_not(None),
        *_at(ZoneStay.store_id, store))).all()
    per_zone: dict[str, list[float]] = defaultdict(list)
    for z in stays:
        per_zone[z.zone].append(z.exited_at - z.entered_at)
    ended = [v.ended_at - v.started_at for v in visits if v.ended_at is not None]
    return {
        "footfall": len(visits) + int(anonymous),
        "enrolled_visits": len(visits),
        "anonymous_visits": int(anonymous),
        "unique_enrolled_visitors": len({v.profile_id for v in visits}),
        "new_visits": new,
        "returning_visits": len(visits) - new,
        "avg_visit_s": round(sum(ended) / len(ended), 1) if ended else None,
        "avg_dwell_s_by_zone": {z: round(sum(d) / len(d), 1) for z, d in sorted(per_zone.items())},
        "bounce_rate": _pct(bounced, len(ended)),
        "anonymous_bounces": anon_bounced,
        "bounce_rate_all": _pct(bounced + anon_bounced, len(ended) + judged),
    }


def hour_figures(session: Session, day: str, timezone: str, store: str | None = None) -> list[dict[str, Any]]:
    """Footfall per local hour of ``day``: enrolled visits beginning in it and anonymous ones (counted in the
    hour they began), one row per hour as the shop's clock showed it (``hour_edges``)."""
    edges = hour_edges(day, timezone)
    start, end = edges[0][1], edges[-1][2]
    enrolled = [0] * len(edges)
    for (t,) in session.execute(select(Visit.started_at).where(Visit.started_at >= start, Visit.started_at < end,
                                                               *_at(Visit.store_id, store))):
        enrolled[min(len(edges) - 1, int((t - start) // 3600))] += 1
    anonymous = [0] * len(edges)
    for h, n in session.execute(select(FootfallHour.hour, func.sum(FootfallHour.anonymous_visits)).where(
            FootfallHour.day == day, FootfallHour.zone == "", *_at(FootfallHour.store_id, store))
            .group_by(FootfallHour.hour)):
        if 0 <= h < len(edges):
            anonymous[h] += int(n or 0)
    return [{"hour": label, "start": a, "footfall": enrolled[i] + anonymous[i], "enrolled_visits": enrolled[i],
             "anonymous_visits": anonymous[i]} for i, (label, a, _) in enumerate(edges)]


def attribute(session: Session, purchases: dict[int, list[float]], window_s: float) -> dict[int, int]:
    """Last touch: each purchase credits the latest released notification to its buyer that came at most
    ``window_s`` before it (ties: the higher id), once. Returns notification id -> purchases credited."""
    if not purchases:
        return {}
    first = min(min(ts) for ts in purchases.values()) - window_s
    last = max(max(ts) for ts in purchases.values())
    touches: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for nid, pid, at in session.execute(select(Notification.id, Notification.profile_id, Notification.created_at)
                                        .where(Notification.profile_id.in_(list(purchases)),
                                               Notification.status.in_(RELEASED),
                                               Notification.created_at >= first, Notification.created_at <= last)):
        touches[pid].append((at, nid))
    credited: dict[int, int] = defaultdict(int)
    for pid, times in purchases.items():
        mine = sorted(touches.get(pid, ()))
        for t in times:
            before = [x for x in mine if t - window_s <= x[0] <= t]
            if before:
                credited[before[-1][1]] += 1
    return dict(credited)


def notification_figures(session: Session, start: float, end: float, conversion_window_s: float = 7 * 86400,
                         store: str | None = None) -> dict[str, Any]:
    notes = session.execute(select(Notification.id, Notification.profile_id, Notification.campaign_id,
                                   Notification.created_at, Notification.status, Notification.variant,
                                   Notification.data)
                            .where(Notification.created_at >= start, Notification.created_at < end,
                                   Notification.status.in_(RELEASED), *_at(Notification.store_id, store))).all()
    ids = [n.id for n in notes]
    kinds: dict[int, set[str]] = defaultdict(set)
    for nid, kind in session.execute(select(Interaction.notification_id, Interaction.kind)
                                     .where(Interaction.notification_id.in_(ids))):
        kinds[nid].add(kind)
    window = conversion_window_s
    purchases: dict[int, list[float]] = defaultdict(list)  # profile -> checkout times (the purchase's own time)
    for pid, at in session.execute(select(Cart.profile_id, Cart.checked_out_at).where(
            Cart.checked_out_at.is_not(None), Cart.checked_out_at >= start, Cart.checked_out_at < end + window)):
        if at is not None:
            purchases[pid].append(float(at))
    credited = attribute(session, purchases, window)

    def converted(pid: int, t: float) -> bool:  # the holdout's side: any purchase within the window
        return any(t <= p <= t + window for p in purchases.get(pid, ()))

    def summarize(rows: list[Any]) -> dict[str, Any]:
        n = len(rows)
        delivered = sum(1 for r in rows if r.status == NotificationStatus.ACKED
                        or InteractionKind.DELIVERED in kinds[r.id])
        opened = sum(1 for r in rows if not kinds[r.id].isdisjoint(ENGAGED))
        clicked = sum(1 for r in rows if InteractionKind.CLICKED in kinds[r.id])
        redeemed = sum(1 for r in rows if InteractionKind.REDEEMED in kinds[r.id])
        conversions = sum(1 for r in rows if r.id in credited)
        return {"notified": n, "delivered": delivered, "opened": opened, "clicked": clicked, "redeemed": redeemed,
                "dismissed": sum(1 for r in rows if InteractionKind.DISMISSED in kinds[r.id]),
                "conversions": conversions, "purchases_credited": sum(credited.get(r.id, 0) for r in rows),
                "engagement_rate": _pct(opened, n), "ctr": _pct(clicked, delivered),
                "redemption_rate": _pct(redeemed, n), "conversion_rate": _pct(conversions, n)}

    by_campaign: dict[str, list[Any]] = defaultdict(list)
    for r in notes:
        by_campaign[r.campaign_id].append(r)
    campaigns = {cid: summarize(rows) for cid, rows in sorted(by_campaign.items())}
    by_zone: dict[str, list[Any]] = defaultdict(list)  # the zone of the triggering event (none: telemetry...)
    for r in notes:
        zone = (r.data or {}).get("zone") if isinstance(r.data, dict) else None
        if isinstance(zone, str) and zone:
            by_zone[zone].append(r)
    zones = {z: summarize(rows) for z, rows in sorted(by_zone.items())}
    # Experiments: per arm, and lift of each arm's conversion over the holdout's.
    holdouts = session.execute(select(Decision.campaign_id, Decision.profile_id, Decision.at).where(
        Decision.reason == "holdout", Decision.at >= start, Decision.at < end, *_at(Decision.store_id, store))).all()
    for cid, rows in by_campaign.items():
        arms: dict[str, list[Any]] = defaultdict(list)
        for r in rows:
            if r.variant:
                arms[r.variant].append(r)
        held = [h for h in holdouts if h.campaign_id == cid]
        if not arms and not held:
            continue
        hold_rate = _pct(sum(1 for h in held if converted(h.profile_id, h.at)), len(held))
        variants = {}
        for name, arm_rows in sorted(arms.items()):
            figs = summarize(arm_rows)
            # Measured like the holdout (any purchase within the window after it), so the two compare.
            figs["converted_within_window"] = sum(1 for r in arm_rows if converted(r.profile_id, r.created_at))
            rate = figs["converted_rate"] = _pct(figs["converted_within_window"], len(arm_rows))
            lift = rate - hold_rate if rate is not None and hold_rate is not None else None
            figs["lift_vs_holdout"] = round(lift, 2) if lift is not None else None  # percentage points
            figs["relative_lift_pct"] = round(100 * lift / hold_rate, 1) if lift is not None and hold_rate else None
            variants[name] = figs
        campaigns[cid]["experiment"] = {"holdout": {"profiles": len(held), "conversion_rate": hold_rate},
                                        "variants": variants}
    return {"total": summarize(list(notes)), "campaigns": campaigns, "zones": zones}


def zone_figures(session: Session, start: float, end: float, days: list[str], store: str | None = None,
                 bounce_s: float = 60.0) -> dict[str, dict[str, Any]]:
    """Per zone: footfall (enrolled stays + anonymous entries), unique enrolled visitors, average dwell, and
    bounce (stays under ``bounce_s`` over the stays that ended, enrolled and anonymous)."""
    stays = session.execute(select(ZoneStay.zone, ZoneStay.profile_id, ZoneStay.entered_at, ZoneStay.exited_at)
                            .where(ZoneStay.entered_at >= start, ZoneStay.entered_at < end,
                                   *_at(ZoneStay.store_id, store))).all()
    anon: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0, 0])  # visits, dwell, judged stays, bounces
    for z, n, d, e, b in session.execute(
            select(FootfallCount.zone, FootfallCount.anonymous_visits, FootfallCount.anonymous_dwell_s,
                   FootfallCount.anonymous_ended, FootfallCount.anonymous_bounces)
            .where(FootfallCount.day.in_(days), FootfallCount.zone != "", *_at(FootfallCount.store_id, store))):
        acc = anon[z]
        acc[0] += int(n or 0)
        acc[1] += float(d or 0.0)
        acc[2] += int(e or 0)  # 0 on rows counted before migration 0013: not judged
        acc[3] += int(b or 0)
    out: dict[str, dict[str, Any]] = {}
    for zone in sorted({z.zone for z in stays} | set(anon)):
        mine = [z for z in stays if z.zone == zone]
        closed = [z.exited_at - z.entered_at for z in mine if z.exited_at is not None]
        n_anon, dwell_anon, judged, anon_bounces = anon.get(zone, (0, 0.0, 0, 0))
        bounced = sum(1 for d in closed if d < bounce_s)
        out[zone] = {"footfall": len(mine) + int(n_anon), "enrolled": len(mine), "anonymous": int(n_anon),
                     "unique_enrolled_visitors": len({z.profile_id for z in mine}),
                     "avg_dwell_s": round(sum(closed) / len(closed), 1) if closed else None,
                     "avg_dwell_s_all": (round((sum(closed) + dwell_anon) / (len(closed) + n_anon), 1)
                                         if closed or n_anon else None),
                     "enrolled_bounces": bounced, "anonymous_bounces": int(anon_bounces),
                     "bounce_rate": _pct(bounced + anon_bounces, len(closed) + judged)}
    return out


def maintenance_figures(session: Session, start: float, end: float, store: str | None = None) -> dict[str, Any]:
    """Response time to maintenance prompts: from the prompt to the owner's first answer.

    A device alarm's prompt (``alarms``) is answered by an acknowledgement or a booking and resolved
    by a service; any other maintenance notification is answered by its first open, click or redemption."""
    answers: list[float] = []
    resolutions: list[float] = []
    prompts = 0
    tied: set[int] = set()
    for a in session.execute(select(Alarm.prompted_at, Alarm.acknowledged_at, Alarm.booked_at, Alarm.resolved_at,
                                    Alarm.notification_id)
                             .where(Alarm.prompted_at.is_not(None), Alarm.prompted_at >= start,
                                    Alarm.prompted_at < end,
                                    *([] if stores(store) is None else [Alarm.notification_id.in_(
                                        select(Notification.id).where(*_at(Notification.store_id, store)))]))):
        prompts += 1
        if a.notification_id is not None:
            tied.add(a.notification_id)
        first = min((t for t in (a.acknowledged_at, a.booked_at) if t is not None), default=None)
        if first is not None:
            answers.append(first - a.prompted_at)
        if a.resolved_at is not None:
            resolutions.append(a.resolved_at - a.prompted_at)
    notes = session.execute(select(Notification.id, func.coalesce(Notification.deliver_at, Notification.created_at))
                            .where(Notification.purpose == Purpose.MAINTENANCE, Notification.status.in_(RELEASED),
                                   Notification.created_at >= start, Notification.created_at < end,
                                   *_at(Notification.store_id, store))).all()
    loose = {nid: at for nid, at in notes if nid not in tied}
    if loose:
        firsts = dict(session.execute(select(Interaction.notification_id, func.min(Interaction.at)).where(
            Interaction.notification_id.in_(list(loose)), Interaction.kind.in_(ENGAGED))
            .group_by(Interaction.notification_id)).all())
        prompts += len(loose)
        answers += [firsts[nid] - at for nid, at in loose.items() if nid in firsts]

    def avg(xs: list[float]) -> float | None:
        return round(sum(xs) / len(xs), 1) if xs else None

    def median(xs: list[float]) -> float | None:
        return round(statistics.median(xs), 1) if xs else None

    return {"prompts": prompts, "answered": len(answers), "answer_rate": _pct(len(answers), prompts),
            "avg_response_s": avg(answers), "median_response_s": median(answers),
            "resolved": len(resolutions), "avg_resolution_s": avg(resolutions)}


def figures(session: Session, day_from: str, day_to: str, timezone: str, *, bounce_s: float = 60.0,
            conversion_window_s: float = 7 * 86400, zone: str | None = None, campaign: str | None = None,
            store: str | None = None, per_day: bool = True) -> dict[str, Any]:
    """Figures for the local days ``day_from`` .. ``day_to`` inclusive, in the store's timezone: the
    range's totals, per zone, per campaign (with experiment arms), maintenance response, per day, and for a
    range of one day per hour (``hours``); of the rows ``store``'s gateway wrote (None: of every store sharing
    the database)."""
    d0, d1 = dt.date.fromisoformat(day_from), dt.date.fromisoformat(day_to)
    if d1 < d0:
        raise ValueError("the range ends before it starts")
    if (d1 - d0).days > 366:
        raise ValueError("at most 366 days at once")
    days = [(d0 + dt.timedelta(days=i)).isoformat() for i in range((d1 - d0).days + 1)]
    start, _ = day_bounds(days[0], timezone)
    _, end = day_bounds(days[-1], timezone)
    visits = visit_figures(session, start, end, days, bounce_s, store)
    zones = zone_figures(session, start, end, days, store, bounce_s)
    notes = notification_figures(session, start, end, conversion_window_s, store)
    if zone is not None:
        zones = {z: f for z, f in zones.items() if z == zone}
        visits["avg_dwell_s_by_zone"] = {z: d for z, d in visits["avg_dwell_s_by_zone"].items() if z == zone}
        notes["zones"] = {z: f for z, f in notes["zones"].items() if z == zone}
    if campaign is not None:
        notes["campaigns"] = {c: f for c, f in notes["campaigns"].items() if c == campaign}
    out: dict[str, Any] = {"from": day_from, "to": day_to, "timezone": timezone, "store": store, **visits,
                           "unique_visitors": visits["unique_enrolled_visitors"] + visits["anonymous_visits"],
                           "zones": zones, "notifications": notes,
                           "maintenance": maintenance_figures(session, start, end, store)}
    if per_day:
        rows = []
        for day in days:
            a, b = day_bounds(day, timezone)
            v = visit_figures(session, a, b, [day], bounce_s, store)
            n = notification_figures(session, a, b, conversion_window_s, store)
            total = n["campaigns"].get(campaign) if campaign is not None else n["total"]
            z = zone_figures(session, a, b, [day], store, bounce_s)
            rows.append({"day": day, **{k: v[k] for k in ("footfall", "enrolled_visits", "anonymous_visits",
                                                          "unique_enrolled_visitors", "new_visits",
                                                          "returning_visits", "bounce_rate",
                                                          "anonymous_bounces", "bounce_rate_all")},
                         "zones": {k: f for k, f in z.items() if zone is None or k == zone},
                         "notifications": total,
                         "notifications_by_zone": {k: f for k, f in n["zones"].items() if zone is None or k == zone}})
        out["days"] = rows
    if len(days) == 1:
        out["hours"] = hour_figures(session, days[0], timezone, store)
    return out
