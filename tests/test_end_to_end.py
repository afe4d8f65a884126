"""The whole chain on real parts: Mosquitto, SQLite, uvicorn, an SSE client over TCP.

Simulated adverts enter at the scanner boundary (virtual time, no sleeping for the store to
happen); a simulated mower publishes over MQTT with paho; carts arrive over HTTP. One customer
with every consent must receive all three kinds of notification on her stream; customers
without consent for a purpose receive nothing for it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from beacons.scanner import InjectionScanner
from devices.mqtt import MqttIntake
from devices.mqtt import MqttSettings as IntakeSettings
from gateway.app.config import Settings
from gateway.app.scenarios import apply_scenario, enrol
from gateway.clock import VirtualClock
from gateway.storage.models import Decision, Notification
from simulators.carts import cart_upserts
from simulators.scenario import load_scenario
from simulators.store_sim import StoreSimulator
from simulators.wearables import MqttPublisher, TelemetryModel, payload, topic_for
from tests.conftest import free_port
from tests.sse import SseReader

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_780_300_800.0  # 2026-06-01 08:00 UTC


async def _until(predicate: Any, timeout: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)  # polling a condition another thread satisfies, not waiting for time
    return True


@pytest.fixture
def scenario():
    return load_scenario(ROOT / "examples/store.yaml")


async def test_store_to_phone_on_real_parts(mosquitto, scenario, tmp_path, runtime_factory):
    settings = apply_scenario(Settings(), scenario)
    settings.data_dir = str(tmp_path)
    settings.database.url = f"sqlite:///{tmp_path / 'gw.db'}"
    settings.api.port = free_port()
    settings.api.admin_key = "test-admin-key-0123456789"
    settings.campaigns.dir = str(ROOT / "examples/campaigns")
    settings.presence.dwell_every_s = 5.0
    clock = VirtualClock(T0)
    intake = MqttIntake(IntakeSettings(host=mosquitto.host, port=mosquitto.port, client_id="gw-e2e",
                                       store_id=scenario.store.id), clock=clock.now)
    scanner = InjectionScanner()
    rt = await runtime_factory(settings, clock=clock, scanner=scanner, mqtt=intake)
    readers: list[SseReader] = []
    publisher = MqttPublisher(mosquitto.host, mosquitto.port)
    try:
        assert await intake.wait_connected(10)
        ids = enrol(rt.service, scenario)
        base = f"http://127.0.0.1:{settings.api.port}"
        admin = {"X-API-Key": settings.api.admin_key}
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            health = (await client.get("/health")).json()
            assert health["components"] == {"db": "ok", "mqtt": "connected", "scanner": "running"}

            for body in cart_upserts(scenario, T0):
                cart_id = body.pop("cart_id")
                r = await client.put(f"/v1/carts/{cart_id}", json=body, headers=admin)
                assert r.status_code == 200, r.text
            tokens = {}
            for who in ("alice", "ivan", "julia"):
                r = await client.post(f"/v1/profiles/{ids[who]}/tokens", headers=admin)
                assert r.status_code == 201
                tokens[who] = r.json()["token"]
            streams = {}
            for who, token in tokens.items():
                reader = SseReader(client, "/v1/me/stream", {"Authorization": f"Bearer {token}"})
                readers.append(await reader.start())
                assert reader.status == 200
                streams[who] = reader

            # The store, 90 virtual seconds of it, and the products' telemetry over MQTT.
            sim = StoreSimulator(scenario, start=T0, seed=3, duration_s=600)
            telemetry = TelemetryModel(scenario, start=T0, seed=3)
            await asyncio.to_thread(publisher.connect)
            published = 0
            for step in range(90):
                t0, t1 = T0 + step, T0 + step + 1
                clock.set(t1)
                rt.inject(sim.advertisements(t0, t1))
                await rt.flush()
                rt.tick()
                for device_id, ts, metrics in telemetry.readings(t0, t1):
                    await asyncio.to_thread(publisher.publish, topic_for(scenario.store.id, device_id),
                                            payload(ts, metrics))
                    published += 1
            assert await _until(lambda: rt.pipeline.figures["readings"] >= published)
            await rt.flush()

            alice = streams["alice"]
            assert await alice.wait(lambda r: len(r.events) >= 3), [e.data for e in alice.events]
            got = {e.json()["campaign"]: e.json() for e in alice.events}
            assert set(got) == {"shoes-dwell-offer", "abandoned-cart-reminder", "mower-blade-service"}

            offer = got["shoes-dwell-offer"]
            assert offer["data"]["zone"] == "shoes" and offer["data"]["offer"]["code"] == "SHOES10"
            assert offer["title"].startswith("Alice,")
            cart = got["abandoned-cart-reminder"]
            assert "Trail runner shoes (shoes, aisle S2)" in cart["body"]
            assert "Merino base layer x2 (apparel, aisle A3)" in cart["body"]
            assert {i["zone"] for i in cart["data"]["cart"]["items"]} == {"shoes", "apparel"}
            mower = got["mower-blade-service"]
            assert mower["data"]["device"]["id"] == "mower-alice" and "mower-alice" in mower["body"]
            # SSE ids are the outbox ids: monotonic.
            sse_ids = [int(e.id) for e in alice.events if e.id]
            assert sse_ids == sorted(sse_ids) and len(set(sse_ids)) == 3

            # Ack one: it is not replayed to a new connection.
            first = sse_ids[0]
            r = await client.post(f"/v1/me/notifications/{first}/ack",
                                  headers={"Authorization": f"Bearer {tokens['alice']}"})
            assert r.status_code == 200 and r.json()["status"] == "acked"
            again = await SseReader(client, "/v1/me/stream",
                                    {"Authorization": f"Bearer {tokens['alice']}"}).start()
            readers.append(again)
            assert await again.wait(lambda r: len(r.events) >= 2)
            assert sorted(int(e.id) for e in again.events if e.id) == sse_ids[1:]

        # Ivan (analytics only) walked the shoe zone and his mower crossed 50 h; Julia (no consent)
        # has an abandoned cart. Nothing reached either of them.
        assert streams["ivan"].events == [] and streams["julia"].events == []
        with rt.db.session() as s:
            rows = s.scalars(select(Notification)).all()
            assert {n.campaign_id for n in rows if n.profile_id == ids["alice"]} == set(got)
            assert all(n.profile_id not in (ids["ivan"], ids["julia"]) for n in rows)
            assert all(n.status in ("sent", "acked") for n in rows if n.profile_id == ids["alice"])
            reasons = {(d.profile_id, d.campaign_id): d.reason for d in s.scalars(select(Decision))}
            assert reasons[(ids["ivan"], "mower-blade-service")] == "no_consent"
            assert reasons[(ids["julia"], "abandoned-cart-reminder")] == "no_consent"
            assert reasons[(ids["ivan"], "shoes-dwell-offer")] == "no_consent"
    finally:
        for reader in readers:
            await reader.close()
        await asyncio.to_thread(publisher.close)
        await runtime_factory.stop(rt)
