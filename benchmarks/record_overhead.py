"""What recording costs the advert hot path: ``Pipeline.ingest_adverts`` with and without a TraceRecorder.

The real Pipeline (parse -> guard -> presence; no profile is enrolled in its identity index, so no drain
reaches the database) on a stream of 300 tags at 10 Hz, each heard by two of four receivers (about
6,000 adverts a second), in 0.1 s drains, with a tick (which flushes the recording) every 0.5 s of
stream time. A tenth of the tags count as enrolled for the recorder (written as they are), the rest are
hashed per file. The two variants run alternately, ``--rounds`` times each, each on a fresh Pipeline;
the best round of each is kept. The stream is generated before any clock starts.

    .venv/bin/python benchmarks/record_overhead.py [--seconds S] [--rounds N] [--quick]

The last line printed is one JSON object: adverts, us_per_advert_off / _on (best rounds),
overhead_pct, recorded_rows, bytes_per_row.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beacons.encode import ibeacon_payload
from beacons.types import Advertisement
from gateway.app.config import Settings
from gateway.app.pipeline import Pipeline
from gateway.campaigns.model import CampaignIndex
from gateway.presence.record import TraceRecorder
from gateway.presence.settings import ReceiverSettings, ZoneBand
from gateway.profiles.identity import IdentityIndex
from gateway.storage.db import Database


def uuid(tag: int) -> str:
    """One uuid per tag: tags sharing a uuid (one vendor, many minors) would be the guard's uuid flood."""
    return f"f7826da6-4fa2-4e98-8024-{tag:012x}"

T0 = 1_780_300_800.0
TAGS, RATE, DRAIN_S, TICK_S = 300, 10, 0.1, 0.5
RECEIVERS = ("rx-1", "rx-2", "rx-3", "rx-4")


def stream(seconds: float, rng: random.Random) -> list[list[Advertisement]]:
    """The adverts in drains: each tag near one receiver (drifting RSSI), heard by it and a neighbour."""
    payloads = [ibeacon_payload(uuid(m), 1, 1) for m in range(TAGS)]
    home = [rng.randrange(len(RECEIVERS)) for _ in range(TAGS)]
    drains: list[list[Advertisement]] = []
    per_drain = int(RATE * DRAIN_S)
    for d in range(int(seconds / DRAIN_S)):
        t = T0 + d * DRAIN_S
        batch = []
        for k in range(per_drain):
            for tag in range(TAGS):
                at = t + (k + tag / TAGS) / RATE
                near, far = RECEIVERS[home[tag]], RECEIVERS[(home[tag] + 1) % len(RECEIVERS)]
                addr = f"02:00:00:00:{tag >> 8:02X}:{tag & 255:02X}"
                batch.append(Advertisement(addr, -55 - rng.randrange(10), at, near, payloads[tag]))
                batch.append(Advertisement(addr, -80 - rng.randrange(10), at + 0.002, far, payloads[tag]))
        drains.append(batch)
    return drains


def settings(tmp: Path) -> Settings:
    s = Settings()
    s.data_dir = str(tmp)
    s.database.url = f"sqlite:///{tmp / 'gw.db'}"
    s.receivers = [ReceiverSettings(id=r, zones=[ZoneBand(f"zone-{r}", 3.0)], measured_power=-59) for r in RECEIVERS]
    return s


def run(drains: list[list[Advertisement]], tmp: Path, record: bool) -> tuple[float, int, int]:
    """CPU seconds through the pipeline; rows and bytes recorded."""
    s = settings(tmp)
    db = Database(s.database.url)
    enrolled = {f"ibeacon:{uuid(m)}:1:1" for m in range(0, TAGS, 10)}
    out = tmp / ("on" if record else "off")
    recorder = TraceRecorder(out, known=enrolled.__contains__) if record else None
    p = Pipeline(s, db, CampaignIndex([]), IdentityIndex(), recorder=recorder)
    ingest, presence = p.ingest_adverts, p.presence
    next_tick = T0 + TICK_S
    t0 = time.process_time()
    for batch in drains:
        ingest(batch)
        if batch[-1].time >= next_tick:  # the runtime's tick: presence timers and the recording's flush
            presence.tick(next_tick)
            if recorder is not None:
                recorder.flush()
            next_tick += TICK_S
    if recorder is not None:
        recorder.close()
    cpu = time.process_time() - t0
    db.dispose()
    files = sorted(out.glob("trace-*.csv")) if record else []
    rows = sum(f.read_text().count("\n") - 1 for f in files)
    return cpu, rows, sum(f.stat().st_size for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="stream time (default 20 s: 120,000 adverts)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 s of stream, one round (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds = 2.0, 1
    drains = stream(args.seconds, random.Random(7))
    adverts = sum(len(b) for b in drains)
    best = {False: float("inf"), True: float("inf")}
    rows = size = 0
    for i in range(args.rounds):
        for record in (False, True):
            with tempfile.TemporaryDirectory() as d:
                cpu, r, b = run(drains, Path(d), record)
            best[record] = min(best[record], cpu)
            if record:
                rows, size = r, b
            print(f"round {i + 1} {'on ' if record else 'off'}: {cpu / adverts * 1e6:.2f} us/advert", file=sys.stderr)
    off, on = best[False] / adverts * 1e6, best[True] / adverts * 1e6
    print(json.dumps({"adverts": adverts, "us_per_advert_off": round(off, 3), "us_per_advert_on": round(on, 3),
                      "overhead_pct": round((on - off) / off * 100, 1), "recorded_rows": rows,
                      "bytes_per_row": round(size / rows, 1) if rows else None}))


if __name__ == "__main__":
    main()
