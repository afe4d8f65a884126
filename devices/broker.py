"""Find an MQTT broker, or start an embedded one, so the demo runs with or without Mosquitto.

A broker that already answers at host:port (a shop's Mosquitto) is always preferred. Only when
nothing listens there do we start amqtt inside this asyncio loop. amqtt speaks MQTT 3.1.1 only
(it answers any other protocol level with CONNACK "unacceptable protocol version"), so the
handle tells the intake which protocol to use.

Presence is tested with a real MQTT CONNECT/CONNACK exchange on a raw socket, not just a TCP
connect: it tells a broker from some other server on the port and learns the protocol (MQTT 5
first, then 3.1.1) without a client thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

Protocol = Literal["5", "3.1.1"]

PROBE_CONNECT_TIMEOUT = 1.0
PROBE_REPLY_TIMEOUT = 2.0

_CONNACK = 0x20
_DISCONNECT = b"\xe0\x00"
# CONNACK codes meaning "I don't speak that protocol level": 3.1.1's 0x01 and MQTT 5's 0x84.
_UNSUPPORTED_PROTOCOL = {0x01, 0x84}


class BrokerError(RuntimeError):
    """No usable broker: the port is held by something that is not MQTT, or amqtt failed to start."""


@dataclass
class BrokerHandle:
    """Where the broker is, which MQTT protocol to speak to it, and how to stop it if it is ours."""

    host: str
    port: int
    protocol: Protocol
    embedded: bool
    description: str
    _broker: Any = field(default=None, repr=False)

    async def stop(self) -> None:
        """Shut the embedded broker down; an external broker is left alone. Safe to call twice."""
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _connect_packet(level: int, client_id: str) -> bytes:
    """A minimal clean-session CONNECT at protocol level 4 (3.1.1) or 5."""
    cid = client_id.encode()
    variable = b"\x00\x04MQTT" + bytes([level, 0x02]) + (10).to_bytes(2, "big")
    if level == 5:
        variable += b"\x00"  # no properties
    body = variable + len(cid).to_bytes(2, "big") + cid
    return bytes([0x10]) + _remaining_length(len(body)) + body


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    for _ in range(4):
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    return header, await reader.readexactly(length)


async def _probe_level(host: str, port: int, level: int) -> int | None:
    """Send CONNECT at one protocol level; return the CONNACK code, or None if no CONNACK came.

    Raises OSError if nothing accepts the TCP connection.
    """
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_CONNECT_TIMEOUT)
    try:
        writer.write(_connect_packet(level, f"gw-probe-{secrets.token_hex(4)}"))
        await writer.drain()
        header, body = await asyncio.wait_for(_read_packet(reader), PROBE_REPLY_TIMEOUT)
        if header != _CONNACK or len(body) < 2:
            return None
        code = body[1]
        if code == 0:
            writer.write(_DISCONNECT)
            await writer.drain()
        return code
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def probe_broker(host: str, port: int) -> Protocol | None:
    """The protocol an MQTT broker at host:port speaks, or None if nothing listens there.

    Any CONNACK counts as "a broker is there", even a refusal for credentials: that broker is
    the shop's to configure, and starting a second one on its port could not work anyway.
    """
    try:
        code = await _probe_level(host, port, 5)
    except (OSError, TimeoutError):
        return None
    if code is not None and code not in _UNSUPPORTED_PROTOCOL:
        return "5"
    try:
        code = await _probe_level(host, port, 4)
    except (OSError, TimeoutError):
        return None
    if code is None:
        raise BrokerError(f"{host}:{port} accepts connections but does not answer MQTT CONNECT")
    return "3.1.1"


async def start_embedded_broker(host: str, port: int) -> BrokerHandle:
    """Start amqtt on host:port in the running loop (anonymous access, no $SYS, no packet log)."""
    from amqtt.broker import Broker  # imported late: only the fallback path needs it

    config: dict[str, Any] = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config, loop=asyncio.get_running_loop())
    try:
        await broker.start()
    except Exception as exc:  # amqtt wraps bind errors in its own BrokerError
        raise BrokerError(f"could not start an embedded amqtt broker on {host}:{port}: {exc}") from exc
    return BrokerHandle(
        host=host,
        port=port,
        protocol="3.1.1",
        embedded=True,
        description=f"started an embedded amqtt broker on {host}:{port} (MQTT 3.1.1)",
        _broker=broker,
    )


async def ensure_broker(host: str = "127.0.0.1", port: int = 1883) -> BrokerHandle:
    """Use the broker at host:port if one answers, else start an embedded amqtt broker there."""
    protocol = await probe_broker(host, port)
    if protocol is not None:
        handle = BrokerHandle(
            host=host,
            port=port,
            protocol=protocol,
            embedded=False,
            description=f"using the MQTT broker at {host}:{port} (MQTT {protocol})",
        )
    else:
        handle = await start_embedded_broker(host, port)
    log.info("%s", handle.description)
    return handle
