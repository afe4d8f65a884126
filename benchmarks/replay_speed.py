"""Replay speed: sightings per CPU second through `gateway replay`'s path (read the trace CSV, track).

The trace is the store layout of ``benchmarks/presence_quality.py`` (the simulator's crowd, 10 Hz
adverts, loss and fading), written to a trace CSV once; then it is read alone (the parser's share)
and replayed through the tracker as ``gateway replay`` does. The issue's goal: 200,000 sightings per
second on one core.

Usage: ``.venv/bin/python benchmarks/replay_speed.py [--quick]``; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from presence_quality import START, bench_scenario, build_trace, receivers_of  # noqa: E402

from beacons.types import Sighting  # noqa: E402
from gateway.app.replay import replay_events  # noqa: E402
from gateway.presence.settings import PresenceSettings  # noqa: E402
from gateway.presence.traces import TraceWriter, open_trace  # noqa: E402
from simulators.store_sim import StoreSimulator  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 s of arrivals instead of an hour")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    duration = 300.0 if args.quick else 3600.0
    sc = bench_scenario(args.quick)
    sim = StoreSimulator(sc, start=START, seed=args.seed, duration_s=duration)
    steps = build_trace(sim, duration + 400.0, args.seed)
    receivers = receivers_of(sc)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.csv"
        with open(path, "w", newline="") as f:
            TraceWriter(f).write_many(Sighting(key, rx, rssi, round(t - START, 3), sc.radio.tx_power)
                                      for _, rows in steps for key, rx, rssi, t in rows)
        f2, reader = open_trace(path)
        cpu, wall = time.process_time(), time.perf_counter()
        with f2:
            n = sum(1 for _ in reader)
        parse_cpu, parse_wall = time.process_time() - cpu, time.perf_counter() - wall
        run = replay_events(path, PresenceSettings(), receivers)
    out = {
        "sightings": n,
        "events": len(run.events),
        "replay_cpu_s": round(run.cpu_s, 3),
        "replay_wall_s": round(run.wall_s, 3),
        "sightings_per_cpu_s": round(n / run.cpu_s),
        "parse_only_cpu_s": round(parse_cpu, 3),
        "parse_only_wall_s": round(parse_wall, 3),
        "parse_sightings_per_cpu_s": round(n / parse_cpu),
        "goal_sightings_per_cpu_s": 200_000,
        "quick": args.quick,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
