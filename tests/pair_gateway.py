"""One of two gateways for one store, on one PostgreSQL, for the two-gateway test.

``python -m tests.pair_gateway --db-url URL --port P --data-dir DIR --beacons N`` takes the store's
lease the way ``gateway run`` does (:class:`gateway.storage.lease.Lease`), printing ``STANDBY`` while
another process holds it and ``LEADER`` once it is ours; then it runs like tests/crash_gateway.py:
Runtime and real uvicorn, the customer enrolled once, ``READY <profile id> <token>``, and, once her
stream has a listener, her N tags walked into the shop at the scanner boundary (one notification per
tag per run), ``DONE`` after the last.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from beacons.scanner import InjectionScanner
from gateway.app.runtime import Runtime
from gateway.storage.lease import Lease
from tests.crash_gateway import CAMPAIGN, settings_for, walk_in


async def main(args: argparse.Namespace) -> None:
    settings = settings_for("unused", args.port, args.data_dir, args.beacons)
    settings.database.url = args.db_url
    lease = Lease(args.db_url, settings.store.id, poll_s=0.2)
    await lease.acquire(None, lambda: print("STANDBY", flush=True))
    print("LEADER", flush=True)
    camp = settings.campaigns.dir
    from pathlib import Path

    Path(camp).mkdir(parents=True, exist_ok=True)
    (Path(camp) / "pair.yaml").write_text(CAMPAIGN)
    scanner = InjectionScanner()
    rt = Runtime(settings, scanner=scanner, on_outcome=None, tick_s=0.2)
    await rt.start()
    await walk_in(rt, scanner, args.beacons, "pair")
    await lease.watch()  # serve until killed (or the lease is lost)
    await rt.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--db-url", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--beacons", type=int, default=30)
    try:
        asyncio.run(main(parser.parse_args()))
    except KeyboardInterrupt:
        sys.exit(0)
