"""ensure_broker: use a broker that answers, else start amqtt, and say which protocol to speak."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable

import pytest

from devices.broker import BrokerError, ensure_broker, probe_broker
from devices.mqtt import MqttIntake, MqttSettings
from devices.topics import telemetry_topic
from tests.conftest import MosquittoServer, PahoTestClient, free_port

ClientFactory = Callable[..., PahoTestClient]


async def test_uses_the_mosquitto_that_answers(mosquitto: MosquittoServer) -> None:
    handle = await ensure_broker(mosquitto.host, mosquitto.port)
    assert not handle.embedded
    assert handle.protocol == "5"
    assert handle.description == f"using the MQTT broker at {mosquitto.host}:{mosquitto.port} (MQTT 5)"
    await handle.stop()  # not ours: left running
    assert await probe_broker(mosquitto.host, mosquitto.port) == "5"


async def test_starts_amqtt_when_nothing_listens(mqtt_client: ClientFactory) -> None:
    port = free_port()
    assert await probe_broker("127.0.0.1", port) is None
    handle = await ensure_broker("127.0.0.1", port)
    try:
        assert handle.embedded
        assert handle.protocol == "3.1.1"
        assert handle.description == f"started an embedded amqtt broker on 127.0.0.1:{port} (MQTT 3.1.1)"

        # amqtt runs in this loop, so the test clients' blocking waits go through to_thread.
        subscriber = mqtt_client("127.0.0.1", port, protocol="3.1.1")
        await asyncio.to_thread(subscriber.subscribe, "t/#", 1)
        publisher = mqtt_client("127.0.0.1", port, protocol="3.1.1")
        infos = [publisher.publish(f"t/{i}", f"m{i}", qos=1) for i in range(10)]
        await asyncio.to_thread(infos[-1].wait_for_publish, 5.0)
        assert await asyncio.to_thread(subscriber.wait_for, lambda ms: len(ms) == 10)
        assert sorted(m.payload for m in subscriber.messages) == sorted(f"m{i}".encode() for i in range(10))
        assert {m.qos for m in subscriber.messages} == {1}

        # Another gateway on the same port finds this broker, and learns it only speaks 3.1.1.
        again = await ensure_broker("127.0.0.1", port)
        assert not again.embedded and again.protocol == "3.1.1"
    finally:
        await handle.stop()
    await handle.stop()  # idempotent
    assert await probe_broker("127.0.0.1", port) is None


async def test_intake_runs_over_the_embedded_broker(mqtt_client: ClientFactory) -> None:
    """The demo path: amqtt + the intake speaking the protocol the handle reports."""
    handle = await ensure_broker("127.0.0.1", free_port())
    intake = MqttIntake(
        MqttSettings(
            host=handle.host,
            port=handle.port,
            protocol=handle.protocol,
            client_id=f"gw-test-{secrets.token_hex(4)}",
            store_id="s1",
        )
    )
    try:
        await intake.start()
        assert await intake.wait_connected(10), intake.last_error
        publisher = mqtt_client(handle.host, handle.port, protocol="3.1.1")
        for i in range(5):
            publisher.publish(telemetry_topic("s1", f"d{i}"), json.dumps({"metrics": {"i": i}}))
        readings = []
        while len(readings) < 5:
            batch = await asyncio.wait_for(intake.batches.get(), 10)
            intake.ack(batch)  # manual acks: what the runtime does once the batch is committed
            readings += batch.readings
        assert sorted(r.device_id for r in readings) == [f"d{i}" for i in range(5)]
    finally:
        await intake.stop()
        await handle.stop()


async def test_a_port_held_by_something_else_is_an_error() -> None:
    async def not_mqtt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_mqtt, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(BrokerError, match="does not answer MQTT"):
            await ensure_broker("127.0.0.1", port)
    finally:
        server.close()
        await server.wait_closed()
