"""MqttIntake against a real Mosquitto: delivery in batches, ack only after commit, bad input, status
flag and will, reconnects, sessions, shared subscriptions, commands, username/password and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.mqtt import BAD_TOPIC, INTERNAL_ERROR, MqttIntake, MqttSettings
from devices.payloads import BAD_METRIC, BAD_STATUS, MISSING_METRICS, NOT_JSON, NOT_OBJECT, Reading, TelemetryBatch
from devices.topics import device_topic
from tests.conftest import MosquittoServer, PahoTestClient, _mosquitto_binary, free_port
from tests.fixtures import self_signed_ca

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


async def collect_batch(intake: MqttIntake, count: int, timeout: float = 10.0, ack: bool = True) -> TelemetryBatch:
    """Merge batches until ``count`` messages came (acking each, as a committing consumer does)."""
    got = TelemetryBatch()
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"only {len(got)} of {count} messages arrived within {timeout} s")
        try:
            batch = await asyncio.wait_for(intake.batches.get(), remaining)
        except TimeoutError:
            continue
        acks = len(batch.acks)
        if ack:
            assert intake.ack(batch) == acks
        got.extend(batch)
    return got


async def drain_until_quiet(intake: MqttIntake, quiet_s: float) -> TelemetryBatch:
    """Whatever else arrives until nothing has for ``quiet_s`` (acked, as a committing consumer does)."""
    got = TelemetryBatch()
    while True:
        try:
            batch = await asyncio.wait_for(intake.batches.get(), quiet_s)
        except TimeoutError:
            return got
        intake.ack(batch)
        got.extend(batch)


async def collect(intake: MqttIntake, count: int, timeout: float = 10.0) -> list[Reading]:
    return (await collect_batch(intake, count, timeout)).readings


async def assert_nothing_acked_comes_back(settings: MqttSettings, publisher: Any, seq: int) -> None:
    """A new connection to the same session: the first message it gets is a fresh one (``seq``), not an
    acknowledged one the broker kept."""
    intake = MqttIntake(settings)
    await intake.start()
    try:
        assert await intake.wait_connected(10)
        publisher.publish(topic_of(intake, "d1"), json.dumps({"seq": seq, "metrics": {"x": 1}}))
        [last] = await collect(intake, 1)
        assert last.seq == seq  # nothing acknowledged came back
    finally:
        await intake.stop()


def no_paho_thread(client_id: str) -> bool:
    return not any(t.name == f"paho-mqtt-client-{client_id}" for t in threading.enumerate())


@pytest.fixture
async def intake(mosquitto: MosquittoServer) -> AsyncIterator[MqttIntake]:
    gateway = MqttIntake(settings_for(mosquitto))
    await gateway.start()
    assert await gateway.wait_connected(10), gateway.last_error
    yield gateway
    await gateway.stop()


def topic_of(gateway: MqttIntake, device_id: str, kind: str = "telemetry") -> str:
    return device_topic(gateway.settings.store_id, device_id, kind, gateway.settings.topic_prefix)  # type: ignore[arg-type]


async def test_all_qos1_readings_arrive_in_few_batches(
    intake: MqttIntake, mosquitto: MosquittoServer, mqtt_client: ClientFactory
) -> None:
    publisher = mqtt_client(mosquitto.host, mosquitto.port)
    devices = [f"dev-{i}" for i in range(5)]
    n = 500
    infos = [
        publisher.publish(
            topic_of(intake, devices[i % len(devices)]),
            json.dumps({"ts": 1767261600.0 + i, "seq": i, "metrics": {"battery_pct": 50 + i % 50}}),
        )
        for i in range(n)
    ]
    readings = await collect(intake, n)
    await asyncio.to_thread(infos[-1].wait_for_publish, 5.0)

    assert sorted(r.seq for r in readings if r.seq is not None) == list(range(n))
    for r in readings:
        assert r.seq is not None
        assert r.device_id == devices[r.seq % len(devices)]
        assert r.store_id == "s1"
        assert r.time == 1767261600.0 + r.seq
        assert r.metrics["battery_pct"] == 50 + r.seq % 50
    stats = intake.stats()
    assert stats["accepted"] == n and stats["acked"] == n and stats["unacked_size"] == 0
    assert stats["rejected_total"] == 0


async def test_status_and_events_topics_are_parsed(
    intake: MqttIntake, mosquitto: MosquittoServer, mqtt_client: ClientFactory
) -> None:
    publisher = mqtt_client(mosquitto.host, mosquitto.port)
    publisher.publish(topic_of(intake, "mower-1", "status"), b'{"state": "offline", "firmware": "2.4.1"}')
    publisher.publish(topic_of(intake, "mower-1", "events"), b'{"ts": 5, "type": "error", "code": "E42"}')
    publisher.publish(topic_of(intake, "mower-1", "status"), b"sleeping")
    got = await collect_batch(intake, 3)
    [status] = got.statuses
    assert (status.device_id, status.online, status.firmware) == ("mower-1", False, "2.4.1")
    [ev] = got.events
    assert (ev.time, ev.type, ev.code) == (5.0, "error", "E42")
    [bad] = got.rejects
    assert bad.reason == BAD_STATUS and bad.topic == topic_of(intake, "mower-1", "status")


async def test_malformed_payloads_are_counted_logged_passed_on_for_dead_letters_and_the_stream_goes_on(
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

    got = await collect_batch(intake, len(bad) + 1)
    [reading] = got.readings
    assert reading.device_id == "mower-1"
    assert reading.metrics == {"blade_hours": 49.6}
    assert intake.rejected == {NOT_JSON: 1, NOT_OBJECT: 1, MISSING_METRICS: 1, BAD_METRIC: 2}
    assert [r.payload for r in got.rejects] == bad  # kept for the dead-letter table, acked with the batch
    assert {r.topic for r in got.rejects} == {topic} and {r.device_id for r in got.rejects} == {"mower-1"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(bad)
    assert all(topic in message for message in warnings)
    assert any("not_json" in message for message in warnings)


async def test_nothing_is_acknowledged_before_the_consumer_says_so(
    mosquitto: MosquittoServer, mqtt_client: ClientFactory
) -> None:
    """Messages taken but not acked (the gateway died before its commit) come back to the next run;
    acked ones do not."""
    settings = settings_for(mosquitto)
    first = MqttIntake(settings)
    await first.start()
    assert await first.wait_connected(10)
    publisher = mqtt_client(mosquitto.host, mosquitto.port)
    for i in range(10):
        publisher.publish(topic_of(first, "d1"), json.dumps({"seq": i, "metrics": {"x": i}}))
    taken = await collect_batch(first, 10, ack=False)
    assert first.stats()["unacked_size"] == 10
    await first.stop()  # "crash": never acked

    second = MqttIntake(settings)
    await second.start()
    try:
        again = await collect(second, 10)  # acked this time
        assert sorted(r.seq for r in again) == sorted(r.seq for r in taken.readings) == list(range(10))
    finally:
        await second.stop()

    await assert_nothing_acked_comes_back(settings, publisher, 99)


async def test_acks_of_an_earlier_connection_are_dropped_and_the_broker_redelivers(
    intake: MqttIntake, mosquitto: MosquittoServer, mqtt_client: ClientFactory
) -> None:
    publisher = mqtt_client(mosquitto.host, mosquitto.port)
    for i in range(5):
        publisher.publish(topic_of(intake, "d1"), json.dumps({"seq": i, "metrics": {"x": i}}))
    held = await collect_batch(intake, 5, ack=False)
    assert intake._client is not None
    cast(socket.socket, intake._client.socket()).shutdown(socket.SHUT_RDWR)  # connection lost mid-commit
    redelivered = await collect_batch(intake, 5, timeout=15)  # acked on the new connection
    assert sorted(r.seq for r in redelivered.readings) == list(range(5))
    assert intake.ack(held) == 0 and intake.stats()["stale_acks"] == 5


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
    [reading] = await collect(intake, 1)
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
    batch: TelemetryBatch | None = None
    while batch is None and time.monotonic() < deadline:
        seq += 1
        publisher.publish(topic_of(intake, "d1"), json.dumps({"metrics": {"seq": seq}}))
        with contextlib.suppress(TimeoutError):
            batch = await asyncio.wait_for(intake.batches.get(), 0.5)
    assert batch is not None, f"no reading after the restart; state={intake.state()} ({intake.last_error})"
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
        readings = await collect(second, 20)
    finally:
        await second.stop()
    assert sorted(int(r.metrics["seq"]) for r in readings) == list(range(20))


async def test_two_workers_of_a_share_group_split_the_messages(
    mosquitto: MosquittoServer, mqtt_client: ClientFactory
) -> None:
    base = settings_for(mosquitto, share_group="gw")
    workers = [MqttIntake(MqttSettings(**{**_fields(base), "client_id": f"{base.client_id}-{i}"})) for i in (1, 2)]
    for w in workers:
        await w.start()
        assert await w.wait_connected(10)
        assert w.subscription.startswith("$share/gw/")
    try:
        publisher = mqtt_client(mosquitto.host, mosquitto.port)
        n = 200
        for i in range(n):
            publisher.publish(topic_of(workers[0], f"d{i % 7}"), json.dumps({"seq": i, "metrics": {"x": i}}))
        seen: list[int] = []
        deadline = time.monotonic() + 10
        while len(seen) < n and time.monotonic() < deadline:
            for w in workers:
                while not w.batches.empty():
                    b = w.batches.get_nowait()
                    w.ack(b)
                    seen += [r.seq for r in b.readings if r.seq is not None]
            await asyncio.sleep(0.02)
        assert sorted(seen) == list(range(n))  # each message went to exactly one worker
        assert all(w.accepted > 0 for w in workers), [w.accepted for w in workers]
        assert sum(w.accepted for w in workers) == n
    finally:
        for w in workers:
            await w.stop()


def _fields(s: MqttSettings) -> dict[str, Any]:
    return {name: getattr(s, name) for name in MqttSettings.__dataclass_fields__}


async def test_publish_command_reaches_the_device(
    intake: MqttIntake, mosquitto: MosquittoServer, mqtt_client: ClientFactory
) -> None:
    device = mqtt_client(mosquitto.host, mosquitto.port)
    await asyncio.to_thread(device.subscribe, topic_of(intake, "mower-1", "commands"))
    info = intake.publish_command("mower-1", {"action": "return_to_base"})
    await asyncio.to_thread(info.wait_for_publish, 5.0)
    assert await asyncio.to_thread(device.wait_for, lambda ms: len(ms) == 1)
    assert json.loads(device.messages[0].payload) == {"action": "return_to_base"}
    assert device.messages[0].qos == 1
    assert intake.stats()["rejected_total"] == 0  # our own command is not read back as telemetry


async def test_unreachable_broker_is_connecting_and_stops_cleanly() -> None:
    settings = MqttSettings(port=free_port(), client_id=f"gw-test-{secrets.token_hex(4)}")
    gateway = MqttIntake(settings)
    await gateway.start()
    assert not await gateway.wait_connected(0.5)
    assert gateway.state() == "connecting"
    await asyncio.wait_for(gateway.stop(), 5)
    assert gateway.state() == "disconnected"
    assert no_paho_thread(settings.client_id)


# -- username/password and TLS, each on a broker of its own -------------------------------------------


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Callable[[str], MosquittoServer]]:
    made: list[MosquittoServer] = []

    def make(extra: str) -> MosquittoServer:
        server = MosquittoServer(binary=_mosquitto_binary(), workdir=tmp_path, extra=extra)
        server.start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


async def test_username_and_password_from_config(own_broker: Callable[[str], MosquittoServer], tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "gateway", "s3cret-pass"], check=True,
                   capture_output=True)
    passwd.chmod(0o644)
    broker = own_broker(f"allow_anonymous false\npassword_file {passwd}\nuser root")

    wrong = MqttIntake(settings_for(broker, username="gateway", password="wrong"))
    await wrong.start()
    try:
        assert not await wrong.wait_connected(2)
        assert wrong.last_error is not None and "refused" in wrong.last_error
    finally:
        await wrong.stop()

    right = MqttIntake(settings_for(broker, username="gateway", password="s3cret-pass"))
    await right.start()
    try:
        assert await right.wait_connected(10), right.last_error
    finally:
        await right.stop()


async def test_tls_with_a_verified_broker_certificate(
    own_broker: Callable[[str], MosquittoServer], tmp_path: Path
) -> None:
    ca, cert, key = self_signed_ca(tmp_path)
    broker = own_broker(f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\nuser root")
    other_ca, _, _ = self_signed_ca(tmp_path / "..")  # a CA that did not sign the broker's certificate

    good = MqttIntake(settings_for(broker, tls=True, ca_file=str(ca)))
    await good.start()
    try:
        assert await good.wait_connected(10), good.last_error
        assert good._client is not None
        assert cast(Any, good._client.socket()).version().startswith("TLS")
    finally:
        await good.stop()

    impostor = MqttIntake(settings_for(broker, tls=True, ca_file=str(other_ca)))
    await impostor.start()
    try:
        assert not await impostor.wait_connected(2)  # certificate verification fails: never connected
    finally:
        await impostor.stop()


# -- the paho-side callback, driven directly --------------------------------------------------------


def message(topic: bytes, payload: bytes, mid: int = 1, qos: int = 1) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(mid=mid, topic=topic)
    msg.payload = payload
    msg.qos = qos
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
            deliver(gateway, message(b"stores/s1/devices/d1/telemetry", payload, mid=i + 1))
        deliver(gateway, message(b"stores/s1/devices/d1/commands", b"{}", mid=101))
        deliver(gateway, message(b"stores/\xff/devices/d1/telemetry", b"{}", mid=102))
        batch = await asyncio.wait_for(gateway.batches.get(), 2)
        assert [int(r.metrics["i"]) for r in batch.readings] == list(range(100))
        assert drains == 1
        assert gateway.rejected == {BAD_TOPIC: 2}
        assert [mid for _, mid, _ in batch.acks] == list(range(1, 103))  # every message held for its ack

        def broken_clock() -> float:
            raise RuntimeError("clock broke")

        gateway._clock = broken_clock
        deliver(gateway, message(b"stores/s1/devices/d1/telemetry", b'{"metrics": {"i": 1}}', mid=200))
        assert gateway.rejected[INTERNAL_ERROR] == 1
        batch = await asyncio.wait_for(gateway.batches.get(), 2)
        assert [r.reason for r in batch.rejects] == [INTERNAL_ERROR] and len(batch.acks) == 1
    finally:
        await gateway.stop()


TOPICS = st.sampled_from([b"stores/s1/devices/d1/telemetry", b"stores/s1/devices/d1/status",
                          b"stores/s1/devices/d1/events", b"stores/s1/devices/d1/commands", b"stores/x",
                          b"stores/s1/devices/\xff\xfe/telemetry"])
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=3), max_leaves=8)
PAYLOADS = st.one_of(
    st.binary(max_size=64),
    JSONISH.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["ts", "seq", "metrics", "state", "type", "code", "data"]), JSONISH,
                    max_size=4).map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"online", b"offline", b'{"metrics": {"x": 1}}', b'{"type": "error", "code": "E1"}']),
)


def test_fuzzed_messages_never_crash_and_every_one_is_counted_and_held_for_its_ack() -> None:
    async def main() -> None:
        gateway = MqttIntake(MqttSettings(port=free_port(), client_id=f"gw-fuzz-{secrets.token_hex(4)}"))
        await gateway.start()  # nothing listens: the intake is only wired to this loop
        mids = iter(range(1, 10**9))

        @settings(max_examples=300, deadline=None)
        @given(messages=st.lists(st.tuples(TOPICS, PAYLOADS), max_size=20))
        def check(messages: list[tuple[bytes, bytes]]) -> None:
            received, accepted, rejected = gateway.received, gateway.accepted, sum(gateway.rejected.values())
            sent = [next(mids) for _ in messages]
            for mid, (topic, payload) in zip(sent, messages, strict=True):
                deliver(gateway, message(topic, payload, mid=mid))
            gateway._drain()  # what the scheduled callback does; we are on the loop's thread
            got = TelemetryBatch()
            while not gateway.batches.empty():
                got.extend(gateway.batches.get_nowait())
            assert gateway.received - received == len(messages)
            new_rejects = sum(gateway.rejected.values()) - rejected
            assert gateway.accepted - accepted + new_rejects == len(messages)  # every one counted, once
            assert len(got) == len(messages) and len(got.rejects) == new_rejects
            assert [mid for _, mid, _ in got.acks] == sent  # every one held for its ack, in order
            assert INTERNAL_ERROR not in gateway.rejected

        try:
            check()
        finally:
            await gateway.stop()

    asyncio.run(main())


async def test_a_backlog_read_in_large_chunks_arrives_whole_and_acked_messages_never_come_back(
    mosquitto: MosquittoServer, mqtt_client: ClientFactory
) -> None:
    """The intake reads the socket in large chunks (many packets per read, one packet across reads) and
    acknowledges a batch with one write: every queued message arrives once, the oversized one is refused
    as such, and after the acks the broker has nothing left for the session."""
    settings = settings_for(mosquitto)
    first = MqttIntake(settings)
    await first.start()
    assert await first.wait_connected(10)
    await first.stop()

    publisher = mqtt_client(mosquitto.host, mosquitto.port)
    n = 1500
    for i in range(n):
        if i == 700:  # bigger than one read of the socket, and than the payload limit
            publisher.publish(topic_of(first, "d1"), b'{"metrics": {"x": 1}, "pad": "' + b"p" * 150_000 + b'"}')
        publisher.publish(topic_of(first, f"d{i % 7}"), json.dumps({"seq": i, "metrics": {"x": i}}))
    info = publisher.publish(topic_of(first, "d1"), json.dumps({"seq": n, "metrics": {"x": n}}))
    await asyncio.to_thread(info.wait_for_publish, 10.0)

    second = MqttIntake(settings)
    await second.start()
    try:
        got = await collect_batch(second, n + 2, timeout=20)
        # QoS 1 is at least once: should the broker send a message twice on this connection, the copy
        # is taken and acknowledged too, before the session is left (a bounded wait for quiet).
        got.extend(await drain_until_quiet(second, 0.5))
        assert second.stats()["unacked_size"] == 0
    finally:
        await second.stop()
    assert sorted({r.seq for r in got.readings if r.seq is not None}) == list(range(n + 1))
    assert [j.reason for j in got.rejects] == ["too_large"]

    await assert_nothing_acked_comes_back(settings, publisher, 10_000)
