"""A failing batch never drops messages silently: a poison message is dead-lettered (ingest_failed) and the
rest stored; while the store is down nothing is acknowledged, and everything lands once it is back."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from devices.mqtt import MqttIntake, MqttSettings
from devices.topics import telemetry_topic
from gateway.app.config import Settings
from gateway.app.runtime import Runtime
from gateway.clock import SystemClock
from gateway.storage.models import DeadLetter, ReadingRecord
from tests.conftest import MosquittoServer, PahoTestClient
from tests.fixtures import RuntimeFactory

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def gateway(mosquitto: MosquittoServer, tmp_path: Path, runtime_factory: RuntimeFactory) -> Runtime:
    settings = Settings()
    settings.database.url = f"sqlite:///{tmp_path}/gw.db"
    settings.data_dir = str(tmp_path)
    settings.campaigns.dir = str(ROOT / "examples/campaigns")
    settings.devices.profiles_dir = str(ROOT / "examples/device-profiles")
    intake = MqttIntake(MqttSettings(host=mosquitto.host, port=mosquitto.port, client_id=f"gw-{secrets.token_hex(4)}",
                                     store_id="s1", topic_prefix=f"t{secrets.token_hex(3)}"))
    rt = await runtime_factory(settings, clock=SystemClock(), mqtt=intake, serve_api=False)
    assert await intake.wait_connected(10)
    return rt


def publish(rt: Runtime, client: PahoTestClient, seqs: range, **extra: float) -> None:
    prefix = rt.mqtt.settings.topic_prefix
    for i in seqs:
        client.publish(telemetry_topic("s1", f"d{i % 3}", prefix), json.dumps({"seq": i, "metrics": {"x": i, **extra}}))


async def until(predicate: Callable[[], bool], timeout: float = 15, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def count(rt: Runtime, model: Any) -> int:
    with rt.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


async def test_a_poison_message_is_dead_lettered_and_the_rest_of_its_batch_stored(
    gateway: Runtime, mosquitto: MosquittoServer, mqtt_client: Callable[..., PahoTestClient]
) -> None:
    store = gateway.pipeline.telemetry
    real_write = store.write

    def write(s: Any, batch: Any, now: float, devices: Any = None) -> Any:
        if any("poison" in r.metrics for r in batch.readings):
            raise RuntimeError("a bug this message triggers")
        return real_write(s, batch, now, devices)

    store.write = write  # type: ignore[method-assign]
    client = mqtt_client(mosquitto.host, mosquitto.port)
    publish(gateway, client, range(20))
    publish(gateway, client, range(20, 21), poison=1)
    publish(gateway, client, range(21, 40))
    await until(lambda: gateway.mqtt.stats()["acked"] == 40)
    assert count(gateway, ReadingRecord) == 39
    with gateway.db.session() as s:
        [dead] = s.scalars(select(DeadLetter)).all()
        assert dead.reason == "ingest_failed" and "a bug this message triggers" in (dead.detail or "")
        assert dead.topic.endswith("/devices/d2/telemetry")
    assert gateway.telemetry_failures >= 1


async def test_while_the_store_is_down_nothing_is_acknowledged_then_everything_lands_once(
    gateway: Runtime, mosquitto: MosquittoServer, mqtt_client: Callable[..., PahoTestClient]
) -> None:
    store = gateway.pipeline.telemetry
    real_write = store.write
    down = {"on": True, "calls": 0}

    def write(s: Any, batch: Any, now: float, devices: Any = None) -> Any:
        if down["on"]:
            down["calls"] += 1
            raise ConnectionError("database unreachable")
        return real_write(s, batch, now, devices)

    store.write = write  # type: ignore[method-assign]
    client = mqtt_client(mosquitto.host, mosquitto.port)
    publish(gateway, client, range(30))
    await until(lambda: down["calls"] >= 9, what="retries")  # whole, then one by one, with backoff, thrice
    stats = gateway.mqtt.stats()
    assert stats["acked"] == 0 and stats["unacked_size"] == 30  # held: the broker still has them
    down["on"] = False
    await until(lambda: gateway.mqtt.stats()["acked"] == 30, what=f"acks {gateway.mqtt.stats()}")
    assert count(gateway, ReadingRecord) == 30 and count(gateway, DeadLetter) == 0
