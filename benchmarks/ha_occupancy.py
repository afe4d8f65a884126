"""What the Home Assistant link costs and sends on a busy floor (gateway/app/homeassistant.py).

1,000 people tracked (a quarter of them enrolled) over 20 zones; every 0.1 s of the gateway's clock a tenth
of them change zone, for a minute. Each step does what the link does once woken: read the occupancy from
the tracks and ask the publisher what to send. Prints the CPU and wall time per step, and how many zone
state messages went out against how many count changes there were (the once-a-second-per-zone limit).

    .venv/bin/python benchmarks/ha_occupancy.py [--quick]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.app.homeassistant import Layout, OccupancyPublisher, occupancy


class Track:
    __slots__ = ("zone",)

    def __init__(self, zone: str | None) -> None:
        self.zone = zone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 s of the floor instead of 60 (the smoke test)")
    ap.add_argument("--people", type=int, default=1000)
    ap.add_argument("--zones", type=int, default=20)
    a = ap.parse_args()
    rng = random.Random(7)
    zones = [f"zone {i}" for i in range(a.zones)]
    tracks = {f"tag:{i}": Track(rng.choice([*zones, None])) for i in range(a.people)}
    owner = {f"tag:{i}": i for i in range(0, a.people, 4)}  # a quarter enrolled
    layout = Layout("stores", "s1", "s1", "homeassistant", "stores/s1/gateways/gw/status")
    pub = OccupancyPublisher(layout, zones, min_interval_s=1.0)
    t = 1_780_300_800.0
    pub.announce(t)
    steps = 100 if a.quick else 600
    changes = sent = 0
    last: dict[str, int] = {}
    cpu = wall = 0.0
    keys = list(tracks)
    for _ in range(steps):
        t += 0.1
        for key in rng.sample(keys, a.people // 10):
            tracks[key].zone = rng.choice([*zones, None])
        c0, w0 = time.process_time(), time.perf_counter()
        counts, where = occupancy(tracks.items(), owner.get)
        out = pub.update(counts, where, t)
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        changes += sum(1 for z in zones if counts.get(z, 0) != last.get(z, 0))
        last = {z: counts.get(z, 0) for z in zones}
        sent += sum(1 for topic, _, _ in out if topic.endswith("/count"))
    result = {"people": a.people, "zones": a.zones, "steps": steps, "virtual_s": round(steps * 0.1, 1),
              "cpu_us_per_step": round(cpu / steps * 1e6, 1), "wall_us_per_step": round(wall / steps * 1e6, 1),
              "count_changes": changes, "count_messages": sent,
              "messages_per_zone_s": round(sent / (a.zones * steps * 0.1), 2)}
    print(f"{a.people} people, {a.zones} zones, {steps} steps of 0.1 s: {result['cpu_us_per_step']} us CPU "
          f"({result['wall_us_per_step']} us wall) per step; {changes} count changes -> {sent} count messages "
          f"({result['messages_per_zone_s']} per zone per second)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
