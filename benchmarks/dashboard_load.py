"""The dashboard's first load: the bytes a tablet fetches to show the store page, plain and gzipped.

A gateway (Runtime, uvicorn on loopback, SQLite) with the demo store's floor plan and receivers; one
client signs in with a one-time link and fetches what the store page loads (the HTML, its stylesheet
and its script; the live stream is not counted). The issue's budget: at most 300 KB compressed.

Then what open dashboards cost the BLE path: the BLE benchmark's stream (``benchmarks/ble_pipeline.py``:
1,000 tags at 10 Hz, about 11,000 adverts a second, 10 % enrolled, four receivers) played in real time
through a live Runtime (its worker thread, and the API on the same event loop), pinned to one core as a Pi's
gateway shares it, in slices without any dashboard open and with ``--open`` (20) store pages each holding
its live stream (another process, on the other core, reads them: only the server's side is counted). The
slices take turns (A B B A ...), so a busy machine slows both alike. What the pages take is the share of
the core they add: at saturation that is the throughput the pipeline loses. The issue's budget: 5 %. The
pages run on the event loop and the pipeline on its worker thread, whose work varies from slice to slice
with the people in it, so ``cost_pct`` is the loop thread's added share (``process_cost_pct``, the whole
process's, is given beside it).

    .venv/bin/python benchmarks/dashboard_load.py [--quick] [--open N] [--slice S] [--rounds N]

The last line is one JSON object: the first load's bytes (``first_load_gzip_bytes``, ``ratio`` to the
budget), and ``stream``: the gateway's share of its core without and with the pages open, ``cost_pct``
(their difference), CPU microseconds per advert both ways, and the live events the pages received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the BLE benchmark's stream, generated the same way

import ble_pipeline as ble

from gateway.app.config import Settings, StoreSettings, example
from gateway.app.runtime import Runtime
from gateway.app.scenarios import apply_scenario
from gateway.clock import VirtualClock
from gateway.presence.settings import ReceiverSettings, ZoneBand
from gateway.storage.db import Database
from simulators.scenario import load_scenario

BUDGET_BYTES = 300_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def first_load(tmp: Path) -> dict[str, object]:
    s = apply_scenario(Settings(), load_scenario(example("examples/store.yaml")))
    s.data_dir = str(tmp)
    s.database.url = f"sqlite:///{tmp / 'gw.db'}"
    s.api.host, s.api.port = "127.0.0.1", free_port()
    s.mqtt.enabled = False
    s.campaigns.dir = str(tmp)
    rt = Runtime(s, on_outcome=None)
    await rt.start()
    try:
        base = f"http://127.0.0.1:{s.api.port}"
        sizes: dict[str, dict[str, int]] = {}
        t0 = time.perf_counter()
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            link = rt.dashboard.login_link(base)
            page = await c.get(link, follow_redirects=True)
            page.raise_for_status()
            assets = re.findall(r'(?:href|src)="(/dashboard/static/[^"]+)"', page.text)
            for name, path in [("html", "/dashboard"), *((a.split("/")[-1].split("?")[0], a) for a in assets)]:
                sizes[name] = {}
                for enc in ("identity", "gzip"):
                    # httpx decodes gzip: count the bytes on the wire from the raw stream
                    async with c.stream("GET", path, headers={"Accept-Encoding": enc}) as r:
                        r.raise_for_status()
                        sizes[name][enc] = sum([len(b) async for b in r.aiter_raw()])
        wall = time.perf_counter() - t0
    finally:
        await rt.stop()
    plain = sum(v["identity"] for v in sizes.values())
    packed = sum(v["gzip"] for v in sizes.values())
    return {"first_load_bytes": plain, "first_load_gzip_bytes": packed, "budget_bytes": BUDGET_BYTES,
            "ratio": round(packed / BUDGET_BYTES, 4), "requests": len(sizes), "files": sizes,
            "zones": len(s.zones), "receivers": len(s.receivers), "wall_s": round(wall, 3)}


async def read_streams(base: str, links: list[str]) -> None:
    """The open pages (run in their own process): each signs in with its link and holds the store page's
    live stream, counting its events; "ready" once every stream has sent its first view, the counts when
    stdin closes."""
    counts = [0] * len(links)
    started = [asyncio.Event() for _ in links]

    async def one(i: int, link: str) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=None) as c:
            signed_in = await c.get(link)  # the one-time link: its redirect sets the session cookie
            if signed_in.status_code != 303:
                raise SystemExit(f"the sign-in link answered {signed_in.status_code}")
            async with c.stream("GET", "/dashboard/stream") as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("event: live"):
                        counts[i] += 1
                        started[i].set()

    tasks = [asyncio.create_task(one(i, link)) for i, link in enumerate(links)]
    waiter = asyncio.gather(*(e.wait() for e in started))
    done, _ = await asyncio.wait({waiter, *tasks}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        for t in done:
            t.result()  # a stream that failed says why
        raise SystemExit("the dashboards' streams did not start within 30 s")
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the benchmark closes our stdin
    for t in tasks:
        t.cancel()
    print(json.dumps({"events": sum(counts), "per_page": counts}), flush=True)


class Pages:
    """``n`` open dashboards in a child process, on the other core when there is one."""

    def __init__(self, base: str, links: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--read-streams", base], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n".join(links) + "\n\n")
        self.proc.stdin.flush()
        self.line = ""

    async def ready(self) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.to_thread(self.proc.stdout.readline)
        if line.strip() != "ready":
            raise SystemExit(f"the dashboards did not open: {line!r}")

    async def close(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        out = await asyncio.to_thread(self.proc.stdout.read)
        await asyncio.to_thread(self.proc.wait, 30)
        return int(json.loads(out.strip().splitlines()[-1])["events"])


def pin(cpu_index: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[cpu_index % len(cpus)]})


async def stream_cost(tmp: Path, n_open: int, slice_s: int, n_tags: int, n_profiles: int, rounds: int,
                      seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    tags = ble.make_tags(n_tags, rng)
    warm_s = max(2, slice_s)
    seconds = warm_s + 2 * rounds * slice_s
    batches = [b for b in ble.make_stream(tags, seconds * 12 * n_tags, seed, 10) if b][:seconds]
    url = f"sqlite:///{tmp / 'stream.db'}"
    db = Database(url)
    try:
        db.upgrade()
        enrolled = ble.load_profiles(db, n_profiles, tags, rng)
    finally:
        db.dispose()
    s = Settings(store=StoreSettings(timezone="Europe/London"),
                 receivers=[ReceiverSettings(id=rx, zones=[ZoneBand(name=z, max_m=m)],
                                             measured_power=ble.MEASURED_POWER) for rx, (z, m) in ble.ZONES.items()])
    s.data_dir = str(tmp)
    s.database.url = url
    s.api.host, s.api.port = "127.0.0.1", free_port()
    s.mqtt.enabled = False
    s.campaigns.dir = str(ble.EXAMPLES)
    clock = VirtualClock(batches[0][0].time - 1)
    rt = Runtime(s, clock=clock, on_outcome=None)
    await rt.start()
    base = f"http://127.0.0.1:{s.api.port}"

    async def play(part: list[list[Any]]) -> None:
        """The stream in real time, as a shop's receivers hear it: each second's adverts at that second."""
        start = time.perf_counter()
        for k, batch in enumerate(part):
            await asyncio.sleep(max(0.0, start + k - time.perf_counter()))
            clock.set(max(clock.now(), batch[-1].time))
            rt.inject(batch)
            rt.tick()
            await rt.flush()
        await asyncio.sleep(max(0.0, start + len(part) - time.perf_counter()))

    # The first seconds warm up (caches, the database's pages, the first visits), unmeasured; then slices,
    # alternately without and with the pages open: A B B A A B B A ...
    warm, rest = batches[:warm_s], batches[warm_s:]
    slices = [rest[i * slice_s:(i + 1) * slice_s] for i in range(2 * rounds)]
    spent = {False: [0, 0.0, 0.0, 0.0], True: [0, 0.0, 0.0, 0.0]}  # adverts, wall s, process CPU s, loop CPU s
    events = 0
    try:
        await play(warm)
        for i, part in enumerate(slices):
            opened = i % 4 in (1, 2)
            pages = Pages(base, [rt.dashboard.login_link(base) for _ in range(n_open)]) if opened else None
            if pages is not None:
                await pages.ready()
            t0, c0, l0 = time.perf_counter(), time.process_time(), time.thread_time()
            await play(part)
            wall, cpu, loop_cpu = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - l0
            row = spent[opened]
            row[0] += sum(len(b) for b in part)
            row[1] += wall
            row[2] += cpu
            row[3] += loop_cpu  # this coroutine runs on the loop: its thread's CPU is the API's and the pages
            if pages is not None:
                events += await pages.close()
        # One look of the store view (the presence snapshot, the receivers, its JSON), which the open pages
        # share once a second: its CPU time is what they cost the pipeline, per second, whatever their number.
        tracked = len(rt.pipeline.presence.tracks)
        c0 = time.process_time()
        for _ in range(50):
            json.dumps({"presence": rt.presence_now(), "receivers": rt.receivers_heard()}, default=list)
        look_ms = 1e3 * (time.process_time() - c0) / 50
    finally:
        await rt.stop()
    closed, opened_ = spent[False], spent[True]
    share = {k: v[2] / v[1] for k, v in spent.items()}  # the gateway's share of its one core
    loop_share = {k: v[3] / v[1] for k, v in spent.items()}  # the event loop's (API, pages, intake) share
    per_advert = {k: 1e6 * v[2] / v[0] for k, v in spent.items()}
    # At saturation the core is the pipeline's but for what the pages take: that share is the throughput lost.
    # The pages run on the event loop; the pipeline on its worker thread, whose work varies with the slice's
    # people (visits starting, campaigns deciding), so the loop's own share tells the pages' cost more steadily.
    cost = 100 * (loop_share[True] - loop_share[False])
    return {"open_dashboards": n_open, "adverts": closed[0] + opened_[0], "identities": n_tags,
            "enrolled": enrolled, "adverts_per_s": round((closed[0] + opened_[0]) / (closed[1] + opened_[1])),
            "core_share_closed_pct": round(100 * share[False], 2), "core_share_open_pct": round(100 * share[True], 2),
            "loop_share_closed_pct": round(100 * loop_share[False], 2),
            "loop_share_open_pct": round(100 * loop_share[True], 2),
            "cost_pct": round(cost, 2), "process_cost_pct": round(100 * (share[True] - share[False]), 2),
            "budget_pct": 5.0,
            "cpu_us_per_advert_closed": round(per_advert[False], 2),
            "cpu_us_per_advert_open": round(per_advert[True], 2),
            "live_events_received": events, "slices": len(slices), "slice_s": slice_s,
            "tracked_identities": tracked, "look_cpu_ms": round(look_ms, 3),
            # at most two shared looks per stream_every_s (1 s), however many pages are open
            "looks_core_share_max_pct": round(100 * (look_ms / 1e3) * 2 / rt.dashboard.stream_every_s, 3),
            "seconds": {"closed_wall": round(closed[1], 3), "closed_cpu": round(closed[2], 3),
                        "closed_loop_cpu": round(closed[3], 3), "open_wall": round(opened_[1], 3),
                        "open_cpu": round(opened_[2], 3), "open_loop_cpu": round(opened_[3], 3)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short stream (seconds), same keys")
    parser.add_argument("--open", type=int, default=20, help="dashboards open during the stream")
    parser.add_argument("--slice", type=int, default=None, help="seconds per slice (default 6)")
    parser.add_argument("--rounds", type=int, default=None, help="A B pairs of slices (default 4)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--read-streams", metavar="BASE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read_streams:
        pin(0)
        links = [line.strip() for line in iter(sys.stdin.readline, "\n") if line.strip()]  # up to a blank line
        asyncio.run(read_streams(args.read_streams, links))
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(first_load(Path(tmp)))
    pin(-1)
    slice_s = args.slice or (2 if args.quick else 6)
    rounds = args.rounds or (1 if args.quick else 4)
    with tempfile.TemporaryDirectory() as tmp:
        result["stream"] = asyncio.run(stream_cost(Path(tmp), args.open, slice_s, 200 if args.quick else 1000,
                                                   500 if args.quick else 10_000, rounds, args.seed))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
