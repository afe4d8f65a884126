"""A gateway process for the kill -9 test: Runtime, real uvicorn, SQLite, and a deterministic store.

``python -m tests.crash_gateway --db D --port P --data-dir DIR --beacons N`` enrols one customer
carrying N beacon tags (once: a restart finds her in the database), prints
``READY <profile id> <token>`` and, as soon as her stream has a listener, walks the tags into the
shop one after another (enter_hold 0, fast looks, 20 adverts each, 20 ms apart) at the scanner
boundary. Each tag has its own zone and its ``enter`` fires the campaign: one notification per tag per
run. ``DONE`` follows the last.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from beacons.encode import ibeacon_payload
from beacons.scanner import InjectionScanner
from beacons.types import Advertisement
from gateway.app.config import Settings
from gateway.app.runtime import Runtime
from gateway.presence.settings import ReceiverSettings, ZoneBand
from gateway.profiles.service import NewProfile

UUID = "f7826da6-4fa2-4e98-8024-bc5b71e0893e"
CAMPAIGN = """\
id: crash-enter
name: One per tag that enters
purpose: offers
trigger: {type: enter}
action: {title: "Welcome tag", body: "You entered the shop."}
"""
ADVERTS_PER_TAG = 20  # the guard's stable_after (3), and 0.4 s: more than one of the HMM tracker's 0.25 s steps
STEP_S = 0.02  # a tag walks in about every step: the run lasts a few seconds, long enough to be killed


def beacon_key(minor: int) -> str:
    return f"ibeacon:{UUID}:1:{minor}"


def settings_for(db: str, port: int, data_dir: str, beacons: int) -> Settings:
    s = Settings()
    s.data_dir = data_dir
    s.database.url = f"sqlite:///{db}"
    s.api.port = port
    s.api.admin_key = "crash-admin-key-0123456789"
    s.api.token_secret = "crash-test-token-secret"  # so a token outlives the process
    s.api.heartbeat_s = 1.0
    s.campaigns.dir = str(Path(data_dir) / "campaigns")
    s.presence.enter_hold_s = 0.0
    s.presence.fade_time_s = 0.05  # every advert is a strong look: a tag is entered within one step
    s.engine.caps = []  # one notification per tag: no frequency cap in the way
    # One customer carries every tag; presence merges one profile's stays per zone, so each tag walks
    # into its own zone (a receiver each) and each enter is a stay of its own.
    s.receivers = [ReceiverSettings(id=f"rx-{i}", zones=[ZoneBand(f"shop-{i}", 50.0)], measured_power=-59)
                   for i in range(beacons)]
    return s


async def walk_in(rt: Runtime, scanner: InjectionScanner, beacons: int, who: str) -> None:
    """The customer enrolled once (a restart finds her), ``READY <profile id> <token>``, and once her stream
    has a listener, her tags walked into the shop one after another; ``DONE`` after the last."""
    found = rt.identities.beacon(beacon_key(0))
    if found is None:
        tags = [("beacon", beacon_key(i)) for i in range(beacons)]
        found = rt.service.create_profile(NewProfile(external_id=who, name=f"{who.title()} Test", identifiers=tags,
                                                     consents={"offers": True}))["id"]
    print(f"READY {found} {rt.service.issue_token(found)[0]}", flush=True)
    for _ in range(3000):  # bounded: the test connects within seconds
        if rt.hub.listeners(found):
            break
        await asyncio.sleep(0.01)
    payloads = [ibeacon_payload(UUID, 1, i) for i in range(beacons)]
    for step in range(beacons + ADVERTS_PER_TAG):
        now = time.time()
        scanner.inject(Advertisement(f"02:00:00:00:{i >> 8:02X}:{i & 255:02X}", -55, now, f"rx-{i}", payloads[i])
                       for i in range(max(0, step - ADVERTS_PER_TAG + 1), min(step + 1, beacons)))
        await asyncio.sleep(STEP_S)
    await rt.flush()
    print("DONE", flush=True)


async def main(args: argparse.Namespace) -> None:
    camp = Path(args.data_dir) / "campaigns"
    camp.mkdir(parents=True, exist_ok=True)
    (camp / "crash.yaml").write_text(CAMPAIGN)
    scanner = InjectionScanner()
    rt = Runtime(settings_for(args.db, args.port, args.data_dir, args.beacons), scanner=scanner, on_outcome=None,
                 tick_s=0.2)
    await rt.start()
    await walk_in(rt, scanner, args.beacons, "crash")
    await asyncio.Event().wait()  # serve until killed


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--beacons", type=int, default=150)
    try:
        asyncio.run(main(parser.parse_args()))
    except KeyboardInterrupt:
        sys.exit(0)
