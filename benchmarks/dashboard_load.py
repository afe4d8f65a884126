"""The dashboard's first load: the bytes a tablet fetches to show the store page, plain and gzipped.

A gateway (Runtime, uvicorn on loopback, SQLite) with the demo store's floor plan and receivers; one
client signs in with a one-time link and fetches what the store page loads (the HTML, its stylesheet
and its script; the live stream is not counted). The issue's budget: at most 300 KB compressed.

    .venv/bin/python benchmarks/dashboard_load.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import tempfile
import time
from pathlib import Path

import httpx

from gateway.app.config import Settings, example
from gateway.app.runtime import Runtime
from gateway.app.scenarios import apply_scenario
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the same run (it is quick already)")
    parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(first_load(Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
