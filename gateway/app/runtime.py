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
import functools
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from beacons.remote import AppReport, RemoteError, app_key, app_sightings, parse_espresense
from beacons.scanner import Scanner
from beacons.types import Advertisement, Sighting
from devices.mqtt import TelemetryIntake
from devices.payloads import Rejected, TelemetryBatch
from gateway.app.channels import build_channels, close_channels
from gateway.app.config import ConfigError, Settings
from gateway.app.homeassistant import HomeAssistantLink
from gateway.app.metrics import db_state, gateway_families, readiness
from gateway.app.pipeline import OutcomeHook, Pipeline, ZoneSwitch, log_outcome
from gateway.app.watchdog import Watchdog
from gateway.campaigns.model import CampaignIndex, load_campaigns, load_segments
from gateway.clock import Clock, SystemClock
from gateway.delivery.backoff import Backoff
from gateway.delivery.hub import Channel, StreamHub
from gateway.delivery.outbox import Dispatcher
from gateway.delivery.outbox import depths as outbox_depths
from gateway.engine.engine import EngineEvent
from gateway.engine.explain import dry_run
from gateway.metrics import Histogram, render
from gateway.presence.record import RecordError, TraceRecorder
from gateway.profiles.devices import DeviceRegistry
from gateway.profiles.identity import IdentityIndex
from gateway.profiles.rotating import RotatingIdentities, SecretBox, load_key
from gateway.profiles.service import GatewayService, Invalid, ServiceHooks, ServiceOptions
from gateway.security.tokens import TokenSigner
from gateway.storage.db import Database, describe, is_transient
from gateway.telemetry.alarms import AlarmDesk

log = logging.getLogger("gateway")
WORKER_NAME = "gateway-pipeline"
WALL_STEP_S = 10.0  # the wall clock running ahead of (or behind) monotonic time by more than this is a step
RELOAD_WAIT_S = 30.0  # an API edit of a campaign waits this long for the worker to take it (a stalled database)
MAX_PENDING_ADVERTS = 100_000  # about 10 s of a full shop (1,000 tags at 10 Hz) waiting for a stalled database
TELEMETRY_RETRY = Backoff(base_s=0.1, max_s=5.0, jitter=0.2, max_attempts=1_000_000)
"""A telemetry batch held by a database outage is retried on this schedule, for as long as it takes."""


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


def switch_view(sw: ZoneSwitch) -> dict[str, Any]:
    """A zone switch as the API serves it (api/schemas.py ZoneSwitchOut)."""
    why = sw.why
    return {"profile_id": sw.profile_id, "event": sw.kind, "zone": sw.zone, "time": sw.time, "since": sw.since,
            "why": None if why is None else {
                "heard": [{"receiver": rid, "rssi": rssi} for rid, rssi in why.heard],
                "before": [{"zone": z, "posterior": p} for z, p in why.before],
                "after": [{"zone": z, "posterior": p} for z, p in why.after]}}


def build_recorder(settings: Settings, identities: IdentityIndex) -> TraceRecorder | None:
    """``[presence] record_dir`` (or ``run --record``): enrolled keys as they are, any other as a per-file
    hash. A directory that cannot be written is a ConfigError now, before anything starts."""
    directory = settings.presence.record_dir
    if not directory:
        return None
    try:
        return TraceRecorder(directory, known=lambda key: identities.beacon(key) is not None)
    except RecordError as exc:
        raise ConfigError(f"presence.record_dir: {exc}") from None


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
                 mqtt: TelemetryIntake | None = None, serve_api: bool = True, channels: Sequence[Channel] = (),
                 on_outcome: OutcomeHook | None = log_outcome, tick_s: float = 0.5,
                 watchdog: Watchdog | None = None) -> None:
        self.settings = settings
        self.watchdog = watchdog  # systemd's (READY=1, the pings, STOPPING=1); None outside a notify unit
        self.clock = clock or SystemClock()
        self.scanner = scanner
        self.mqtt = mqtt
        self.serve_api = serve_api
        self.tick_s = tick_s
        self.db = Database(settings.database.url, settings.database.busy_timeout_ms)
        self.identities = IdentityIndex()
        self.campaigns = CampaignIndex(load_campaigns(settings.campaigns.dir))
        self.hub = StreamHub()
        d = settings.delivery
        self.recorder = build_recorder(settings, self.identities)  # first: an unusable dir stops the start
        self.remote_channels = build_channels(settings, self.db, self.clock)  # webhook, Web Push, as enabled
        self.pipeline = Pipeline(settings, self.db, self.campaigns, self.identities, on_outcome,
                                 segments=load_segments(settings.campaigns.dir), intake=mqtt,
                                 channels=(self.hub.name, *(c.name for c in self.remote_channels)),
                                 recorder=self.recorder)
        self.dispatcher = Dispatcher(self.db, [self.hub, *channels, *self.remote_channels],
                                     Backoff(d.backoff_base_s, d.backoff_max_s, jitter=d.jitter,
                                             max_attempts=d.max_attempts), concurrency=d.concurrency)
        self.advert_latency = Histogram("gateway_advert_to_commit_seconds",
                                        "From an advertisement's arrival to the commit of the notifications it caused")
        self._batch_t0 = 0.0
        self.admin_key = settings.api.admin_key or secrets.token_urlsafe(24)
        self.uplink: Any = None  # gateway.hq.uplink.UplinkThread when [hq] uplink: the store's events upward
        engine = self.pipeline.engine

        def runner(session: Session, event: EngineEvent) -> list[dict[str, Any]]:
            return dry_run(session, event, engine=engine.clone())

        self.service = GatewayService(
            self.db, self.identities, self.clock, TokenSigner(token_secret(settings)),
            ServiceOptions(token_ttl_s=settings.api.token_ttl_s, timezone=settings.store.timezone,
                           store_id=settings.store.id,
                           conversion_window_s=settings.interactions.conversion_window_s,
                           bounce_s=settings.figures.bounce_s),
            ServiceHooks(on_campaigns_changed=self.reload_campaigns, dry_runner=runner,
                         on_profile_changed=self._profile_changed, on_profile_gone=self._profile_gone),
            file_campaigns=self.campaigns.by_id)
        # Rotating identities: enrolled over the API, resolved by the pipeline (changes reach it on the worker).
        self.service.rotating = RotatingIdentities(
            self.db, SecretBox(load_key(settings.identities.key_file, settings.data_dir)), self.clock,
            self.pipeline.rotating, period_s=settings.identities.app_period_s, apply=self._on_worker)
        self._adverts: list[Advertisement] = []
        self._drain_scheduled = False
        self._drainer: asyncio.Task[None] | None = None
        self._last_tick: tuple[float, float] | None = None  # (wall, monotonic) at the worker's last look
        self._untold_step = 0.0  # a forward wall clock step the pipeline's rows are yet to move on by
        self.adverts_dropped = 0  # arrived while MAX_PENDING_ADVERTS were already waiting for the worker
        # The one thread that runs the pipeline: its state (presence, engine caches) is never shared.
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=WORKER_NAME)
        self._jobs: set[asyncio.Future[Any]] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self._dispatches: set[asyncio.Task[Any]] = set()
        self._scrubs: set[asyncio.Future[Any]] = set()  # trace files being rewritten after an erasure
        self._server: _QuietServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.scanner_error: str | None = None
        self.sightings: asyncio.Queue[Sighting] = asyncio.Queue()  # ESPresense nodes, via the MQTT thread
        self.telemetry_failures = 0  # telemetry batches whose first commit failed (then retried)
        self.devices = DeviceRegistry(self.db, self.identities, self.clock, self.pipeline.telemetry.profiles)
        self.alarms = AlarmDesk(self.db, self.clock, self.pipeline.rules)
        self.dashboard: Any = None  # api.dashboard.Dashboard when the API serves: its one-time login links
        if serve_api:  # here, not at start: a broken walks file is an error before anything starts
            from api.dashboard import Dashboard
            from api.dashboard.plan import load_floor_image

            ds = settings.dashboard
            self.dashboard = Dashboard(settings.zones, settings.receivers, settings.data_dir,
                                       settings.presence.record_dir, heard=self.receivers_heard, clock=self.clock,
                                       campaigns_dir=settings.campaigns.dir,
                                       floor_image=(load_floor_image(ds.floor_image, ds.floor_image_bounds,
                                                                     settings.zones) if ds.floor_image else None),
                                       names_purpose=(settings.dashboard.show_purpose
                                                      if settings.dashboard.show_customers else None))
            self.pipeline.on_outcome = self.dashboard.feed.hook(on_outcome)  # each decision to the feed too
        self.homeassistant: HomeAssistantLink | None = None  # [homeassistant]: occupancy out over MQTT
        if settings.homeassistant.enabled and mqtt is not None:
            self.homeassistant = HomeAssistantLink(settings, mqtt, self.clock, self.db,
                                                   lambda: _snapshot(self.pipeline.presence.tracks),
                                                   self.identities.beacon, self.pipeline.presence.zones)
            self.pipeline.presence_listeners.append(self.homeassistant.presence_changed)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.db.upgrade, self.settings.store.id)
        await self._run(self._load_state)
        await self._run(self._resume_scrub)  # before any input: an erasure a crash cut short is finished first
        await self._run(self.pipeline.purge_recordings, self.clock.now())  # then hourly, with the tick's purge
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
                                        presence_profile=self.presence_of,
                                        alarms=self.alarms, devices=self.devices), self.dashboard)
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
            self._subscribe_hq_sends()
            if self.homeassistant is not None:
                self.mqtt.add_subscription(self.homeassistant.subscription())
                self._tasks.append(asyncio.create_task(self.homeassistant.run(), name="homeassistant"))
            await self.mqtt.start(self._loop)
            self._tasks.append(asyncio.create_task(self._consume_telemetry(), name="telemetry"))
            self._tasks.append(asyncio.create_task(self._consume_sightings(), name="sightings"))
        if self.settings.hq.uplink and self.settings.mqtt.enabled:  # a stage apart: it reads rows, never calls in
            from devices.mqtt import settings_from_config
            from gateway.hq.uplink import Uplink, UplinkThread

            m, store, hq = self.settings.mqtt, self.settings.store.id, self.settings.hq
            self.uplink = UplinkThread(lambda publish: Uplink(self.db, store, m.topic_prefix, publish,
                                                              batch=hq.batch, now=self.clock.now),
                                       m.host, m.port, f"gateway-{store}-uplink", hq.interval_s,
                                       broker=settings_from_config(m, store))  # credentials, TLS
            self.uplink.start()
        if self.scanner is not None:
            await self.scanner.start(self.on_advert)
        self._tasks.append(asyncio.create_task(self._ticker(), name="ticker"))
        self._tasks.append(asyncio.create_task(self._retrier(), name="retrier"))
        if self.watchdog is not None:  # last: READY=1 means /health/ready answers 200
            self.watchdog.start(self._loop, lambda: db_state(self.db), self.scanner)

    def _load_state(self) -> None:
        with self.db.session() as s:
            self.identities.load(s)
        if self.service.rotating is not None:  # after the index: the resolver allows its profiles' keys in it
            self.service.rotating.load(self.clock.now())
        self._reload_campaigns_now()

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

    def _on_worker(self, change: Callable[[], None]) -> None:
        """A change of pipeline state from another thread (a rotating enrolment), queued behind the drains."""

        def job() -> list[int]:
            change()
            return []

        self._submit("rotating identity change", job)

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

    async def stop(self) -> None:
        if self.watchdog is not None:  # first: STOPPING=1, and no ping judges a runtime being taken apart
            self.watchdog.stop()
        if self.scanner is not None:
            await self.scanner.stop()
        await self.flush()
        if self.mqtt is not None:
            await self._flush_telemetry()  # committed and acked while we are still connected
            await self.mqtt.stop()
        if self.uplink is not None:
            await asyncio.to_thread(self.uplink.stop)
        self.hub.close_all()
        if self.dashboard is not None:  # its live streams end with the customers'
            self.dashboard.close()
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
        if self._scrubs:
            await asyncio.gather(*self._scrubs, return_exceptions=True)
        if self.recorder is not None:  # the worker is done: what it buffered goes to the file
            self.recorder.close()
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

    @property
    def pending_adverts(self) -> int:
        """Adverts received and waiting for the next drain."""
        return len(self._adverts)

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
        if not r.espresense or self.mqtt is None:
            return
        from devices.mqtt import ExtraSubscription

        parse = functools.partial(parse_espresense, prefix=r.espresense_prefix, rooms=dict(r.rooms))
        self.mqtt.add_subscription(ExtraSubscription("espresense", f"{r.espresense_prefix}/devices/#", parse,
                                                     self.sightings, (RemoteError,)))

    def _subscribe_hq_sends(self) -> None:
        """[hq] uplink: other stores' sends, from head office, join the engine's send history (cross-store
        cooldowns and caps; gateway/hq/downlink.py)."""
        if not self.settings.hq.uplink or self.mqtt is None:
            return
        from devices.mqtt import ExtraSubscription
        from gateway.hq.downlink import parse_send, record_sends, sends_topic
        from gateway.hq.events import EventError

        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.mqtt.add_subscription(ExtraSubscription("hq-sends", sends_topic(self.settings.mqtt.topic_prefix),
                                                     parse_send, queue, (EventError,)))

        def record(batch: list[Any]) -> list[int]:
            with self.db.session() as s:
                record_sends(s, self.settings.store.id, batch)
            return []

        async def consume() -> None:
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                await self._run(self._guarded, f"head office's sends, {len(batch)}", record, batch)

        self._tasks.append(asyncio.create_task(consume(), name="hq-sends"))

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
        if self.homeassistant is not None:  # its consents may have changed
            self.homeassistant.profile_changed(profile_id)
        self._submit(f"segment refresh for profile {profile_id}",
                     lambda: self.pipeline.profile_changed(profile_id, self.clock.now()))

    def _profile_gone(self, profile_id: int) -> None:
        """From the API's worker threads, after an erasure or a link committed: the pipeline forgets the profile
        on the worker, where its state changes (before start, nothing else touches it: now)."""

        if self.dashboard is not None:  # its decisions leave the staff's feed
            self.dashboard.feed.forget(profile_id)
        if self.homeassistant is not None:  # its entity and retained state leave Home Assistant
            self.homeassistant.profile_gone(profile_id)

        def forget() -> list[int]:
            self.pipeline.forget_profile(profile_id)
            self._scrub_traces(profile_id)
            return []

        self._submit(f"forgetting profile {profile_id}", forget)

    def _gone(self, app_keys: set[str]) -> Callable[[str], bool]:
        """Which clear keys of a recording an erasure takes: those app keys, and every other key the identity
        index no longer knows (only enrolled keys were written in clear)."""
        index = self.identities

        def gone(key: str) -> bool:
            return key in app_keys if key.startswith("app:") else index.beacon(key) is None

        return gone

    def _resume_scrub(self) -> None:
        """At start, on the worker: the rewrite of an erasure a crash cut short is done again, whole."""
        recorder = self.recorder
        keys = recorder.pending_scrub() if recorder is not None else None
        if recorder is None or keys is None:
            return
        recorder.begin_scrub(())
        ok = False
        try:
            changed = recorder.scrub(self._gone(keys))
            ok = True
        finally:
            recorder.end_scrub(ok)
        log.info("finished an interrupted erasure in the trace files (%d row(s) anonymised)", changed)

    def _scrub_traces(self, profile_id: int) -> None:
        """On the worker, after an erasure (or a link): no trace file keeps a key of the profile in clear.

        Its beacon keys have left the identity index by now, so every clear key the index no longer knows
        is rewritten as an anonymous alias, with the profile's app key; keys still enrolled (a link moved
        them to the profile kept) stay. The current file is rewritten here, before the next drain writes to
        it; the closed ones on another thread, so a long recording does not hold up the pipeline. Noted in
        the directory until done (``begin_scrub``), so a crash meanwhile is made good at the next start."""
        recorder = self.recorder
        if recorder is None:
            return
        mine = app_key(profile_id)
        gone = self._gone({mine})
        recorder.begin_scrub([mine])
        closed = recorder.closed_files()
        try:
            recorder.scrub_current(gone)
        except BaseException:
            recorder.end_scrub(ok=False)
            raise

        def rest() -> int:
            ok = False
            try:
                changed = recorder.scrub_closed(closed, gone)
                ok = True
                return changed
            finally:
                recorder.end_scrub(ok)

        loop = self._loop
        if loop is None or loop.is_closed():
            rest()
            return

        def spawn() -> None:
            job = loop.run_in_executor(None, rest)
            self._scrubs.add(job)
            job.add_done_callback(self._scrubbed)

        loop.call_soon_threadsafe(spawn)

    def _scrubbed(self, job: asyncio.Future[Any]) -> None:
        self._scrubs.discard(job)
        if not job.cancelled() and job.exception() is not None:
            log.error("rewriting trace files after an erasure failed", exc_info=job.exception())

    async def _consume_telemetry(self) -> None:
        """What is queued, up to the intake's max_batch, is one batch: one transaction, then one round of
        PUBACKs. The broker keeps sending (receive_maximum) while it commits."""
        assert self.mqtt is not None  # started only with an intake
        queue = self.mqtt.batches
        limit = self.mqtt.max_batch
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
        assert self.mqtt is not None  # telemetry comes only from an intake
        self.mqtt.ack(batch)
        self._dispatch(ids)

    def _commit_telemetry_job(self, batch: TelemetryBatch) -> list[int] | None:
        """On the worker: the batch's notification ids, or None if it must wait (nothing acknowledged)."""
        try:
            ids = self.pipeline.ingest_readings(batch=batch, now=self._now())
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
        queue = self.mqtt.batches if self.mqtt is not None else None
        if queue is None or queue.empty():
            return
        batch: TelemetryBatch = queue.get_nowait()
        while not queue.empty():
            batch.extend(queue.get_nowait())
        try:
            await asyncio.wait_for(self.commit_telemetry(batch), 5.0)
        except TimeoutError:  # never acknowledged: the broker redelivers them to the next run
            log.warning("stopping with %d telemetry message(s) uncommitted; the broker keeps them", len(batch))

    def reload_campaigns(self) -> None:
        """Files (loaded at start) plus API campaigns (from the database); an API id never shadows a file's.

        From the API's threads (a campaign edited) the swap is a job on the worker, after whatever events
        came before it, and the caller waits for it, so the edit is live when its answer goes out: the engine
        is only ever touched by the thread that runs it."""
        loop = self._loop
        on_worker = threading.current_thread().name.startswith(WORKER_NAME)
        if loop is not None and not loop.is_closed() and not _on_loop(loop) and not on_worker:
            done = asyncio.run_coroutine_threadsafe(self._run(self._reload_campaigns_now), loop)
            done.result(RELOAD_WAIT_S)
            return
        self._reload_campaigns_now()

    def _reload_campaigns_now(self) -> list[int]:
        merged = dict(self.service.file_campaigns)
        merged.update((c.id, c) for c in self.service.api_campaigns() if c.id not in merged)
        self.campaigns = CampaignIndex(merged.values())
        self.pipeline.engine.set_campaigns(self.campaigns)
        return []

    def tick(self) -> None:
        """Presence timers (exits, visit ends) at the clock's now, queued on the worker (``flush`` waits)."""
        self._submit("tick", self._tick_job)

    async def _ticker(self) -> None:
        """One tick at a time: a tick held up by the database is not followed by a pile of others."""
        while True:
            await asyncio.sleep(self.tick_s)
            self._dispatch(await self._run(self._guarded, "tick", self._tick_job))

    def _now(self) -> float:
        """On the worker: the clock's now, after telling the pipeline of a step of the wall clock since the
        last look (the wall moved on more, or less, than monotonic time did: NTP on a Pi that booted
        without a clock). Ticks and telemetry commits both look, so no reading is judged across an
        untold step. A step that could not be told (the database down) is told with the next job."""
        now = self.clock.now()
        mono = getattr(self.clock, "monotonic", self.clock.now)()
        last, self._last_tick = self._last_tick, (now, mono)
        if last is not None:
            jump = (now - last[0]) - (mono - last[1])
            if abs(jump) > WALL_STEP_S:
                log.warning("the wall clock stepped %s %.0f s; presence, device silence, rule timers and "
                            "carts keep their own time across it", "forward" if jump > 0 else "back", abs(jump))
                self.pipeline.presence.wall_stepped(jump)  # a step back it sees for itself: ignored there
                self._untold_step += jump
        if self._untold_step:
            self.pipeline.wall_stepped(now, self._untold_step)  # raises on an outage: kept for the next job
            self._untold_step = 0.0
        return now

    def _tick_job(self) -> list[int]:
        return self.pipeline.tick(self._now())

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
            waiting: list[Any] = [*self._jobs, *self._dispatches, *self._scrubs]
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
                "anonymous": sum(z["anonymous"] for z in out),
                "recent": [switch_view(sw) for sw in self.pipeline.switches.newest()]}

    def receivers_heard(self, recent_s: float = 10.0) -> dict[str, dict[str, Any]]:
        """Per receiver: its newest sample among the identities tracked now, how many it heard in the last
        ``recent_s``, and its adverts (or remote sightings) per second over the pipeline's rate window, beacon
        or not (the dashboard's receiver table; read on the loop, as presence_now is)."""
        heard: dict[str, dict[str, Any]] = {}
        since = self.clock.now() - recent_s
        for _, track in _snapshot(self.pipeline.presence.tracks):
            for rid, link in list(track.links.items()):
                h = heard.setdefault(rid, {"last": link.last, "tags": 0})
                h["last"] = max(h["last"], link.last)
                h["tags"] += link.last >= since
        for rid, rate in self.pipeline.heard_rates.rates().items():
            heard.setdefault(rid, {"last": None, "tags": 0})["adverts_per_s"] = round(rate, 1)
        return heard

    def presence_of(self, profile_id: int) -> list[dict[str, Any]]:
        """One enrolled profile's last zone switches, newest first (memory only: empty after a restart)."""
        return [switch_view(sw) for sw in self.pipeline.switches.of(profile_id)]

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
