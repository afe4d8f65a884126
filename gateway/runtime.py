"""The wiring: the one place that knows tasks, queues, the MQTT thread and the HTTP server.

``Pipeline`` composes the stages synchronously (adverts -> sightings -> presence -> identity
-> engine -> outbox); the virtual-time simulation drives it directly. ``Runtime`` runs the
same pipeline live: scanner callbacks and MQTT batches are drained on the event loop, and
committed notifications are dispatched to the channels afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import hashlib
import logging
import secrets
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from beacons.guard import Guard, GuardSettings
from beacons.parse import ParseStats, parse_advertisement
from beacons.remote import AppReport, RemoteError, app_sightings, parse_espresense
from beacons.scanner import Scanner
from beacons.types import Advertisement, Sighting
from devices.payloads import Reading
from gateway.campaigns import CampaignIndex, Segment, load_campaigns, load_segments
from gateway.channels import Channel, StreamHub
from gateway.clock import Clock, SystemClock
from gateway.config import Settings
from gateway.delivery import build_channels, close_channels
from gateway.engine import Engine, EngineEvent, FrequencyCap, Outcome
from gateway.explain import dry_run
from gateway.identity import IdentityIndex
from gateway.outbox import Backoff, Dispatcher
from gateway.presence import PresenceEvent, PresenceTracker
from gateway.service import GatewayService, Invalid
from gateway.storage.db import Database
from gateway.storage.models import Cart, Device, FootfallCount, Profile, Visit, ZoneStay
from gateway.tokens import TokenSigner

log = logging.getLogger("gateway")
decision_log = logging.getLogger("gateway.decisions")

OutcomeHook = Callable[[Outcome, EngineEvent], None]
CART_SCAN_S = 5.0  # how often (clock time) carts are checked for abandonment and purchases


def log_outcome(o: Outcome, ev: EngineEvent) -> None:
    where = f" in {ev.zone}" if ev.zone else ""
    if o.fired:
        decision_log.info("%s  %s  FIRED on %s%s -> notification %s%s", o.who, o.campaign_id, ev.kind, where,
                          o.notification_id, f" ({o.detail})" if o.detail else "")
    else:
        decision_log.info("%s  %s  not sent: %s (%s)", o.who, o.campaign_id, o.reason, o.detail)


class Pipeline:
    """Stages composed in one direction; returns the ids of notifications it committed."""

    def __init__(self, settings: Settings, db: Database, campaigns: CampaignIndex,
                 identities: IdentityIndex, on_outcome: OutcomeHook | None = None,
                 guard: GuardSettings | None = None, segments: Sequence[Segment] = ()) -> None:
        self.settings = settings
        self.db = db
        self.identities = identities
        self.parse_stats = ParseStats()
        # Floods, rotating addresses and passers-by stop here; enrolled identities skip the uuid rule.
        self.guard = Guard(guard, trusted=lambda key: identities.beacon(key) is not None)
        self.presence = PresenceTracker(settings.presence, settings.receivers)
        self.engine = Engine(campaigns, abandon_after_s=settings.carts.abandon_after_s,
                             timezone=settings.store.timezone,
                             caps=[FrequencyCap(c.window_s, c.max, tuple(c.purposes)) for c in settings.engine.caps],
                             segments=segments,
                             tiers=[(t.name, t.min_points) for t in settings.loyalty.tiers])
        self.on_outcome = on_outcome
        self.figures: Counter[str] = Counter()
        self._tz = ZoneInfo(settings.store.timezone)
        self._anonymous: defaultdict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
        self._open_stays: dict[tuple[int, str], int] = {}
        self._last_cart_scan = float("-inf")
        self._open_visits: dict[int, int] = {}

    # ------------------------------------------------------------ BLE

    def ingest_adverts(self, adverts: Iterable[Advertisement]) -> list[int]:
        events: list[PresenceEvent] = []
        observe = self.presence.observe
        admit = self.guard.admit
        stats = self.parse_stats
        n = 0
        for adv in adverts:
            n += 1
            for frame in parse_advertisement(adv, stats):
                key = frame.key
                if key is None or not admit(adv.address, frame, adv.time):
                    continue
                evs = observe(Sighting(key, adv.receiver, adv.rssi, adv.time, frame.tx_power))
                if evs:
                    events.extend(evs)
        self.figures["adverts"] += n
        return self.handle_presence(events) if events else []

    def stats(self) -> dict[str, Any]:
        """Counters for /metrics: figures, the parser's accepts/rejects, the guard's drops."""
        return {"figures": dict(self.figures), "parse": self.parse_stats.as_dict(), "guard": self.guard.stats()}

    def ingest_sightings(self, sightings: Iterable[Sighting]) -> list[int]:
        """Sightings other receivers resolved (ESPresense nodes, the shop's app): the advert path
        from presence on. No guard: they carry no address, and unmapped ids never got this far."""
        events: list[PresenceEvent] = []
        observe = self.presence.observe
        n = 0
        for s in sightings:
            n += 1
            evs = observe(s)
            if evs:
                events.extend(evs)
        self.figures["remote_sightings"] += n
        return self.handle_presence(events) if events else []

    def tick(self, now: float) -> list[int]:
        """Timers: presence exits and visit ends, then delayed or held sends that are now due."""
        events = self.presence.tick(now)
        created = self.handle_presence(events) if events else []
        with self.db.session() as s:
            created += self.engine.release_due(s, now)
        if now - self._last_cart_scan >= CART_SCAN_S:
            self._last_cart_scan = now
            created += self.cart_events(now)
        self.flush_footfall()
        return created

    def cart_events(self, now: float) -> list[int]:
        """Raise each cart's lifecycle events once: abandoned (idle past the limit) and purchase."""
        created: list[int] = []
        cutoff = now - self.settings.carts.abandon_after_s
        with self.db.session() as s:
            for cart in s.scalars(select(Cart).where(Cart.status == "open", Cart.abandoned_at.is_(None),
                                                     Cart.updated_at <= cutoff).limit(500)):
                cart.abandoned_at = now
                created += self._decide(s, EngineEvent("cart_abandoned", cart.profile_id, now,
                                                       f"cart:{cart.id}:{cart.updated_at:.3f}"))
            for cart in s.scalars(select(Cart).where(Cart.checked_out_at.is_not(None),
                                                     Cart.purchase_handled_at.is_(None)).limit(500)):
                cart.purchase_handled_at = now
                created += self._decide(s, EngineEvent("purchase", cart.profile_id, now, f"purchase:{cart.id}"))
        return created

    def handle_presence(self, events: Sequence[PresenceEvent]) -> list[int]:
        known: list[tuple[PresenceEvent, int]] = []
        for ev in events:
            pid = self.identities.beacon(ev.key)
            if pid is not None:
                known.append((ev, pid))
            elif ev.kind in ("visit_start", "exit"):
                self._count_anonymous(ev)  # footfall only: counts per day and zone, no identity
        if not known:
            return []
        created: list[int] = []
        with self.db.session() as s:
            for ev, pid in known:
                self._record_visit(s, ev, pid)
                if ev.kind.startswith("visit"):
                    stay = f"visit:{ev.visit_since:.3f}"
                else:
                    stay = f"stay:{ev.zone}:{ev.zone_since:.3f}"
                created += self._decide(s, EngineEvent(ev.kind, pid, ev.time, stay, ev.zone, ev.dwell_s))
        return created

    def _record_visit(self, s: Session, ev: PresenceEvent, pid: int) -> None:
        if ev.kind == "visit_start":
            before = s.scalar(select(func.count()).select_from(Visit).where(Visit.profile_id == pid)) or 0
            self.figures["visits_returning" if before else "visits_new"] += 1
            v = Visit(profile_id=pid, started_at=ev.time, zones=[])
            s.add(v)
            s.execute(update(Profile).where(Profile.id == pid)
                      .values(points=Profile.points + self.settings.loyalty.points_per_visit))
            s.flush()
            self._open_visits[pid] = v.id
        elif ev.kind == "enter":
            vid = self._open_visits.get(pid)
            current = s.get(Visit, vid) if vid is not None else None
            if current is not None and ev.zone and (not current.zones or current.zones[-1] != ev.zone):
                current.zones = [*current.zones, ev.zone]
            if ev.zone:
                stay = ZoneStay(profile_id=pid, visit_id=vid if current is not None else None, zone=ev.zone,
                                entered_at=ev.time)
                s.add(stay)
                s.flush()
                self._open_stays[(pid, ev.zone)] = stay.id
        elif ev.kind == "exit":
            sid = self._open_stays.pop((pid, ev.zone or ""), None)
            closed = s.get(ZoneStay, sid) if sid is not None else None
            if closed is not None:
                closed.exited_at = ev.time
        elif ev.kind == "visit_end":
            vid = self._open_visits.pop(pid, None)
            ended = s.get(Visit, vid) if vid is not None else None
            if ended is not None:
                ended.ended_at = ev.time

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
        with self.db.session() as s:
            for (day, zone), (visits, dwell) in pending.items():
                row = s.get(FootfallCount, (day, zone))
                if row is None:
                    s.add(FootfallCount(day=day, zone=zone, anonymous_visits=int(visits), anonymous_dwell_s=dwell))
                else:
                    row.anonymous_visits += int(visits)
                    row.anonymous_dwell_s += dwell

    def _decide(self, s: Session, ev: EngineEvent) -> list[int]:
        outcomes = self.engine.handle(s, ev)
        created = []
        for o in outcomes:
            if self.on_outcome is not None:
                self.on_outcome(o, ev)
            if o.sends_now and o.notification_id is not None:
                created.append(o.notification_id)
        return created

    # ------------------------------------------------------------ telemetry

    def ingest_readings(self, readings: Iterable[Reading]) -> list[int]:
        """One transaction per batch; each device's row is written once with its latest state."""
        batch = sorted(readings, key=lambda r: r.time)
        if not batch:
            return []
        created: list[int] = []
        with self.db.session() as s, s.no_autoflush:
            devices: dict[str, Device] = {}
            for r in batch:
                self.figures["readings"] += 1
                d = devices.get(r.device_id)
                if d is None:
                    d = s.get(Device, r.device_id)
                    if d is None:  # accepted and registered unowned; the device issue adds policies
                        d = Device(id=r.device_id, state={})
                        s.add(d)
                        self.figures["unknown_devices"] += 1
                    devices[r.device_id] = d
                    d.state = dict(d.state or {})
                d.state.update(r.metrics)
                d.last_seen = r.time
                if d.profile_id is not None:
                    facts = {"device": {"id": d.id, "kind": d.kind}, "reading": dict(r.metrics)}
                    created += self._decide(s, EngineEvent("telemetry", d.profile_id, r.time,
                                                           f"reading:{d.id}:{r.time:.3f}", facts=facts))
            for d in devices.values():
                d.state = dict(d.state)  # a new object, so the JSON column is seen as changed
        return created


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

        self.server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                            timeout_graceful_shutdown=2))

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
        self.db = Database(settings.database.url)
        self.identities = IdentityIndex()
        self.campaigns = CampaignIndex(load_campaigns(settings.campaigns.dir))
        self.pipeline = Pipeline(settings, self.db, self.campaigns, self.identities, on_outcome,
                                 segments=load_segments(settings.campaigns.dir))
        self.hub = StreamHub()
        d = settings.delivery
        self.remote_channels = build_channels(settings, self.db, self.clock)  # webhook, Web Push, as enabled
        self.dispatcher = Dispatcher(self.db, [self.hub, *channels, *self.remote_channels],
                                     Backoff(d.backoff_base_s, d.backoff_max_s, jitter=d.jitter,
                                             max_attempts=d.max_attempts))
        self.admin_key = settings.api.admin_key or secrets.token_urlsafe(24)
        self.service = GatewayService(self.db, self.identities, self.clock, TokenSigner(token_secret(settings)),
                                      settings.api.token_ttl_s, timezone=settings.store.timezone)
        engine = self.pipeline.engine
        self.service.file_campaigns = dict(self.campaigns.by_id)
        self.service.on_campaigns_changed = self.reload_campaigns

        def runner(session: Session, event: EngineEvent) -> list[dict[str, Any]]:
            return dry_run(session, event, campaigns=engine.campaigns, abandon_after_s=engine.abandon_after_s,
                           timezone=settings.store.timezone, caps=list(engine.caps))

        self.service.dry_runner = runner
        self._adverts: list[Advertisement] = []
        self._drain_scheduled = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._dispatches: set[asyncio.Task[Any]] = set()
        self._server: _QuietServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.scanner_error: str | None = None
        self.sightings: asyncio.Queue[Sighting] = asyncio.Queue()  # ESPresense nodes, via the MQTT thread

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.db.upgrade)
        with self.db.session() as s:
            self.identities.load(s)
        self.reload_campaigns()
        if self.serve_api:
            from api.app import create_app
            from api.deps import ApiContext

            app = create_app(ApiContext(service=self.service, hub=self.hub, admin_key=self.admin_key,
                                        health=self.health, heartbeat_s=self.settings.api.heartbeat_s,
                                        cors_origins=self.settings.api.cors_origins,
                                        report_sightings=self.report_sightings))
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
            self._tasks.append(asyncio.create_task(self._consume_readings(), name="readings"))
            self._tasks.append(asyncio.create_task(self._consume_sightings(), name="sightings"))
        if self.scanner is not None:
            await self.scanner.start(self.on_advert)
        self._tasks.append(asyncio.create_task(self._ticker(), name="ticker"))
        self._tasks.append(asyncio.create_task(self._retrier(), name="retrier"))

    async def stop(self) -> None:
        if self.scanner is not None:
            await self.scanner.stop()
        if self.mqtt is not None:
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
        await close_channels(self.remote_channels)
        self.db.dispose()

    # ------------------------------------------------------------ inputs

    def on_advert(self, adv: Advertisement) -> None:
        """Scanner callback: collect, and drain once per loop iteration so a burst is one batch."""
        self._adverts.append(adv)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._drain_adverts)

    def inject(self, adverts: Iterable[Advertisement]) -> None:
        for adv in adverts:
            self.on_advert(adv)

    def _drain_adverts(self) -> None:
        self._drain_scheduled = False
        batch, self._adverts = self._adverts, []
        try:
            ids = self.pipeline.ingest_adverts(batch)
        except Exception:
            log.exception("advertisement batch of %d failed", len(batch))
            return
        self._dispatch(ids)

    def _dispatch(self, ids: list[int]) -> None:
        if ids:
            t = asyncio.create_task(self.dispatcher.dispatch(ids, self.clock.now()))
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
            try:
                self._dispatch(self.pipeline.ingest_sightings(batch))
            except Exception:
                log.exception("remote sighting batch of %d failed", len(batch))

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
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._ingest_sightings_now, usable)
        return {"received": len(batch), "accepted": len(usable), "unknown_beacon": len(batch) - len(usable)}

    def _ingest_sightings_now(self, batch: list[Sighting]) -> None:
        try:
            self._dispatch(self.pipeline.ingest_sightings(batch))
        except Exception:
            log.exception("app sighting batch of %d failed", len(batch))

    async def _consume_readings(self) -> None:
        queue = self.mqtt.readings
        while True:
            first = await queue.get()
            batch: list[Reading] = list(first) if isinstance(first, list) else [first]
            while not queue.empty():
                more = queue.get_nowait()
                batch.extend(more if isinstance(more, list) else [more])
            try:
                self._dispatch(self.pipeline.ingest_readings(batch))
            except Exception:
                log.exception("telemetry batch of %d failed", len(batch))

    def ingest_readings(self, readings: Iterable[Reading]) -> None:
        self._dispatch(self.pipeline.ingest_readings(readings))

    def reload_campaigns(self) -> None:
        """Files (loaded at start) plus API campaigns (from the database); an API id never shadows a file's."""
        merged = dict(self.service.file_campaigns)
        merged.update((c.id, c) for c in self.service.api_campaigns() if c.id not in merged)
        self.campaigns = CampaignIndex(merged.values())
        self.pipeline.engine.set_campaigns(self.campaigns)

    def tick(self) -> None:
        """Presence timers (exits, visit ends) at the clock's now; the ticker task calls it."""
        self._dispatch(self.pipeline.tick(self.clock.now()))

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self.tick()
            except Exception:
                log.exception("presence tick failed")

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
        """Wait for pending advert batches and dispatches (tests, shutdown)."""
        for _ in range(100):
            if not self._drain_scheduled and not self._dispatches:
                return
            await asyncio.sleep(0)
            if self._dispatches:
                await asyncio.gather(*list(self._dispatches), return_exceptions=True)

    # ------------------------------------------------------------ health

    def health(self) -> dict[str, Any]:
        db_ok = self.db.ping()
        components: dict[str, Any] = {"db": "ok" if db_ok else "down"}
        components["mqtt"] = self.mqtt.state() if self.mqtt is not None else "disabled"
        if self.scanner is not None:
            components["scanner"] = self.scanner.state()
        else:
            components["scanner"] = f"disabled ({self.scanner_error})" if self.scanner_error else "disabled"
        ok = db_ok and components["mqtt"] in ("connected", "disabled")
        return {"status": "ok" if ok else "degraded", "components": components}
