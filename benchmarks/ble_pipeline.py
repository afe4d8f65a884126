"""Advertisements per second through the whole BLE path, against Home Assistant's iBeacon parser.

Ours: parse -> guard -> filter -> presence -> identity match -> campaign engine, the real
``gateway.app.pipeline.Pipeline`` on a temporary SQLite database with 10,000 profiles and 200+
campaigns loaded, fed in one-second batches (as the runtime drains the scanner) with a
presence tick after each. Anchor: ``ibeacon_ble.iBeaconParser.parse`` (what Home Assistant's
ibeacon integration calls for every advertisement) on the same stream, as the bleak-like
``BluetoothServiceInfo`` objects it takes. Both run on one core, in this process; the stream
is generated before either clock starts.

The stream: 1,000 identities (mostly iBeacon, some Eddystone UID with interleaved TLM, some
non-beacon manufacturer data), 10 % enrolled (nine in ten with consent; some with past visits
and an open online cart, some of those abandoned), people walking between the zones of four
receivers (log-distance RSSI with 3 dB shadowing, so they enter, dwell and leave), a few phones
rotating their address every minute. The engine runs with the shop's controls: the default
frequency caps, quiet hours (held and dropped), live segments, an A/B test with a holdout,
delayed sends an exit cancels, cart reminders, and telemetry and alarm campaigns loaded; it
stops with an error if no decision or notification was made.

    .venv/bin/python benchmarks/ble_pipeline.py [--quick] [--adverts N] [--rate HZ] [--profile]

Each tag that is heard advertises ``--rate`` times a second (default 10: Apple's recommended iBeacon
interval of 100 ms, and the rate of the presence benchmark's trace). 1,000 tags at 10 Hz, each advert
heard by one or two receivers, make about 11,000 adverts a second: about the radio's ceiling, so the
500,000 adverts are 45 s of a full shop. ``--rate 1`` (slow tags) makes them 7.5 minutes of the same
shop, with ten times the presence steps and campaign decisions per advert.

The last line printed is one JSON object: adverts_per_s, anchor_adverts_per_s, ratio (ours /
anchor), adverts, identities, campaigns, profiles, decisions, notifications, and the counters.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import csv
import gc
import json
import math
import os
import pstats
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, insert, select  # noqa: E402

from beacons import parse as parse_module  # noqa: E402
from beacons.encode import eddystone_tlm_frame, eddystone_uid_frame  # noqa: E402
from beacons.parse import EDDYSTONE_SERVICE_UUID, ParseStats, parse_adverts  # noqa: E402
from beacons.types import Advertisement  # noqa: E402
from gateway.app.config import Settings, StoreSettings  # noqa: E402
from gateway.app.pipeline import Pipeline  # noqa: E402
from gateway.campaigns.model import CampaignIndex, load_campaigns, load_segments, parse_campaign  # noqa: E402
from gateway.presence.settings import PresenceSettings, ReceiverSettings, ZoneBand  # noqa: E402
from gateway.profiles.identity import IdentityIndex  # noqa: E402
from gateway.storage.db import Database  # noqa: E402
from gateway.storage.models import (  # noqa: E402
    Cart,
    CatalogItem,
    Consent,
    Decision,
    Identifier,
    Notification,
    Profile,
    Visit,
)

T0 = 1_780_000_000.0  # 21:26 in the store's timezone (Europe/London): some campaigns are in quiet hours
EXAMPLES = ROOT / "examples" / "campaigns"
MEASURED_POWER = -59
ZONES = {"rx-entrance": ("entrance", 4.0), "rx-shoes": ("shoes", 6.0), "rx-apparel": ("apparel", 6.0),
         "rx-checkout": ("checkout", 4.0)}
RECEIVERS = tuple(ZONES)
TIERS = ("bronze", "silver", "gold", "platinum")
VENDOR_UUIDS = 24  # iBeacon tags share vendor uuids, under Home Assistant's 50 ids per uuid
EDDY_SHARE, OTHER_SHARE, ROTATING_SHARE, ENROLLED_SHARE = 0.10, 0.05, 0.05, 0.10


@dataclass(frozen=True, slots=True)
class Tag:
    index: int
    kind: str  # ibeacon | eddystone | other
    key: str | None
    manufacturer_data: dict[int, bytes]
    service_data: dict[str, bytes]
    tlm: dict[str, bytes]
    rotating: bool


def make_tags(n: int, rng: random.Random) -> list[Tag]:
    tags = []
    for i in range(n):
        u = rng.random()
        rotating = False
        if u < OTHER_SHARE:  # a phone or a headset: manufacturer data that is not a beacon
            company = rng.choice((0x0006, 0x0075, 0x00E0))
            tags.append(Tag(i, "other", None, {company: rng.randbytes(rng.randint(8, 24))}, {}, {}, False))
        elif u < OTHER_SHARE + EDDY_SHARE:
            ns, inst = rng.randbytes(10), i.to_bytes(6, "big")
            frame = eddystone_uid_frame(ns, inst, tx_power=-20)
            tlm = eddystone_tlm_frame(3000, 21.5, 1000 + i, 3600)
            tags.append(Tag(i, "eddystone", f"eddystone_uid:{ns.hex()}:{inst.hex()}", {},
                            {EDDYSTONE_SERVICE_UUID: frame}, {EDDYSTONE_SERVICE_UUID: tlm}, False))
        else:
            vendor = f"{i % VENDOR_UUIDS:08x}-5a1e-4c0d-9e57-0000000b1e{i % VENDOR_UUIDS:02x}"
            major, minor = 1 + i // 1000, i % 1000 + 1
            data = (b"\x02\x15" + bytes.fromhex(vendor.replace("-", "")) + major.to_bytes(2, "big")
                    + minor.to_bytes(2, "big") + (MEASURED_POWER & 0xFF).to_bytes(1, "big"))
            rotating = rng.random() < ROTATING_SHARE / (1 - OTHER_SHARE - EDDY_SHARE)
            tags.append(Tag(i, "ibeacon", f"ibeacon:{vendor}:{major}:{minor}", {0x004C: data}, {}, {}, rotating))
    return tags


def plan(rng: random.Random, horizon: float) -> list[tuple[float, float, str | None, bool]]:
    """(start, end, receiver or None, heard): away (unheard), between zones (heard far), in a zone."""
    out = []
    t = rng.uniform(0, 120)  # people arrive over the first two minutes
    while t < horizon:
        u = rng.random()
        if u < 0.15:
            d = rng.uniform(30, 150)
            out.append((t, t + d, None, False))
        elif u < 0.35:
            d = rng.uniform(3, 15)
            out.append((t, t + d, None, True))
        else:
            d = rng.uniform(20, 120)
            out.append((t, t + d, rng.choice(RECEIVERS), True))
        t += d
    return out


def rssi_at(d: float, rng: random.Random) -> int:
    return max(-100, min(-30, round(MEASURED_POWER - 20 * math.log10(d) + rng.gauss(0, 3))))


def address(tag: Tag, t: float) -> str:
    n = tag.index * 1000 + (int(t // 60) if tag.rotating else 0)
    b = n.to_bytes(5, "big")
    first = 0xC0 | (n >> 40 & 0x3F) if tag.rotating else 0xAC  # random addresses have the top bits set
    return f"{first:02X}:" + ":".join(f"{x:02X}" for x in b)


def make_stream(tags: list[Tag], n_adverts: int, seed: int, rate: int = 1) -> list[list[Advertisement]]:
    """One-second batches of adverts, time-ordered inside each batch; stops at n_adverts. Each tag that is
    heard advertises ``rate`` times a second, and each advert reaches one or two receivers."""
    rng = random.Random(seed)
    horizon = 3600.0 * 4
    plans = [plan(rng, horizon) for _ in tags]
    cursor = [0] * len(tags)
    phase = [rng.random() for _ in tags]
    batches: list[list[Advertisement]] = []
    total = 0
    second = 0
    while total < n_adverts and second < horizon:
        batch: list[tuple[float, Advertisement]] = []
        for tag in tags:
            p = plans[tag.index]
            c = cursor[tag.index]
            while c < len(p) - 1 and p[c][1] <= second:
                c += 1
            cursor[tag.index] = c
            _, _, rx, heard = p[c]
            if not heard:
                continue
            for j in range(rate):
                if rng.random() < 0.05:  # 5 % of adverts lost on air
                    continue
                t = T0 + second + (phase[tag.index] + j) / rate
                batch.extend(emit(tag, t, rx, rng))
        batch.sort(key=lambda x: x[0])
        advs = [a for _, a in batch][: n_adverts - total]
        batches.append(advs)
        total += len(advs)
        second += 1
    return batches


def emit(tag: Tag, t: float, rx: str | None, rng: random.Random) -> list[tuple[float, Advertisement]]:
    """One advert of ``tag`` at ``t`` as its receivers hear it: the zone's own (near) and maybe another (far)."""
    addr = address(tag, t)
    mfr, svc = tag.manufacturer_data, tag.service_data
    if tag.tlm and rng.random() < 0.1:
        svc = tag.tlm  # Eddystone beacons interleave telemetry frames
    hearers: list[tuple[str, float]] = []
    if rx is not None:
        hearers.append((rx, rng.uniform(0.5, 0.7 * ZONES[rx][1])))
        if rng.random() < 0.5:
            hearers.append((rng.choice([r for r in RECEIVERS if r != rx]), rng.uniform(10, 18)))
    else:
        hearers.append((rng.choice(RECEIVERS), rng.uniform(8, 14)))
    out = []
    for k, (receiver, d) in enumerate(hearers):
        ts = t + 0.002 * k
        out.append((ts, Advertisement(addr, rssi_at(d, rng), ts, receiver, manufacturer_data=mfr, service_data=svc)))
    return out


def make_campaigns(n: int, rng: random.Random) -> list[dict[str, Any]]:
    """Offers on every BLE trigger, with the controls a shop uses: cooldowns, quiet hours (held and
    dropped; the stream starts at 21:26 store time), segments, an experiment with a holdout, delayed
    sends an exit cancels, cart reminders, and telemetry and cart campaigns that BLE events never meet."""
    zones = [z for z, _ in ZONES.values()]
    out = []
    for k in range(n):
        kind = ("dwell", "enter", "visit_start")[k % 3]
        trigger: dict[str, Any] = {"type": kind}
        if kind != "visit_start":
            trigger["zone"] = zones[k // 3 % len(zones)]
        if kind == "dwell":
            trigger["min_dwell_s"] = rng.choice((15, 30, 45, 60))
        shape = rng.random()
        tier = {"fact": "profile.attributes.tier", "op": "in", "value": rng.sample(TIERS, rng.randint(1, 3))}
        age = {"fact": "profile.attributes.age", "op": rng.choice(("gte", "lt")), "value": rng.randint(20, 60)}
        segment = {"fact": "segments", "op": "contains", "value": rng.choice(("frequent", "occasional"))}
        if shape < 0.35:
            cond: dict[str, Any] = {"all": [tier, age]}
        elif shape < 0.6:
            cond = {"any": [tier, {"not": age}]}
        elif shape < 0.75:
            cond = {"all": [{"fact": "profile.attributes.newsletter", "op": "eq", "value": True}, tier]}
        elif shape < 0.9:
            cond = {"all": [segment, tier]}
        else:
            cond = {"all": [age]}
        limits: dict[str, Any] = {"cooldown_s": rng.choice((0, 600, 3600))}
        u = rng.random()
        if u < 0.08:
            limits["quiet_hours"] = {"start": "21:00", "end": "08:00"}  # held until the morning
        elif u < 0.12:
            limits["quiet_hours"] = {"start": "21:15", "end": "07:00", "mode": "drop"}
        c: dict[str, Any] = {
            "id": f"bench-{k:04d}",
            "purpose": "offers" if rng.random() < 0.85 else "analytics",
            "trigger": trigger,
            "conditions": cond,
            "action": {"title": "{profile.first_name}, an offer in {event.zone}", "body": "Offer {offer.code}",
                       "data": {"offer": {"code": f"B{k:04d}"}}},
            "limits": limits,
            "priority": rng.randint(0, 50),
        }
        if k % 40 == 7:  # an A/B test with a 10 % holdout
            c["experiment"] = {"holdout": 0.1, "variants": [
                {"name": "a", "weight": 1}, {"name": "b", "weight": 1, "action": {
                    "title": "{profile.first_name}: today only", "body": "Offer {offer.code}, 15 % off"}}]}
        if kind == "dwell" and k % 30 == 2:  # sent a minute later unless they leave the zone first
            c["action"]["delay_s"] = 60
            c["cancel_on"] = ["exit"]
        out.append(c)
    for k, zone in enumerate(zones):  # reminders where the abandoned cart's items are
        out.append({"id": f"bench-cart-{k}", "purpose": "cart_reminders", "trigger": {"type": "enter", "zone": zone},
                    "conditions": {"all": [{"fact": "cart.abandoned", "op": "eq", "value": True},
                                           {"fact": "cart.zones", "op": "contains", "value_fact": "event.zone"}]},
                    "action": {"title": "Your cart", "body": "{cart.items_where}"},
                    "limits": {"cooldown_s": 21600}, "priority": 30, "cancel_on": ["purchase"]})
    for k, metric in enumerate(("battery_pct", "blade_hours", "chain_wear_pct")):  # never met by BLE events
        out.append({"id": f"bench-telemetry-{k}", "purpose": "maintenance",
                    "trigger": {"type": "telemetry", "metric": metric, "above": 50},
                    "action": {"title": "Service due", "body": "{device.id}"}, "limits": {"cooldown_s": 86400}})
    out.append({"id": "bench-cart-abandoned", "purpose": "cart_reminders", "trigger": {"type": "cart_abandoned"},
                "action": {"title": "Your cart", "body": "{cart.item_count} item(s)"}, "limits": {"cooldown_s": 86400}})
    return out


def load_catalogue(db: Database) -> list[dict[str, Any]]:
    with open(ROOT / "examples" / "catalogue.csv", newline="") as f:
        rows = [{"sku": r["sku"], "name": r["name"], "price": float(r["price"]), "zone": r["zone"] or None,
                 "aisle": r["aisle"] or None} for r in csv.DictReader(f)]
    with db.session() as s:
        s.execute(insert(CatalogItem), rows)
    return rows


def load_profiles(db: Database, n_profiles: int, tags: list[Tag], rng: random.Random) -> int:
    """Bulk-loads profiles; the first enrolled ones own the stream's tags, most with consent, some with
    past visits (so segments differ) and an open online cart (some abandoned). Returns enrolled."""
    beacon_tags = [t for t in tags if t.key is not None]
    enrolled = rng.sample(beacon_tags, min(len(beacon_tags), round(len(tags) * ENROLLED_SHARE), n_profiles))
    catalogue = [r for r in load_catalogue(db) if r["zone"] in {z for z, _ in ZONES.values()}]
    profiles, identifiers, consents, visits, carts = [], [], [], [], []
    for pid in range(1, n_profiles + 1):
        profiles.append({"id": pid, "external_id": f"cust-{pid:06d}", "name": f"Customer {pid}",
                         "attributes": {"tier": rng.choice(TIERS), "age": rng.randint(18, 80),
                                        "newsletter": rng.random() < 0.5},
                         "created_at": T0 - 86400 * 90, "points": rng.randint(0, 300)})
        if pid <= len(enrolled):
            key, granted = enrolled[pid - 1].key, rng.random() < 0.9
            for _ in range(rng.choice((0, 0, 1, 2, 3, 5, 8))):
                start = T0 - rng.uniform(1, 40) * 86400
                visits.append({"profile_id": pid, "started_at": start, "ended_at": start + rng.uniform(300, 3600),
                               "zones": []})
            if catalogue and rng.random() < 0.4:
                items = [{"sku": r["sku"], "name": r["name"], "price": r["price"], "quantity": 1}
                         for r in rng.sample(catalogue, min(len(catalogue), rng.randint(1, 3)))]
                carts.append({"id": f"cart-{pid}", "profile_id": pid, "status": "open", "items": items,
                              "updated_at": T0 - rng.uniform(600, 7200)})
        else:
            key, granted = f"ibeacon:ffffffff-0000-4000-8000-{pid:012x}:1:1", rng.random() < 0.5
        assert key is not None
        identifiers.append({"profile_id": pid, "kind": "beacon", "value": key, "created_at": T0 - 86400})
        for purpose in ("offers", "cart_reminders", "maintenance", "analytics"):
            consents.append({"profile_id": pid, "purpose": purpose, "granted": granted or purpose == "maintenance",
                             "updated_at": T0 - 86400, "source": "bench"})
    with db.session() as s:
        s.execute(insert(Profile), profiles)
        s.execute(insert(Identifier), identifiers)
        s.execute(insert(Consent), consents)
        if visits:
            s.execute(insert(Visit), visits)
        if carts:
            s.execute(insert(Cart), carts)
    return len(enrolled)


class Anchor:
    """Home Assistant's parser over the same adverts, as the BluetoothServiceInfo objects it takes."""

    def __init__(self, batches: list[list[Advertisement]]) -> None:
        from home_assistant_bluetooth import BluetoothServiceInfo
        from ibeacon_ble import iBeaconParser

        self.parser = iBeaconParser()
        asyncio.run(self.parser.async_setup())  # loads the OUI table, as Home Assistant does at start
        self.batches = [[BluetoothServiceInfo("", a.address, a.rssi, a.manufacturer_data, a.service_data, [],
                                              a.receiver) for a in batch] for batch in batches]
        self.found = 0
        self.wall = self.cpu = 0.0

    def run(self, i: int) -> None:
        parse = self.parser.parse
        found = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for si in self.batches[i]:
            if parse(si) is not None:
                found += 1
        self.wall += time.perf_counter() - t0
        self.cpu += time.process_time() - c0
        self.found += found


def time_stages(pipeline: Pipeline) -> dict[str, float]:
    """Wraps the engine-side calls (once per batch or tick, so the wrapper costs nothing per advert).

    ``engine``: identity match, visits and campaign decisions with their SQL, wherever the presence
    events come from; ``tick``: the rest of the timers (scheduled sends, carts, footfall, device rules)."""
    spent = {"engine": 0.0, "tick": 0.0}
    handle, tick = pipeline.handle_presence, pipeline.tick

    def timed_handle(events: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return handle(events)
        finally:
            spent["engine"] += time.perf_counter() - t0

    def timed_tick(now: float) -> Any:
        t0, e0 = time.perf_counter(), spent["engine"]
        try:
            return tick(now)
        finally:
            spent["tick"] += time.perf_counter() - t0 - (spent["engine"] - e0)

    pipeline.handle_presence = timed_handle  # type: ignore[method-assign]
    pipeline.tick = timed_tick  # type: ignore[method-assign]
    return spent


def time_parse_only(batches: list[list[Advertisement]]) -> float:
    """Our parser alone over the same stream (what the anchor does), caches cleared first."""
    for cache in (parse_module._PAYLOAD_CACHE, parse_module._IBEACON_CACHE, parse_module._EDDYSTONE_CACHE,
                  parse_module._UUID_CACHE):
        cache.clear()
    stats = ParseStats()
    t0 = time.perf_counter()
    for batch in batches:
        parse_adverts(batch, stats)
    return time.perf_counter() - t0


def pin_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small run (seconds), same keys")
    ap.add_argument("--adverts", type=int, default=None)
    ap.add_argument("--identities", type=int, default=None)
    ap.add_argument("--campaigns", type=int, default=None)
    ap.add_argument("--profiles", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=int, default=10,
                    help="adverts per second of each tag that is heard (10: iBeacon's 100 ms interval; 1: slow tags)")
    ap.add_argument("--profile", action="store_true", help="cProfile our pipeline; top functions on stderr")
    args = ap.parse_args(argv)
    def pick(given: int | None, quick: int, full: int) -> int:
        return given if given is not None else quick if args.quick else full

    n_adverts = pick(args.adverts, 20_000, 500_000)
    n_ids = pick(args.identities, 200, 1000)
    n_campaigns = pick(args.campaigns, 30, 240)
    n_profiles = pick(args.profiles, 500, 10_000)
    pin_one_core()
    rng = random.Random(args.seed)

    tags = make_tags(n_ids, rng)
    batches = make_stream(tags, n_adverts, args.seed, args.rate)
    total = sum(len(b) for b in batches)
    # The generated offers plus the example shop's own campaigns (cart reminders, telemetry, alarms).
    campaigns = [parse_campaign(c, "bench") for c in make_campaigns(n_campaigns, rng)]
    campaigns += load_campaigns(EXAMPLES)

    with tempfile.TemporaryDirectory(prefix="ble-bench-") as tmp:
        db = Database(f"sqlite:///{Path(tmp) / 'bench.db'}")
        try:
            db.upgrade()
            enrolled = load_profiles(db, n_profiles, tags, rng)
            identities = IdentityIndex()
            with db.session() as s:
                identities.load(s)
            settings = Settings(  # default caps (3 an hour, 6 a day) and loyalty tiers
                store=StoreSettings(timezone="Europe/London"),
                presence=PresenceSettings(),
                receivers=[ReceiverSettings(id=rx, zones=[ZoneBand(name=z, max_m=m)], measured_power=MEASURED_POWER)
                           for rx, (z, m) in ZONES.items()],
            )
            # The example store's live segments: re-evaluated at every visit start and end, as in a shop.
            segments = load_segments(EXAMPLES)
            pipeline = Pipeline(settings, db, CampaignIndex(campaigns), identities, segments=segments)
            stage = time_stages(pipeline)
            anchor = Anchor(batches)
            # The generated stream (both sides' copies) is input, not the gateway's heap: frozen, so the
            # collector does not walk half a million adverts on every full pass (ours and the anchor alike).
            gc.collect()
            gc.freeze()
            profiler = cProfile.Profile() if args.profile else None
            if profiler is not None:
                profiler.enable()
            # Ours and the anchor take turns batch by batch, so a busy machine slows both alike.
            ours_s = ours_cpu = 0.0
            for i, batch in enumerate(batches):
                if not batch:
                    continue
                t0, c0 = time.perf_counter(), time.process_time()
                pipeline.ingest_adverts(batch)
                pipeline.tick(batch[-1].time)
                ours_s += time.perf_counter() - t0
                ours_cpu += time.process_time() - c0
                if profiler is None:
                    anchor.run(i)
            if profiler is not None:
                profiler.disable()
                pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
            with db.session() as s:
                decisions = s.scalar(select(func.count()).select_from(Decision)) or 0
                notifications = s.scalar(select(func.count()).select_from(Notification)) or 0
            stats = pipeline.stats()
            evaluations = pipeline.engine.evaluations
            if not (decisions and notifications and evaluations):  # the engine must have done real work
                raise SystemExit(f"no engine work: {decisions} decisions, {notifications} notifications")
            reasons = dict(pipeline.engine.counts.most_common())
        finally:
            db.dispose()

    if args.profile:  # the anchor runs unprofiled, after ours
        for i in range(len(batches)):
            anchor.run(i)
    anchor_s, anchor_cpu, anchor_found = anchor.wall, anchor.cpu, anchor.found
    parse_s = time_parse_only(batches)
    ours = total / ours_s
    per_advert_s = ours_s - stage["engine"] - stage["tick"]
    anchor = total / anchor_s
    return {
        "adverts_per_s": round(ours),
        "anchor_adverts_per_s": round(anchor),
        "ratio": round(ours / anchor, 2),
        "adverts": total,
        "identities": n_ids,
        "advert_rate_hz": args.rate,
        "stream_seconds": len(batches),
        "enrolled": enrolled,
        "campaigns": len(campaigns),
        "profiles": n_profiles,
        "decisions": decisions,
        "engine_evaluations": evaluations,  # campaign checks made: the index keeps this to those that can fire
        "engine_us_per_evaluation": round(1e6 * stage["engine"] / evaluations, 1) if evaluations else None,
        "decisions_by_reason": reasons,
        "notifications": notifications,
        "anchor_ibeacons": anchor_found,
        "figures": stats["figures"],
        "parse": stats["parse"],
        "guard": stats["guard"],
        # Wall seconds give the figures; CPU seconds show how much a busy machine stretched them.
        # Where our time went: the per-advert path (parse, guard, filter, presence), the engine's share
        # (identity match, visits, campaign decisions and their SQL) and the other timers per tick.
        "stage_seconds": {"per_advert_path": round(per_advert_s, 3), "engine": round(stage["engine"], 3),
                          "tick": round(stage["tick"], 3)},
        "per_advert_path_adverts_per_s": round(total / per_advert_s) if per_advert_s > 0 else None,
        # Like for like with the anchor: our parser alone (beacons.parse.parse_adverts) on the same stream.
        "parse_only": {"adverts_per_s": round(total / parse_s), "ratio": round(anchor_s / parse_s, 2)},
        "seconds": {"ours": round(ours_s, 3), "anchor": round(anchor_s, 3), "ours_cpu": round(ours_cpu, 3),
                    "anchor_cpu": round(anchor_cpu, 3)},
    }


if __name__ == "__main__":
    print(json.dumps(main()))
