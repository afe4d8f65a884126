"""Mosquitto restarts in the middle of a QoS 1 stream: every published reading is stored exactly once.

The whole path is real: a publisher with a persistent session, a Mosquitto of our own with
persistence on, the gateway's Runtime (intake with manual acks, pipeline, SQLite). The broker is
stopped and started again on the same port while the publisher is still sending; messages it had
queued for the gateway survive in its persistence file, messages the publisher had in flight are
resent by paho, and anything delivered twice is a counted duplicate, never a second row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import func, select

from devices.mqtt import MqttIntake, MqttSettings
from devices.topics import telemetry_topic
from gateway.app.config import Settings
from gateway.app.runtime import Runtime
from gateway.clock import SystemClock
from gateway.storage.models import ReadingRecord
from tests.conftest import MosquittoServer, _mosquitto_binary

ROOT = Path(__file__).resolve().parent.parent
N = 3000
DEVICES = 25
T0 = 1_767_261_600.0


class StreamPublisher(threading.Thread):
    """Publishes N QoS 1 readings as fast as the broker acks them, across reconnects (paho queues and
    resends what is unacknowledged; its session is persistent)."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        super().__init__(daemon=True)
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"pub-{secrets.token_hex(4)}", protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(1, 1)
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(100)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        self.client.connect(host, port, keepalive=10, clean_start=False, properties=props)
        self.client.loop_start()
        self.prefix = prefix
        self.infos: list[mqtt.MQTTMessageInfo] = []
        self.sent = threading.Event()

    def run(self) -> None:
        for i in range(N):
            body = json.dumps({"ts": T0 + i, "seq": i, "metrics": {"battery_pct": i % 100}})
            topic = telemetry_topic("s1", f"dev-{i % DEVICES}", self.prefix)
            while True:  # like a device: while the broker is away, wait, then send it again
                info = self.client.publish(topic, body, qos=1)
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    break
                deadline = time.monotonic() + 30
                while not self.client.is_connected() and time.monotonic() < deadline:
                    time.sleep(0.05)
            self.infos.append(info)
            if i % 100 == 99:  # keep the stream flowing, not all queued at once in paho's memory
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(0.2)
        self.sent.set()

    def all_acked(self) -> bool:
        return self.sent.is_set() and all(info.is_published() for info in self.infos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def stored(rt: Runtime) -> tuple[int, int]:
    with rt.db.session() as s:
        rows = s.scalar(select(func.count()).select_from(ReadingRecord)) or 0
        keys = s.scalar(select(func.count(func.distinct(ReadingRecord.device_id + ":" + ReadingRecord.key)))) or 0
    return int(rows), int(keys)


async def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_broker_restart_mid_stream_loses_nothing_and_stores_each_reading_once(
    tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    (tmp_path / "mosquitto").mkdir()
    broker = MosquittoServer(binary=_mosquitto_binary(), workdir=tmp_path / "mosquitto",
                             extra=f"persistence true\npersistence_location {tmp_path / 'mosquitto'}/\n"
                                   "autosave_interval 1\nmax_inflight_messages 1000\nuser root")
    broker.start()
    prefix = f"t{secrets.token_hex(3)}"
    settings = Settings()
    settings.database.url = f"sqlite:///{tmp_path}/gw.db"
    settings.data_dir = str(tmp_path)
    settings.campaigns.dir = str(ROOT / "examples/campaigns")
    settings.devices.profiles_dir = str(ROOT / "examples/device-profiles")
    intake = MqttIntake(MqttSettings(host=broker.host, port=broker.port, client_id=f"gw-{secrets.token_hex(4)}",
                                     store_id="s1", topic_prefix=prefix, reconnect_min_delay=1,
                                     reconnect_max_delay=2, session_expiry=300))
    # By hand, not runtime_factory: started inside the try, so its finally stops it before this test's own broker.
    rt = Runtime(settings, clock=SystemClock(), mqtt=intake, serve_api=False, on_outcome=None, tick_s=3600)
    publisher: StreamPublisher | None = None
    try:
        await rt.start()
        assert await intake.wait_connected(10), intake.last_error
        publisher = StreamPublisher(broker.host, broker.port, prefix)
        publisher.start()
        await wait_until(lambda: stored(rt)[0] >= N // 3, 30, "a third of the stream to be stored")

        before = stored(rt)[0]
        await asyncio.to_thread(broker.stop)
        await asyncio.to_thread(broker.start)  # same port, same persistence file
        up = time.monotonic()
        await wait_until(lambda: intake.connected, 30, "the gateway to reconnect")
        reconnect_s = time.monotonic() - up
        record_property("gateway_reconnect_s", round(reconnect_s, 2))
        print(f"gateway back {reconnect_s:.2f} s after the broker (stored {before} of {N} before the restart)")

        await wait_until(publisher.all_acked, 60, "the publisher's messages to be acknowledged")
        await wait_until(lambda: stored(rt)[0] >= N, 60, "every reading to be stored")
        await asyncio.sleep(0.3)  # a late redelivery would show up as a duplicate, not a row
        rows, keys = stored(rt)
        assert rows == keys == N  # each published reading stored, none twice
        with rt.db.session() as s:
            seqs = sorted(int(k[1:]) for k in s.scalars(select(ReadingRecord.key)))
        assert seqs == sorted(i for i in range(N))
        t = rt.pipeline.telemetry.stats()
        assert t["accepted"] == N
        print(f"duplicates absorbed: {t['duplicates']}; intake: {intake.stats()}")
        assert reconnect_s < 30  # generous bound; the figure is reported, not asserted
        assert before < N  # the restart really happened mid-stream
    finally:
        if publisher is not None:
            publisher.close()
        await rt.stop()
        broker.stop()
