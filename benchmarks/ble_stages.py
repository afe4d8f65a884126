"""CPU per advert of the BLE path's own stages (parse, guard, presence), apart from the engine.

``ble_pipeline.py`` times the whole pipeline, engine and database included, so a change to one stage
is lost in the others' noise. This runs the same stream (same generator, same seed) through
``parse_adverts`` -> ``Guard.sightings`` -> ``PresenceTracker.observe_many`` with a ``tick`` after each
one-second batch, as the pipeline does, and times each stage alone in CPU seconds (steadier than wall
time on a shared machine). Every repeat starts from empty caches and fresh objects; the best repeat
per stage is reported.

    .venv/bin/python benchmarks/ble_stages.py [--quick] [--adverts N] [--rate HZ] [--repeats K]

The last line printed is one JSON object: ns per advert per stage (CPU and wall, the best
repeat of each), adverts, sightings and presence events (these counts depend only on the stream and the code's
behaviour, so they must not move when only speed changes).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ble_pipeline import MEASURED_POWER, ZONES, make_stream, make_tags, pin_one_core  # noqa: E402

from beacons import parse as parse_module  # noqa: E402
from beacons.guard import Guard  # noqa: E402
from beacons.parse import ParseStats, parse_adverts  # noqa: E402
from beacons.types import Advertisement  # noqa: E402
from gateway.presence.settings import PresenceSettings, ReceiverSettings, ZoneBand  # noqa: E402
from gateway.presence.tracker import PresenceTracker  # noqa: E402

STAGES = ("parse", "guard", "presence")


def clear_parse_caches() -> None:
    for cache in (parse_module._PAYLOAD_CACHE, parse_module._IBEACON_CACHE, parse_module._EDDYSTONE_CACHE,
                  parse_module._UUID_CACHE):
        cache.clear()


def run_once(batches: list[list[Advertisement]], trusted: frozenset[str]) -> dict[str, Any]:
    """One pass over the stream from a cold start: CPU and wall seconds per stage, and the counts."""
    clear_parse_caches()
    receivers = [ReceiverSettings(id=rx, zones=[ZoneBand(name=z, max_m=m)], measured_power=MEASURED_POWER)
                 for rx, (z, m) in ZONES.items()]
    tracker = PresenceTracker(PresenceSettings(), receivers)
    guard = Guard(trusted=trusted.__contains__)
    stats = ParseStats()
    cpu = dict.fromkeys(STAGES, 0.0)
    wall = dict.fromkeys(STAGES, 0.0)
    clock, perf = time.process_time, time.perf_counter
    n_sightings = n_events = 0
    for batch in batches:
        if not batch:
            continue
        c0, w0 = clock(), perf()
        pairs = parse_adverts(batch, stats)
        c1, w1 = clock(), perf()
        sightings = guard.sightings(pairs)
        c2, w2 = clock(), perf()
        events = tracker.observe_many(sightings)
        events += tracker.tick(batch[-1].time)
        c3, w3 = clock(), perf()
        cpu["parse"] += c1 - c0
        cpu["guard"] += c2 - c1
        cpu["presence"] += c3 - c2
        wall["parse"] += w1 - w0
        wall["guard"] += w2 - w1
        wall["presence"] += w3 - w2
        n_sightings += len(sightings)
        n_events += len(events)
    return {"cpu": cpu, "wall": wall, "sightings": n_sightings, "events": n_events,
            "accepted": sum(stats.accepted.values()), "guard_admitted": guard.figures["admitted"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small run (seconds), same keys")
    ap.add_argument("--adverts", type=int, default=None)
    ap.add_argument("--identities", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=int, default=10, help="adverts per second of each tag that is heard")
    ap.add_argument("--repeats", type=int, default=None, help="passes over the stream; the best is reported")
    args = ap.parse_args(argv)
    n_adverts = args.adverts or (20_000 if args.quick else 500_000)
    n_ids = args.identities or (200 if args.quick else 1000)
    repeats = args.repeats or (1 if args.quick else 5)
    pin_one_core()
    tags = make_tags(n_ids, random.Random(args.seed))  # the pipeline benchmark's stream, same seed
    batches = make_stream(tags, n_adverts, args.seed, args.rate)
    total = sum(len(b) for b in batches)
    # The pipeline's guard trusts enrolled identities; a tenth of the beacons here, as there.
    keys = sorted(t.key for t in tags if t.key is not None)
    trusted = frozenset(random.Random(args.seed).sample(keys, len(keys) // 10))
    gc.collect()
    gc.freeze()  # the stream is input, not the stages' heap
    runs = [run_once(batches, trusted) for _ in range(repeats)]
    counts = {k: runs[0][k] for k in ("sightings", "events", "accepted", "guard_admitted")}
    if any({k: r[k] for k in counts} != counts for r in runs):
        raise SystemExit("the counts differ between repeats: a stage keeps state across runs")
    ns = {s: round(1e9 * min(r["cpu"][s] for r in runs) / total, 1) for s in STAGES}
    ns_wall = {s: round(1e9 * min(r["wall"][s] for r in runs) / total, 1) for s in STAGES}
    return {
        "adverts": total,
        "advert_rate_hz": args.rate,
        "repeats": repeats,
        "cpu_ns_per_advert": {**ns, "total": round(sum(ns.values()), 1)},
        "wall_ns_per_advert": {**ns_wall, "total": round(sum(ns_wall.values()), 1)},
        **counts,
    }


if __name__ == "__main__":
    print(json.dumps(main()))
