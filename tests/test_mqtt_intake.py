"""MqttIntake against a real Mosquitto: delivery, bad input, status flag, reconnects, sessions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import paho.mqtt.client as mqtt
import pytest

from devices.mqtt import BAD_TOPIC, INTERNAL_ERROR, MqttIntake, MqttSettings
from devices.payloads import BAD_METRIC, MISSING_METRICS, NOT_JSON, NOT_OBJECT, Reading
from devices.topics import telemetry_topic
from tests.conftest import MosquittoServer, PahoTestClient, free_port

ClientFactory = Callable[..., PahoTestClient]


def settings_for(mosquitto: MosquittoServer, **overrides: Any) -> MqttSettings:
    """Per-test client id and topic prefix: no test sees another's sessions or messages."""
    values: dict[str, Any] = {
        "host": mosquitto.host,
        "port": mosquitto.port,
        "client_id": f"gw-test-{secrets.token_hex(4)}",
        "store_id": "s1",
        "topic_prefix": f"t{secrets.token_hex(4)}",
        "reconnect_min_delay": 1,
        "reconnect_max_delay": 2,
        "session_expiry": 60,
    }
    values.update(overrides)
    return MqttSettings(**values)


async def collect(queue: asyncio.Queue[Reading], count: int, timeout: float = 10.0) -> list[Reading]:
    """Take ``count`` readings off the queue, failing if they have not all come within ``timeout``."""
    got: list[Reading] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"only {len(got)} of {count} readings arrived within {timeout} s")
        try:
            got.append(await asyncio.wait_for(queue.get(), remaining))
        except TimeoutError:
            continue
    return got


def no_paho_thread(client_id: str) -> bool:
    return not any(t.name == f"paho-mqtt-client-{client_id}" for t in threading.enumerate())


@pytest.fixture
async def intake(mosquitto: MosquittoServer) -> AsyncIterator[MqttIntake]:
    gateway = MqttIntake(settings_for(mosquitto))
    await gateway.start()
    assert await gateway.wait_connected(10), gateway.last_error
    yield gateway
    await gateway.stop()


def topic_of(gateway: MqttIntake, device_id: str) -> str:
    return telemetry_topic(gateway.settings.store_id, device_id, gateway.settings.topic_prefix)


async def test_all_qos1_readings_arrive(
    intake: MqttIntake, mosquitto: MosquittoServer, mqtt_client: ClientFactory
) -> None:
    publisher = mqtt_client(mosquitto.host, mosquitto.port)
    devices = [f"dev-{i}" for i in range(5)]
    n = 500
    infos = [
        publisher.publish(
            topic_of(intake, devices[i % len(devices)]),
            json.dumps({"ts": 1767261600.0 + i, "metrics": {"seq": i, "battery_pct": 50 + i % 50}}),
        )
        for i in range(n)
    ]
    readings = await collect(intake.readings, n)
    await asyncio.to_thread(infos[-1].wait_for_publish, 5.0)

    assert sorted(int(r.metrics["seq"]) for r in readings) == list(range(n))
    for r in readings:
        seq = int(r.metrics["seq"])
        assert r.device_id == devices[seq % len(devices)]
        assert r.store_id == "s1"
        assert r.time == 1767261600.0 + seq
        assert r.metrics["battery_pct"] == 50 + seq % 50
    assert intake.accepted == n
    assert not intake.stats


async def test_malformed_payloads_are_counted_and_the_stream_goes_on(
    intake: MqttIntake,
    mosquitto: MosquittoServer,
    mqtt_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="devices.mqtt")
    publisher = mqtt_client(mosquitto.host, mosquitto.port)
    topic = topic_of(intake, "mower-1")
    bad = [b"not json {", b"[1, 2, 3]", b'{"ts": 1}', b'{"metrics": {"x": NaN}}', b'{"metrics": {"x": "12"}}']
    for payload in bad:
        publisher.publish(topic, payload)
    # Same topic and publisher, so it is delivered after the bad ones.
    publisher.publish(topic, b'{"metrics": {"blade_hours": 49.6}}')

    [reading] = await collect(intake.readings, 1)
    assert reading.device_id == "mower-1"
    assert reading.metrics == {"blade_hours": 49.6}
    assert intake.stats == {NOT_JSON: 1, NOT_OBJECT: 1, MISSING_METRICS: 1, BAD_METRIC: 2}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(bad)
    assert all(topic in message for message in warnings)
    assert any("not_json" in message for message in warnings)


async def test_status_is_online_while_running_and_offline_after(
    mosquitto: MosquittoServer, mqtt_client: ClientFactory
) -> None:
    gateway = MqttIntake(settings_for(mosquitto))
    assert gateway.state() == "disconnected"
    await gateway.start()
    assert await gateway.wait_connected(10)
    assert gateway.state() == "connected" and gateway.connected
    assert gateway._client is not None
    sock = cast(socket.socket, gateway._client.socket())
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    watcher = mqtt_client(mosquitto.host, mosquitto.port)
    await asyncio.to_thread(watcher.subscribe, gateway.status_topic)
    assert await asyncio.to_thread(watcher.wait_for, lambda ms: [m.payload for m in ms] == [b"online"])
    assert watcher.messages[0].retain

    client_id = gateway.settings.client_id
    await gateway.stop()
    assert gateway.state() == "disconnected" and not gateway.connected
    assert no_paho_thread(client_id)
    assert await asyncio.to_thread(watcher.wait_for, lambda ms: ms[-1].payload == b"offline")

    # A newcomer reads the retained flag.
    late = mqtt_client(mosquitto.host, mosquitto.port)
    await asyncio.to_thread(late.subscribe, gateway.status_topic)
    assert await asyncio.to_thread(late.wait_for, lambda ms: [m.payload for m in ms] == [b"offline"])
    await gateway.stop()  # a second stop is harmless


async def test_unclean_disconnect_publishes_the_will_then_reconnects(
    intake: MqttIntake, mosquitto: MosquittoServer, mqtt_client: ClientFactory
) -> None:
    watcher = mqtt_client(mosquitto.host, mosquitto.port)
    await asyncio.to_thread(watcher.subscribe, intake.status_topic)
    assert await asyncio.to_thread(watcher.wait_for, lambda ms: len(ms) == 1)

    # Cut the TCP connection under paho's feet: the broker sees no DISCONNECT and sends the will.
    assert intake._client is not None
    sock = cast(socket.socket, intake._client.socket())
    sock.shutdown(socket.SHUT_RDWR)

    payloads = lambda ms: [m.payload for m in ms]  # noqa: E731
    assert await asyncio.to_thread(
        watcher.wait_for, lambda ms: payloads(ms)[-2:] == [b"offline", b"online"], 10.0
    ), payloads(watcher.messages)
    assert await intake.wait_connected(10)

    publisher = mqtt_client(mosquitto.host, mosquitto.port)
    publisher.publish(topic_of(intake, "d1"), b'{"metrics": {"x": 1}}')
    [reading] = await collect(intake.readings, 1)
    assert reading.metrics == {"x": 1.0}


async def test_reconnects_after_broker_restart(
    intake: MqttIntake, mosquitto: MosquittoServer, mqtt_client: ClientFactory
) -> None:
    await asyncio.to_thread(mosquitto.restart)

    # The restarted broker (no persistence) has forgotten our subscription: the intake must
    # reconnect and subscribe again by itself. Publish until a reading gets through.
    publisher = mqtt_client(mosquitto.host, mosquitto.port)
    deadline = time.monotonic() + 15
    seq = 0
    reading: Reading | None = None
    while reading is None and time.monotonic() < deadline:
        seq += 1
        publisher.publish(topic_of(intake, "d1"), json.dumps({"metrics": {"seq": seq}}))
        with contextlib.suppress(TimeoutError):
            reading = await asyncio.wait_for(intake.readings.get(), 0.5)
    assert reading is not None, f"no reading after the restart; state={intake.state()} ({intake.last_error})"
    assert intake.state() == "connected"


async def test_persistent_session_keeps_messages_sent_while_away(
    mosquitto: MosquittoServer, mqtt_client: ClientFactory
) -> None:
    settings = settings_for(mosquitto)
    first = MqttIntake(settings)
    await first.start()
    assert await first.wait_connected(10)
    await first.stop()

    publisher = mqtt_client(mosquitto.host, mosquitto.port)
    infos = [publisher.publish(topic_of(first, "d1"), json.dumps({"metrics": {"seq": i}})) for i in range(20)]
    await asyncio.to_thread(infos[-1].wait_for_publish, 5.0)

    second = MqttIntake(settings)  # same client id: the broker hands over the queued messages
    await second.start()
    try:
        readings = await collect(second.readings, 20)
    finally:
        await second.stop()
    assert sorted(int(r.metrics["seq"]) for r in readings) == list(range(20))


async def test_unreachable_broker_is_connecting_and_stops_cleanly() -> None:
    settings = MqttSettings(port=free_port(), client_id=f"gw-test-{secrets.token_hex(4)}")
    gateway = MqttIntake(settings)
    await gateway.start()
    assert not await gateway.wait_connected(0.5)
    assert gateway.state() == "connecting"
    await asyncio.wait_for(gateway.stop(), 5)
    assert gateway.state() == "disconnected"
    assert no_paho_thread(settings.client_id)


def message(topic: bytes, payload: bytes) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(topic=topic)
    msg.payload = payload
    return msg


def deliver(gateway: MqttIntake, msg: mqtt.MQTTMessage) -> None:
    """Call the intake's on_message as paho's thread would (the client argument is unused)."""
    gateway._on_message(cast(mqtt.Client, None), None, msg)


async def test_a_burst_costs_one_wakeup_and_odd_messages_never_raise() -> None:
    """Drive the paho-side callback directly, as paho's thread would, while the loop is busy."""
    settings = MqttSettings(port=free_port(), client_id=f"gw-test-{secrets.token_hex(4)}")
    gateway = MqttIntake(settings)
    await gateway.start()  # nothing listens: we only need the intake wired to this loop
    drains = 0
    real_drain = gateway._drain

    def counting_drain() -> None:
        nonlocal drains
        drains += 1
        real_drain()

    gateway._drain = counting_drain  # type: ignore[method-assign]
    try:
        for i in range(100):
            payload = b'{"metrics": {"i": %d}}' % i
            deliver(gateway, message(b"stores/s1/devices/d1/telemetry", payload))
        deliver(gateway, message(b"stores/s1/devices/d1/events", b"{}"))
        deliver(gateway, message(b"stores/\xff/devices/d1/telemetry", b"{}"))
        readings = await collect(gateway.readings, 100, timeout=2)
        assert [int(r.metrics["i"]) for r in readings] == list(range(100))
        assert drains == 1
        assert gateway.stats == {BAD_TOPIC: 2}

        def broken_clock() -> float:
            raise RuntimeError("clock broke")

        gateway._clock = broken_clock
        deliver(gateway, message(b"stores/s1/devices/d1/telemetry", b'{"metrics": {"i": 1}}'))
        assert gateway.stats[INTERNAL_ERROR] == 1
    finally:
        await gateway.stop()
