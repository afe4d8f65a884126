"""A 24-hour soak in virtual time: does the gateway's memory stay flat, and do the day's figures match its rows?

The example store (examples/store.yaml) scaled up: its people cloned to ``--people`` enrolled customers
with one or two visits each across the day, its devices cloned to ``--devices`` products publishing every
``--interval`` s, the anonymous crowd arriving all day, the example campaigns firing. The synchronous
Pipeline (the one the Runtime's worker runs) is driven in virtual time on SQLite, as ``gateway simulate``
does, and every virtual hour the process's RSS and the size of every in-memory table of the pipeline's
stages (presence tracks, engine caches, zone switches, guard, rotating cache, telemetry caches...: found
by walking each stage's attributes, so a new one is reported without being named here) are sampled.

At the end, the day's figures (the figures function /v1/figures serves) are checked against what the
rows say: visits, notifications and decisions counted straight from their tables.

    python benchmarks/soak.py            # 24 h, 1,000 people, 500 devices
    python benchmarks/soak.py --quick    # 2 h, 100 people, 50 devices

Last line: one JSON object (``rss_mb`` per hour, ``rss_growth_pct`` last hour against the first, ``tables``
per hour, ``tables_max``, ``figures_match``, CPU and wall seconds).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import gc
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devices.payloads import Reading  # noqa: E402
from gateway.app.config import Settings  # noqa: E402
from gateway.app.pipeline import Pipeline  # noqa: E402
from gateway.app.scenarios import apply_scenario  # noqa: E402
from gateway.app.simulate import open_store, opening_time  # noqa: E402
from gateway.campaigns.model import CampaignIndex, load_campaigns, load_segments  # noqa: E402
from gateway.clock import VirtualClock  # noqa: E402
from gateway.engine.figures import figures as day_figures  # noqa: E402
from gateway.storage.db import Database  # noqa: E402
from gateway.storage.models import Decision, Notification  # noqa: E402
from gateway.storage.models import Visit as VisitRecord  # noqa: E402
from simulators.scenario import Scenario, Visit, load_scenario  # noqa: E402
from simulators.store_sim import StoreSimulator  # noqa: E402
from simulators.wearables import TelemetryModel  # noqa: E402

SIZED = (dict, set, list, collections.deque, collections.Counter, collections.OrderedDict, frozenset)


def rss_mb() -> float:
    """The process's resident set now (Linux /proc), in MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 1e6


def scaled(base: Scenario, people: int, devices: int, interval_s: float, hours: float, seed: int) -> Scenario:
    """The example store with ``people`` customers (clones of its own, one or two visits each across the
    run) and ``devices`` products (clones of its own, owned by the clones), the crowd arriving all run."""
    rng = random.Random(seed)
    span = hours * 3600.0
    templates = base.people
    persons = []
    for i in range(people):
        p = templates[i % len(templates)]
        routes = [v.route for q in templates for v in q.visits] or [p.visits[0].route]
        visits = tuple(sorted((Visit(rng.uniform(0, span * 0.95), rng.choice(routes))
                               for _ in range(rng.choice((1, 1, 2)))), key=lambda v: v.at))
        pid = p.id if i < len(templates) else f"{p.id}-{i}"
        email = p.email if i < len(templates) or p.email is None else f"{i}.{p.email}"
        persons.append(dataclasses.replace(p, id=pid, email=email, visits=visits,
                                           beacon=dataclasses.replace(p.beacon, major=1000 + i // 60000,
                                                                      minor=1 + i % 60000)))
    owners = {p.id for p in templates}
    devs = []
    for i in range(devices):
        d = base.devices[i % len(base.devices)]
        owner = persons[i % len(persons)].id if persons else d.owner
        devs.append(dataclasses.replace(d, id=f"{d.id}-{i}", owner=owner if owner in owners or i >= len(base.devices)
                                        else d.owner, interval_s=interval_s))
    crowd = dataclasses.replace(base.crowd, arrivals_per_hour=max(base.crowd.arrivals_per_hour, 40.0),
                                count=max(base.crowd.count, int(40 * hours)))
    return dataclasses.replace(base, people=tuple(persons), devices=tuple(devs), crowd=crowd)


def sizes(stages: dict[str, Any]) -> dict[str, int]:
    """``stage.attr`` -> len, for every container attribute of the stages (one level of nested objects too)."""
    out: dict[str, int] = {}

    def walk(prefix: str, obj: Any, depth: int) -> None:
        names = list(getattr(obj, "__dict__", {})) + [n for c in type(obj).__mro__
                                                      for n in getattr(c, "__slots__", ())]
        for name in names:
            if name in ("settings", "__dict__") or name.startswith("__"):
                continue
            try:
                value = getattr(obj, name)
            except AttributeError:
                continue
            if isinstance(value, SIZED):
                out[f"{prefix}.{name}"] = len(value)
                if isinstance(value, dict) and value and all(isinstance(v, SIZED) for v in list(value.values())[:50]):
                    out[f"{prefix}.{name}[*]"] = sum(len(v) for v in list(value.values()))  # what they hold
            elif depth and hasattr(value, "__dict__") and type(value).__module__.split(".")[0] in (
                    "gateway", "beacons", "devices") and not callable(value):
                walk(f"{prefix}.{name}", value, depth - 1)

    for name, stage in stages.items():
        walk(name, stage, 0 if name == "pipeline" else 1)  # the pipeline's own; its stages by their names
    return out


def run(hours: float, people: int, devices: int, interval_s: float, step_s: float, seed: int) -> dict[str, Any]:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    base = load_scenario(ROOT / "examples/store.yaml")
    scenario = scaled(base, people, devices, interval_s, hours, seed)
    campaigns_dir = str(ROOT / "examples/campaigns")
    settings = apply_scenario(Settings(), scenario)
    start = opening_time(scenario, dt.date(2026, 6, 1))
    duration = hours * 3600.0
    clock = VirtualClock(start)
    with tempfile.TemporaryDirectory(prefix="gateway-soak-") as tmp:
        db = Database(f"sqlite:///{Path(tmp) / 'soak.db'}")
        try:
            identities = open_store(db, settings, scenario, clock, start)
            outcomes = 0

            def on_outcome(*_: Any) -> None:
                nonlocal outcomes
                outcomes += 1

            pipeline = Pipeline(settings, db, CampaignIndex(load_campaigns(campaigns_dir)), identities, on_outcome,
                                segments=load_segments(campaigns_dir))
            sim = StoreSimulator(scenario, start=start, seed=seed, duration_s=duration)
            telemetry = TelemetryModel(scenario, start=start, seed=seed)
            stages = {"pipeline": pipeline, "presence": pipeline.presence, "engine": pipeline.engine,
                      "guard": pipeline.guard, "switches": pipeline.switches, "telemetry": pipeline.telemetry,
                      "rules": pipeline.rules, "rotating": pipeline.rotating, "identities": identities}
            rss: list[float] = []
            tables: list[dict[str, int]] = []
            t, end = start, start + duration
            next_hour, next_readings, last_readings = start + 3600.0, start + 10.0, start
            readings_every = max(step_s, 10.0)
            while t < end:
                t1 = min(t + step_s, end)
                pipeline.ingest_adverts(sim.advertisements(t, t1))
                clock.set(t1)
                if t1 >= next_readings or t1 >= end:
                    rows = telemetry.readings(last_readings, t1)
                    pipeline.ingest_readings(Reading(device_id=d, store_id=scenario.store.id, time=ts, metrics=m)
                                             for d, ts, m in rows)
                    last_readings, next_readings = t1, t1 + readings_every
                pipeline.tick(t1)
                t = t1
                if t >= next_hour or t >= end:
                    gc.collect()
                    rss.append(round(rss_mb(), 2))
                    tables.append(sizes(stages))
                    next_hour += 3600.0
                    print(f"hour {len(rss)}: rss {rss[-1]} MB, tracks {len(pipeline.presence.tracks)}",
                          file=sys.stderr, flush=True)
            clock.set(end + settings.presence.visit_end_after_s + 1)  # everyone still inside times out
            pipeline.tick(clock.now())
            pipeline.flush_footfall()
            tz = ZoneInfo(settings.store.timezone)
            day = dt.datetime.fromtimestamp(start, tz).date()
            lo = dt.datetime.combine(day, dt.time(0), tz).timestamp()
            hi = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), tz).timestamp()
            with db.session() as s:
                fig = day_figures(s, day.isoformat(), day.isoformat(), settings.store.timezone,
                                  bounce_s=settings.figures.bounce_s, store=settings.store.id,
                                  conversion_window_s=settings.interactions.conversion_window_s)
                rows_visits = s.scalar(select(func.count()).select_from(VisitRecord).where(
                    VisitRecord.started_at >= lo, VisitRecord.started_at < hi)) or 0
                rows_notified = s.scalar(select(func.count()).select_from(Notification).where(
                    Notification.created_at >= lo, Notification.created_at < hi)) or 0
                rows_decisions = s.scalar(select(func.count()).select_from(Decision)) or 0
        finally:
            db.dispose()
    first = rss[1] if len(rss) > 2 else rss[0]  # the first hour fills caches and the allocator: measured after it
    keys = sorted({k for row in tables for k in row})
    tables_max = {k: max(row.get(k, 0) for row in tables) for k in keys}
    tables_last = {k: tables[-1].get(k, 0) for k in keys}
    checks = {"visits": (fig["enrolled_visits"], rows_visits),
              "notifications": (fig["notifications"]["total"]["notified"], rows_notified),
              "decisions": (outcomes, rows_decisions)}
    return {"benchmark": "soak", "hours": hours, "people": people, "devices": devices, "device_interval_s": interval_s,
            "step_s": step_s, "seed": seed, "rss_mb": rss,
            "rss_growth_pct": round(100 * (rss[-1] - first) / first, 2),
            "rss_growth_from_hour": 2 if len(rss) > 2 else 1,
            "goal_growth_pct": 5.0, "tables": tables, "tables_max": tables_max, "tables_last": tables_last,
            "figures": {k: {"figures": a, "rows": b} for k, (a, b) in checks.items()},
            "figures_match": all(a == b for a, b in checks.values()),
            "adverts": pipeline.figures["adverts"], "readings": pipeline.figures["readings"],
            "cpu_s": round(time.process_time() - cpu0, 2), "wall_s": round(time.perf_counter() - wall0, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 virtual hours, 100 people, 50 devices")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--people", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--interval", type=float, default=300.0, help="seconds between a device's readings")
    parser.add_argument("--step", type=float, default=1.0, help="virtual seconds per pipeline step")
    parser.add_argument("--seed", type=int, default=3)
    a = parser.parse_args()
    if a.quick:
        a.hours, a.people, a.devices = 2.0, 100, 50
    print(json.dumps(run(a.hours, a.people, a.devices, a.interval, a.step, a.seed)))


if __name__ == "__main__":
    main()
