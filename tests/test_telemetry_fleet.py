"""The simulated fleet (simulators/wearables.py) through a real broker into the gateway: what is valid is
stored once, what is not is dead-lettered with its reason, disconnects show as offline then online."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

from sqlalchemy import func, select

from devices.mqtt import MqttIntake, MqttSettings
from gateway.app.config import Settings
from gateway.clock import SystemClock
from gateway.storage.models import DeadLetter, Device, DeviceEventRecord, ReadingRecord
from simulators.wearables import Fleet, FleetSpec, PipelinedPublisher
from tests.conftest import MosquittoServer
from tests.fixtures import RuntimeFactory

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_767_261_600.0  # 10:00 UTC


def test_the_fleet_model_is_deterministic_and_behaves_like_products() -> None:
    spec = FleetSpec(devices=8, interval_s=600, seed=3)
    a, b = Fleet(spec, T0), Fleet(spec, T0)
    assert [m.payload for m in a.messages(200)] == [m.payload for m in b.messages(200)]

    day = Fleet(FleetSpec(devices=4, interval_s=600, seed=1), T0 - 10 * 3600)  # from midnight
    watch, mower = day.devices[0], day.devices[1]
    assert (watch.kind, mower.kind) == ("fitness_watch", "robot_mower")
    steps, blade = [], []
    for _ in range(24 * 6):  # one day
        day.step()
        steps.append(watch.counter)
        blade.append(mower.counter)
    assert steps[6 * 6] < 2000 < steps[20 * 6]  # few steps by 06:00, many by 20:00
    assert blade[8 * 6] == blade[0] and blade[18 * 6] > blade[9 * 6]  # the mower works in the day only
    day.step()
    assert watch.counter < steps[-1]  # a new day: steps start again


async def test_a_rough_fleet_over_mqtt_stores_the_valid_and_dead_letters_the_rest(
    mosquitto: MosquittoServer, tmp_path: Path, runtime_factory: RuntimeFactory
) -> None:
    prefix = f"t{secrets.token_hex(3)}"
    spec = FleetSpec(devices=40, interval_s=60, store_id="s1", prefix=prefix, fault_rate=0.05,
                     disconnect_rate=0.03, offline_intervals=3, bad_payload_rate=0.03, seed=7)
    fleet = Fleet(spec, T0)
    settings = Settings()
    settings.database.url = f"sqlite:///{tmp_path}/gw.db"
    settings.data_dir = str(tmp_path)
    settings.campaigns.dir = str(ROOT / "examples/campaigns")
    settings.devices.profiles_dir = str(ROOT / "examples/device-profiles")
    intake = MqttIntake(MqttSettings(host=mosquitto.host, port=mosquitto.port, client_id=f"gw-{secrets.token_hex(4)}",
                                     store_id="s1", topic_prefix=prefix))
    rt = await runtime_factory(settings, clock=SystemClock(), mqtt=intake, serve_api=False)
    pub = None
    try:
        for d in fleet.devices:  # registered with their kind, so their profile checks their readings
            rt.devices.register(d.id, kind=d.kind)
        assert await intake.wait_connected(10)
        messages = fleet.messages(1500)
        pub = PipelinedPublisher(mosquitto.host, mosquitto.port)
        for m in messages:
            pub.publish(m.topic, m.payload, retain=m.retain)
        assert await asyncio.to_thread(pub.flush, 30)

        telemetry = [m for m in messages if m.kind == "telemetry"]
        good = sum(m.valid for m in telemetry)
        deadline = time.monotonic() + 30
        while intake.stats()["acked"] < len(messages) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert intake.stats()["acked"] == len(messages)
        with rt.db.session() as s:
            assert s.scalar(select(func.count()).select_from(ReadingRecord)) == good
            dead = dict(s.execute(select(DeadLetter.reason, func.count()).group_by(DeadLetter.reason)).all())
            assert sum(dead.values()) == len(telemetry) - good
            assert set(dead) <= {"out_of_range", "not_json", "not_utf8", "not_object", "missing_metrics",
                                 "bad_metric"}
            assert dead.get("out_of_range") == fleet.counts["fault_spike"]
            events = s.scalar(select(func.count()).select_from(DeviceEventRecord))
            assert events == fleet.counts["fault_error"] > 0
            states = {d.id: d.online for d in s.scalars(select(Device))}
        assert fleet.counts["disconnects"] > 0 and fleet.counts["late_readings"] > 0
        away = {d.id for d in fleet.devices if d.offline}
        assert away and all(states[i] is False for i in away)  # their retained "offline" is the last word
        assert all(states[d.id] is True for d in fleet.devices if d.id not in away)
    finally:
        if pub is not None:
            pub.close()
        await runtime_factory.stop(rt)


def test_a_clean_fleet_only_makes_valid_telemetry() -> None:
    fleet = Fleet(FleetSpec(devices=20), T0)
    messages = fleet.messages(500)
    assert all(m.valid and m.kind == "telemetry" for m in messages)
    assert len({(m.topic, m.payload) for m in messages}) == len(messages)
