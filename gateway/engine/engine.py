"""The campaign engine: one event for one profile in, decisions and outbox notifications out.

Every campaign the event's trigger can fire is evaluated and leaves a Decision with a reason,
so the API can always say why something did or did not happen. Only the highest-priority
campaign that passes every check sends (arbitration). The notification is unique per
(campaign, profile, triggering occurrence), so a replayed event never sends twice.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import secrets
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.orm import Session

from gateway.campaigns.model import (
    CHANNELS,
    Campaign,
    CampaignIndex,
    Segment,
    Variant,
    assign_variant,
    evaluate,
    render,
)
from gateway.engine import store as stored
from gateway.engine.facts import behaviour_facts, cart_facts, profile_facts, tier_for
from gateway.engine.limits import FrequencyCap, capped, exhausted, nearest_within
from gateway.engine.store import EngineStore
from gateway.storage.models import DEFAULT_STORE_ID, Decision, NotificationStatus


class Reason(StrEnum):
    """Why a campaign did (FIRED) or did not send for an event: every decision row has one."""

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
    CANCELLED = "cancelled"  # a scheduled send withdrawn by a cancel_on event
    EXPIRED = "expired"  # a scheduled send whose ttl passed while it waited


RELEASE_RESCAN_S = 5.0  # at least this often (clock time) the outbox is asked for due scheduled sends
# Events after which a profile's live segments are evaluated again (a dwell tick changes nothing).
REFRESH_SEGMENTS_ON = frozenset({"visit_start", "visit_end", "purchase", "cart_abandoned", "profile_updated"})


@dataclass(frozen=True, slots=True)
class EngineEvent:
    kind: str  # a trigger type: visit_start, enter, dwell, exit, visit_end, telemetry, cart_abandoned
    profile_id: int
    time: float
    key: str  # identifies the occurrence (a zone stay, a visit, a reading), part of the dedup key
    zone: str | None = None
    dwell_s: float = 0.0
    facts: Mapping[str, Any] = field(default_factory=dict)
    points: int = 0  # loyalty points the occurrence earns (a visit), credited as it is judged


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


def redemption_code() -> str:
    """Short, unguessable, unambiguous (no 0/O, 1/I): read out or scanned at the till."""
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # 32 letters: a byte mod 32 is uniform
    return "".join(alphabet[b & 31] for b in secrets.token_bytes(8))


class Engine:
    """Decides, explains, and writes the outbox. All durable state (cooldowns, caps, budgets, pending
    sends, segment memberships) is read from the database, so it survives a restart; the in-memory
    state only avoids repeating work and is safe to lose."""

    def __init__(self, campaigns: CampaignIndex, *, abandon_after_s: float = 1800.0, timezone: str = "UTC",
                 caps: Sequence[FrequencyCap] = (), segments: Sequence[Segment] = (),
                 tiers: Sequence[tuple[str, int]] = (), channels: Sequence[str] = CHANNELS,
                 store_id: str = DEFAULT_STORE_ID) -> None:
        self.campaigns = campaigns
        self.store_id = store_id  # written on each decision and notification: figures per store
        self.segments = tuple(segments)
        self._segments_read_cart = any(seg.conditions.reads_from("cart") for seg in self.segments)
        self.tiers = tuple(tiers)
        self.abandon_after_s = abandon_after_s
        self.timezone = timezone
        self.tz = ZoneInfo(timezone)
        # Worked out once (until caps or channels are set again): a campaign's channels by its channels setting,
        # the caps that count a purpose.
        self._channels_of: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._caps_of: dict[str, list[FrequencyCap]] = {}
        self.caps = tuple(caps)
        self.channels = tuple(channels)  # the configured channels a notification can go out on
        self.counts: Counter[str] = Counter()  # decisions by reason, for /metrics and summaries
        self.fired_by_campaign: Counter[str] = Counter()
        self.evaluations = 0  # campaign evaluations (one per candidate and event): the engine's work
        self._last_value: dict[tuple[str, str], float] = {}  # (device, metric) -> previous reading
        # Occurrences already judged, per profile: a zone stay gets one verdict per campaign, not one
        # per dwell tick. Forgotten when the visit ends; the outbox's dedup key is the durable guard.
        self._judged: dict[int, set[tuple[str, str]]] = {}
        self._cancellers: dict[str, list[str]] = {}
        self._schedules_done: set[str] = set()
        # Scheduled sends: none is due before _release_from (sends this engine schedules lower it; a rollback
        # leaves it too early, which costs one query). Others' (another worker's) are seen at the rescan.
        self._release_from = -math.inf
        self._release_scan = -math.inf
        self.set_campaigns(campaigns)

    @property
    def caps(self) -> tuple[FrequencyCap, ...]:
        return self._caps

    @caps.setter
    def caps(self, caps: Sequence[FrequencyCap]) -> None:
        self._caps = tuple(caps)
        self._caps_of.clear()

    @property
    def channels(self) -> tuple[str, ...]:
        return self._channels

    @channels.setter
    def channels(self, channels: Sequence[str]) -> None:
        self._channels = tuple(channels)
        self._channels_of.clear()

    def forget_profile(self, profile_id: int) -> None:
        """An erased or linked-away profile: what was judged for it goes (the next profile never gets its id,
        but memory should not keep what erasure removed from the database)."""
        self._judged.pop(profile_id, None)

    def clone(self) -> Engine:
        """The same configuration and campaigns, no in-memory history (dry runs)."""
        return Engine(self.campaigns, abandon_after_s=self.abandon_after_s, timezone=self.timezone, caps=self.caps,
                      segments=self.segments, tiers=self.tiers, channels=self.channels, store_id=self.store_id)

    def set_campaigns(self, campaigns: CampaignIndex) -> None:
        """Swap the live campaign set (API edits); durable state is in the database, so nothing is lost."""
        self.campaigns = campaigns
        cancellers: dict[str, list[str]] = {}
        for c in campaigns.by_id.values():
            for kind in c.cancel_on:
                cancellers.setdefault(kind, []).append(c.id)
        self._cancellers = cancellers

    # ------------------------------------------------------------ triggers

    @staticmethod
    def _crossed(c: Campaign, event: EngineEvent, last: Mapping[tuple[str, str], float]) -> bool:
        """Thresholds fire on the crossing, not on every reading past it (no re-sends, no noise)."""
        t = c.trigger
        if t.metric is None or (t.above is None and t.below is None):
            return True
        value = event.facts.get("reading", {}).get(t.metric)
        if value is None:
            return False
        prev = last.get((str(event.facts.get("device", {}).get("id")), t.metric))
        if t.above is not None and value >= t.above and (prev is None or prev < t.above):
            return True
        return t.below is not None and value <= t.below and (prev is None or prev > t.below)

    @staticmethod
    def _remember(event: EngineEvent, last: dict[tuple[str, str], float]) -> None:
        device = str(event.facts.get("device", {}).get("id"))
        for metric, value in event.facts.get("reading", {}).items():
            last[(device, metric)] = value

    def _candidates(self, event: EngineEvent, only: Sequence[Campaign] | None,
                    last: dict[tuple[str, str], float]) -> list[Campaign]:
        """The campaigns the event can fire, highest priority first; a reading moves ``last`` on."""
        if only is not None:
            cands = list(only)
        else:
            metrics = event.facts.get("reading", {}).keys() if event.kind == "telemetry" else ()
            segment = event.facts.get("segment", {}).get("id") if event.kind == "segment_entered" else None
            cands = self.campaigns.candidates(event.kind, event.zone, event.dwell_s, metrics, segment)
        if event.kind == "telemetry":
            cands = [c for c in cands if self._crossed(c, event, last)]
            self._remember(event, last)
        return cands

    # ------------------------------------------------------------ events

    def handle(self, session: Session, event: EngineEvent, only: Sequence[Campaign] | None = None) -> list[Outcome]:
        """Judge ``event`` against every campaign its trigger can fire (or just ``only``): a batch of one."""
        return self.handle_many(session, [event], only)[0]

    def handle_many(self, session: Session, events: Sequence[EngineEvent],
                    only: Sequence[Campaign] | None = None) -> list[list[Outcome]]:
        """Judge each event in order against every campaign its trigger can fire (or just ``only``).

        The batch's profiles, consents, dedup keys and send history are read once for all of its events
        (EngineStore), and its notifications and decisions are written together at the end; each event is
        judged as it would be alone after the ones before it. Returns the outcomes per event, in order."""
        if not events:
            return []
        store = EngineStore(session)
        planned = self._plan(store, events, only)
        per_event = [self._judge(store, ev, cands, only) for ev, cands in zip(events, planned, strict=True)]
        ids = iter(store.finish())
        return [[dataclasses.replace(o, notification_id=next(ids)) if o.fired else o for o in outs]
                for outs in per_event]

    def _plan(self, store: EngineStore, events: Sequence[EngineEvent],
              only: Sequence[Campaign] | None) -> list[list[Campaign]]:
        """Each event's candidates, and what the batch will read: the profiles of events with something to
        judge, the dedup keys their candidates could make, the send history back to the earliest any check
        can reach."""
        reach = max((cap.window_s for cap in self.caps), default=0.0)
        refresh = REFRESH_SEGMENTS_ON if self.segments else frozenset()
        last = dict(self._last_value) if any(ev.kind == "telemetry" for ev in events) else self._last_value
        earliest = math.inf
        pids: set[int] = set()
        keys: list[str] = []
        planned = []
        for ev in events:
            cands = self._candidates(ev, only, last)
            planned.append(cands)
            judged = self._judged.get(ev.profile_id)
            if judged:  # a dwell tick judges few: no key to read for the others
                cands = [c for c in cands if (c.id, ev.key) not in judged]
            if cands:
                tail = self.dedup_tail(ev)
                keys += [c.id + tail for c in cands]
                reach = max(reach, max(c.cooldown_s for c in cands))
            if cands or ev.kind in refresh:
                pids.add(ev.profile_id)
                earliest = min(earliest, ev.time)
        if pids:
            store.preload(pids, keys, earliest - reach)
        return planned

    def _judge(self, store: EngineStore, event: EngineEvent, candidates: list[Campaign],
               only: Sequence[Campaign] | None) -> list[Outcome]:
        if event.points:
            store.add_points(event.profile_id, event.points)
        outcomes = self._cancel_pending(store, event) if event.kind in self._cancellers else []
        if event.kind == "telemetry":
            self._remember(event, self._last_value)
        judged = self._judged.setdefault(event.profile_id, set())
        candidates = [c for c in candidates if (c.id, event.key) not in judged]
        if event.kind == "visit_end":
            self._judged.pop(event.profile_id, None)
        refresh = bool(self.segments) and event.kind in REFRESH_SEGMENTS_ON
        if not candidates and not refresh:
            return self._record(store, event, outcomes)
        profile = store.profile(event.profile_id)
        if profile is None:  # erased
            return outcomes
        consents = store.consents(profile.id)
        facts: dict[str, Any] = dict(event.facts)
        facts["profile"] = profile_facts(profile, consents)
        facts["event"] = {"kind": event.kind, "zone": event.zone, "dwell_s": round(event.dwell_s, 1),
                          "time": event.time}
        reads = [self._condition_reads(c) for c in candidates]
        cart_now = any(c.purpose == "cart_reminders" for c in candidates) or any(r[0] for r in reads) or (
            refresh and self._segments_read_cart)
        if cart_now:
            facts["cart"] = self._cart_facts(store, profile.id, event.time)
        # A refresh reads the cart for a send's data and templates only: read when one fires (same answer).
        cart_later = refresh and not cart_now
        facts["loyalty"] = {"points": profile.points or 0, "tier": tier_for(profile.points or 0, self.tiers)}
        entered: list[str] = []
        if refresh or any(r[1] for r in reads):
            facts["behaviour"] = behaviour_facts(store.behaviour(profile.id, event.time), event.time)
            facts["segments"] = [seg.id for seg in self.segments if evaluate(seg.conditions, facts) is None]
            if refresh:
                entered = store.set_memberships(profile.id, facts["segments"], event.time)

        who = profile.external_id or f"#{profile.id}"
        winner: Campaign | None = None
        for c in candidates:  # highest priority first
            self.evaluations += 1
            variant = assign_variant(c.experiment, c.id, profile.id) if c.experiment else None
            arm = (variant.name if variant else "holdout") if c.experiment else None
            send_at, channels, reason, detail = self._check(store, c, event, facts, consents, variant)
            if reason is None and winner is not None:
                reason, detail = Reason.LOST_ARBITRATION, f"{winner.id} has higher priority"
            if reason == Reason.HOLDOUT and winner is None:
                winner = c  # the holdout takes the event too, so lift is measured against no message
            if reason is not None:
                outcomes.append(Outcome(c.id, profile.id, False, reason, detail, None, who, arm))
                continue
            winner = c
            if cart_later and "cart" not in facts:
                facts["cart"] = self._cart_facts(store, profile.id, event.time)
            outcomes.append(self._fire(store, c, event, facts, who, variant, send_at, channels, detail))
        if event.kind != "schedule":  # a schedule's key is per day: its dedup key is guard enough
            judged.update((o.campaign_id, event.key) for o in outcomes)
        self._record(store, event, outcomes)
        for seg in entered:  # joining a segment is an event of its own, after the one that caused it
            nested = EngineEvent("segment_entered", profile.id, event.time, f"segment:{seg}:{event.time:.3f}",
                                 facts={"segment": {"id": seg}})
            outcomes += self._judge(store, nested, self._candidates(nested, only, self._last_value), only)
        return outcomes

    @staticmethod
    def _condition_reads(c: Campaign) -> tuple[bool, bool]:
        """Whether the conditions read cart facts, and behaviour facts or segments (the parsed tree knows)."""
        cond = c.conditions
        if cond is None:
            return False, False
        return cond.reads_from("cart"), cond.reads_from("behaviour", "segments")

    def _record(self, store: EngineStore, event: EngineEvent, outcomes: list[Outcome]) -> list[Outcome]:
        """An event leaves a decision per candidate (dozens at visit start), written with the batch's."""
        if outcomes:
            t, kind, key, where = event.time, event.kind, event.key, self.store_id
            store.decided((t, o.profile_id, o.campaign_id, kind, key, o.fired, o.reason, o.detail, o.variant, where)
                          for o in outcomes)
        for o in outcomes:
            self.counts[o.reason] += 1
            if o.fired:
                self.fired_by_campaign[o.campaign_id] += 1
        return outcomes

    def _cart_facts(self, store: EngineStore, profile_id: int, now: float) -> dict[str, Any]:
        cart, where = store.open_cart(profile_id)
        reminded = cart is not None and store.reminded(profile_id, cart.updated_at)
        return cart_facts(cart, where, reminded, now, self.abandon_after_s)

    def send_time(self, c: Campaign, t: float) -> float:
        """When a send decided at ``t`` reaches the customer: after the delay, and after quiet hours (hold)."""
        at = t + c.delay_s
        if c.quiet_hours is not None and c.quiet_hours.mode == "hold" and self._quiet(c, at):
            at = self._quiet_end(c, at)
        return at

    def _check(self, store: EngineStore, c: Campaign, event: EngineEvent, facts: Mapping[str, Any],
               consents: set[str], variant: Variant | None) -> tuple[float, tuple[str, ...], str | None, str | None]:
        """(send time, channels, reason, detail): reason None means it may fire.

        Cooldowns and caps are judged at the time the customer would get it (after a delay or held quiet
        hours), against sends on both sides of that time, so neither late events nor held sends released
        together can break them. Consent and conditions come first: most candidates stop there, before the
        send time is worked out (the event's time and no channels are returned for them)."""
        if c.purpose not in consents:
            return event.time, (), Reason.NO_CONSENT, f"no consent for {c.purpose}"
        failed = evaluate(c.conditions, facts)
        if failed is not None:
            return event.time, (), Reason.CONDITION_FALSE, failed
        send_at = self.send_time(c, event.time)
        channels = self._channels_of.get(c.channels)
        if channels is None:
            channels = self._channels_of[c.channels] = tuple(ch for ch in (c.channels or self.channels)
                                                             if ch in self.channels)
        if store.duplicate(self.dedup_key(c, event)):
            return send_at, channels, Reason.DUPLICATE, "already sent for this occurrence"
        caps = self._caps_of.get(c.purpose)
        if caps is None:
            caps = self._caps_of[c.purpose] = [cap for cap in self.caps if c.purpose in cap.purposes]
        reach = max([c.cooldown_s, *(cap.window_s for cap in caps)])
        history = store.history(event.profile_id, send_at - reach) if reach > 0 else []
        if c.cooldown_s > 0:
            gap = nearest_within(history, c.id, send_at, c.cooldown_s)
            if gap is not None:
                when = (f"one is due at {dt.datetime.fromtimestamp(gap, self.tz):%H:%M}" if gap > event.time
                        else f"sent {event.time - gap:.0f} s ago")
                return send_at, channels, Reason.COOLDOWN, f"{when}, cooldown {c.cooldown_s:.0f} s"
        if c.max_per_profile:
            sent = store.sends_of(c.id, event.profile_id)
            if exhausted(sent, c.max_per_profile):
                detail = f"already sent {sent} time(s), at most {c.max_per_profile}"
                return send_at, channels, Reason.NOT_REELIGIBLE, detail
        if c.budget_sends:
            used = store.campaign_sends(c.id)
            if exhausted(used, c.budget_sends):
                return send_at, channels, Reason.BUDGET_EXHAUSTED, f"{used} of {c.budget_sends} sends used"
        if c.budget_redemptions:
            redeemed = store.campaign_redemptions(c.id)
            if exhausted(redeemed, c.budget_redemptions):
                detail = f"{redeemed} of {c.budget_redemptions} redemptions used"
                return send_at, channels, Reason.BUDGET_EXHAUSTED, detail
        channels, blocked = capped(caps, send_at, channels, history, self.channels)
        if blocked is not None:
            return send_at, channels, Reason.CAPPED, blocked
        if c.experiment is not None and variant is None:
            return send_at, channels, Reason.HOLDOUT, f"in the {c.experiment.holdout:.0%} holdout"
        if c.quiet_hours is not None and c.quiet_hours.mode == "drop" and self._quiet(c, send_at):
            return send_at, channels, Reason.QUIET_HOURS, "inside quiet hours (drop)"
        left_out = [ch for ch in (c.channels or self.channels) if ch in self.channels and ch not in channels]
        return send_at, channels, None, f"not on {', '.join(left_out)} (channel cap)" if left_out else None

    def _quiet(self, c: Campaign, t: float) -> bool:
        assert c.quiet_hours is not None
        return c.quiet_hours.contains(dt.datetime.fromtimestamp(t, self.tz).time())

    def _quiet_end(self, c: Campaign, t: float) -> float:
        """The first moment after ``t`` outside the campaign's quiet hours, in the store's timezone."""
        assert c.quiet_hours is not None
        local = dt.datetime.fromtimestamp(t, self.tz)
        end = dt.datetime.combine(local.date(), c.quiet_hours.end, self.tz)
        if end <= local:
            end = dt.datetime.combine(local.date() + dt.timedelta(days=1), c.quiet_hours.end, self.tz)
        return end.timestamp()

    @staticmethod
    def dedup_key(c: Campaign, event: EngineEvent) -> str:
        return c.id + Engine.dedup_tail(event)

    @staticmethod
    def dedup_tail(event: EngineEvent) -> str:
        """What follows the campaign id in ``dedup_key``: made once per event when many campaigns are checked."""
        return f":{event.profile_id}:{event.key}"

    def _fire(self, store: EngineStore, c: Campaign, event: EngineEvent, facts: dict[str, Any],
              who: str, variant: Variant | None, send_at: float, channels: Sequence[str],
              note: str | None) -> Outcome:
        action = variant.action if variant is not None and variant.action is not None else c.action
        scope = {**facts, **action.data}
        data: dict[str, Any] = {"campaign": c.id, "purpose": c.purpose, "trigger": event.kind,
                                "zone": event.zone, **action.data}
        if variant is not None:
            data["variant"] = variant.name
        if tuple(channels) != self.channels:
            data["channels"] = list(channels)  # the dispatcher leaves the others out
        if "cart" in facts and facts["cart"].get("abandoned"):
            data["cart"] = {k: facts["cart"][k] for k in ("id", "items", "zones")}
        if "device" in facts:
            data["device"] = facts["device"]
        if "alarm" in facts:  # the app acks or books the alarm by this id (POST /v1/me/alarms/{id}/...)
            data["alarm"] = {k: facts["alarm"].get(k) for k in ("id", "rule", "severity")}
        deliver_at = send_at if send_at > event.time else None
        detail = f"delayed {c.delay_s:.0f} s" if c.delay_s else None
        if deliver_at is not None and deliver_at > event.time + c.delay_s:
            detail = f"held for quiet hours until {dt.datetime.fromtimestamp(deliver_at, self.tz):%H:%M}"
        if note:
            detail = f"{detail}; {note}" if detail else note
        code = redemption_code() if c.purpose == "offers" else None
        row: dict[str, Any] = {
            "profile_id": event.profile_id, "campaign_id": c.id, "purpose": c.purpose,
            "dedup_key": self.dedup_key(c, event), "title": render(action.title, scope)[:300],
            "body": render(action.body, scope), "data": {**data, "redemption_code": code} if code else data,
            "created_at": event.time,
            "status": NotificationStatus.SCHEDULED if deliver_at is not None else NotificationStatus.PENDING,
            "deliver_at": deliver_at, "expires_at": event.time + c.ttl_s if c.ttl_s else None,
            "variant": variant.name if variant is not None else None, "redemption_code": code,
            "store_id": self.store_id}
        if deliver_at is not None:
            self._release_from = min(self._release_from, deliver_at)
        store.fired(row, deliver_at if deliver_at is not None else event.time)
        return Outcome(c.id, event.profile_id, True, Reason.FIRED, detail, None, who,
                       variant.name if variant is not None else None, deliver_at)

    # ------------------------------------------------------------ schedules

    def due_schedules(self, now: float) -> list[tuple[Campaign, str, float]]:
        """(campaign, occurrence key, occurrence time) for schedule times passed within their window."""
        out = []
        local = dt.datetime.fromtimestamp(now, self.tz)
        for c in self.campaigns.by_trigger.get("schedule", ()):
            t = c.trigger
            for back in (1, 0):
                day = local.date() - dt.timedelta(days=back)
                if day.weekday() not in t.days:
                    continue
                for at in t.at:
                    occ = dt.datetime.combine(day, at, self.tz).timestamp()
                    if occ <= now < occ + t.within_s:
                        out.append((c, f"schedule:{day.isoformat()}T{at:%H:%M}", occ))
        return out

    def schedule_audiences(self, session: Session, now: float) -> Iterator[tuple[Campaign, list[EngineEvent]]]:
        """Each due schedule once per occurrence (remembered durably by its decisions, so a restart inside the
        window does not run it again), with one event per audience profile: every profile that consented to
        the campaign's purpose; conditions (segments, tiers...) and limits then apply as for any event."""
        for c, key, _occ in self.due_schedules(now):
            done = f"{c.id}:{key}"
            if done in self._schedules_done:
                continue
            if not stored.schedule_ran(session, c.id, key):
                yield c, [EngineEvent("schedule", pid, now, key) for pid in stored.audience(session, c.purpose)]
            self._schedules_done.add(done)

    # ------------------------------------------------------------ pending sends

    def _cancel_pending(self, store: EngineStore, event: EngineEvent) -> list[Outcome]:
        """An event named in a campaign's ``cancel_on`` withdraws that campaign's scheduled sends."""
        return [Outcome(n.campaign_id, n.profile_id, False, Reason.CANCELLED,
                        f"{event.kind} cancels notification {n.id}", n.id, "", n.variant)
                for n in store.cancel_scheduled(event.profile_id, self._cancellers[event.kind])]

    def release_due(self, session: Session, now: float) -> list[int]:
        """Scheduled sends whose time has come: expired ones are dropped, consent is checked again.

        The outbox is asked only when a send this engine scheduled may be due, or every RELEASE_RESCAN_S
        (sends scheduled by another process), not on every tick."""
        if now < self._release_from and self._release_scan <= now < self._release_scan + RELEASE_RESCAN_S:
            return []
        self._release_scan = now
        first = stored.first_scheduled(session)
        if first is None or first > now:
            self._release_from = math.inf if first is None else first
            return []
        self._release_from = -math.inf  # asked again at the next tick, after these are released
        due, top = stored.due_scheduled(session, now)
        released: list[int] = []
        for n in due:
            reason: str | None = None
            if n.expires_at is not None and now > n.expires_at:
                n.status, reason = NotificationStatus.EXPIRED, Reason.EXPIRED
            elif n.purpose not in stored.consents_of(session, n.profile_id):
                n.status, reason = NotificationStatus.CANCELLED, Reason.NO_CONSENT  # consent withdrawn while it waited
            else:
                n.status = NotificationStatus.PENDING
                n.released_after = top  # it goes live after every id committed so far: replay must not skip it
                released.append(n.id)
                continue
            session.add(Decision(at=now, profile_id=n.profile_id, campaign_id=n.campaign_id,
                                 event_kind="release", event_key=f"notification:{n.id}", fired=False,
                                 reason=reason, detail=f"notification {n.id} not sent", variant=n.variant,
                                 store_id=self.store_id))
            self.counts[reason] += 1
        return released
