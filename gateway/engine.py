"""The campaign engine: one event for one profile in, decisions and outbox notifications out.

Every campaign the event's trigger can fire is evaluated and leaves a Decision with a reason,
so the API can always say why something did or did not happen. Only the highest-priority
campaign that passes every check sends (arbitration). The notification is unique per
(campaign, profile, triggering occurrence), so a replayed event never sends twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway.campaigns import Campaign, CampaignIndex, evaluate, render
from gateway.storage.models import Cart, CatalogItem, Consent, Decision, Notification, Profile

FIRED = "fired"
NO_CONSENT = "no_consent"
CONDITION_FALSE = "condition_false"
COOLDOWN = "cooldown"
LOST_ARBITRATION = "lost_arbitration"
DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class EngineEvent:
    kind: str  # a trigger type: visit_start, enter, dwell, exit, visit_end, telemetry, cart_abandoned
    profile_id: int
    time: float
    key: str  # identifies the occurrence (a zone stay, a visit, a reading), part of the dedup key
    zone: str | None = None
    dwell_s: float = 0.0
    facts: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    campaign_id: str
    profile_id: int
    fired: bool
    reason: str
    detail: str | None = None
    notification_id: int | None = None
    who: str = ""  # the profile's external id, for logs


def cart_facts(session: Session, profile_id: int, now: float, abandon_after_s: float) -> dict[str, Any]:
    """The profile's most recent open cart, with where each item is in the shop."""
    cart = session.scalars(
        select(Cart).where(Cart.profile_id == profile_id, Cart.status == "open")
        .order_by(Cart.updated_at.desc()).limit(1)
    ).first()
    if cart is None:
        return {"abandoned": False, "item_count": 0, "items": []}
    skus = [str(i.get("sku")) for i in cart.items]
    where = {c.sku: c for c in session.scalars(select(CatalogItem).where(CatalogItem.sku.in_(skus)))}
    items = []
    for it in cart.items:
        cat = where.get(str(it.get("sku")))
        items.append({
            "sku": it.get("sku"), "name": it.get("name") or (cat.name if cat else it.get("sku")),
            "quantity": it.get("quantity", 1), "price": it.get("price"),
            "zone": cat.zone if cat else None, "aisle": cat.aisle if cat else None,
        })

    def describe(i: dict[str, Any]) -> str:
        qty = f" x{i['quantity']}" if i["quantity"] and i["quantity"] != 1 else ""
        place = ", ".join(p for p in (i["zone"], f"aisle {i['aisle']}" if i["aisle"] else None) if p)
        return f"{i['name']}{qty} ({place})" if place else f"{i['name']}{qty}"

    return {
        "id": cart.id,
        "abandoned": now - cart.updated_at >= abandon_after_s,
        "idle_s": now - cart.updated_at,
        "item_count": sum(int(i["quantity"] or 1) for i in items),
        "items": items,
        "items_where": "; ".join(describe(i) for i in items),
        "zones": sorted({i["zone"] for i in items if i["zone"]}),
    }


def profile_facts(profile: Profile, consents: set[str]) -> dict[str, Any]:
    name = profile.name or ""
    return {
        "id": profile.id, "external_id": profile.external_id, "name": name,
        "first_name": name.split()[0] if name else "there",
        "attributes": dict(profile.attributes or {}), "consents": sorted(consents),
    }


class Engine:
    def __init__(self, campaigns: CampaignIndex, *, abandon_after_s: float = 1800.0) -> None:
        self.campaigns = campaigns
        self.abandon_after_s = abandon_after_s
        self.counts: Counter[str] = Counter()  # decisions by reason, for /metrics and summaries
        self.fired_by_campaign: Counter[str] = Counter()
        self._last_value: dict[tuple[str, str], float] = {}  # (device, metric) -> previous reading
        # Occurrences already judged, per profile: a zone stay gets one verdict per campaign, not one
        # per dwell tick. Forgotten when the visit ends; the outbox's dedup key is the durable guard.
        self._judged: dict[int, set[tuple[str, str]]] = {}

    def _crossed(self, c: Campaign, event: EngineEvent) -> bool:
        """Thresholds fire on the crossing, not on every reading past it (no re-sends, no noise)."""
        t = c.trigger
        if t.metric is None or (t.above is None and t.below is None):
            return True
        value = event.facts.get("reading", {}).get(t.metric)
        if value is None:
            return False
        prev = self._last_value.get((str(event.facts.get("device", {}).get("id")), t.metric))
        if t.above is not None and value >= t.above and (prev is None or prev < t.above):
            return True
        return t.below is not None and value <= t.below and (prev is None or prev > t.below)

    def _remember_readings(self, event: EngineEvent) -> None:
        device = str(event.facts.get("device", {}).get("id"))
        for metric, value in event.facts.get("reading", {}).items():
            self._last_value[(device, metric)] = value

    def handle(self, session: Session, event: EngineEvent) -> list[Outcome]:
        metrics = event.facts.get("reading", {}).keys() if event.kind == "telemetry" else ()
        candidates = self.campaigns.candidates(event.kind, event.zone, event.dwell_s, metrics)
        if event.kind == "telemetry":
            candidates = [c for c in candidates if self._crossed(c, event)]
            self._remember_readings(event)
        judged = self._judged.setdefault(event.profile_id, set())
        candidates = [c for c in candidates if (c.id, event.key) not in judged]
        if event.kind == "visit_end":
            self._judged.pop(event.profile_id, None)
        if not candidates:
            return []
        profile = session.get(Profile, event.profile_id)
        if profile is None:
            return []
        consents = set(session.scalars(
            select(Consent.purpose).where(Consent.profile_id == profile.id, Consent.granted.is_(True))
        ))
        facts: dict[str, Any] = dict(event.facts)
        facts["profile"] = profile_facts(profile, consents)
        facts["event"] = {"kind": event.kind, "zone": event.zone, "dwell_s": round(event.dwell_s, 1),
                          "time": event.time}
        if any(c.purpose == "cart_reminders" or "cart" in str(c.conditions) for c in candidates):
            facts["cart"] = cart_facts(session, profile.id, event.time, self.abandon_after_s)

        who = profile.external_id or f"#{profile.id}"
        outcomes: list[Outcome] = []
        winner: Campaign | None = None
        for c in candidates:  # highest priority first
            reason, detail = self._check(session, c, event, facts, consents)
            if reason is None and winner is not None:
                reason, detail = LOST_ARBITRATION, f"{winner.id} has higher priority"
            if reason is not None:
                outcomes.append(Outcome(c.id, profile.id, False, reason, detail, None, who))
                continue
            winner = c
            outcomes.append(self._fire(session, c, event, facts, who))
        judged.update((o.campaign_id, event.key) for o in outcomes)
        for o in outcomes:
            session.add(Decision(at=event.time, profile_id=o.profile_id, campaign_id=o.campaign_id,
                                 event_kind=event.kind, event_key=event.key, fired=o.fired,
                                 reason=o.reason, detail=o.detail))
            self.counts[o.reason] += 1
            if o.fired:
                self.fired_by_campaign[o.campaign_id] += 1
        return outcomes

    def _check(self, session: Session, c: Campaign, event: EngineEvent, facts: Mapping[str, Any],
               consents: set[str]) -> tuple[str | None, str | None]:
        if c.purpose not in consents:
            return NO_CONSENT, f"no consent for {c.purpose}"
        failed = evaluate(c.conditions, facts)
        if failed is not None:
            return CONDITION_FALSE, failed
        if session.scalar(select(Notification.id).where(Notification.dedup_key == self.dedup_key(c, event))):
            return DUPLICATE, "already sent for this occurrence"
        if c.cooldown_s > 0:
            last = session.scalar(select(func.max(Notification.created_at)).where(
                Notification.campaign_id == c.id, Notification.profile_id == event.profile_id))
            if last is not None and event.time - last < c.cooldown_s:
                return COOLDOWN, f"sent {event.time - last:.0f} s ago, cooldown {c.cooldown_s:.0f} s"
        return None, None

    @staticmethod
    def dedup_key(c: Campaign, event: EngineEvent) -> str:
        return f"{c.id}:{event.profile_id}:{event.key}"

    def _fire(self, session: Session, c: Campaign, event: EngineEvent, facts: dict[str, Any],
              who: str) -> Outcome:
        scope = {**facts, **c.action.data}
        data: dict[str, Any] = {"campaign": c.id, "purpose": c.purpose, "trigger": event.kind,
                                "zone": event.zone, **c.action.data}
        if "cart" in facts and facts["cart"].get("abandoned"):
            data["cart"] = {k: facts["cart"][k] for k in ("id", "items", "zones")}
        if "device" in facts:
            data["device"] = facts["device"]
        n = Notification(profile_id=event.profile_id, campaign_id=c.id, purpose=c.purpose,
                         dedup_key=self.dedup_key(c, event), title=render(c.action.title, scope)[:300],
                         body=render(c.action.body, scope), data=data, created_at=event.time,
                         status="pending")
        session.add(n)
        session.flush()  # assigns the monotonic id the stream uses
        return Outcome(c.id, event.profile_id, True, FIRED, None, n.id, who)
