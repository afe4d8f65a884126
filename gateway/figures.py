"""Engagement figures a marketer asks for, computed from the store's own tables.

Footfall counts every visit (enrolled visits are rows; anonymous ones are daily counts with no
identity). Dwell and bounce come from enrolled customers' zone stays. Delivery figures are over
notifications actually released (not cancelled, expired or still scheduled).

Definitions (all rates in percent):
- new visit: the profile's first visit ever; returning: any later one.
- bounce rate: enrolled visits that saw at most one zone and lasted under ``bounce_s``.
- engagement rate: notifications with an open, click or redemption / notified.
- CTR: notifications clicked / notifications delivered (acked by the app).
- redemption rate: notifications redeemed / notified.
- conversion: notified profiles who purchased (a cart checked out) within ``conversion_window_s``
  after the notification / notified; per experiment arm, lift is against the holdout's conversion
  after its holdout decision.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway.storage.models import Cart, Decision, FootfallCount, Interaction, Notification, Visit, ZoneStay

RELEASED = ("pending", "sent", "acked")


def day_bounds(day: str, timezone: str) -> tuple[float, float]:
    d = dt.date.fromisoformat(day)
    tz = ZoneInfo(timezone)
    start = dt.datetime.combine(d, dt.time(0), tz)
    return start.timestamp(), (start + dt.timedelta(days=1)).timestamp()


def _pct(num: float, den: float) -> float | None:
    return round(100.0 * num / den, 2) if den else None


def visit_figures(session: Session, start: float, end: float, days: list[str], bounce_s: float = 60.0
                  ) -> dict[str, Any]:
    visits = session.execute(select(Visit.id, Visit.profile_id, Visit.started_at, Visit.ended_at, Visit.zones)
                             .where(Visit.started_at >= start, Visit.started_at < end)).all()
    first_visit = dict(session.execute(
        select(Visit.profile_id, func.min(Visit.started_at))
        .where(Visit.profile_id.in_({v.profile_id for v in visits})).group_by(Visit.profile_id)).all())
    new = sum(1 for v in visits if first_visit.get(v.profile_id) == v.started_at)
    anonymous = session.scalar(select(func.coalesce(func.sum(FootfallCount.anonymous_visits), 0)).where(
        FootfallCount.day.in_(days), FootfallCount.zone == "")) or 0
    bounced = sum(1 for v in visits if len(v.zones or []) <= 1 and v.ended_at is not None
                  and v.ended_at - v.started_at < bounce_s)
    stays = session.execute(select(ZoneStay.zone, ZoneStay.entered_at, ZoneStay.exited_at).where(
        ZoneStay.entered_at >= start, ZoneStay.entered_at < end, ZoneStay.exited_at.is_not(None))).all()
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
        "bounce_rate": _pct(bounced, len([v for v in visits if v.ended_at is not None])),
    }


def notification_figures(session: Session, start: float, end: float, conversion_window_s: float = 7 * 86400
                         ) -> dict[str, Any]:
    notes = session.execute(select(Notification.id, Notification.profile_id, Notification.campaign_id,
                                   Notification.created_at, Notification.status, Notification.variant)
                            .where(Notification.created_at >= start, Notification.created_at < end,
                                   Notification.status.in_(RELEASED))).all()
    ids = [n.id for n in notes]
    kinds: dict[int, set[str]] = defaultdict(set)
    for nid, kind in session.execute(select(Interaction.notification_id, Interaction.kind)
                                     .where(Interaction.notification_id.in_(ids))):
        kinds[nid].add(kind)
    purchases: dict[int, list[float]] = defaultdict(list)
    for pid, at in session.execute(select(Cart.profile_id, Cart.updated_at).where(
            Cart.status == "checked_out", Cart.updated_at >= start, Cart.updated_at < end + conversion_window_s)):
        purchases[pid].append(at)

    def converted(pid: int, t: float) -> bool:
        return any(t <= p <= t + conversion_window_s for p in purchases.get(pid, ()))

    def summarize(rows: list[Any]) -> dict[str, Any]:
        n = len(rows)
        delivered = sum(1 for r in rows if r.status == "acked" or "delivered" in kinds[r.id])
        opened = sum(1 for r in rows if kinds[r.id] & {"opened", "clicked", "redeemed"})
        clicked = sum(1 for r in rows if "clicked" in kinds[r.id])
        redeemed = sum(1 for r in rows if "redeemed" in kinds[r.id])
        conversions = sum(1 for r in rows if converted(r.profile_id, r.created_at))
        return {"notified": n, "delivered": delivered, "opened": opened, "clicked": clicked, "redeemed": redeemed,
                "dismissed": sum(1 for r in rows if "dismissed" in kinds[r.id]),
                "engagement_rate": _pct(opened, n), "ctr": _pct(clicked, delivered),
                "redemption_rate": _pct(redeemed, n), "conversion_rate": _pct(conversions, n)}

    by_campaign: dict[str, list[Any]] = defaultdict(list)
    for r in notes:
        by_campaign[r.campaign_id].append(r)
    campaigns = {cid: summarize(rows) for cid, rows in sorted(by_campaign.items())}
    # Experiments: per arm, and lift of each arm's conversion over the holdout's.
    holdouts = session.execute(select(Decision.campaign_id, Decision.profile_id, Decision.at).where(
        Decision.reason == "holdout", Decision.at >= start, Decision.at < end)).all()
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
            rate = figs["conversion_rate"]
            figs["lift_vs_holdout"] = (round(rate - hold_rate, 2) if rate is not None and hold_rate is not None
                                       else None)
            variants[name] = figs
        campaigns[cid]["experiment"] = {"holdout": {"profiles": len(held), "conversion_rate": hold_rate},
                                        "variants": variants}
    return {"total": summarize(list(notes)), "campaigns": campaigns}


def figures(session: Session, day_from: str, day_to: str, timezone: str, *, bounce_s: float = 60.0,
            conversion_window_s: float = 7 * 86400) -> dict[str, Any]:
    """Figures for the local days ``day_from`` .. ``day_to`` inclusive, in the store's timezone."""
    d0, d1 = dt.date.fromisoformat(day_from), dt.date.fromisoformat(day_to)
    if d1 < d0:
        raise ValueError("the range ends before it starts")
    if (d1 - d0).days > 366:
        raise ValueError("at most 366 days at once")
    days = [(d0 + dt.timedelta(days=i)).isoformat() for i in range((d1 - d0).days + 1)]
    start, _ = day_bounds(days[0], timezone)
    _, end = day_bounds(days[-1], timezone)
    return {"from": day_from, "to": day_to, "timezone": timezone,
            **visit_figures(session, start, end, days, bounce_s),
            "notifications": notification_figures(session, start, end, conversion_window_s)}
