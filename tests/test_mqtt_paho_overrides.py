"""The intake's client leans on paho-mqtt's private methods (devices/mqtt.py's ``_Client``): buffered reads
that go on through many packets per loop pass, and one write for a batch of PUBACKs. They are worth it
(docs/performance.md: about a third less CPU per message in the worker), but paho may rename or reshape
them in any release. These tests fail on such a release, naming the paho version, before a shop does.

They talk to a hand-written broker on a local socket, so what they check is what goes over the wire.
"""

from __future__ import annotations

import inspect
import select
import socket
import struct
from collections.abc import Iterator

import paho.mqtt
import paho.mqtt.client as mqtt
import pytest

from devices.mqtt import _NO_PROPERTIES, READ_BURST, _BufferedSocket, _Client

PAHO = f"paho-mqtt {paho.mqtt.__version__}"
WHAT_TO_DO = ("devices/mqtt.py's _Client overrides paho's private methods, tested on paho-mqtt 2.2: adapt "
              "them to this paho (benchmarks/telemetry_ingest.py --paho-api measures what they buy) or drop "
              "them, and keep pyproject.toml's pin on the versions tested")

# paho's private methods the overrides replace or call, with the parameters they pass or accept.
PRIVATE_METHODS = {
    "_create_socket": ["self"],
    "_packet_read": ["self"],
    "_loop_rc_handle": ["self", "rc"],
    "_packet_queue": ["self", "command", "packet", "mid", "qos", "info"],
    "loop_read": ["self", "max_packets"],
    "_handle_publish": ["self"],
    "_handle_on_message": ["self", "message"],
}
PRIVATE_ATTRIBUTES = ("_sock", "_ssl", "_transport", "_in_packet", "_protocol", "_manual_ack", "_logger")
CONNACK = b"\x20\x03\x00\x00\x00"  # MQTT 5: no session present, success, no properties


def publish_packet(topic: bytes, mid: int, payload: bytes) -> bytes:
    """A QoS 1 MQTT 5 PUBLISH with no properties (short enough for a one-byte remaining length)."""
    body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", mid) + b"\x00" + payload
    assert len(body) < 128
    return bytes([0x32, len(body)]) + body


def read_packet(sock: socket.socket) -> bytes:
    """One whole packet from the client, blocking (the fixture's timeout bounds it)."""
    packet = sock.recv(1)
    length, shift = 0, 0
    while True:
        byte = sock.recv(1)
        packet += byte
        length += (byte[0] & 127) << shift
        shift += 7
        if not byte[0] & 128:
            break
    end = len(packet) + length
    while len(packet) < end:
        packet += sock.recv(end - len(packet))
    return packet


@pytest.fixture
def connected() -> Iterator[tuple[_Client, socket.socket, list[int]]]:
    """The intake's client connected to a listening socket that plays the broker; the mids it delivers."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = _Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="overrides",
                         protocol=mqtt.MQTTv5, manual_ack=True)
        delivered: list[int] = []
        client.on_message = lambda c, u, message: delivered.append(message.mid)
        client.connect("127.0.0.1", server.getsockname()[1], keepalive=60)
        broker, _ = server.accept()
        broker.settimeout(5)
        with broker:
            assert read_packet(broker)[0] == 0x10, "the client's first packet is not a CONNECT"
            try:
                yield client, broker, delivered
            finally:
                client.disconnect()


def test_paho_still_has_the_private_methods_the_overrides_use() -> None:
    for name, parameters in PRIVATE_METHODS.items():
        method = getattr(mqtt.Client, name, None)
        assert callable(method), f"{PAHO} has no Client.{name}. {WHAT_TO_DO}"
        found = list(inspect.signature(method).parameters)
        assert found == parameters, f"{PAHO}: Client.{name}{tuple(found)}, expected {tuple(parameters)}. {WHAT_TO_DO}"
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    for attribute in PRIVATE_ATTRIBUTES:
        assert hasattr(client, attribute), f"{PAHO}: a Client has no {attribute}. {WHAT_TO_DO}"


def test_a_plain_tcp_connection_reads_through_the_buffered_socket(
    connected: tuple[_Client, socket.socket, list[int]],
) -> None:
    client, _, _ = connected
    assert isinstance(client.socket(), _BufferedSocket), (
        f"{PAHO}: the client's socket is {type(client.socket()).__name__}, so _create_socket's override did "
        f"not take. {WHAT_TO_DO}")


def test_many_packets_are_handled_per_loop_pass_and_buffered_ones_never_wait_for_the_socket(
    connected: tuple[_Client, socket.socket, list[int]],
) -> None:
    """More packets than one pass's burst, in one write: paho reads one packet per pass on its own, so they
    take a few passes only if the override reads on through the buffer, and the rest arrive at all only if
    paho's loop honours ``pending()`` (nothing more comes on the socket to wake its ``select``)."""
    client, broker, delivered = connected
    count = READ_BURST + 500
    broker.sendall(CONNACK + b"".join(publish_packet(b"t/d", mid, b"{}") for mid in range(1, count + 1)))
    select.select([client.socket()], [], [], 5)
    passes = 0
    while len(delivered) < count and passes < 20:
        assert client.loop(timeout=0.05) == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        passes += 1
    assert delivered == list(range(1, count + 1)), (
        f"{PAHO}: {len(delivered)} of {count} buffered messages handled in {passes} loop passes. {WHAT_TO_DO}")
    assert passes <= 10, f"{PAHO}: {passes} loop passes for {count} buffered messages. {WHAT_TO_DO}"


def test_nothing_is_acked_on_delivery_and_a_batch_of_acks_is_pubacks_in_order(
    connected: tuple[_Client, socket.socket, list[int]],
) -> None:
    client, broker, delivered = connected
    mids = [7, 8, 300, 65535]
    broker.sendall(CONNACK + b"".join(publish_packet(b"t/d", mid, b"{}") for mid in mids))
    for _ in range(20):
        if len(delivered) == len(mids):
            break
        client.loop(timeout=0.05)
    assert delivered == mids
    broker.setblocking(False)
    with pytest.raises(BlockingIOError):  # manual acks: paho sent nothing back on delivery
        broker.recv(64)
    broker.settimeout(5)

    client.ack_many(mids)
    client.loop(timeout=0.05)
    acks = [read_packet(broker) for _ in mids]
    assert acks == [struct.pack("!BBH", 0x40, 2, mid) for mid in mids], (
        f"{PAHO}: ack_many's PUBACKs came out as {acks!r}. {WHAT_TO_DO}")


def test_a_publish_without_properties_skips_paho_s_properties_and_one_with_them_keeps_them(
    connected: tuple[_Client, socket.socket, list[int]],
) -> None:
    """The PUBLISH fast path: same topic, payload, mid and flags as paho's own; a packet that carries
    properties (here a content type) takes paho's path and the message has them."""
    client, broker, _ = connected
    got: list[mqtt.MQTTMessage] = []
    client.on_message = lambda c, u, message: got.append(message)
    plain = publish_packet(b"s1/devices/d1/telemetry", 41, b'{"metrics": {"hr": 61}}')
    flagged = bytes([0x32 | 0x08 | 0x01]) + publish_packet(b"t/x", 42, b"{}")[1:]  # dup and retain set
    props = b"\x03" + struct.pack("!H", 16) + b"application/json"  # content type
    body = struct.pack("!H", 3) + b"t/p" + struct.pack("!H", 43) + bytes([len(props)]) + props + b"{}"
    with_props = bytes([0x32, len(body)]) + body
    broker.sendall(CONNACK + plain + flagged + with_props)
    for _ in range(20):
        if len(got) == 3:
            break
        client.loop(timeout=0.05)
    seen = [(m.topic, m.payload, m.mid, m.qos, m.dup, m.retain) for m in got]
    assert seen == [("s1/devices/d1/telemetry", b'{"metrics": {"hr": 61}}', 41, 1, False, False),
                    ("t/x", b"{}", 42, 1, True, True), ("t/p", b"{}", 43, 1, False, False)], f"{PAHO}: {seen}"
    assert getattr(got[2].properties, "ContentType", None) == "application/json", f"{PAHO}. {WHAT_TO_DO}"
    assert got[0].properties is got[1].properties is _NO_PROPERTIES  # the fast path took them
