"""Odd telemetry never fails its batch, and the telemetry counters count only what was committed.

Real parts: a live Runtime with the paho intake on the session's Mosquitto, once on SQLite and once on
PostgreSQL. A message the database would refuse (a lone surrogate or NUL in a name, an id longer than its
column, NaN in an event's data...) is dead-lettered by the parser with its own reason, so its batch
commits whole instead of falling back to one-by-one commits. A commit that fails (SQLite locked by another
process, PostgreSQL refusing connections) and is retried counts nothing until it succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from devices.mqtt import MqttIntake, MqttSettings
from devices.payloads import BAD_DEVICE_ID, BAD_EVENT, BAD_METRIC, BAD_STATUS, BAD_STORE_ID, BAD_TS, NOT_JSON
from gateway.app.config import Settings
from gateway.app.runtime import Runtime
from gateway.clock import SystemClock
from gateway.storage.models import DeadLetter, Device, DeviceEventRecord, ReadingRecord
from tests.conftest import MosquittoServer, PahoTestClient
from tests.faults import postgresql_refusing, sqlite_locked
from tests.live_gateway import running

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_767_261_600.0


async def until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def live_gateway(db_url: str, tmp: Path, broker: MosquittoServer) -> AsyncIterator[Runtime]:
    settings = Settings()
    settings.database.url = db_url
    settings.database.busy_timeout_ms = 200  # SQLite: a locked file fails the commit soon, then it is retried
    settings.data_dir = str(tmp)
    settings.campaigns.dir = str(ROOT / "examples/campaigns")
    settings.devices.profiles_dir = str(ROOT / "examples/device-profiles")
    intake = MqttIntake(MqttSettings(host=broker.host, port=broker.port, client_id=f"gw-{secrets.token_hex(4)}",
                                     store_id="s1", topic_prefix=f"t{secrets.token_hex(3)}"))
    async with running(settings, SystemClock(), mqtt=intake, serve_api=False) as rt:
        assert await intake.wait_connected(10), intake.last_error
        yield rt


def topic(rt: Runtime, device: str, kind: str = "telemetry", store: str = "s1") -> str:
    # By hand: devices.topics.device_topic refuses the over-long ids sent here on purpose.
    return f"{rt.mqtt.settings.topic_prefix}/{store}/devices/{device}/{kind}"


def rows(rt: Runtime, model: Any) -> int:
    with rt.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def dead_reasons(rt: Runtime) -> Counter[str]:
    with rt.db.session() as s:
        return Counter(s.scalars(select(DeadLetter.reason)).all())


def publish_all(client: PahoTestClient, messages: list[tuple[str, bytes]]) -> None:
    infos = [client.publish(t, p) for t, p in messages]
    for info in infos:
        info.wait_for_publish(10)


async def test_odd_messages_are_dead_lettered_with_their_reason_and_never_split_their_batch(
        db_url: str, tmp_path: Path, mosquitto: MosquittoServer,
        mqtt_client: Callable[..., PahoTestClient]) -> None:
    async with live_gateway(db_url, tmp_path, mosquitto) as rt:
        long_device, long_store = "d" * 129, "s" * 65
        odd: list[tuple[str, bytes, str]] = [
            (topic(rt, "d1"), rb'{"seq": 1000, "metrics": {"\ud800": 1}}', BAD_METRIC),  # the repro
            (topic(rt, "d1"), rb'{"seq": 1001, "metrics": {"a\u0000b": 1}}', BAD_METRIC),
            (topic(rt, "d1"), b'{"seq": 1002, "metrics": {"' + b"m" * 65 + b'": 1}}', BAD_METRIC),
            (topic(rt, "d1"), b'{"seq": 1003, "metrics": {"x": 1e300}}', BAD_METRIC),
            (topic(rt, "d1"), b'{"seq": 1004, "ts": 1e300, "metrics": {"x": 1}}', BAD_TS),
            (topic(rt, long_device), b'{"seq": 1005, "metrics": {"x": 1}}', BAD_DEVICE_ID),
            (topic(rt, "d1", store=long_store), b'{"seq": 1006, "metrics": {"x": 1}}', BAD_STORE_ID),
            (topic(rt, long_device, "status"), b"online", BAD_DEVICE_ID),
            (topic(rt, "d1", "status"), rb'{"state": "online", "firmware": "2.4\u0000"}', BAD_STATUS),
            (topic(rt, "d1", "events"), rb'{"type": "error", "code": "E\u00004"}', BAD_EVENT),
            (topic(rt, "d1", "events"), rb'{"type": "err\ud800"}', BAD_EVENT),
            (topic(rt, "d1", "events"), b'{"type": "error", "data": {"x": NaN}}', BAD_EVENT),
        ]
        good = [(topic(rt, f"d{i % 3}"), json.dumps({"ts": T0 + i, "seq": i, "metrics": {"x": i}}).encode())
                for i in range(30)]
        good += [(topic(rt, "d2", "status"), b'{"state": "online", "firmware": "2.4.1"}'),
                 (topic(rt, "d2", "events"), b'{"ts": 5, "type": "error", "code": "E42"}')]
        messages = [*good[:10], *[(t, p) for t, p, _ in odd], *good[10:]]  # the odd ones amid the good
        client = mqtt_client(mosquitto.host, mosquitto.port)
        await asyncio.to_thread(publish_all, client, messages)
        await until(lambda: rt.mqtt.stats()["acked"] == len(messages), f"all acked ({rt.mqtt.stats()})")

        assert rt.telemetry_failures == 0  # no batch failed, so none was retried one message at a time
        assert rows(rt, ReadingRecord) == 30 and rows(rt, DeviceEventRecord) == 1
        reasons = dead_reasons(rt)
        assert reasons == Counter(reason for _, _, reason in odd)
        stats = rt.pipeline.telemetry.stats()
        assert stats["dead_lettered"] == reasons and stats["dead_lettered_total"] == len(odd)
        assert (stats["accepted"], stats["statuses"], stats["events"]) == (30, 1, 1)
        with rt.db.session() as s:
            assert sorted(s.scalars(select(Device.id)).all()) == ["d0", "d1", "d2"]
            assert s.get(Device, "d2").firmware == "2.4.1"  # type: ignore[union-attr]
            kept = {(d.topic, d.payload) for d in s.scalars(select(DeadLetter))}
            long = s.scalars(select(DeadLetter).where(DeadLetter.reason == BAD_DEVICE_ID)).first()
        # The raw payload is kept as bytes and the topic as it came: each dead letter names its message.
        assert kept == {(t, p) for t, p, _ in odd}
        assert long is not None and long.device_id == long_device[:128] and "129 characters" in (long.detail or "")


async def test_a_commit_that_fails_counts_nothing_and_its_retry_counts_once(
        db_url: str, tmp_path: Path, mosquitto: MosquittoServer,
        mqtt_client: Callable[..., PahoTestClient]) -> None:
    async with live_gateway(db_url, tmp_path, mosquitto) as rt:
        client = mqtt_client(mosquitto.host, mosquitto.port)
        messages = [(topic(rt, "d1"), b'{"ts": 1767261600, "seq": 1, "metrics": {"x": 1}}'),
                    (topic(rt, "d1"), b"not json {"),
                    (topic(rt, "d1"), rb'{"seq": 2, "metrics": {"\ud800": 1}}'),
                    (topic(rt, "d1", "status"), b"online")]
        store, refused = rt.pipeline.telemetry, rt.db.outage.refused
        fault = sqlite_locked(Path(make_url(db_url).database or "")) if db_url.startswith("sqlite") \
            else postgresql_refusing(db_url)
        with fault:
            await asyncio.to_thread(publish_all, client, messages)
            await until(lambda: rt.mqtt.stats()["unacked_size"] == len(messages), "the messages to arrive")
            await until(lambda: rt.db.outage.refused >= refused + 3, "the batch to fail and be retried thrice")
            stats = store.stats()
            assert stats["dead_lettered_total"] == 0 and stats["dead_lettered"] == {}
            assert (stats["accepted"], stats["statuses"], stats["registered"]) == (0, 0, 0)
            assert rt.mqtt.stats()["acked"] == 0
        await until(lambda: rt.mqtt.stats()["acked"] == len(messages), f"all acked ({rt.mqtt.stats()})")
        assert rows(rt, ReadingRecord) == 1
        reasons = dead_reasons(rt)
        assert reasons == {NOT_JSON: 1, BAD_METRIC: 1}
        stats = store.stats()
        assert stats["dead_lettered"] == reasons and stats["dead_lettered_total"] == 2
        assert (stats["accepted"], stats["statuses"], stats["registered"]) == (1, 1, 1)
        assert rt.telemetry_failures == 0

