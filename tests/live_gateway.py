"""A live gateway for tests: Runtime with a real uvicorn on a free loopback port, SQLite, virtual time.

One ``enter`` campaign on a single-zone shop, so a handful of injected adverts of an enrolled beacon
commit and dispatch one notification through the real engine and outbox.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from beacons.encode import ibeacon_payload
from beacons.types import Advertisement
from gateway.app.config import Settings
from gateway.app.runtime import Runtime
from gateway.clock import Clock, VirtualClock
from gateway.presence.settings import ReceiverSettings, ZoneBand
from gateway.profiles.service import NewProfile
from gateway.storage.models import Notification
from tests.fixtures import RuntimeFactory, runtime_settings

T0 = 1_780_300_800.0  # 2026-06-01 08:00 UTC
ADMIN_KEY = "live-admin-key-0123456789abcdef"
UUID = "f7826da6-4fa2-4e98-8024-bc5b71e0893e"
ENTER = """\
id: welcome
name: Welcome in
purpose: offers
trigger: {type: enter, zone: shop}
action: {title: "Welcome {profile.name}", body: "A coffee on us at the till."}
"""


def beacon(minor: int) -> str:
    return f"ibeacon:{UUID}:1:{minor}"


def live_settings(tmp: Path, campaigns: str = ENTER) -> Settings:
    camp = tmp / "campaigns"
    camp.mkdir(parents=True, exist_ok=True)
    if campaigns:
        (camp / "campaign.yaml").write_text(campaigns)
    s = runtime_settings(tmp)
    s.api.admin_key = ADMIN_KEY
    s.api.heartbeat_s = 30.0
    s.campaigns.dir = str(camp)
    s.presence.enter_hold_s = 0.0
    s.engine.caps = []
    s.receivers = [ReceiverSettings(id="rx", zones=[ZoneBand("shop", 50.0)], measured_power=-59)]
    return s


def walk_in(minor: int, t: float, n: int = 8, address: str | None = None) -> list[Advertisement]:
    """n adverts of beacon 1:<minor>, 0.1 s apart from t: enough for the guard and an ``enter``."""
    payload = ibeacon_payload(UUID, 1, minor)
    addr = address or f"02:00:00:00:{minor >> 8:02X}:{minor & 255:02X}"
    return [Advertisement(addr, -55, t + i * 0.1, "rx", payload) for i in range(n)]


def enrol(rt: Runtime, name: str, minor: int) -> tuple[int, str]:
    """A profile with the offers consent and beacon 1:<minor>; returns (profile id, app token)."""
    pid = rt.service.create_profile(NewProfile(external_id=name, name=name, identifiers=[("beacon", beacon(minor))],
                                               consents={"offers": True}))["id"]
    return pid, rt.service.issue_token(pid)[0]


def insert_notifications(rt: Runtime, profile_id: int, keys: list[str], status: str = "pending",
                         **extra: Any) -> list[int]:
    """Committed outbox rows (as the engine leaves them), for tests of what happens after the commit."""
    with rt.db.session() as s:
        ids = s.execute(insert(Notification).returning(Notification.id), [
            {"profile_id": profile_id, "campaign_id": "c", "purpose": "offers", "dedup_key": f"test:{k}",
             "title": f"n {k}", "body": "b", "data": {}, "created_at": rt.clock.now(), "status": status, **extra}
            for k in keys]).scalars().all()
    return list(ids)


@asynccontextmanager
async def running(settings: Settings, clock: Clock | None = None, **kwargs: Any) -> AsyncIterator[Runtime]:
    """``runtime_factory`` as a context manager, for a test that scopes its runtime to a block."""
    factory = RuntimeFactory(clock or VirtualClock(T0))
    try:
        yield await factory(settings, **kwargs)
    finally:
        await factory.stop_all()


def base_url(rt: Runtime) -> str:
    return f"http://127.0.0.1:{rt.settings.api.port}"
