"""The stages composed synchronously, in one direction: adverts -> sightings -> presence -> identity ->
engine -> outbox; telemetry -> registry and storage -> device rules -> engine; timers.

The virtual-time simulation drives it directly; the live ``Runtime`` (runtime.py) runs it on its
worker thread. It returns the ids of the notifications it committed; dispatching them is the caller's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import Dialect, Table, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from beacons.guard import Guard, GuardSettings
from beacons.parse import ParseStats, parse_adverts
from beacons.remote import app_key
from beacons.types import Advertisement, Sighting
from devices.mqtt import TelemetryIntake
from devices.payloads import Reading, TelemetryBatch
from devices.profiles import load_profiles
from devices.rules import load_rules
from gateway.app.config import ConfigError, Settings
from gateway.campaigns.model import CampaignIndex, Segment
from gateway.engine.engine import Engine, EngineEvent, FrequencyCap, Outcome
from gateway.presence.tracker import PresenceEvent, PresenceTracker
from gateway.profiles.identity import IdentityIndex
from gateway.profiles.privacy import purge_presence
from gateway.storage.db import Database
from gateway.storage.models import Cart, Device, FootfallCount, Visit, ZoneStay
from gateway.telemetry.alarms import DeviceRules, mqtt_alert_sender
from gateway.telemetry.store import POLICIES, TelemetrySettings, TelemetryStore

log = logging.getLogger("gateway")
_VISITS = cast(Table, Visit.__table__)
_STAYS = cast(Table, ZoneStay.__table__)
_FOOTFALL = cast(Table, FootfallCount.__table__)
# The visit path's statements, built once (their cache keys are memoized); values come as bound parameters.
_HAS_VISIT = select(Visit.id).where(Visit.profile_id == bindparam("pid"), Visit.store_id == bindparam("store")).limit(1)
_NEW_VISIT = insert(_VISITS).returning(_VISITS.c.id)
_NEW_STAY = insert(_STAYS).returning(_STAYS.c.id)
_VISIT_ZONES = update(_VISITS).where(_VISITS.c.id == bindparam("vid")).values(zones=bindparam("zones"))
_VISIT_END = update(_VISITS).where(_VISITS.c.id == bindparam("vid")).values(ended_at=bindparam("at"))
_IDLE_CARTS = select(Cart).where(Cart.status == "open", Cart.abandoned_at.is_(None),
                                Cart.updated_at <= bindparam("cutoff")).limit(500)
_BOUGHT_CARTS = select(Cart).where(Cart.checked_out_at.is_not(None), Cart.purchase_handled_at.is_(None)).limit(500)
_STAY_EXIT = update(_STAYS).where(_STAYS.c.id == bindparam("sid")).values(exited_at=bindparam("at"))


_FOOTFALL_UPSERTS: dict[str, Any] = {}


def _footfall_upsert(dialect: Dialect) -> Any:
    """INSERT ... ON CONFLICT that adds the counts to the day's row, built once per dialect (SQLite and
    PostgreSQL spell it alike in SQLAlchemy)."""
    name = dialect.name
    stmt = _FOOTFALL_UPSERTS.get(name)
    if stmt is None:
        if name not in ("postgresql", "sqlite"):
            raise NotImplementedError(f"storage supports SQLite and PostgreSQL, not {name}")
        ins = (postgresql.insert if name == "postgresql" else sqlite.insert)(_FOOTFALL)
        stmt = _FOOTFALL_UPSERTS[name] = ins.on_conflict_do_update(index_elements=["store_id", "day", "zone"], set_={
            "anonymous_visits": _FOOTFALL.c.anonymous_visits + ins.excluded.anonymous_visits,
            "anonymous_dwell_s": _FOOTFALL.c.anonymous_dwell_s + ins.excluded.anonymous_dwell_s})
    return stmt
decision_log = logging.getLogger("gateway.decisions")

OutcomeHook = Callable[[Outcome, EngineEvent], None]
CART_SCAN_S = 5.0  # how often (clock time) carts are checked for abandonment and purchases
OFFLINE_SCAN_S = 5.0  # how often devices are checked for missed reporting intervals
PURGE_EVERY_S = 3600.0  # how often telemetry retention runs


def log_outcome(o: Outcome, ev: EngineEvent) -> None:
    where = f" in {ev.zone}" if ev.zone else ""
    if o.fired:
        decision_log.info("%s  %s  FIRED on %s%s -> notification %s%s", o.who, o.campaign_id, ev.kind, where,
                          o.notification_id, f" ({o.detail})" if o.detail else "")
    else:
        decision_log.info("%s  %s  not sent: %s (%s)", o.who, o.campaign_id, o.reason, o.detail)


def build_telemetry_store(settings: Settings, identities: IdentityIndex) -> TelemetryStore:
    """The registry/storage stage from ``[devices]``; a device's owner comes from its enrolled identifier."""
    d = settings.devices
    if d.unknown_policy not in POLICIES:
        raise ConfigError(f"devices.unknown_policy: expected one of {', '.join(POLICIES)}, got {d.unknown_policy!r}")
    day = 86400.0
    ts = TelemetrySettings(unknown_policy=d.unknown_policy,  # type: ignore[arg-type]  # checked just above
                           default_profile=d.default_profile or None, require_profile=d.require_profile,
                           offline_after_s=d.offline_after_s, raw_retention_s=d.raw_retention_days * day,
                           minute_retention_s=d.minute_retention_days * day,
                           hour_retention_s=d.hour_retention_days * day,
                           dead_letter_retention_s=d.dead_letter_retention_days * day)
    return TelemetryStore(ts, load_profiles(d.profiles_dir), owner_of=lambda device_id: identities.lookup("device",
                                                                                                           device_id))


class Pipeline:
    """Stages composed in one direction; returns the ids of notifications it committed."""

    def __init__(self, settings: Settings, db: Database, campaigns: CampaignIndex,
                 identities: IdentityIndex, on_outcome: OutcomeHook | None = None,
                 guard: GuardSettings | None = None, segments: Sequence[Segment] = (),
                 intake: TelemetryIntake | None = None) -> None:
        """``intake``: the MQTT intake when one runs: its counters join ``stats()``, and device rules send
        commands and staff alerts through it."""
        self.settings = settings
        self.db = db
        self.store_id = settings.store.id  # written on every visit, stay and footfall row (figures per store)
        self.identities = identities
        self.parse_stats = ParseStats()
        # Floods, rotating addresses and passers-by stop here; enrolled identities skip the uuid rule.
        self.guard = Guard(guard, trusted=lambda key: identities.beacon(key) is not None)
        self.presence = PresenceTracker(settings.presence, settings.receivers)
        self.engine = Engine(campaigns, abandon_after_s=settings.carts.abandon_after_s,
                             timezone=settings.store.timezone,
                             caps=[FrequencyCap(c.window_s, c.max, tuple(c.purposes), c.channel or None)
                                   for c in settings.engine.caps],
                             segments=segments,
                             tiers=[(t.name, t.min_points) for t in settings.loyalty.tiers],
                             store_id=settings.store.id)
        self.on_outcome = on_outcome
        self.figures: Counter[str] = Counter()
        self._tz = ZoneInfo(settings.store.timezone)
        self._anonymous: defaultdict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
        self._open_stays: dict[tuple[int, str], int] = {}
        self._last_cart_scan = float("-inf")
        self._open_visits: dict[int, int] = {}
        self._visit_zones: dict[int, list[str]] = {}  # the open visit's zones, as written to its row
        # One person may carry several identities (a tag and the app): their keys per profile's visit and stay.
        self._visit_keys: dict[int, dict[str, float]] = {}
        self._zone_keys: dict[tuple[int, str | None], dict[str, float]] = {}
        self._visit_began: dict[int, float] = {}
        self.telemetry = build_telemetry_store(settings, identities)
        # Device rules (alarms) see accepted telemetry in its transaction; prompts go through the engine.
        alerts = (mqtt_alert_sender(intake.publish, settings.mqtt.topic_prefix, settings.store.id)
                  if intake is not None and settings.device_rules.staff_alerts_mqtt else None)
        self.rules = DeviceRules(load_rules(settings.device_rules.dir) if settings.device_rules.dir else [],
                                 timezone=settings.store.timezone, decide=self._decide,
                                 publish_command=intake.publish_command if intake is not None else None,
                                 publish_alert=alerts)
        self.mqtt_stats: Callable[[], dict[str, Any]] | None = intake.stats if intake is not None else None
        self._last_offline_scan = float("-inf")
        self._last_purge = float("-inf")

    # ------------------------------------------------------------ BLE

    def ingest_adverts(self, adverts: Iterable[Advertisement]) -> list[int]:
        """One scanner drain: parsed at once (beacons.parse.parse_adverts), then guard and presence per
        frame, then one engine transaction for the drain's presence events."""
        batch = adverts if isinstance(adverts, list) else list(adverts)
        # The guard never reads presence, so the drain is admitted first, then observed in one call.
        events = self.presence.observe_many(self.guard.sightings(parse_adverts(batch, self.parse_stats)))
        self.figures["adverts"] += len(batch)
        return self.handle_presence(events) if events else []

    def stats(self) -> dict[str, Any]:
        """Counters for /metrics: figures, the parser's accepts/rejects, the guard's and presence's drops."""
        out = {"figures": dict(self.figures), "parse": self.parse_stats.as_dict(), "guard": self.guard.stats(),
               "presence": self.presence.stats(), "telemetry": self.telemetry.stats()}
        if self.mqtt_stats is not None:
            out["mqtt"] = self.mqtt_stats()
        return out

    def ingest_sightings(self, sightings: Iterable[Sighting]) -> list[int]:
        """Sightings other receivers resolved (ESPresense nodes, the shop's app): the advert path
        from presence on. No guard: they carry no address, and unmapped ids never got this far."""
        batch = sightings if isinstance(sightings, list) else list(sightings)
        events = self.presence.observe_many(batch)
        self.figures["remote_sightings"] += len(batch)
        return self.handle_presence(events) if events else []

    def tick(self, now: float) -> list[int]:
        """Timers: presence exits and visit ends, then delayed or held sends that are now due."""
        events = self.presence.tick(now)
        created = self.handle_presence(events) if events else []
        with self.db.session() as s:
            created += self.rules.tick(s, now)  # device rules' due timers: for_s durations, did-not-recur clears
            created += self.engine.release_due(s, now)
            audiences: dict[str, tuple[Any, list[EngineEvent]]] = {}  # schedule triggers, store time
            for ev, campaign in self.engine.schedule_events(s, now):
                audiences.setdefault(campaign.id, (campaign, []))[1].append(ev)
            for campaign, evs in audiences.values():  # everyone who consented, judged in bulk
                created += self._decide_many(s, evs, [campaign])
        if now - self._last_cart_scan >= CART_SCAN_S:
            self._last_cart_scan = now
            created += self.cart_events(now)
        self.flush_footfall()
        self.telemetry_timers(now)
        return created

    def cart_events(self, now: float) -> list[int]:
        """Raise each cart's lifecycle events once: abandoned (idle past the limit) and purchase."""
        created: list[int] = []
        cutoff = now - self.settings.carts.abandon_after_s
        with self.db.session() as s:  # each kind judged in bulk (a cart's facts never read another's marks)
            events = []
            for cart in s.scalars(_IDLE_CARTS, {"cutoff": cutoff}):
                cart.abandoned_at = now
                events.append(EngineEvent("cart_abandoned", cart.profile_id, now,
                                          f"cart:{cart.id}:{cart.updated_at:.3f}"))
            created += self._decide_many(s, events)
            events = []
            for cart in s.scalars(_BOUGHT_CARTS):
                cart.purchase_handled_at = now
                events.append(EngineEvent("purchase", cart.profile_id, now, f"purchase:{cart.id}"))
            created += self._decide_many(s, events)
        return created

    def handle_presence(self, events: Sequence[PresenceEvent]) -> list[int]:
        known: list[tuple[PresenceEvent, int]] = []
        for ev in events:
            pid = self.identities.beacon(ev.key)
            if pid is not None:
                merged = self._per_profile(ev, pid)
                if merged is not None:
                    known.append((merged, pid))
            elif ev.kind in ("visit_start", "exit"):
                self._count_anonymous(ev)  # footfall only: counts per day and zone, no identity
        if not known:
            return []
        judged = [EngineEvent(ev.kind, pid, ev.time,
                              f"visit:{ev.visit_since:.3f}" if ev.kind.startswith("visit")
                              else f"stay:{ev.zone}:{ev.zone_since:.3f}", ev.zone, ev.dwell_s)
                  for ev, pid in known]
        with self.db.session() as s:
            # The drain's events in bulk (profiles, consents and sends read once); each event's visit or stay
            # is written just before it is judged, as one-by-one judging would see it.
            return self._decide_many(s, judged, before=lambda i: self._record_visit(s, *known[i]))

    def _per_profile(self, ev: PresenceEvent, pid: int) -> PresenceEvent | None:
        """One visit and one stay per zone per profile, however many identities it is seen by.

        The first identity to start a visit (enter a zone) opens it for the profile, the last one to end
        it closes it; dwell comes from the identity that entered first. None: not an event for the profile.
        """
        if ev.kind in ("visit_start", "visit_end"):
            keys = self._visit_keys.setdefault(pid, {})
            if ev.kind == "visit_start":
                first = not keys or list(keys) == [ev.key]  # the same identity again: its new visit
                keys[ev.key] = ev.visit_since if ev.visit_since is not None else ev.time
                if first:
                    self._visit_began[pid] = keys[ev.key]
                return ev if first else None
            for (p, _), stay in list(self._zone_keys.items()):  # stays this identity never exited
                if p == pid and stay.pop(ev.key, None) is not None and not stay:
                    del self._zone_keys[(p, _)]
            if keys.pop(ev.key, None) is None or keys:
                if not keys:
                    del self._visit_keys[pid]
                return None
            del self._visit_keys[pid]
            since = self._visit_began.pop(pid, None)  # the profile's visit began with its first identity
            if since is None or since == ev.visit_since:
                return ev
            return dataclasses.replace(ev, visit_since=since, dwell_s=max(0.0, ev.time - since))
        if ev.kind == "enter":
            stay = self._zone_keys.setdefault((pid, ev.zone), {})
            first = not stay or ev.key in stay  # the same identity again: its new stay (it missed an exit)
            stay[ev.key] = ev.zone_since if ev.zone_since is not None else ev.time
            return ev if first else None
        stay = self._zone_keys.get((pid, ev.zone), {})
        if ev.kind == "exit":
            if stay.pop(ev.key, None) is None or stay:
                return None
            del self._zone_keys[(pid, ev.zone)]
            return ev
        return ev if next(iter(stay), None) == ev.key else None  # dwell: the identity that entered first

    def _record_visit(self, s: Session, ev: PresenceEvent, pid: int) -> None:
        """The profile's visit and zone stays, as Core statements (one per event; no ORM objects to load) on
        the session's connection (the ORM's per-statement work and autoflush are not needed: the session holds
        no visits or stays): the open visit's zones are remembered here, so an enter appends to them without
        reading the row."""
        if ev.kind == "dwell":  # a dwell tick writes nothing
            return
        c = s.connection()
        if ev.kind == "visit_start":
            before = c.scalar(_HAS_VISIT, {"pid": pid, "store": self.store_id}) is not None  # new here, as figures
            self.figures["visits_returning" if before else "visits_new"] += 1
            vid = c.execute(_NEW_VISIT, {"profile_id": pid, "started_at": ev.time, "zones": [],
                                          "store_id": self.store_id}).scalar_one()
            self.engine.add_points(s, pid, self.settings.loyalty.points_per_visit)
            self._open_visits[pid] = vid
            self._visit_zones[pid] = []
        elif ev.kind == "enter":
            open_vid = self._open_visits.get(pid)
            zones = self._visit_zones.get(pid) if open_vid is not None else None
            current = open_vid
            if zones is not None and ev.zone and (not zones or zones[-1] != ev.zone):
                zones.append(ev.zone)
                done = c.execute(_VISIT_ZONES, {"vid": open_vid, "zones": list(zones)})
                if not done.rowcount:
                    current = None  # the visit is gone (erased): the stay belongs to no visit
            if ev.zone:
                self._open_stays[(pid, ev.zone)] = c.execute(_NEW_STAY, {
                    "profile_id": pid, "visit_id": current, "zone": ev.zone, "entered_at": ev.time,
                    "store_id": self.store_id}).scalar_one()
        elif ev.kind == "exit":
            sid = self._open_stays.pop((pid, ev.zone or ""), None)
            if sid is not None:
                c.execute(_STAY_EXIT, {"sid": sid, "at": ev.time})
        elif ev.kind == "visit_end":
            vid = self._open_visits.pop(pid, None)
            self._visit_zones.pop(pid, None)
            if vid is not None:
                c.execute(_VISIT_END, {"vid": vid, "at": ev.time})

    def _count_anonymous(self, ev: PresenceEvent) -> None:
        day = dt.datetime.fromtimestamp(ev.time, self._tz).date().isoformat()
        if ev.kind == "visit_start":
            self.figures["anonymous_visits"] += 1
            self._anonymous[(day, "")][0] += 1
        elif ev.zone:
            acc = self._anonymous[(day, ev.zone)]
            acc[0] += 1
            acc[1] += ev.dwell_s

    def flush_footfall(self) -> None:
        """Anonymous counts go to the database in one small transaction per tick, not per advert."""
        if not self._anonymous:
            return
        pending, self._anonymous = self._anonymous, defaultdict(lambda: [0, 0.0])
        rows = [{"store_id": self.store_id, "day": day, "zone": zone, "anonymous_visits": int(visits),
                 "anonymous_dwell_s": dwell}
                for (day, zone), (visits, dwell) in pending.items()]
        # One upsert statement (the counts are added to the day's row), on a bare connection: no ORM session.
        with self.db.engine.begin() as conn:
            conn.execute(_footfall_upsert(conn.dialect), rows)

    def forget_profile(self, profile_id: int) -> None:
        """An erased profile (or one linked into another) leaves nothing keyed by its id in memory: no open
        visit or stay to write to, no identities to wait for, no occurrences judged (Engine.forget_profile),
        no presence track of its app. Its tags' tracks stay, anonymous now, as any unknown identity's."""
        self.presence.tracks.pop(app_key(profile_id), None)
        for per_profile in (self._visit_keys, self._visit_began, self._open_visits, self._visit_zones):
            per_profile.pop(profile_id, None)
        for key in [k for k in self._zone_keys if k[0] == profile_id]:
            del self._zone_keys[key]
        for stay in [k for k in self._open_stays if k[0] == profile_id]:
            del self._open_stays[stay]
        self.engine.forget_profile(profile_id)

    def profile_changed(self, profile_id: int, now: float) -> list[int]:
        """Attributes or consents changed: live segments are evaluated again (segment_entered may fire)."""
        with self.db.session() as s:
            return self._decide(s, EngineEvent("profile_updated", profile_id, now, f"profile:{now:.3f}"))

    def _decide(self, s: Session, ev: EngineEvent, only: Sequence[Any] | None = None) -> list[int]:
        return self._sent([(ev, self.engine.handle(s, ev, only))])

    def _decide_many(self, s: Session, events: Sequence[EngineEvent], only: Sequence[Any] | None = None,
                     before: Callable[[int], None] | None = None) -> list[int]:
        """Like ``_decide`` for many profiles' events (Engine.handle_many: read and written in bulk)."""
        return self._sent(zip(events, self.engine.handle_many(s, events, only, before), strict=True))

    def _sent(self, judged: Iterable[tuple[EngineEvent, Sequence[Outcome]]]) -> list[int]:
        """Each outcome to the hook; the ids of the notifications that go out now."""
        created = []
        for ev, outcomes in judged:
            for o in outcomes:
                if self.on_outcome is not None:
                    self.on_outcome(o, ev)
                if o.sends_now and o.notification_id is not None:
                    created.append(o.notification_id)
        return created

    # ------------------------------------------------------------ telemetry

    def ingest_readings(self, readings: Iterable[Reading] = (), now: float | None = None,
                        batch: TelemetryBatch | None = None) -> list[int]:
        """One transaction per batch: registry, readings, rollups, events, dead letters (gateway/telemetry/store.py),
        then the rules and the engine on the readings that are new and valid. The MQTT intake acknowledges
        the batch to the broker only after this returns (the commit)."""
        if batch is None:
            batch = TelemetryBatch(readings=list(readings))
        if not len(batch):
            return []
        if now is None:  # virtual time: the batch's own latest time
            now = max((r.time for r in batch.readings), default=None) or time.time()
        created: list[int] = []
        with self.db.session() as s, s.no_autoflush:
            named: dict[str, Device | None] = {}  # the batch's registry rows, read once for all three stages
            accepted = self.telemetry.write(s, batch, now, named)
            devices = {k: d for k, d in named.items() if d is not None}
            # -- device rules hook: the rules see `accepted` (stored once, profile-valid, time order) here.
            created += self.rules.on_batch(s, accepted, batch.events, devices)
            for r in accepted:
                d = devices.get(r.device_id)
                if d is not None and d.profile_id is not None:
                    facts = {"device": {"id": d.id, "kind": d.kind}, "reading": dict(r.metrics)}
                    created += self._decide(s, EngineEvent("telemetry", d.profile_id, r.time,
                                                           f"reading:{d.id}:{r.key}", facts=facts))
        self.figures["readings"] += len(batch.readings)  # counted once committed: a rolled-back try counts nothing
        return created

    def telemetry_timers(self, now: float) -> list[str]:
        """Devices gone silent past their profile's missed intervals go offline; retention purges.
        Returns the ids of devices that went offline now."""
        gone: list[str] = []
        if now - self._last_offline_scan >= OFFLINE_SCAN_S:
            self._last_offline_scan = now
            with self.db.session() as s:
                gone = self.telemetry.sweep_offline(s, now)
        if now - self._last_purge >= PURGE_EVERY_S:
            self._last_purge = now
            with self.db.session() as s:
                self.telemetry.purge(s, now)
                if self.settings.privacy.presence_retention_days > 0:  # visits, zone stays, decisions
                    purge_presence(s, now - self.settings.privacy.presence_retention_days * 86400)
        return gone
