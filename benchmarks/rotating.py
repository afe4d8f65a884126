"""Adverts per second through the BLE path with 10,000 enrolled rotating identities, against the same stream
with static identifiers, in the same run.

The path measured is the pipeline's own, up to presence: ``parse_adverts`` -> the rotating resolver
(``Pipeline.rotating``) -> the guard -> ``PresenceTracker.observe_many``, and after each one-second batch the
tick's share (``Resolver.refresh`` and ``PresenceTracker.tick``). The engine after presence sees the same
events in both runs, so it is left out: the ratio is the rotation's cost where it is largest.

Enrolled: 10,000 rotating identities, a third each Eddystone-EID (K = 5: a new EID every 32 s), IRK
(phones whose resolvable private address changes every 60 s) and the app's rotating iBeacon (a 60 s window),
short periods so that windows and addresses move many times within the run (a shop's are 15 minutes: fewer
moves, less work). Heard: 1,000 devices, as benchmarks/ble_pipeline.py's stream (its walking plans, RSSI
model and receivers), 70 % of them enrolled ones and 30 % unknown phones from random private addresses that
change every 15 minutes and carry no beacon frame: each new one costs one AES pass per enrolled IRK, once.
The baseline stream is the same adverts with the 700 enrolled devices as static iBeacons (10,000 enrolled
static identifiers) and the same unknown phones; the resolver has nothing enrolled there.

    .venv/bin/python benchmarks/rotating.py [--quick] [--adverts N] [--rate HZ] [--seed S]

The last line printed is one JSON object: adverts_per_s, baseline_adverts_per_s, ratio (rotating /
baseline, goal >= 0.8), table_mb (the resolver's table and caches for 10,000 identities, goal < 20),
build_s (decrypted keys to a table), cpu_s and wall_s of each run, and the resolver's counters.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from beacons import rotating as proto  # noqa: E402
from beacons.encode import eddystone_eid_payload, ibeacon_payload  # noqa: E402
from beacons.parse import ParseStats, parse_adverts  # noqa: E402
from beacons.types import Advertisement  # noqa: E402
from benchmarks.ble_pipeline import MEASURED_POWER, RECEIVERS, T0, ZONES, pin_one_core, plan, rssi_at  # noqa: E402
from gateway.app.config import Settings  # noqa: E402
from gateway.app.pipeline import Pipeline  # noqa: E402
from gateway.campaigns.model import CampaignIndex  # noqa: E402
from gateway.presence.settings import ReceiverSettings, ZoneBand  # noqa: E402
from gateway.profiles.identity import IdentityIndex  # noqa: E402
from gateway.profiles.rotating import Entry  # noqa: E402
from gateway.storage.db import Database  # noqa: E402

ENROLLED = 10_000
HEARD = 1_000
UNKNOWN_SHARE = 0.3
EID_K = 5
APP_PERIOD_S = 60
RPA_EVERY_S = 60
UNKNOWN_RPA_EVERY_S = 900
START_S = 5  # the stream's first seconds: every device is new to the gateway (a start), timed apart
APP_UUID = Settings().identities.app_uuid
STATIC_UUID = "5a1e0000-4c0d-9e57-0000-000000000b1e"
FRAMELESS = b"\x02\x01\x1a\x0c\xff\x06\x00\x01\x09\x20\x02\x5e\x11\x22\x33\x44"  # flags + a vendor's data


def _rpa(irk: bytes, rng: random.Random) -> str:
    prand = bytes([0x40 | rng.getrandbits(6), rng.getrandbits(8), rng.getrandbits(8)])
    return ":".join(f"{b:02X}" for b in prand + proto.rpa_hash(irk, prand))


def _random_rpa(rng: random.Random) -> str:
    return ":".join(f"{b:02X}" for b in bytes([0x40 | rng.getrandbits(6)]) + rng.randbytes(5))


def make_entries(rng: random.Random) -> list[Entry]:
    """10,000 enrolled identities, kinds in turn: eid, irk, app (profile id = identity id)."""
    out = []
    for i in range(1, ENROLLED + 1):
        kind = ("eid", "irk", "app")[i % 3]
        secret = rng.randbytes(32 if kind == "app" else 16)
        out.append(Entry(i, i, kind, secret, k=EID_K, epoch=int(T0) - 86_400, period_s=APP_PERIOD_S))
    return out


class Device:
    """One heard device: what it advertises at a time, rotating and as its static twin."""

    def __init__(self, index: int, entry: Entry | None, rng: random.Random) -> None:
        self.entry = entry
        self.index = index
        self.rng = random.Random(rng.random())
        self.static_address = f"AC:00:00:{index >> 8 & 0xFF:02X}:{index & 0xFF:02X}:01"
        self.static_payload = ibeacon_payload(STATIC_UUID, 1 + index // 1000, index % 1000 + 1, MEASURED_POWER)
        self._memo: dict[int, tuple[str, bytes]] = {}

    def rotating(self, t: float) -> tuple[str, bytes]:
        e = self.entry
        if e is None:  # an unknown phone: a random private address, no beacon frame
            w = int(t // UNKNOWN_RPA_EVERY_S)
        elif e.kind == "eid":
            w = (int(t) - e.epoch) >> EID_K
        elif e.kind == "app":
            w = int(t // APP_PERIOD_S)
        else:
            w = int(t // RPA_EVERY_S)
        got = self._memo.get(w)
        if got is None:
            if e is None:
                got = (_random_rpa(self.rng), FRAMELESS)
            elif e.kind == "eid":
                got = (self.static_address, eddystone_eid_payload(proto.eid(e.secret, EID_K, w << EID_K), -20))
            elif e.kind == "app":
                major, minor = proto.app_beacon(e.secret, w)
                got = (_random_rpa(self.rng), ibeacon_payload(APP_UUID, major, minor, MEASURED_POWER))
            else:
                got = (_rpa(e.secret, self.rng), FRAMELESS)
            self._memo[w] = got
        return got

    def static(self, t: float) -> tuple[str, bytes]:
        if self.entry is None:
            return self.rotating(t)  # the same unknown phones in both streams
        return self.static_address, self.static_payload


def make_streams(devices: list[Device], n_adverts: int, seed: int, rate: int
                 ) -> tuple[list[list[Advertisement]], list[list[Advertisement]]]:
    """One-second batches, as benchmarks/ble_pipeline.py's make_stream: the rotating stream and its static
    twin, advert for advert (same times, receivers and RSSI)."""
    rng = random.Random(seed)
    horizon = 3600.0 * 4
    plans = [plan(rng, horizon) for _ in devices]
    cursor = [0] * len(devices)
    phase = [rng.random() for _ in devices]
    rot: list[list[Advertisement]] = []
    base: list[list[Advertisement]] = []
    total = second = 0
    while total < n_adverts and second < horizon:
        batch: list[tuple[float, Advertisement, Advertisement]] = []
        for i, dev in enumerate(devices):
            p, c = plans[i], cursor[i]
            while c < len(p) - 1 and p[c][1] <= second:
                c += 1
            cursor[i] = c
            _, _, rx, heard = p[c]
            if not heard:
                continue
            for j in range(rate):
                if rng.random() < 0.05:
                    continue
                t = T0 + second + (phase[i] + j) / rate
                hearers = [(rx, rng.uniform(0.5, 0.7 * ZONES[rx][1]))] if rx is not None else [
                    (rng.choice(RECEIVERS), rng.uniform(8, 14))]
                if rx is not None and rng.random() < 0.5:
                    hearers.append((rng.choice([r for r in RECEIVERS if r != rx]), rng.uniform(10, 18)))
                ra, rp = dev.rotating(t)
                sa, sp = dev.static(t)
                for k, (receiver, d) in enumerate(hearers):
                    ts, level = t + 0.002 * k, rssi_at(d, rng)
                    batch.append((ts, Advertisement(ra, level, ts, receiver, rp),
                                  Advertisement(sa, level, ts, receiver, sp)))
        batch.sort(key=lambda x: x[0])
        batch = batch[: n_adverts - total]
        rot.append([r for _, r, _ in batch])
        base.append([b for _, _, b in batch])
        total += len(batch)
        second += 1
    return rot, base


def ble_path(pipeline: Pipeline, batch: list[Advertisement], stats: ParseStats) -> int:
    """The pipeline's advert path up to presence, then the tick's share; the events presence made."""
    sightings = pipeline.guard.sightings(pipeline.rotating.resolve(batch, lambda b: parse_adverts(b, stats)))
    events = pipeline.presence.observe_many(sightings)
    now = batch[-1].time
    pipeline.rotating.refresh(now)
    return len(events) + len(pipeline.presence.tick(now))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small run (seconds), same keys")
    ap.add_argument("--adverts", type=int, default=None)
    ap.add_argument("--rate", type=int, default=10, help="adverts per second of each heard device (10: 100 ms)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    n_adverts = args.adverts if args.adverts is not None else 20_000 if args.quick else 300_000
    pin_one_core()
    rng = random.Random(args.seed)
    entries = make_entries(rng)
    picked = rng.sample(entries, int(HEARD * (1 - UNKNOWN_SHARE)))
    devices = [Device(i, e, rng) for i, e in enumerate(picked + [None] * (HEARD - len(picked)))]
    rng.shuffle(devices)
    rot_batches, base_batches = make_streams(devices, n_adverts, args.seed, args.rate)
    total = sum(len(b) for b in rot_batches)

    receivers = [ReceiverSettings(id=rx, zones=[ZoneBand(name=z, max_m=m)], measured_power=MEASURED_POWER)
                 for rx, (z, m) in ZONES.items()]
    with tempfile.TemporaryDirectory(prefix="rotating-bench-") as tmp:
        db = Database(f"sqlite:///{Path(tmp) / 'bench.db'}")  # the pipeline wants one; nothing here writes
        try:
            rot_ids, base_ids = IdentityIndex(), IdentityIndex()
            for e in entries:  # the baseline's 10,000 enrolled static identifiers
                base_ids.add("beacon", f"ibeacon:{STATIC_UUID}:{100 + e.id // 1000}:{e.id % 1000 + 1}", e.id)
            for dev in devices:
                if dev.entry is not None:
                    i = dev.index
                    base_ids.add("beacon", f"ibeacon:{STATIC_UUID}:{1 + i // 1000}:{i % 1000 + 1}", dev.entry.id)
            ours = Pipeline(Settings(receivers=receivers), db, CampaignIndex([]), rot_ids)
            baseline = Pipeline(Settings(receivers=receivers), db, CampaignIndex([]), base_ids)
            gc.collect()
            t0 = time.perf_counter()
            ours.rotating.load(entries, T0)
            build_s = time.perf_counter() - t0
            gc.collect()
            table_bytes = ours.rotating.size_bytes()
            gc.freeze()  # the streams are input, not the gateway's heap
            times = {"ours": [0.0, 0.0], "baseline": [0.0, 0.0]}
            start = {"ours": [0.0, 0.0], "baseline": [0.0, 0.0]}  # the first START_S of stream, apart
            events = {"ours": 0, "baseline": 0}
            stats = {"ours": ParseStats(), "baseline": ParseStats()}
            steady = 0
            warm = min(START_S, len(rot_batches) // 2)  # a --quick run is shorter than START_S
            # Batch by batch in turn, so a busy machine slows both alike.
            for second, (rb, bb) in enumerate(zip(rot_batches, base_batches, strict=True)):
                if not rb:
                    continue
                into = start if second < warm else times
                steady += len(rb) if into is times else 0
                for name, p, b in (("ours", ours, rb), ("baseline", baseline, bb)):
                    w0, c0 = time.perf_counter(), time.process_time()
                    events[name] += ble_path(p, b, stats[name])
                    into[name][0] += time.perf_counter() - w0
                    into[name][1] += time.process_time() - c0
            table_bytes_end = ours.rotating.size_bytes()
        finally:
            db.dispose()
    if not events["ours"] or not events["baseline"]:
        raise SystemExit(f"presence made no events: {events}")
    ours_rate, base_rate = steady / times["ours"][0], steady / times["baseline"][0]
    whole = {k: times[k][0] + start[k][0] for k in times}
    rs = ours.rotating.stats()
    rs.pop("table_bytes", None)
    out = {
        "adverts_per_s": round(ours_rate),
        "baseline_adverts_per_s": round(base_rate),
        "ratio": round(ours_rate / base_rate, 3),
        "ratio_with_start": round(whole["baseline"] / whole["ours"], 3),
        "start_extra_s": round(start["ours"][0] - start["baseline"][0], 3),
        "table_mb": round(max(table_bytes, table_bytes_end) / 1e6, 2),
        "build_s": round(build_s, 3),
        "adverts": total,
        "enrolled": ENROLLED,
        "heard": HEARD,
        "unknown_share": UNKNOWN_SHARE,
        "steady_adverts": steady,
        "cpu_s": round(times["ours"][1] + start["ours"][1], 3),
        "wall_s": round(whole["ours"], 3),
        "baseline_cpu_s": round(times["baseline"][1] + start["baseline"][1], 3),
        "baseline_wall_s": round(whole["baseline"], 3),
        "presence_events": events["ours"],
        "baseline_presence_events": events["baseline"],
        "tracks": len(ours.presence.tracks),
        "baseline_tracks": len(baseline.presence.tracks),
        "resolver": rs,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
