"""The stages composed synchronously, in one direction: adverts -> sightings -> presence -> identity ->
engine -> outbox; telemetry -> registry and storage -> device rules -> engine; timers.

The virtual-time simulation drives it directly; the live ``Runtime`` (runtime.py) runs it on its
worker thread. It returns the ids of the notifications it committed; dispatching them is the caller's.
"""

from __future__ import annotations

import logging
import math
import operator
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from beacons.guard import Guard, GuardSettings
from beacons.parse import ParseStats, parse_adverts
from beacons.remote import app_key
from beacons.types import Advertisement, Frame, Sighting
from devices.mqtt import TelemetryIntake
from devices.payloads import Reading, TelemetryBatch
from devices.profiles import load_profiles
from devices.rules import load_rules
from gateway.app.config import ConfigError, Settings
from gateway.campaigns.model import CHANNELS, Campaign, CampaignIndex, Segment
from gateway.engine.engine import Engine, EngineEvent, FrequencyCap, Outcome
from gateway.metrics import RateWindow
from gateway.presence.calibration import load as load_calibration
from gateway.presence.floor import adjacency
from gateway.presence.record import TraceRecorder
from gateway.presence.tracker import PresenceEvent, PresenceTracker, Why
from gateway.presence.visits import Visits
from gateway.profiles import carts
from gateway.profiles.identity import IdentityIndex
from gateway.profiles.privacy import purge_presence
from gateway.profiles.rotating import Resolver
from gateway.storage.db import Database
from gateway.storage.models import Device
from gateway.telemetry.alarms import DeviceRules, mqtt_alert_sender
from gateway.telemetry.store import POLICIES, TelemetrySettings, TelemetryStore

log = logging.getLogger("gateway")
decision_log = logging.getLogger("gateway.decisions")

OutcomeHook = Callable[[Outcome, EngineEvent], None]
CART_SCAN_S = 5.0  # how often (clock time) carts are checked for abandonment and purchases
OFFLINE_SCAN_S = 5.0  # how often devices are checked for missed reporting intervals
PURGE_EVERY_S = 3600.0  # how often telemetry retention runs
SWITCHES_PER_PROFILE = 5  # zone switches (enter / exit) kept per enrolled profile, for GET /v1/presence
SWITCH_PROFILES = 1000  # profiles whose switches are kept (the ones that switched last)
SWITCHES_SHOWN = 20  # the newest switches, over all profiles, in GET /v1/presence
RECEIVER_RATE_WINDOW_S = 10.0  # adverts per second per receiver: over this window
RECEIVER_OF = operator.attrgetter("receiver")


@dataclass(frozen=True, slots=True)
class ZoneSwitch:
    """An enrolled profile entered or left a zone, with the tracker's evidence when it gives one."""

    profile_id: int
    kind: str  # enter / exit
    zone: str | None
    time: float
    since: float | None  # when the stay began
    why: Why | None = None  # the tracker's evidence; None for an exit on silence


class ZoneSwitches:
    """The last few zone switches of enrolled profiles, in memory and bounded (written on the worker,
    read on the loop through ``snapshot``). Anonymous identities never get here: they have no profile."""

    def __init__(self, per_profile: int = SWITCHES_PER_PROFILE, profiles: int = SWITCH_PROFILES) -> None:
        self._per, self._max = per_profile, profiles
        self._by_profile: OrderedDict[int, deque[ZoneSwitch]] = OrderedDict()

    def add(self, sw: ZoneSwitch) -> None:
        q = self._by_profile.get(sw.profile_id)
        if q is None:
            q = self._by_profile[sw.profile_id] = deque(maxlen=self._per)
            while len(self._by_profile) > self._max:
                self._by_profile.popitem(last=False)
        else:
            self._by_profile.move_to_end(sw.profile_id)
        q.append(sw)

    def forget(self, profile_id: int) -> None:
        self._by_profile.pop(profile_id, None)

    def of(self, profile_id: int) -> list[ZoneSwitch]:
        """One profile's switches, newest first (any thread: a copy taken under the GIL, tried again if the
        worker changed it meanwhile)."""
        for _ in range(10):
            try:
                return list(reversed(self._by_profile.get(profile_id, ())))
            except RuntimeError:
                continue
        return []

    def newest(self, n: int = SWITCHES_SHOWN) -> list[ZoneSwitch]:
        """The newest ``n`` over every profile, newest first (any thread, as ``of``)."""
        for _ in range(10):
            try:
                queues = list(self._by_profile.values())
                every = [sw for q in queues for sw in list(q)]
                break
            except RuntimeError:
                continue
        else:
            return []
        every.sort(key=lambda sw: sw.time, reverse=True)
        return every[:n]


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
                 intake: TelemetryIntake | None = None, channels: Sequence[str] = CHANNELS,
                 recorder: TraceRecorder | None = None) -> None:
        """``intake``: the MQTT intake when one runs: its counters join ``stats()``, and device rules send
        commands and staff alerts through it. ``channels``: the ones configured, which can carry a send.
        ``recorder``: every sighting presence observes is written to it (``[presence] record_dir``)."""
        self.settings = settings
        self.db = db
        self.store_id = settings.store.id  # written on every visit, stay and footfall row (figures per store)
        self.identities = identities
        self.parse_stats = ParseStats()
        # Floods, rotating addresses and passers-by stop here; enrolled identities skip the uuid rule.
        self.guard = Guard(guard, trusted=lambda key: identities.beacon(key) is not None)
        # Rotating identities (EID, RPA, the app's beacon) become their profile's app key before the guard.
        self.rotating = Resolver(identities, app_uuid=settings.identities.app_uuid,
                                 rpa_cache_size=settings.identities.rpa_cache_size)
        calibration = load_calibration(settings.presence.calibration) if settings.presence.calibration else None
        self.presence = PresenceTracker(settings.presence, settings.receivers, calibration=calibration,
                                        adjacency=adjacency(settings.zones))  # [[zones]]: None without
        self.engine = Engine(campaigns, abandon_after_s=settings.carts.abandon_after_s,
                             timezone=settings.store.timezone,
                             caps=[FrequencyCap(c.window_s, c.max, tuple(c.purposes), c.channel or None)
                                   for c in settings.engine.caps],
                             segments=segments,
                             tiers=[(t.name, t.min_points) for t in settings.loyalty.tiers],
                             store_id=settings.store.id, channels=channels)
        self.on_outcome = on_outcome
        self.figures: Counter[str] = Counter()
        # Adverts (and remote sightings) per receiver, and their rate over 10 s, sampled at each tick: the
        # dashboard's and /metrics' traffic per receiver.
        self.heard_by: Counter[str] = Counter()
        self.heard_rates = RateWindow(RECEIVER_RATE_WINDOW_S)
        self.visits = Visits(settings.store.id, settings.store.timezone, self.figures, settings.figures.bounce_s)
        self._last_cart_scan = float("-inf")
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
        self.recorder = recorder
        self.switches = ZoneSwitches()
        # Told of every batch of presence events, anonymous ones too, before the engine (Home Assistant's link).
        self.presence_listeners: list[Callable[[Sequence[PresenceEvent]], None]] = []

    # ------------------------------------------------------------ BLE

    def ingest_adverts(self, adverts: Iterable[Advertisement]) -> list[int]:
        """One scanner drain: parsed at once (beacons.parse.parse_adverts), then guard and presence per
        frame, then one engine transaction for the drain's presence events."""
        batch = adverts if isinstance(adverts, list) else list(adverts)
        # The guard never reads presence, so the drain is admitted first, then observed in one call.
        sightings = self.guard.sightings(self.rotating.resolve(batch, self._parse))
        if self.recorder is not None:  # one buffered write per drain; the tick flushes
            self.recorder.write(sightings)
        events = self.presence.observe_many(sightings)
        self.figures["adverts"] += len(batch)
        self.heard_by.update(map(RECEIVER_OF, batch))
        return self.handle_presence(events) if events else []

    def _parse(self, adverts: Sequence[Advertisement]) -> list[tuple[Advertisement, Frame]]:
        return parse_adverts(adverts, self.parse_stats)

    def stats(self) -> dict[str, Any]:
        """Counters for /metrics: figures, the parser's accepts/rejects, the guard's and presence's drops."""
        out = {"figures": dict(self.figures), "parse": self.parse_stats.as_dict(), "guard": self.guard.stats(),
               "presence": self.presence.stats(), "telemetry": self.telemetry.stats(),
               "rotating": self.rotating.stats()}
        if self.mqtt_stats is not None:
            out["mqtt"] = self.mqtt_stats()
        return out

    def ingest_sightings(self, sightings: Iterable[Sighting]) -> list[int]:
        """Sightings other receivers resolved (ESPresense nodes, the shop's app): the advert path
        from presence on. No guard: they carry no address, and unmapped ids never got this far."""
        batch = sightings if isinstance(sightings, list) else list(sightings)
        if self.recorder is not None:
            self.recorder.write(batch)
        events = self.presence.observe_many(batch)
        self.figures["remote_sightings"] += len(batch)
        self.heard_by.update(map(RECEIVER_OF, batch))
        return self.handle_presence(events) if events else []

    def tick(self, now: float) -> list[int]:
        """Timers: presence exits and visit ends, then delayed or held sends that are now due."""
        self.rotating.refresh(now)
        events = self.presence.tick(now)
        self.heard_rates.sample(now, self.heard_by)
        created = self.handle_presence(events) if events else []
        with self.db.session() as s:
            created += self.rules.tick(s, now)  # device rules' due timers: for_s durations, did-not-recur clears
            created += self.engine.release_due(s, now)
            for campaign, audience in self.engine.schedule_audiences(s, now):  # each audience as one batch
                created += self._decide_many(s, audience, [campaign])
        if not 0 <= now - self._last_cart_scan < CART_SCAN_S:  # due, or the clock stepped back past the last scan
            self._last_cart_scan = now
            created += self.cart_events(now)
        self.flush_footfall()
        self.telemetry_timers(now)
        if self.recorder is not None:
            self.recorder.flush()
        return created

    def wall_stepped(self, now: float, seconds: float) -> None:
        """The wall clock was stepped by ``seconds`` (forward, or back if negative) just before ``now`` (the
        Runtime saw it against monotonic time). What is stamped before the step moves by it, in one
        transaction: the online devices' last readings (a step forward is not silence: nobody goes offline
        for it), the device rules' timers (a ``for`` duration is not an hour older), open carts' last changes
        (not abandoned at once). A device that really went quiet is still offline after its allowance of
        real time. Forward: every stamp up to ``now - seconds`` (the latest before the step) moves. Back:
        only stamps later than ``now`` (ahead of the corrected clock, so made before the step) move; one at
        or before it may be a device's or the shop's own right clock, and stays."""
        after, upto = (-math.inf, now - seconds) if seconds > 0 else (now, now - seconds)
        with self.db.session() as s:
            devices = self.telemetry.wall_stepped(s, after, upto, seconds)
            states = self.rules.wall_stepped(s, after, upto, seconds)
            open_carts = carts.wall_stepped(s, after, upto, seconds)
        log.info("wall clock step of %+.0f s: moved %d device(s), %d rule state(s), %d open cart(s)",
                 seconds, devices, states, open_carts)

    def cart_events(self, now: float) -> list[int]:
        """Raise each cart's lifecycle events once: abandoned (idle past the limit) and purchase."""
        with self.db.session() as s:  # each kind judged as one batch (a cart's facts never read another's marks)
            created = self._decide_many(s, carts.abandoned(s, now, self.settings.carts.abandon_after_s))
            return created + self._decide_many(s, carts.purchased(s, now))

    def handle_presence(self, events: Sequence[PresenceEvent]) -> list[int]:
        """Profiles' events: their visits and stays written, then judged as one batch (the engine reads visit
        history as of each event's time). Unknown identities are footfall only."""
        for listener in self.presence_listeners:
            listener(events)
        known = self.visits.per_profile(events, self.identities.beacon)
        if not known:
            return []
        for ev, pid in known:
            if ev.kind == "enter" or ev.kind == "exit":
                self.switches.add(ZoneSwitch(pid, ev.kind, ev.zone, ev.time, ev.zone_since, ev.why))
        points = self.settings.loyalty.points_per_visit
        judged = [EngineEvent(ev.kind, pid, ev.time,
                              f"visit:{ev.visit_since:.3f}" if ev.kind.startswith("visit")
                              else f"stay:{ev.zone}:{ev.zone_since:.3f}", ev.zone, ev.dwell_s,
                              points=points if ev.kind == "visit_start" else 0)
                  for ev, pid in known]
        with self.db.session() as s:
            self.visits.record(s.connection(), known)
            return self._decide_many(s, judged)

    def flush_footfall(self) -> None:
        """Anonymous counts go to the database in one small transaction per tick, not per advert."""
        self.visits.flush_footfall(self.db.engine)

    def forget_profile(self, profile_id: int) -> None:
        """An erased profile (or one linked into another) leaves nothing keyed by its id in memory: no open
        visit or stay to write to, no identities to wait for, no occurrences judged (Engine.forget_profile),
        no presence track of its app. Its tags' tracks stay, anonymous now, as any unknown identity's."""
        self.rotating.remove_profile(profile_id)
        self.presence.tracks.pop(app_key(profile_id), None)
        self.visits.forget(profile_id)
        self.engine.forget_profile(profile_id)
        self.switches.forget(profile_id)

    def profile_changed(self, profile_id: int, now: float) -> list[int]:
        """Attributes or consents changed: live segments are evaluated again (segment_entered may fire)."""
        with self.db.session() as s:
            return self._decide(s, EngineEvent("profile_updated", profile_id, now, f"profile:{now:.3f}"))

    def _decide(self, s: Session, ev: EngineEvent) -> list[int]:
        return self._decide_many(s, [ev])

    def _decide_many(self, s: Session, events: Sequence[EngineEvent], only: Sequence[Campaign] | None = None
                     ) -> list[int]:
        """The events judged as one batch (against ``only``, or all their triggers' campaigns); outcomes to
        the hook; the ids of notifications that go out now."""
        return self._sent(zip(events, self.engine.handle_many(s, events, only), strict=True)) if events else []

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
            owned: list[EngineEvent] = []  # the readings of owned devices, judged as one batch in time order
            for r in accepted:
                d = devices.get(r.device_id)
                if d is not None and d.profile_id is not None:
                    owned.append(EngineEvent("telemetry", d.profile_id, r.time, f"reading:{d.id}:{r.key}",
                                             facts={"device": {"id": d.id, "kind": d.kind},
                                                    "reading": dict(r.metrics)}))
            created += self._decide_many(s, owned)
        self.figures["readings"] += len(batch.readings)  # counted once committed: a rolled-back try counts nothing
        return created

    def telemetry_timers(self, now: float) -> list[str]:
        """Devices gone silent past their profile's missed intervals go offline; retention purges.
        Returns the ids of devices that went offline now."""
        gone: list[str] = []
        if not 0 <= now - self._last_offline_scan < OFFLINE_SCAN_S:  # (a step back: now, not in an hour)
            self._last_offline_scan = now
            with self.db.session() as s:
                gone = self.telemetry.sweep_offline(s, now)
        if not 0 <= now - self._last_purge < PURGE_EVERY_S:
            self._last_purge = now
            with self.db.session() as s:
                self.telemetry.purge(s, now)
                if self.settings.privacy.presence_retention_days > 0:  # visits, zone stays, decisions
                    purge_presence(s, now - self.settings.privacy.presence_retention_days * 86400)
            self.purge_recordings(now)
        return gone

    def purge_recordings(self, now: float) -> None:
        """Trace files past ``[privacy] presence_retention_days`` go, as the visits they show did."""
        if self.recorder is not None:
            gone = self.recorder.purge(now, self.settings.privacy.presence_retention_days)
            if gone:
                log.info("deleted %d trace file(s) past presence retention", len(gone))
