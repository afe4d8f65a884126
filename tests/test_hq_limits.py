"""Cross-store limits on real parts: two store gateways (Runtimes in virtual time, each with its own SQLite and
its MQTT intake and uplink on one central Mosquitto, both connected) and head office's consumer on a fresh
PostgreSQL. A customer the stores share (the same external id) gets the shoes offer at the first store; the
send goes up, head office republishes it down, and the second store's engine counts it: the same campaign
on the same day at the second store is held by its cooldown. A customer only the second store has seen
gets the offer there, so the second store's engine does fire."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import select

from devices.mqtt import MqttIntake, settings_from_config
from gateway.app.config import CampaignSettings, DatabaseSettings, HqSettings, MqttSettings, Settings, StoreSettings
from gateway.app.runtime import Runtime
from gateway.hq.consumer import HqConsumer
from gateway.presence.tracker import PresenceEvent
from gateway.profiles.service import NewProfile
from gateway.storage.db import Database
from gateway.storage.models import Decision, Notification
from tests.conftest import MosquittoServer
from tests.fixtures import RuntimeFactory
from tests.test_hq_bridge import hq_db  # noqa: F401  # the fixture: a fresh PostgreSQL for head office

TZ = "Europe/Paris"
T0 = dt.datetime(2026, 6, 1, 10, 0, tzinfo=ZoneInfo(TZ)).timestamp()
PREFIX = "chainlimits"
OFFER = """id: shoes-offer
purpose: offers
trigger: {type: enter, zone: shoes}
action: {title: 10 % off, body: today}
limits: {cooldown_s: 86400}
"""


def tag(name: str) -> str:
    return f"ibeacon:8f3c0a52-6d1e-4b7a-9c2d-5e4f3a2b1c00:7:{sum(map(ord, name))}"


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    """A bounded poll that leaves the loop free (the stores' intakes hand their messages over on it)."""
    for _ in range(int(timeout * 20)):
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def store(factory: RuntimeFactory, tmp_path: Path, sid: str, broker: MosquittoServer) -> Runtime:
    (tmp_path / sid).mkdir()
    (tmp_path / sid / "shoes.yaml").write_text(OFFER)
    settings = Settings(store=StoreSettings(id=sid, timezone=TZ),
                        database=DatabaseSettings(url=f"sqlite:///{tmp_path}/{sid}.db"),
                        mqtt=MqttSettings(host=broker.host, port=broker.port, topic_prefix=PREFIX,
                                          client_id=f"gw-{sid}-{broker.port}"),
                        campaigns=CampaignSettings(dir=str(tmp_path / sid)),
                        hq=HqSettings(uplink=True, interval_s=0.1), data_dir=str(tmp_path / f"{sid}-data"))
    intake = MqttIntake(settings_from_config(settings.mqtt, sid))
    rt = await factory(settings, mqtt=intake, serve_api=False)
    assert await intake.wait_connected(10)
    return rt


async def enter_shoes(rt: Runtime, who: str, t: float) -> None:
    await rt._run(rt.pipeline.handle_presence, [PresenceEvent("visit_start", tag(who), t, "shoes", t, t),
                                                PresenceEvent("enter", tag(who), t, "shoes", t, t)])


def decisions(db: Database, store_id: str) -> list[tuple[str, bool, str]]:
    with db.session() as s:
        return [(r.event_key, r.fired, r.reason) for r in s.scalars(
            select(Decision).where(Decision.store_id == store_id, Decision.campaign_id == "shoes-offer")
            .order_by(Decision.id))]


async def test_the_same_campaign_in_two_stores_on_one_day_sends_once(
        tmp_path: Path, mosquitto: MosquittoServer, hq_db: Database,  # noqa: F811
        runtime_factory: RuntimeFactory) -> None:
    hq = HqConsumer(hq_db, mosquitto.host, mosquitto.port, PREFIX, f"hq-limits-{mosquitto.port}")
    hq.start()
    try:
        assert await asyncio.to_thread(hq.subscribed.wait, 10)
        north = await store(runtime_factory, tmp_path, "north", mosquitto)
        south = await store(runtime_factory, tmp_path, "south", mosquitto)
        for rt in (north, south):  # the customer the chain knows, enrolled at both stores
            rt.service.create_profile(NewProfile(external_id="c-1", consents={"offers": True},
                                                 identifiers=[("beacon", tag("dana"))]))
        south.service.create_profile(NewProfile(external_id="c-2", consents={"offers": True},
                                                identifiers=[("beacon", tag("eve"))]))

        await enter_shoes(north, "dana", T0)
        assert [fired for _, fired, _ in decisions(north.db, "north")] == [True]

        def south_heard() -> bool:
            with south.db.session() as s:
                return s.scalar(select(Notification.id).where(Notification.store_id == "north")) is not None
        assert await wait_until(south_heard), "head office's send never reached the south store"

        await enter_shoes(south, "dana", T0 + 3600)  # an hour later, the same day, the other store
        await enter_shoes(south, "eve", T0 + 3700)
        [(_, dana_fired, dana_reason), (_, eve_fired, _)] = decisions(south.db, "south")
        assert (dana_fired, dana_reason) == (False, "cooldown")
        assert eve_fired
        with south.db.session() as s:  # south sent once (to eve), and the north send it holds is not live
            own = s.scalars(select(Notification).where(Notification.store_id == "south")).all()
            theirs = s.scalars(select(Notification).where(Notification.store_id == "north")).all()
        assert len(own) == 1 and [n.status for n in theirs] == ["acked"]
    finally:
        hq.stop()
