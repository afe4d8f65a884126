"""The campaign engine: one event for one profile in, decisions and outbox notifications out.

Every campaign the event's trigger can fire is evaluated and leaves a Decision with a reason,
so the API can always say why something did or did not happen. Only the highest-priority
campaign that passes every check sends (arbitration). The notification is unique per
(campaign, profile, triggering occurrence), so a replayed event never sends twice.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway.campaigns import Campaign, CampaignIndex, Segment, Variant, assign_variant, evaluate, render
from gateway.storage.models import Cart, CatalogItem, Consent, Decision, Notification, Profile, Visit

FIRED = "fired"
NO_CONSENT = "no_consent"
CONDITION_FALSE = "condition_false"
COOLDOWN = "cooldown"
LOST_ARBITRATION = "lost_arbitration"
DUPLICATE = "duplicate"
CAPPED = "capped"
QUIET_HOURS = "quiet_hours"
HOLDOUT = "holdout"
BUDGET_EXHAUSTED = "budget_exhausted"
NOT_REELIGIBLE = "not_reeligible"
EXPIRED = "expired"
CANCELLED = "cancelled"

SCHEDULED = "scheduled"


@dataclass(frozen=True, slots=True)
class FrequencyCap:
    """At most ``max`` notifications per profile in any rolling ``window_s``, across campaigns."""

    window_s: float
    max: int
    purposes: tuple[str, ...] = ("offers", "cart_reminders")  # service messages are not capped


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
    variant: str | None = None
    deliver_at: float | None = None  # set when the send is scheduled (delay, quiet hours)

    @property
    def sends_now(self) -> bool:
        """A committed notification that should go to the channels right away."""
        return self.fired and self.notification_id is not None and self.deliver_at is None


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


def behaviour_facts(session: Session, profile_id: int, now: float) -> dict[str, Any]:
    """Visit history as facts: what segments like "frequent" or "occasional" are made of."""
    rows = session.execute(select(Visit.started_at, Visit.ended_at).where(
        Visit.profile_id == profile_id, Visit.started_at >= now - 365 * 86400)).all()
    past = [r for r in rows if r.started_at < now - 1]  # the visit that just began is not history
    ended = [r.ended_at - r.started_at for r in rows if r.ended_at is not None and r.started_at >= now - 90 * 86400]
    last = max((r.started_at for r in past), default=None)
    return {
        "visits_30d": sum(1 for r in rows if r.started_at >= now - 30 * 86400),
        "visits_365d": len(rows),
        "days_since_last_visit": None if last is None else round((now - last) / 86400, 2),
        "avg_visit_s": round(sum(ended) / len(ended), 1) if ended else None,
    }


def redemption_code() -> str:
    """Short, unguessable, unambiguous (no 0/O, 1/I): read out or scanned at the till."""
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    return "".join(secrets.choice(alphabet) for _ in range(8))


def tier_for(points: int, tiers: Sequence[tuple[str, int]]) -> str | None:
    best = None
    for name, min_points in sorted(tiers, key=lambda t: t[1]):
        if points >= min_points:
            best = name
    return best


def profile_facts(profile: Profile, consents: set[str]) -> dict[str, Any]:
    name = profile.name or ""
    return {
        "id": profile.id, "external_id": profile.external_id, "name": name,
        "first_name": name.split()[0] if name else "there",
        "attributes": dict(profile.attributes or {}), "consents": sorted(consents),
    }


class Engine:
    """Decides, explains, and writes the outbox. All durable state (cooldowns, caps, budgets, pending
    sends) is read from the database, so it survives a restart; the in-memory state only avoids
    repeating work and is safe to lose."""

    def __init__(self, campaigns: CampaignIndex, *, abandon_after_s: float = 1800.0, timezone: str = "UTC",
                 caps: Sequence[FrequencyCap] = (), segments: Sequence[Segment] = (),
                 tiers: Sequence[tuple[str, int]] = ()) -> None:
        self.campaigns = campaigns
        self.segments = tuple(segments)
        self.tiers = tuple(tiers)
        self.abandon_after_s = abandon_after_s
        self.tz = ZoneInfo(timezone)
        self.caps = tuple(caps)
        self.counts: Counter[str] = Counter()  # decisions by reason, for /metrics and summaries
        self.fired_by_campaign: Counter[str] = Counter()
        self._last_value: dict[tuple[str, str], float] = {}  # (device, metric) -> previous reading
        # Occurrences already judged, per profile: a zone stay gets one verdict per campaign, not one
        # per dwell tick. Forgotten when the visit ends; the outbox's dedup key is the durable guard.
        self._judged: dict[int, set[tuple[str, str]]] = {}
        self._cancellers: dict[str, list[str]] = {}
        self.set_campaigns(campaigns)

    def set_campaigns(self, campaigns: CampaignIndex) -> None:
        """Swap the live campaign set (API edits); durable state is in the database, so nothing is lost."""
        self.campaigns = campaigns
        cancellers: dict[str, list[str]] = {}
        for c in campaigns.by_id.values():
            for kind in c.cancel_on:
                cancellers.setdefault(kind, []).append(c.id)
        self._cancellers = cancellers

    # ------------------------------------------------------------ triggers

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

    # ------------------------------------------------------------ one event

    def handle(self, session: Session, event: EngineEvent) -> list[Outcome]:
        outcomes = self._cancel_pending(session, event) if event.kind in self._cancellers else []
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
            return self._record(session, event, outcomes)
        profile = session.get(Profile, event.profile_id)
        if profile is None:
            return outcomes
        consents = self._consents(session, profile.id)
        facts: dict[str, Any] = dict(event.facts)
        facts["profile"] = profile_facts(profile, consents)
        facts["event"] = {"kind": event.kind, "zone": event.zone, "dwell_s": round(event.dwell_s, 1),
                          "time": event.time}
        wanted = " ".join(str(c.conditions) for c in candidates)
        if any(c.purpose == "cart_reminders" for c in candidates) or "cart." in wanted:
            facts["cart"] = cart_facts(session, profile.id, event.time, self.abandon_after_s)
        facts["loyalty"] = {"points": profile.points or 0, "tier": tier_for(profile.points or 0, self.tiers)}
        if "behaviour." in wanted or "segments" in wanted:
            facts["behaviour"] = behaviour_facts(session, profile.id, event.time)
            facts["segments"] = [seg.id for seg in self.segments if evaluate(seg.conditions, facts) is None]

        who = profile.external_id or f"#{profile.id}"
        winner: Campaign | None = None
        for c in candidates:  # highest priority first
            variant = assign_variant(c.experiment, c.id, profile.id) if c.experiment else None
            arm = (variant.name if variant else "holdout") if c.experiment else None
            reason, detail = self._check(session, c, event, facts, consents, variant)
            if reason is None and winner is not None:
                reason, detail = LOST_ARBITRATION, f"{winner.id} has higher priority"
            if reason == HOLDOUT and winner is None:
                winner = c  # the holdout takes the event too, so lift is measured against no message
            if reason is not None:
                outcomes.append(Outcome(c.id, profile.id, False, reason, detail, None, who, arm))
                continue
            winner = c
            outcomes.append(self._fire(session, c, event, facts, who, variant))
        judged.update((o.campaign_id, event.key) for o in outcomes)
        return self._record(session, event, outcomes)

    def _record(self, session: Session, event: EngineEvent, outcomes: list[Outcome]) -> list[Outcome]:
        for o in outcomes:
            session.add(Decision(at=event.time, profile_id=o.profile_id, campaign_id=o.campaign_id,
                                 event_kind=event.kind, event_key=event.key, fired=o.fired,
                                 reason=o.reason, detail=o.detail, variant=o.variant))
            self.counts[o.reason] += 1
            if o.fired:
                self.fired_by_campaign[o.campaign_id] += 1
        return outcomes

    @staticmethod
    def _consents(session: Session, profile_id: int) -> set[str]:
        return set(session.scalars(
            select(Consent.purpose).where(Consent.profile_id == profile_id, Consent.granted.is_(True))
        ))

    def _check(self, session: Session, c: Campaign, event: EngineEvent, facts: Mapping[str, Any],
               consents: set[str], variant: Variant | None) -> tuple[str | None, str | None]:
        if c.purpose not in consents:
            return NO_CONSENT, f"no consent for {c.purpose}"
        failed = evaluate(c.conditions, facts)
        if failed is not None:
            return CONDITION_FALSE, failed
        if session.scalar(select(Notification.id).where(Notification.dedup_key == self.dedup_key(c, event))):
            return DUPLICATE, "already sent for this occurrence"
        mine = (Notification.campaign_id == c.id, Notification.profile_id == event.profile_id,
                Notification.status.not_in((CANCELLED, EXPIRED)))
        if c.cooldown_s > 0:
            last = session.scalar(select(func.max(Notification.created_at)).where(*mine))
            if last is not None and event.time - last < c.cooldown_s:
                return COOLDOWN, f"sent {event.time - last:.0f} s ago, cooldown {c.cooldown_s:.0f} s"
        if c.max_per_profile:
            sent = session.scalar(select(func.count()).select_from(Notification).where(*mine)) or 0
            if sent >= c.max_per_profile:
                return NOT_REELIGIBLE, f"already sent {sent} time(s), at most {c.max_per_profile}"
        if c.budget_sends:
            used = session.scalar(select(func.count()).select_from(Notification).where(
                Notification.campaign_id == c.id, Notification.status.not_in((CANCELLED, EXPIRED)))) or 0
            if used >= c.budget_sends:
                return BUDGET_EXHAUSTED, f"{used} of {c.budget_sends} sends used"
        for cap in self.caps:
            if c.purpose not in cap.purposes:
                continue
            recent = session.scalar(select(func.count()).select_from(Notification).where(
                Notification.profile_id == event.profile_id, Notification.purpose.in_(cap.purposes),
                Notification.created_at > event.time - cap.window_s,
                Notification.status.not_in((CANCELLED, EXPIRED)))) or 0
            if recent >= cap.max:
                return CAPPED, f"{recent} sent in the last {cap.window_s:.0f} s, cap {cap.max}"
        if c.experiment is not None and variant is None:
            return HOLDOUT, f"in the {c.experiment.holdout:.0%} holdout"
        if c.quiet_hours is not None and c.quiet_hours.mode == "drop" and self._quiet(c, event.time):
            return QUIET_HOURS, "inside quiet hours (drop)"
        return None, None

    def _quiet(self, c: Campaign, t: float) -> bool:
        assert c.quiet_hours is not None
        return c.quiet_hours.contains(dt.datetime.fromtimestamp(t, self.tz).time())

    def _quiet_end(self, c: Campaign, t: float) -> float:
        """The first moment after ``t`` outside the campaign's quiet hours, in the store's timezone."""
        assert c.quiet_hours is not None
        local = dt.datetime.fromtimestamp(t, self.tz)
        end = local.replace(hour=c.quiet_hours.end.hour, minute=c.quiet_hours.end.minute, second=0,
                            microsecond=0)
        if end <= local:
            end += dt.timedelta(days=1)
        return end.timestamp()

    @staticmethod
    def dedup_key(c: Campaign, event: EngineEvent) -> str:
        return f"{c.id}:{event.profile_id}:{event.key}"

    def _fire(self, session: Session, c: Campaign, event: EngineEvent, facts: dict[str, Any],
              who: str, variant: Variant | None) -> Outcome:
        action = variant.action if variant is not None and variant.action is not None else c.action
        scope = {**facts, **action.data}
        data: dict[str, Any] = {"campaign": c.id, "purpose": c.purpose, "trigger": event.kind,
                                "zone": event.zone, **action.data}
        if variant is not None:
            data["variant"] = variant.name
        if "cart" in facts and facts["cart"].get("abandoned"):
            data["cart"] = {k: facts["cart"][k] for k in ("id", "items", "zones")}
        if "device" in facts:
            data["device"] = facts["device"]
        if "alarm" in facts:  # the app acks or books the alarm by this id (POST /v1/me/alarms/{id}/...)
            data["alarm"] = {k: facts["alarm"].get(k) for k in ("id", "rule", "severity")}
        deliver_at = event.time + c.delay_s if c.delay_s else None
        detail = f"delayed {c.delay_s:.0f} s" if c.delay_s else None
        if c.quiet_hours is not None and c.quiet_hours.mode == "hold" and self._quiet(c, deliver_at or event.time):
            deliver_at = self._quiet_end(c, deliver_at or event.time)
            detail = f"held for quiet hours until {dt.datetime.fromtimestamp(deliver_at, self.tz):%H:%M}"
        n = Notification(profile_id=event.profile_id, campaign_id=c.id, purpose=c.purpose,
                         dedup_key=self.dedup_key(c, event), title=render(action.title, scope)[:300],
                         body=render(action.body, scope), data=data, created_at=event.time,
                         status=SCHEDULED if deliver_at is not None else "pending", deliver_at=deliver_at,
                         expires_at=event.time + c.ttl_s if c.ttl_s else None,
                         variant=variant.name if variant is not None else None,
                         redemption_code=redemption_code() if c.purpose == "offers" else None)
        if n.redemption_code:
            n.data = {**data, "redemption_code": n.redemption_code}
        session.add(n)
        session.flush()  # assigns the monotonic id the stream uses
        return Outcome(c.id, event.profile_id, True, FIRED, detail, n.id, who,
                       variant.name if variant is not None else None, deliver_at)

    # ------------------------------------------------------------ pending sends

    def _cancel_pending(self, session: Session, event: EngineEvent) -> list[Outcome]:
        """An event named in a campaign's ``cancel_on`` withdraws that campaign's scheduled sends."""
        rows = session.scalars(select(Notification).where(
            Notification.profile_id == event.profile_id, Notification.status == SCHEDULED,
            Notification.campaign_id.in_(self._cancellers[event.kind])))
        out = []
        for n in rows:
            n.status = CANCELLED
            out.append(Outcome(n.campaign_id, n.profile_id, False, CANCELLED,
                               f"{event.kind} cancels notification {n.id}", n.id, "", n.variant))
        return out

    def release_due(self, session: Session, now: float) -> list[int]:
        """Scheduled sends whose time has come: expired ones are dropped, consent is checked again."""
        due = list(session.scalars(select(Notification).where(
            Notification.status == SCHEDULED, Notification.deliver_at <= now).order_by(Notification.id)))
        released: list[int] = []
        # Its stream position: it goes live after every id committed so far, so replay must not skip it.
        top = session.scalar(select(func.max(Notification.id))) if due else None
        for n in due:
            reason: str | None = None
            if n.expires_at is not None and now > n.expires_at:
                n.status, reason = EXPIRED, EXPIRED
            elif n.purpose not in self._consents(session, n.profile_id):
                n.status, reason = CANCELLED, NO_CONSENT  # consent withdrawn while it waited
            else:
                n.status = "pending"
                n.released_after = top
                released.append(n.id)
                continue
            session.add(Decision(at=now, profile_id=n.profile_id, campaign_id=n.campaign_id,
                                 event_kind="release", event_key=f"notification:{n.id}", fired=False,
                                 reason=reason, detail=f"notification {n.id} not sent", variant=n.variant))
            self.counts[reason] += 1
        return released
