"""A store day in virtual time: the simulator injects adverts and readings, the clock jumps.

Nothing sleeps: each step advances a VirtualClock, so 8 hours take as long as the work does.
"""

from __future__ import annotations

import datetime as dt
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from devices.payloads import Reading
from gateway.app.config import Settings
from gateway.app.pipeline import Pipeline
from gateway.app.scenarios import apply_scenario, enrol
from gateway.campaigns.model import CampaignIndex, load_campaigns, load_segments
from gateway.clock import VirtualClock
from gateway.engine.engine import EngineEvent, Outcome, Reason
from gateway.engine.figures import figures as day_figures
from gateway.profiles.identity import IdentityIndex
from gateway.profiles.service import GatewayService
from gateway.security.tokens import TokenSigner
from gateway.storage.db import Database
from simulators.carts import cart_upserts
from simulators.scenario import Scenario
from simulators.store_sim import StoreSimulator
from simulators.wearables import TelemetryModel


@dataclass
class Summary:
    duration_s: float
    adverts: int = 0
    readings: int = 0
    visits_enrolled_new: int = 0
    visits_enrolled_returning: int = 0
    visits_anonymous: int = 0
    notifications: Counter[str] = field(default_factory=Counter)
    suppressions: Counter[str] = field(default_factory=Counter)
    decisions: list[tuple[str, str, str]] = field(default_factory=list)  # who, campaign, reason
    figures: dict[str, Any] = field(default_factory=dict)  # the day's engagement figures (GET /v1/figures)
    wall_s: float = 0.0

    @property
    def visits(self) -> int:
        return self.visits_enrolled_new + self.visits_enrolled_returning + self.visits_anonymous

    def table(self) -> str:
        rows = [("visits (footfall)", self.visits),
                ("  enrolled, first visit (new)", self.visits_enrolled_new),
                ("  enrolled, returning", self.visits_enrolled_returning),
                ("  anonymous", self.visits_anonymous),
                ("advertisements", self.adverts), ("telemetry readings", self.readings)]
        rows += [(f"notifications: {c}", n) for c, n in sorted(self.notifications.items())]
        rows += [(f"suppressed: {r}", n) for r, n in sorted(self.suppressions.items())]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'figure':<{width}}  value", f"{'-' * width}  -----"]
        lines += [f"{name:<{width}}  {value}" for name, value in rows]
        return "\n".join(lines)


def opening_time(scenario: Scenario, day: dt.date) -> float:
    hh, mm = (int(x) for x in scenario.store.opens.split(":"))
    return dt.datetime.combine(day, dt.time(hh, mm), ZoneInfo(scenario.store.timezone)).timestamp()


def open_store(db: Database, settings: Settings, scenario: Scenario, clock: VirtualClock, start: float
               ) -> IdentityIndex:
    """The scenario's store in a fresh database: migrated, its customers enrolled, their online carts as the
    shop's site would have sent them by ``start`` (a simulated day's and the soak's common start); the
    identity index that knows them."""
    db.upgrade(settings.store.id)
    identities = IdentityIndex()
    service = GatewayService(db, identities, clock, TokenSigner(b"simulation-only-secret-0123456789"))
    enrol(service, scenario)
    for body in cart_upserts(scenario, start):
        service.upsert_cart(body["cart_id"], profile_id=None, external_id=body["profile_external_id"],
                            items=body["items"], updated_at=body["updated_at"])
    return identities


def run_steps(pipeline: Pipeline, sim: StoreSimulator, telemetry: TelemetryModel, clock: VirtualClock,
              store_id: str, start: float, end: float, step_s: float) -> Iterator[float]:
    """The simulated day through the pipeline, a step at a time: each step's adverts, the readings every
    10 s of virtual time (or every step, if longer), then the tick; yields each step's end, so a caller
    (the soak) does its own work between steps."""
    t = start
    readings_every = max(step_s, 10.0)
    next_readings, last_readings = start + readings_every, start
    while t < end:
        t1 = min(t + step_s, end)
        pipeline.ingest_adverts(sim.advertisements(t, t1))
        clock.set(t1)
        if t1 >= next_readings or t1 >= end:
            rows = telemetry.readings(last_readings, t1)
            pipeline.ingest_readings(Reading(device_id=d, store_id=store_id, time=ts, metrics=m)
                                     for d, ts, m in rows)
            last_readings, next_readings = t1, t1 + readings_every
        pipeline.tick(t1)
        t = t1
        yield t


def parse_duration(text: str) -> float:
    """'8h', '90m', '45s', '1h30m' or plain seconds."""
    text = text.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    total, num = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "d": 86400.0}
    for ch in text:
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in units and num:
            total += float(num) * units[ch]
            num = ""
        else:
            raise ValueError(f"bad duration {text!r}: use e.g. 8h, 90m, 1h30m or seconds")
    if num or total <= 0:
        raise ValueError(f"bad duration {text!r}: use e.g. 8h, 90m, 1h30m or seconds")
    return total


def simulate(scenario: Scenario, duration_s: float, *, campaigns_dir: str, seed: int = 0,
             db_url: str | None = None, day: dt.date | None = None, step_s: float = 1.0,
             progress: Callable[[float], None] | None = None, settings: Settings | None = None) -> Summary:
    import time

    wall0 = time.perf_counter()
    settings = apply_scenario(settings or Settings(), scenario)
    start = opening_time(scenario, day or dt.date(2026, 6, 1))
    clock = VirtualClock(start)
    tmp = None
    if db_url is None:
        tmp = tempfile.TemporaryDirectory(prefix="gateway-sim-")
        db_url = f"sqlite:///{Path(tmp.name) / 'sim.db'}"
    db = Database(db_url)
    try:
        identities = open_store(db, settings, scenario, clock, start)
        summary = Summary(duration_s)

        def on_outcome(o: Outcome, ev: EngineEvent) -> None:
            summary.decisions.append((o.who, o.campaign_id, o.reason))
            if o.reason == Reason.FIRED:
                summary.notifications[o.campaign_id] += 1
            else:
                summary.suppressions[o.reason] += 1

        pipeline = Pipeline(settings, db, CampaignIndex(load_campaigns(campaigns_dir)), identities, on_outcome,
                            segments=load_segments(campaigns_dir))
        sim = StoreSimulator(scenario, start=start, seed=seed, duration_s=duration_s)
        telemetry = TelemetryModel(scenario, start=start, seed=seed)
        end = start + duration_s
        for t in run_steps(pipeline, sim, telemetry, clock, scenario.store.id, start, end, step_s):
            if progress is not None:
                progress((t - start) / duration_s)
        # Let everyone still inside time out, so visits end and figures are complete.
        clock.set(end + settings.presence.visit_end_after_s + 1)
        pipeline.tick(clock.now())
        f = pipeline.figures
        summary.adverts, summary.readings = f["adverts"], f["readings"]
        summary.visits_enrolled_new, summary.visits_enrolled_returning = f["visits_new"], f["visits_returning"]
        summary.visits_anonymous = f["anonymous_visits"]
        local_day = dt.datetime.fromtimestamp(start, ZoneInfo(settings.store.timezone)).date().isoformat()
        with db.session() as s:
            summary.figures = day_figures(s, local_day, local_day, settings.store.timezone,
                                          bounce_s=settings.figures.bounce_s, store=settings.store.id,
                                          conversion_window_s=settings.interactions.conversion_window_s)
        summary.wall_s = time.perf_counter() - wall0
        return summary
    finally:
        db.dispose()
        if tmp is not None:
            tmp.cleanup()


def progress_bar(stream: TextIO = sys.stderr, width: int = 40) -> Callable[[float], None]:
    state: dict[str, int] = {"last": -1}

    def show(fraction: float) -> None:
        pct = int(fraction * 100)
        if pct == state["last"]:
            return
        state["last"] = pct
        filled = int(fraction * width)
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {pct:3d}%")
        if pct >= 100:
            stream.write("\n")
        stream.flush()

    return show
