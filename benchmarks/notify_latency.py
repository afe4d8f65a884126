"""Advertisement to phone: from the advert injected at the scanner boundary to the SSE event in a client.

One gateway process (Runtime, InjectionScanner, uvicorn on loopback, SQLite) tracks 1,000 people
(a background stream of adverts: each person once a second, anonymous, distinct identities) while
enrolled customers walk in one after another; an ``enter`` campaign sends each a notification.
Their SSE streams are read by a client in another process (raw sockets), so its work does not sit
on the server's loop. A notification's ``created_at`` is the time of the advert that completed the
``enter`` (the adverts carry wall-clock time), so latency = receipt time - created_at, on one machine.
Goal: p99 <= 25 ms.

    .venv/bin/python benchmarks/notify_latency.py [--people 1000] [--notifications 300] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _notify_common import UUID, bench_settings, enrol_many, free_port, open_streams, raise_fd_limit

TICK_S = 0.01
ADVERTS_TO_ENTER = 12  # ticks of a customer's adverts (3 each): the guard (3 sightings), the filter's looks
NEW_CUSTOMER_EVERY = 3  # ticks
GOAL_P99_MS = 25.0  # the issue's anchor (iOS region monitoring takes 10-30 s to report an exit)


def client(port: int, tokens: list[str], conn: Connection) -> None:
    raise_fd_limit(len(tokens) + 256)

    async def run() -> list[float]:
        streams, tasks = await open_streams(port, tokens)
        conn.send(sum(1 for s in streams if not s.failed))
        await asyncio.wait(tasks, timeout=120)
        for s in streams:
            s.close()
        return [(t - data["created_at"]) * 1000 for s in streams for t, data in s.events]

    conn.send(asyncio.run(run()))


def background_uuid(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-00000000beef"


async def bench(people: int, notifications: int, warmup_s: float = 4.0) -> dict[str, Any]:
    from beacons.encode import ibeacon_payload
    from beacons.scanner import InjectionScanner
    from beacons.types import Advertisement
    from gateway.app.runtime import Runtime

    raise_fd_limit(notifications * 2 + 1024)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        scanner = InjectionScanner()
        rt = Runtime(bench_settings(Path(tmp), port), scanner=scanner, on_outcome=None, tick_s=0.5)
        await rt.start()
        try:
            pids = enrol_many(rt.db, notifications, time.time())
            with rt.db.session() as s:
                rt.identities.load(s)
            tokens = [rt.service.issue_token(pid)[0] for pid in pids]
            ours, theirs = mp.get_context("spawn").Pipe()
            proc = mp.get_context("spawn").Process(target=client, args=(port, tokens, theirs), daemon=True)
            proc.start()
            connected = await asyncio.to_thread(ours.recv)
            if connected != notifications:
                raise SystemExit(f"only {connected} of {notifications} streams connected")

            crowd = [ibeacon_payload(background_uuid(i), 7, 7) for i in range(people)]
            customers = [ibeacon_payload(UUID, 1, i) for i in range(notifications)]
            per_tick = max(1, round(people * TICK_S))  # each person once a second
            # The crowd is in the shop, past the flood guard (3 sightings, one a second), before anyone is measured.
            warmup_ticks = int(warmup_s / TICK_S)
            walk_ticks = (notifications + ADVERTS_TO_ENTER) * NEW_CUSTOMER_EVERY
            cursor = 0
            tracked_samples: list[int] = []  # identities the tracker holds, sampled while measuring
            for tick in range(warmup_ticks + walk_ticks):
                now = time.time()
                batch = []
                for _ in range(per_tick):
                    i = cursor % people
                    cursor += 1
                    batch.append(Advertisement(f"06:00:00:00:{i >> 8:02X}:{i & 255:02X}", -70, now, "rx", crowd[i]))
                t = tick - warmup_ticks
                if t >= 0:
                    tracked_samples.append(len(rt.pipeline.presence.tracks))
                    newest = t // NEW_CUSTOMER_EVERY
                    for c in range(max(0, newest - ADVERTS_TO_ENTER + 1), min(newest + 1, notifications)):
                        # Walking in: the RSSI rises (each few dB is a fresh look for the presence filter).
                        rssi = min(-50, -86 + 3 * (t - c * NEW_CUSTOMER_EVERY))
                        batch.append(Advertisement(f"02:00:00:00:{c >> 8:02X}:{c & 255:02X}", rssi, now, "rx",
                                                   customers[c]))
                scanner.inject(batch)
                await asyncio.sleep(TICK_S)
            await rt.flush()
            fired = rt.pipeline.engine.counts.get("fired", 0)
            counts = dict(rt.pipeline.engine.counts)
            latencies = await asyncio.wait_for(asyncio.to_thread(ours.recv), 150)
            proc.join(timeout=10)
        finally:
            await rt.stop()
    if len(latencies) < 2:
        raise SystemExit(f"only {len(latencies)} notifications arrived ({fired} fired; decisions {counts})")
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    # ``people``: what the tracker really held while latencies were measured (the crowd and the customers
    # walking in), not the number asked for; the fewest seen, so the figure never flatters the load.
    p99 = round(q[98], 2)
    return {"people": min(tracked_samples), "people_median": int(statistics.median(tracked_samples)),
            "people_requested": people, "notifications": len(latencies), "expected": notifications,
            "p50_ms": round(statistics.median(latencies), 2), "p99_ms": p99, "max_ms": round(max(latencies), 2),
            "goal_p99_ms": GOAL_P99_MS, "ratio": round(p99 / GOAL_P99_MS, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=1000, help="tracked people in the background")
    parser.add_argument("--notifications", type=int, default=300, help="customers walking in, one notification each")
    parser.add_argument("--quick", action="store_true", help="200 people, 20 notifications, 3.5 s warm-up")
    args = parser.parse_args()
    people, n, warmup = (200, 20, 3.5) if args.quick else (args.people, args.notifications, 4.0)
    result = asyncio.run(bench(people, n, warmup))
    print(f"{result['notifications']} notifications with {result['people']} people tracked: "
          f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, max {result['max_ms']} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
