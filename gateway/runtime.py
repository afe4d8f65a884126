"""The wiring: the one place that knows tasks, queues, the MQTT thread and the HTTP server.

``Pipeline`` composes the stages synchronously (adverts -> sightings -> presence -> identity
-> engine -> outbox); the virtual-time simulation drives it directly. ``Runtime`` runs the
same pipeline live: scanner callbacks and MQTT batches are collected on the event loop and handed,
one job at a time, to the pipeline's own worker thread, which is the only thread that runs the
pipeline; committed notifications are dispatched to the channels afterwards, on the loop.

The event loop never waits on the database: a locked SQLite file or a PostgreSQL outage stalls the
worker, never the API (``/health/live`` keeps answering). Backpressure: adverts that arrive while a
drain runs wait for the next one, up to ``MAX_PENDING_ADVERTS`` (the rest are counted and dropped, as
the radio drops them); telemetry waits unacknowledged at the broker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import logging
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import Dialect, Table, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from beacons.guard import Guard, GuardSettings
from beacons.parse import ParseStats, parse_adverts
from beacons.remote import AppReport, RemoteError, app_key, app_sightings, parse_espresense
from beacons.scanner import Scanner
from beacons.types import Advertisement, Sighting
from devices.payloads import Reading, Rejected, TelemetryBatch
from devices.profiles import load_profiles
from devices.rules import load_rules
from gateway.campaigns.model import CampaignIndex, Segment, load_campaigns, load_segments
from gateway.channels import Channel, StreamHub
from gateway.clock import Clock, SystemClock
from gateway.config import ConfigError, Settings
from gateway.delivery import build_channels, close_channels
from gateway.delivery.outbox import Backoff, Dispatcher
from gateway.delivery.outbox import depths as outbox_depths
from gateway.engine.engine import Engine, EngineEvent, FrequencyCap, Outcome
from gateway.engine.explain import dry_run
from gateway.metrics import Histogram, db_state, gateway_families, readiness, render
from gateway.presence.tracker import PresenceEvent, PresenceTracker
from gateway.profiles.devices import DeviceRegistry
from gateway.profiles.identity import IdentityIndex
from gateway.profiles.privacy import purge_presence
from gateway.profiles.service import GatewayService, Invalid
from gateway.security.tokens import TokenSigner
from gateway.storage.db import Database, describe, is_transient
from gateway.storage.models import Cart, Device, FootfallCount, Visit, ZoneStay
from gateway.telemetry.alarms import AlarmDesk, DeviceRules, mqtt_alert_sender
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
MAX_PENDING_ADVERTS = 100_000  # about 10 s of a full shop (1,000 tags at 10 Hz) waiting for a stalled database
TELEMETRY_RETRY = Backoff(base_s=0.1, max_s=5.0, jitter=0.2, max_attempts=1_000_000)
"""A telemetry batch held by a database outage is retried on this schedule, for as long as it takes."""


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
                 guard: GuardSettings | None = None, segments: Sequence[Segment] = ()) -> None:
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
        self.rules = DeviceRules(load_rules(settings.device_rules.dir) if settings.device_rules.dir else [],
                                 timezone=settings.store.timezone, decide=self._decide)
        self.mqtt_stats: Callable[[], dict[str, Any]] | None = None  # set by the Runtime: the intake's counters
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
        outcomes = self.engine.handle(s, ev, only)
        created = []
        for o in outcomes:
            if self.on_outcome is not None:
                self.on_outcome(o, ev)
            if o.sends_now and o.notification_id is not None:
                created.append(o.notification_id)
        return created

    def _decide_many(self, s: Session, events: Sequence[EngineEvent], only: Sequence[Any] | None = None,
                     before: Callable[[int], None] | None = None) -> list[int]:
        """Like ``_decide`` for many profiles' events (Engine.handle_many: read and written in bulk)."""
        created = []
        for ev, outcomes in zip(events, self.engine.handle_many(s, events, only, before), strict=True):
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


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _snapshot(tracks: dict[str, Any]) -> list[tuple[str, Any]]:
    """The tracks as they are now, read on the loop while the worker may change them: one C-level copy
    (it holds the GIL throughout), tried again in the rare case the dict changed size mid-copy."""
    for _ in range(10):
        try:
            return list(tracks.items())
        except RuntimeError:
            continue
    return []


def token_secret(settings: Settings) -> bytes:
    """The configured secret, or one generated once and kept in the data dir (mode 0600)."""
    if settings.api.token_secret:
        return hashlib.sha256(settings.api.token_secret.encode()).digest()
    path = Path(settings.data_dir) / "token.secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secrets.token_bytes(32))
        path.chmod(0o600)
    return path.read_bytes()


class _QuietServer:
    """uvicorn without its own signal handling: the CLI owns Ctrl-C and stops everything in order."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        # log_config=None: uvicorn's records go through the gateway's handlers ([logging], secrets masked).
        self.server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                            timeout_graceful_shutdown=2, log_config=None))

    async def serve(self) -> None:
        await self.server.serve()

    @property
    def started(self) -> bool:
        return bool(self.server.started)

    def stop(self) -> None:
        self.server.should_exit = True


class Runtime:
    """Runs the pipeline live: scanner, MQTT intake, ticker, dispatcher and API server."""

    def __init__(self, settings: Settings, *, clock: Clock | None = None, scanner: Scanner | None = None,
                 mqtt: Any = None, serve_api: bool = True, channels: Sequence[Channel] = (),
                 on_outcome: OutcomeHook | None = log_outcome, tick_s: float = 0.5) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.scanner = scanner
        self.mqtt = mqtt
        self.serve_api = serve_api
        self.tick_s = tick_s
        self.db = Database(settings.database.url, settings.database.busy_timeout_ms)
        self.identities = IdentityIndex()
        self.campaigns = CampaignIndex(load_campaigns(settings.campaigns.dir))
        self.pipeline = Pipeline(settings, self.db, self.campaigns, self.identities, on_outcome,
                                 segments=load_segments(settings.campaigns.dir))
        self.hub = StreamHub()
        d = settings.delivery
        self.remote_channels = build_channels(settings, self.db, self.clock)  # webhook, Web Push, as enabled
        self.dispatcher = Dispatcher(self.db, [self.hub, *channels, *self.remote_channels],
                                     Backoff(d.backoff_base_s, d.backoff_max_s, jitter=d.jitter,
                                             max_attempts=d.max_attempts), concurrency=d.concurrency)
        self.advert_latency = Histogram("gateway_advert_to_commit_seconds",
                                        "From an advertisement's arrival to the commit of the notifications it caused")
        self._batch_t0 = 0.0
        self.admin_key = settings.api.admin_key or secrets.token_urlsafe(24)
        self.service = GatewayService(self.db, self.identities, self.clock, TokenSigner(token_secret(settings)),
                                      settings.api.token_ttl_s, timezone=settings.store.timezone)
        engine = self.pipeline.engine
        self.service.file_campaigns = dict(self.campaigns.by_id)
        self.service.conversion_window_s = settings.interactions.conversion_window_s
        self.service.bounce_s = settings.figures.bounce_s
        self.service.store_id = settings.store.id
        self.service.on_campaigns_changed = self.reload_campaigns

        engine.channels = (self.hub.name, *(c.name for c in self.remote_channels))  # what can carry a send

        def runner(session: Session, event: EngineEvent) -> list[dict[str, Any]]:
            return dry_run(session, event, engine=engine.clone())

        self.service.dry_runner = runner
        self.service.on_profile_changed = self._profile_changed
        self.service.on_profile_gone = self._profile_gone
        self._adverts: list[Advertisement] = []
        self._drain_scheduled = False
        self._drainer: asyncio.Task[None] | None = None
        self.adverts_dropped = 0  # arrived while MAX_PENDING_ADVERTS were already waiting for the worker
        # The one thread that runs the pipeline: its state (presence, engine caches) is never shared.
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-pipeline")
        self._jobs: set[asyncio.Future[Any]] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self._dispatches: set[asyncio.Task[Any]] = set()
        self._server: _QuietServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.scanner_error: str | None = None
        self.sightings: asyncio.Queue[Sighting] = asyncio.Queue()  # ESPresense nodes, via the MQTT thread
        self.telemetry_failures = 0  # telemetry batches whose first commit failed (then retried)
        self.devices = DeviceRegistry(self.db, self.identities, self.clock, self.pipeline.telemetry.profiles)
        self.alarms = AlarmDesk(self.db, self.clock, self.pipeline.rules)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.db.upgrade, self.settings.store.id)
        await self._run(self._load_state)
        self._dispatch(await self._run(self._due_rule_timers))
        if self.serve_api:
            from api.app import create_app
            from api.deps import ApiContext
            from gateway.security.auth import AuthPolicy

            app = create_app(ApiContext(service=self.service, hub=self.hub, admin_key=self.admin_key,
                                        health=self.health, heartbeat_s=self.settings.api.heartbeat_s,
                                        stream_write_timeout_s=self.settings.api.stream_write_timeout_s,
                                        cors_origins=self.settings.api.cors_origins,
                                        cors_methods=self.settings.api.cors_methods,
                                        cors_headers=self.settings.api.cors_headers,
                                        auth_policy=AuthPolicy.from_settings(self.settings.api),
                                        report_sightings=self.report_sightings,
                                        ready=self.readiness, metrics=self.metrics_text, presence=self.presence_now,
                                        alarms=self.alarms, devices=self.devices))
            app.state.vapid_public_key = next(  # for GET /v1/me/push-subscriptions/vapid-public-key
                (getattr(c, "public_key", None) for c in self.remote_channels if c.name == "webpush"), None)
            self._server = _QuietServer(app, self.settings.api.host, self.settings.api.port)
            self._tasks.append(asyncio.create_task(self._server.serve(), name="api"))
            for _ in range(200):  # the port is bound within milliseconds; fail loudly if not
                if self._server.started:
                    break
                if self._tasks[-1].done():
                    self._tasks[-1].result()
                await asyncio.sleep(0.01)
        if self.mqtt is not None:
            self._subscribe_remote()
            await self.mqtt.start(self._loop)
            if hasattr(self.mqtt, "stats"):
                self.pipeline.mqtt_stats = self.mqtt.stats
            self._wire_device_rules()
            self._tasks.append(asyncio.create_task(self._consume_telemetry(), name="telemetry"))
            self._tasks.append(asyncio.create_task(self._consume_sightings(), name="sightings"))
        if self.scanner is not None:
            await self.scanner.start(self.on_advert)
        self._tasks.append(asyncio.create_task(self._ticker(), name="ticker"))
        self._tasks.append(asyncio.create_task(self._retrier(), name="retrier"))

    def _load_state(self) -> None:
        with self.db.session() as s:
            self.identities.load(s)
        self.reload_campaigns()

    def _due_rule_timers(self) -> list[int]:
        """Device rules' timers that came due while the gateway was away."""
        with self.db.session() as s:
            return self.pipeline.rules.tick(s, self.clock.now())

    # ------------------------------------------------------------ the pipeline's worker

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the pipeline's worker thread and wait for it (the loop goes on meanwhile)."""
        assert self._loop is not None
        job = self._loop.run_in_executor(self._worker, functools.partial(fn, *args))
        self._jobs.add(job)
        try:
            return await job
        finally:
            self._jobs.discard(job)

    def _submit(self, what: str, fn: Callable[..., list[int]], *args: Any) -> None:
        """Queue a pipeline job from any thread; the notifications it commits are dispatched. Errors are
        logged (a database outage once, see _failed), never raised to the caller."""
        loop = self._loop
        if loop is None or loop.is_closed():  # before start nothing else runs the pipeline: inline
            self._guarded(what, fn, *args)
            return

        def spawn() -> None:
            async def job() -> None:
                self._dispatch(await self._run(self._guarded, what, fn, *args))

            task = loop.create_task(job())
            self._dispatches.add(task)
            task.add_done_callback(self._dispatches.discard)

        if _on_loop(loop):
            spawn()
        else:
            loop.call_soon_threadsafe(spawn)

    def _guarded(self, what: str, fn: Callable[..., list[int]], *args: Any) -> list[int]:
        """On the worker: a failing job loses its inputs but never the worker. A database outage is
        logged once (Database.outage), not a traceback per batch."""
        try:
            return fn(*args)
        except Exception as error:
            self._failed(what, error)
            return []

    def _failed(self, what: str, error: BaseException) -> None:
        if is_transient(error):
            self.db.outage.failed(error)
        else:
            log.error("%s failed", what, exc_info=error)

    def _wire_device_rules(self) -> None:
        """Alarm actions that leave over MQTT: commands to devices, retained staff alerts."""
        rules = self.pipeline.rules
        if hasattr(self.mqtt, "publish_command"):
            rules.publish_command = self.mqtt.publish_command
        if self.settings.device_rules.staff_alerts_mqtt and hasattr(self.mqtt, "publish"):
            rules.publish_alert = mqtt_alert_sender(self.mqtt.publish, self.settings.mqtt.topic_prefix,
                                                    self.settings.store.id)

    async def stop(self) -> None:
        if self.scanner is not None:
            await self.scanner.stop()
        await self.flush()
        if self.mqtt is not None:
            await self._flush_telemetry()  # committed and acked while we are still connected
            await self.mqtt.stop()
        self.hub.close_all()
        if self._server is not None:
            self._server.stop()
        for t in self._tasks:
            if t.get_name() != "api":
                t.cancel()
        if self._dispatches:
            await asyncio.gather(*self._dispatches, return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await asyncio.to_thread(self._worker.shutdown, True)  # the job under way finishes; none is cut off
        await close_channels(self.remote_channels)
        self.db.dispose()

    # ------------------------------------------------------------ inputs

    def on_advert(self, adv: Advertisement) -> None:
        """Scanner callback, on the loop: collect; one drain at a time runs on the worker, and what
        arrives meanwhile is the next drain, so a burst (or a stalled database's backlog) is one batch."""
        if len(self._adverts) >= MAX_PENDING_ADVERTS:
            self.adverts_dropped += 1
            return
        if not self._adverts:
            self._batch_t0 = time.perf_counter()  # the batch's first advert: advert-to-commit starts here
        self._adverts.append(adv)
        if not self._drain_scheduled and self._drainer is None:
            self._drain_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._drain_adverts)

    def inject(self, adverts: Iterable[Advertisement]) -> None:
        for adv in adverts:
            self.on_advert(adv)

    def _drain_adverts(self) -> None:
        self._drain_scheduled = False
        if self._drainer is None and self._adverts:
            self._drainer = asyncio.create_task(self._drain_loop(), name="adverts")

    async def _drain_loop(self) -> None:
        try:
            while self._adverts:
                batch, self._adverts = self._adverts, []
                t0 = self._batch_t0
                ids = await self._run(self._guarded, f"advertisement batch of {len(batch)}",
                                      self.pipeline.ingest_adverts, batch)
                if ids:
                    self.advert_latency.observe(time.perf_counter() - t0)
                self._dispatch(ids)
        finally:
            self._drainer = None

    def _dispatch(self, ids: list[int]) -> None:
        if ids:
            t = asyncio.create_task(self.dispatcher.dispatch(ids, self.clock.now(), time.perf_counter()))
            self._dispatches.add(t)
            t.add_done_callback(self._dispatches.discard)

    def _subscribe_remote(self) -> None:
        """ESPresense nodes publish on the same broker: one more filter on the intake's connection."""
        r = self.settings.remote
        if not r.espresense or not hasattr(self.mqtt, "add_subscription"):
            return
        from devices.mqtt import ExtraSubscription

        parse = functools.partial(parse_espresense, prefix=r.espresense_prefix, rooms=dict(r.rooms))
        self.mqtt.add_subscription(ExtraSubscription("espresense", f"{r.espresense_prefix}/devices/#", parse,
                                                     self.sightings, (RemoteError,)))

    async def _consume_sightings(self) -> None:
        queue = self.sightings
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            self._dispatch(await self._run(self._guarded, f"remote sighting batch of {len(batch)}",
                                           self.pipeline.ingest_sightings, batch))

    def report_sightings(self, profile_id: int, reports: list[AppReport]) -> dict[str, Any]:
        """The app's door (called from the API's worker threads): validate all, then hand the batch to
        the event loop. Reports of store beacons no receiver is configured for are counted, not used."""
        try:
            batch = app_sightings(profile_id, reports, self.clock.now(), max_age_s=self.settings.remote.app_max_age_s,
                                  max_ahead_s=self.settings.remote.app_max_ahead_s)
        except RemoteError as exc:
            raise Invalid(exc.message) from None
        known = self.pipeline.presence.receivers
        usable = [s for s in batch if s.receiver in known]
        if usable:
            self.identities.allow_app(profile_id)
            self._submit(f"app sighting batch of {len(usable)}", self.pipeline.ingest_sightings, usable)
        return {"received": len(batch), "accepted": len(usable), "unknown_beacon": len(batch) - len(usable)}

    def _profile_changed(self, profile_id: int) -> None:
        """From the API's worker threads: segments are re-evaluated on the loop, like any other input."""
        if self._loop is None:
            return
        self._submit(f"segment refresh for profile {profile_id}",
                     lambda: self.pipeline.profile_changed(profile_id, self.clock.now()))

    def _profile_gone(self, profile_id: int) -> None:
        """From the API's worker threads, after an erasure or a link committed: the pipeline forgets the profile
        on the worker, where its state changes (before start, nothing else touches it: now)."""

        def forget() -> list[int]:
            self.pipeline.forget_profile(profile_id)
            return []

        self._submit(f"forgetting profile {profile_id}", forget)

    async def _consume_telemetry(self) -> None:
        """What is queued, up to the intake's max_batch, is one batch: one transaction, then one round of
        PUBACKs. The broker keeps sending (receive_maximum) while it commits."""
        queue = self.mqtt.batches
        limit = getattr(getattr(self.mqtt, "settings", None), "max_batch", 1000)
        while True:
            batch: TelemetryBatch = await queue.get()
            while not queue.empty() and len(batch) < limit:
                batch.extend(queue.get_nowait())
            await self.commit_telemetry(batch)

    async def commit_telemetry(self, batch: TelemetryBatch) -> None:
        """Commit, then acknowledge. Nothing is acknowledged that is not in the database.

        A batch that fails for the database's state (locked, full, unreachable: ``is_transient``) is
        held unacknowledged and retried whole with backoff for as long as it takes; the broker keeps
        it. A batch that fails for its data is retried message by message, and only a message that
        fails for its own data is dead-lettered (``ingest_failed``). A message committed on an
        earlier pass comes back as a counted duplicate.
        """
        attempts = 0
        while True:
            ids = await self._run(self._commit_telemetry_job, batch)
            if ids is not None:
                break
            attempts += 1
            delay = TELEMETRY_RETRY.delay(attempts)
            log.debug("%d telemetry message(s) held unacknowledged; retry in %.1f s", len(batch), delay)
            await asyncio.sleep(delay)
        self.mqtt.ack(batch)
        self._dispatch(ids)

    def _commit_telemetry_job(self, batch: TelemetryBatch) -> list[int] | None:
        """On the worker: the batch's notification ids, or None if it must wait (nothing acknowledged)."""
        try:
            ids = self.pipeline.ingest_readings(batch=batch, now=self.clock.now())
        except Exception as error:
            if is_transient(error):
                self.db.outage.failed(error)
                return None
            self.telemetry_failures += 1
            log.warning("telemetry batch of %d failed (%s); retrying its messages one by one", len(batch),
                        describe(error))
            ids = []
            if not self._commit_one_by_one(batch, ids):
                return None
        self.db.outage.succeeded()
        return ids

    def _commit_one_by_one(self, batch: TelemetryBatch, ids: list[int]) -> bool:
        """False if some message could be neither stored nor dead-lettered, or the database's state
        failed it: then the whole batch waits."""
        now = self.clock.now()
        singles = [*(("telemetry", TelemetryBatch(readings=[r], prefix=batch.prefix)) for r in batch.readings),
                   *(("status", TelemetryBatch(statuses=[x], prefix=batch.prefix)) for x in batch.statuses),
                   *(("events", TelemetryBatch(events=[e], prefix=batch.prefix)) for e in batch.events),
                   *(("", TelemetryBatch(rejects=[j], prefix=batch.prefix)) for j in batch.rejects)]
        for kind, one in singles:
            try:
                ids += self.pipeline.ingest_readings(batch=one, now=now)
                continue
            except Exception as exc:
                if is_transient(exc):  # not this message's fault: it must not be dead-lettered
                    self.db.outage.failed(exc)
                    return False
                detail = describe(exc)
            item = (one.readings or one.statuses or one.events or [None])[0]
            if item is None:  # a reject that cannot be dead-lettered
                log.error("telemetry reject could not be stored (%s); holding the batch", detail)
                return False
            topic = f"{batch.prefix}/{item.store_id}/devices/{item.device_id}/{kind}"
            log.warning("telemetry message on %s dead-lettered: %s", topic, detail)
            try:
                self.pipeline.ingest_readings(batch=TelemetryBatch(rejects=[Rejected(
                    topic, "ingest_failed", detail, repr(item).encode()[:1024], now, item.device_id)]), now=now)
            except Exception as exc:
                if is_transient(exc):
                    self.db.outage.failed(exc)
                else:
                    log.error("dead-lettering a telemetry message on %s failed: %s", topic, describe(exc))
                return False
        return True

    async def _flush_telemetry(self) -> None:
        queue = getattr(self.mqtt, "batches", None)
        if queue is None or queue.empty():
            return
        batch: TelemetryBatch = queue.get_nowait()
        while not queue.empty():
            batch.extend(queue.get_nowait())
        try:
            await asyncio.wait_for(self.commit_telemetry(batch), 5.0)
        except TimeoutError:  # never acknowledged: the broker redelivers them to the next run
            log.warning("stopping with %d telemetry message(s) uncommitted; the broker keeps them", len(batch))

    def ingest_readings(self, readings: Iterable[Reading]) -> None:
        self._dispatch(self.pipeline.ingest_readings(readings, now=self.clock.now()))

    def reload_campaigns(self) -> None:
        """Files (loaded at start) plus API campaigns (from the database); an API id never shadows a file's."""
        merged = dict(self.service.file_campaigns)
        merged.update((c.id, c) for c in self.service.api_campaigns() if c.id not in merged)
        self.campaigns = CampaignIndex(merged.values())
        self.pipeline.engine.set_campaigns(self.campaigns)

    def tick(self) -> None:
        """Presence timers (exits, visit ends) at the clock's now, queued on the worker (``flush`` waits)."""
        now = self.clock.now()
        self._submit("tick", self.pipeline.tick, now)

    async def _ticker(self) -> None:
        """One tick at a time: a tick held up by the database is not followed by a pile of others."""
        while True:
            await asyncio.sleep(self.tick_s)
            self._dispatch(await self._run(self._guarded, "tick", self.pipeline.tick, self.clock.now()))

    async def _retrier(self) -> None:
        """Due retries come from the database, so they survive a restart; so do notifications a crash
        left committed but never dispatched, which go out first."""
        try:
            if recovered := await self.dispatcher.recover(self.clock.now()):
                log.info("dispatched %d notification(s) left undispatched by the last run", recovered)
        except Exception:
            log.exception("recovering undispatched notifications failed")
        while True:
            await asyncio.sleep(self.settings.delivery.retry_poll_s)
            try:
                await self.dispatcher.retry_due(self.clock.now())
            except Exception:
                log.exception("delivery retries failed")

    async def flush(self) -> None:
        """Wait for pending advert batches, pipeline jobs and dispatches (tests, shutdown)."""
        for _ in range(1000):
            waiting: list[Any] = [*self._jobs, *self._dispatches]
            if self._drainer is not None:
                waiting.append(self._drainer)
            if not waiting and not self._drain_scheduled and not self._adverts:
                return
            await asyncio.sleep(0)
            if waiting:
                await asyncio.gather(*waiting, return_exceptions=True)

    # ------------------------------------------------------------ health

    def readiness(self) -> dict[str, Any]:
        """Ready to serve: the database answers and its schema is at this version's migrations."""
        return readiness(self.db)

    async def metrics_text(self) -> str:
        """/metrics: counters read on the loop (where they change), outbox depths read off it."""
        depths = await asyncio.to_thread(self._outbox_depths)
        return render(gateway_families(self, depths))

    def _outbox_depths(self) -> dict[str, int]:
        try:
            with self.db.session() as s:
                return outbox_depths(s)
        except Exception:  # the database is down: /health/ready says so; /metrics still answers
            return {}

    def presence_now(self) -> dict[str, Any]:
        """Who is in which zone now: enrolled identities by profile id, unknown ones only counted."""
        zones: dict[str, dict[str, Any]] = {}
        for key, track in _snapshot(self.pipeline.presence.tracks):
            zone = track.zone
            if zone is None:
                continue
            z = zones.setdefault(zone, {"zone": zone, "profiles": set(), "anonymous": 0})
            pid = self.identities.beacon(key)
            if pid is None:
                z["anonymous"] += 1
            else:
                z["profiles"].add(pid)
        out = [{"zone": z["zone"], "profiles": sorted(z["profiles"]), "enrolled": len(z["profiles"]),
                "anonymous": z["anonymous"], "total": len(z["profiles"]) + z["anonymous"]}
               for _, z in sorted(zones.items())]
        return {"at": self.clock.now(), "zones": out, "enrolled": sum(z["enrolled"] for z in out),
                "anonymous": sum(z["anonymous"] for z in out)}

    def health(self) -> dict[str, Any]:
        state = db_state(self.db)
        db_ok = state == "ok"
        components: dict[str, Any] = {"db": state}
        components["mqtt"] = self.mqtt.state() if self.mqtt is not None else "disabled"
        if self.scanner is not None:
            components["scanner"] = self.scanner.state()
        else:
            components["scanner"] = f"disabled ({self.scanner_error})" if self.scanner_error else "disabled"
        ok = db_ok and components["mqtt"] in ("connected", "disabled")
        return {"status": "ok" if ok else "degraded", "components": components}
