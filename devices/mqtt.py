"""MQTT telemetry intake: a paho-mqtt 2.x client feeding device messages to asyncio in batches.

paho runs its network loop in its own thread (``loop_start``); this module is the only place
that crosses from that thread into the event loop. Messages are parsed on the paho thread (cheap,
pure) and handed over in batches: the first message of a burst schedules one drain callback with
``call_soon_threadsafe`` and the rest just join the pending :class:`TelemetryBatch`, so a burst of
N messages costs one event-loop wake-up instead of N.

**Nothing lost.** The client runs with ``manual_ack=True``: paho does not acknowledge a QoS 1
message when ``on_message`` returns. The consumer commits the batch to the database and only then
calls :meth:`MqttIntake.ack`, which sends the PUBACKs. A crash, a failed commit or a lost connection
before that leaves the messages unacknowledged, and the broker (persistent session) redelivers them;
the storage's unique (device, key) turns a redelivery into a counted duplicate. Acks of a previous
connection are dropped rather than sent (their packet ids mean nothing on the new one). The broker's
in-flight window (our Receive Maximum) bounds how many unacknowledged messages we hold: that is the
backpressure, so the queue here never grows past it.

Bad input never stops the stream: a malformed payload is counted by reason code, logged with its
topic (rate-limited, a short prefix of the payload) and passed on as a :class:`Rejected` so that it
lands in the dead-letter table, and is acknowledged only once it is there.

Other publishers on the same broker (ESPresense nodes reporting BLE sightings) ride on the same
connection through :class:`ExtraSubscription`: one more filter, its own parser and queue, its
rejects counted as ``<name>:<reason>``. Sightings are ephemeral: they are acknowledged on arrival.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devices.payloads import PayloadError, Rejected, TelemetryBatch, parse_event, parse_status, parse_telemetry
from devices.topics import DEFAULT_PREFIX, command_topic, device_filter, gateway_status_topic, parse_topic

log = logging.getLogger(__name__)

State = Literal["connected", "connecting", "disconnected"]

BAD_TOPIC = "bad_topic"
INTERNAL_ERROR = "internal_error"
ONLINE = b"online"
OFFLINE = b"offline"

# Log the first few rejects of each reason, then one in LOG_EVERY: a broken device sending
# 100 messages a second must not fill the SD card with warnings.
LOG_FIRST = 10
LOG_EVERY = 1000
PAYLOAD_PREFIX = 32


class _DropPostDisconnectNoise(logging.Filter):
    """paho 2.2 logs "Client is not connected" at ERROR after every clean ``disconnect()``: its
    thread makes one more loop pass over the socket it has just closed. Nothing is wrong then,
    and an ERROR line on every shutdown would teach operators to ignore ERROR lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


_paho_log = logging.getLogger(f"{__name__}.paho")
_paho_log.addFilter(_DropPostDisconnectNoise())


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """How to reach the broker and who we are there. ``client_id`` must be stable per gateway:
    the broker keys the persistent session (and the messages queued while we were away) by it."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "engagement-gateway"
    store_id: str = "store-1"
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    keepalive: int = 30
    topic_prefix: str = DEFAULT_PREFIX
    qos: int = 1
    clean_start: bool = False
    session_expiry: int = 3600
    """MQTT 5 only: seconds the broker keeps our session after a disconnect (0 would end it at once,
    making ``clean_start=False`` useless). MQTT 3.1.1 sessions last until the broker drops them."""
    reconnect_min_delay: int = 1
    reconnect_max_delay: int = 30
    ca_cert_reqs: bool = True
    """TLS: verify the broker's certificate (and host name) against ``ca_file`` or the system store."""
    client_cert: str | None = None
    client_key: str | None = None
    receive_maximum: int = 10000
    """MQTT 5: at most this many unacknowledged QoS 1 messages in flight to us. Acks go out only after
    the commit, so this is the backpressure; a few batches' worth lets the broker keep sending while a
    batch commits (Mosquitto's ``max_inflight_messages`` caps it too: 20 by default, far too few)."""
    max_batch: int = 4000
    """Messages per batch at most: a commit of one batch overlaps the arrival of the next. Large, because
    much of a batch's cost is per device (its registry row, rule states, hour rollups), not per message:
    500 devices' backlog costs about 40 % less CPU per message in batches of 4000 than of 1000."""
    share_group: str | None = None
    """Subscribe as ``$share/<group>/...``: workers of one group split the messages between them.
    Each worker needs its own ``client_id``."""


@dataclass(frozen=True, slots=True)
class ExtraSubscription:
    """Another topic filter on the same connection, e.g. remote BLE receivers' sightings.

    ``parse(topic, payload, received_at)`` runs on paho's thread and returns the item for ``queue``;
    an exception of ``errors`` is a reject: counted as ``<name>:<reason_code>`` and logged with its
    topic, unless it says it is ``quiet`` (expected traffic we ignore), which is only counted.
    """

    name: str
    topic_filter: str
    parse: Callable[[str, bytes, float], Any]
    queue: asyncio.Queue[Any]
    errors: tuple[type[Exception], ...] = (ValueError,)


_PARSERS = {"telemetry": parse_telemetry, "status": parse_status, "events": parse_event}

READ_CHUNK = 65536
READ_BURST = 1000  # packets read from the buffer per loop pass, so PUBACKs and keepalives still get turns


class _BufferedSocket:
    """A plain TCP socket whose ``recv`` serves paho's small reads from one large read.

    paho 2.x reads every packet with three or more ``recv`` calls (one byte of command, the remaining
    length byte by byte, then the body) after a ``select`` each: about three syscalls per telemetry
    message. This reads up to READ_CHUNK bytes at once and hands them out; ``pending()`` is the hook
    paho already checks for TLS sockets' buffered bytes, so its loop does not wait in ``select`` while
    data sits here. Everything else is the socket's own.
    """

    __slots__ = ("_buf", "_pos", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, bufsize: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            buf = self._sock.recv(READ_CHUNK)  # BlockingIOError and EOF (b"") go to paho as they are
            if not buf:
                return buf
            pos = 0
            self._buf = buf
        end = pos + bufsize
        self._pos = end
        return buf[pos:end]

    def pending(self) -> int:
        return len(self._buf) - self._pos

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Client(mqtt.Client):
    """paho's client with a buffered read path and one write for a batch of PUBACKs (plain TCP only;
    TLS and websockets keep paho's own path). The protocol handling is paho's, unchanged.

    Both lean on paho's private methods, which is why pyproject.toml pins paho to the minor version tested:
    with paho's public API only, the intake takes about twice the CPU per message (docs/performance.md,
    measured by ``benchmarks/telemetry_ingest.py --paho-api``). tests/test_mqtt_paho_overrides.py fails,
    naming the paho version, when a paho release renames or reshapes what they use."""

    def _create_socket(self) -> Any:
        sock = super()._create_socket()
        if not self._ssl and self._transport == "tcp" and isinstance(sock, socket.socket):
            return _BufferedSocket(sock)
        return sock

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        """paho reads one packet per ``select``; go on through what is already buffered."""
        rc = super().loop_read(max_packets)
        sock = self._sock
        for _ in range(READ_BURST):
            if rc != mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS or sock is not self._sock \
                    or not isinstance(sock, _BufferedSocket) or not sock.pending():
                break
            rc = self._packet_read()
            if rc == mqtt.MQTTErrorCode.MQTT_ERR_AGAIN:  # a packet split across reads: the rest comes later
                return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
            if rc > 0:
                return self._loop_rc_handle(rc)
        return rc

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        """paho's, without the Properties object it builds for every PUBLISH (a third of its cost per message)
        when the packet carries none: MQTT 5, QoS 1, manual acks, a property length of 0, no debug logging.
        Anything else (properties, other QoS, an empty or short topic, a malformed packet) is paho's own path."""
        header, packet = self._in_packet["command"], self._in_packet["packet"]
        if header & 0x06 != 0x02 or self._protocol != mqtt.MQTTv5 or not self._manual_ack \
                or self.on_log is not None or (self._logger is not None and self._logger.isEnabledFor(logging.DEBUG)):
            return super()._handle_publish()
        at = 2 + ((packet[0] << 8) | packet[1]) if len(packet) >= 2 else 0
        if at <= 2 or len(packet) < at + 3 or packet[at + 2] != 0:
            return super()._handle_publish()
        message = mqtt.MQTTMessage(mid=(packet[at] << 8) | packet[at + 1], topic=bytes(packet[2:at]))
        message.dup, message.qos, message.retain = bool(header & 0x08), 1, bool(header & 0x01)
        message.properties = _NO_PROPERTIES
        message.payload = bytes(packet[at + 3:])
        message.timestamp = time.monotonic()  # paho's time_func
        self._handle_on_message(message)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS  # manual acks: the intake acks after the commit

    def ack_many(self, mids: list[int]) -> None:
        """PUBACKs for QoS 1 messages as one queued write (one wake-up of paho's thread, one ``send``)
        instead of one each. Same bytes on the wire as ``ack(mid, 1)`` for every mid."""
        if mids:
            self._packet_queue(PUBACK, b"".join([_PUBACK.pack(PUBACK, 2, mid) for mid in mids]), 0, 1)


PUBACK = 0x40
_NO_PROPERTIES = Properties(PacketTypes.PUBLISH)  # shared by every PUBLISH that carries none; nobody writes it
_PUBACK = struct.Struct("!BBH")


def _literal_prefix(topic_filter: str) -> str:
    """The filter's levels before its first wildcard, without the last "/" (``a/b/#`` matches ``a/b``):
    every topic the filter matches starts with it."""
    literal: list[str] = []
    for level in topic_filter.split("/"):
        if level in ("+", "#"):
            break
        literal.append(level)
    return "/".join(literal)


class TelemetryIntake(Protocol):
    """What the runtime needs of a telemetry source (one API over swappable backends, as the Scanner is):
    batches to commit, an ack once each is committed, and a way back to the devices."""

    batches: asyncio.Queue[TelemetryBatch]
    max_batch: int
    """How many messages the runtime may join into one commit."""

    async def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None: ...
    async def stop(self, timeout: float = 2.0) -> None: ...
    def ack(self, batch: TelemetryBatch) -> int: ...
    def state(self) -> str: ...
    def stats(self) -> dict[str, Any]: ...
    def add_subscription(self, extra: ExtraSubscription) -> None: ...
    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> Any: ...
    def publish_command(self, device_id: str, payload: bytes | str | dict[str, Any],
                        store_id: str | None = None) -> Any: ...


class MqttIntake:
    """Subscribe to device telemetry, status and events; put each :class:`TelemetryBatch` on ``batches``.

    Lifecycle: ``await start()`` (returns at once; the connection is made, and remade after any
    loss, by paho's thread with exponential backoff), then ``await stop()``. Whoever takes a batch
    must call :meth:`ack` once it is committed (or dead-lettered): until then the broker holds it.
    """

    def __init__(
        self,
        settings: MqttSettings,
        batches: asyncio.Queue[TelemetryBatch] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if batches is not None and batches.maxsize:
            # Backpressure is the broker's in-flight window (receive_maximum), not a bounded queue here.
            raise ValueError("the batch queue must be unbounded; the broker's in-flight window bounds it")
        group = settings.share_group
        if group is not None and (not group or any(c in group for c in "/+#")):
            raise ValueError(f"share_group {group!r} must be one topic level")
        self.settings = settings
        self.max_batch = settings.max_batch
        self.batches: asyncio.Queue[TelemetryBatch] = batches if batches is not None else asyncio.Queue()
        self.rejected: Counter[str] = Counter()
        """Refused messages by reason code (PayloadError codes, ``bad_topic``, ``internal_error``)."""
        self.received = 0
        self.accepted = 0
        self.acked = 0
        self.stale_acks = 0
        self.unacked = 0
        self.connects = 0
        self.last_error: str | None = None
        self.last_connected_at: float | None = None
        self.last_connack_at: float | None = None
        self._clock = clock
        share = f"$share/{settings.share_group}/" if settings.share_group else ""
        self._filters = [share + device_filter(kind, settings.topic_prefix) for kind in _PARSERS]  # type: ignore[arg-type]
        self._filter = self._filters[0]
        self._status_topic = gateway_status_topic(
            settings.store_id, settings.client_id, settings.topic_prefix
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: _Client | None = None
        self._state: State = "disconnected"
        self._stopping = False
        self._lock = threading.Lock()
        self._generation = 0  # one per connection: acks of an older one are never sent
        self._pending = TelemetryBatch(prefix=settings.topic_prefix)
        self._full: list[TelemetryBatch] = []
        self._drain_scheduled = False
        self._connected_event: asyncio.Event | None = None
        self._subscribe_mid: int | None = None
        self._extra: list[ExtraSubscription] = []
        self._extra_literal: list[str] = []  # each filter's levels before its first wildcard: a cheap first test
        self._pending_extra: list[tuple[asyncio.Queue[Any], Any]] = []
        self.extra_accepted: Counter[str] = Counter()
        """Accepted messages per extra subscription name."""

    def add_subscription(self, extra: ExtraSubscription) -> None:
        """Subscribe to one more filter (before ``start``); its items go to ``extra.queue``."""
        if self._client is not None:
            raise RuntimeError("add subscriptions before start()")
        if extra.queue.maxsize:
            raise ValueError("the queue must be unbounded; the consumer owns backpressure")
        self._extra.append(extra)
        self._extra_literal.append(_literal_prefix(extra.topic_filter))

    # -- status -------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._state == "connected"

    def state(self) -> State:
        """For /health: ``connected`` (subscribed, receiving), ``connecting`` (started, retrying)
        or ``disconnected`` (not started, or stopped)."""
        return self._state

    @property
    def status_topic(self) -> str:
        """The retained topic saying whether this gateway is ``online`` or ``offline``."""
        return self._status_topic

    @property
    def subscription(self) -> str:
        """The telemetry filter (with its ``$share/<group>/`` prefix when shared)."""
        return self._filter

    @property
    def subscriptions(self) -> list[str]:
        return list(self._filters)

    def stats(self) -> dict[str, Any]:
        """Counters for /metrics and /health. ``unacked_size``: messages taken from the broker and not yet
        acknowledged (in a batch queued or being committed); ``queue_depth``: batches waiting."""
        return {"state": self._state, "received": self.received, "accepted": self.accepted,
                "rejected": dict(self.rejected), "rejected_total": sum(self.rejected.values()),
                "acked": self.acked, "stale_acks": self.stale_acks, "unacked_size": self.unacked,
                "queue_depth": self.batches.qsize(), "connects": self.connects,
                "extra_accepted": dict(self.extra_accepted)}

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start connecting in paho's thread; returns without waiting for the broker."""
        if self._client is not None:
            raise RuntimeError("MqttIntake already started")
        self._loop = loop or asyncio.get_running_loop()
        self._connected_event = asyncio.Event()
        self._stopping = False
        client = self._make_client()
        s = self.settings
        if s.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.session_expiry
            props.ReceiveMaximum = max(1, min(65535, s.receive_maximum))
            client.connect_async(s.host, s.port, s.keepalive, clean_start=s.clean_start, properties=props)
        else:
            client.connect_async(s.host, s.port, s.keepalive)
        self._client = client
        self._state = "connecting"
        client.loop_start()
        log.info("MQTT intake connecting to %s:%d as %r (MQTT %s)", s.host, s.port, s.client_id, s.protocol)

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until connected and subscribed; True if so."""
        if self.connected:
            return True
        if self._connected_event is None:
            return False
        try:
            await asyncio.wait_for(self._connected_event.wait(), timeout)
        except TimeoutError:
            return False
        return self.connected

    async def stop(self, timeout: float = 2.0) -> None:
        """Say "offline", disconnect and join paho's thread. Safe to call twice or before start."""
        client = self._client
        if client is None:
            return
        self._stopping = True
        if self.connected:
            info = client.publish(self._status_topic, OFFLINE, qos=1, retain=True)
            with contextlib.suppress(ValueError, RuntimeError):
                await asyncio.to_thread(info.wait_for_publish, timeout)
        client.disconnect()
        await asyncio.to_thread(client.loop_stop)
        self._client = None
        self._state = "disconnected"
        # Parsed but unacknowledged: the broker redelivers them to our session; a consumer still
        # draining may commit them first, and the redelivery is then a counted duplicate.
        self._drain()
        log.info("MQTT intake stopped (%d accepted, %d refused, %d acknowledged)", self.accepted,
                 sum(self.rejected.values()), self.acked)

    def ack(self, batch: TelemetryBatch) -> int:
        """Acknowledge a committed batch to the broker (any thread). Returns the PUBACKs sent; acks of
        an earlier connection are dropped, as the broker redelivers those messages anyway."""
        client = self._client
        with self._lock:
            generation = self._generation
            self.unacked -= len(batch.acks)
        mids: list[int] = []  # QoS 1: one write for all of them
        sent = 0
        for gen, mid, qos in batch.acks:
            if client is None or gen != generation:
                self.stale_acks += 1
                continue
            sent += 1
            if qos == 1:
                mids.append(mid)
            elif qos == 2:  # not what devices are asked for, but a broker may deliver it
                client.ack(mid, qos)
        batch.acks.clear()
        if client is not None:
            client.ack_many(mids)
        self.acked += sent
        return sent

    def publish_command(self, device_id: str, payload: bytes | str | dict[str, Any],
                        store_id: str | None = None) -> mqtt.MQTTMessageInfo:
        """Send a command to one device on ``{prefix}/{store}/devices/{id}/commands`` at QoS 1.

        A dict is sent as JSON. The device should subscribe with a persistent session so a command
        sent while it is away waits at the broker. Any thread; returns paho's message info.
        """
        body = json.dumps(payload, separators=(",", ":")) if isinstance(payload, dict) else payload
        topic = command_topic(store_id or self.settings.store_id, device_id, self.settings.topic_prefix)
        return self.publish(topic, body, qos=1)

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        """Publish from any thread; QoS 1 messages published while offline go out on reconnect."""
        if self._client is None:
            raise RuntimeError("MqttIntake is not started")
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    # -- paho side (runs in paho's thread) ----------------------------------------------------

    def _make_client(self) -> _Client:
        s = self.settings
        if s.protocol == "5":
            client = _Client(
                callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                client_id=s.client_id,
                protocol=mqtt.MQTTv5,
                manual_ack=True,
            )
        else:
            client = _Client(
                callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                client_id=s.client_id,
                protocol=mqtt.MQTTv311,
                clean_session=s.clean_start,
                manual_ack=True,
            )
        client.enable_logger(_paho_log)
        client.suppress_exceptions = True  # a bug in a callback must not end the network thread
        secure_client(client, s)
        client.reconnect_delay_set(s.reconnect_min_delay, s.reconnect_max_delay)
        client.will_set(self._status_topic, OFFLINE, qos=1, retain=True)
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    @staticmethod
    def _on_socket_open(client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Telemetry is many small packets; don't let Nagle hold PUBACKs back.
        with contextlib.suppress(AttributeError, OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: Any,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused connection: {reason_code}"
            log.warning("MQTT broker %s:%d refused us: %s", client.host, client.port, reason_code)
            return
        with self._lock:
            self._generation += 1
        self.connects += 1
        self.last_connack_at = time.monotonic()  # a persistent session's queue starts flowing now
        # Subscribe on every connect: cheap, and correct even if the broker lost our session.
        # We count as connected only once the SUBACK is back (see _on_subscribe). One SUBSCRIBE for
        # all filters: one SUBACK says we are connected.
        qos = self.settings.qos
        filters = [*((f, qos) for f in self._filters), *((e.topic_filter, qos) for e in self._extra)]
        _, self._subscribe_mid = client.subscribe(filters)
        client.publish(self._status_topic, ONLINE, qos=1, retain=True)
        log.info(
            "MQTT connected to %s:%d (session present: %s)",
            self.settings.host,
            self.settings.port,
            flags.session_present,
        )

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[Any],
        properties: Properties | None,
    ) -> None:
        if mid != self._subscribe_mid:
            return
        failed = [code for code in reason_codes if code.is_failure]
        if failed:
            self.last_error = f"subscription to {self._filter} refused: {failed[0]}"
            log.error("MQTT broker refused our subscription to %s: %s", self._filter, failed[0])
            return
        self._state = "connected"
        self.last_error = None
        self.last_connected_at = time.monotonic()
        log.info("MQTT subscribed to %s", ", ".join(self._filters))
        self._call_in_loop(self._set_connected_event)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if self.last_error is None:  # once per outage, not once per retry
            log.warning("MQTT broker %s:%d unreachable; retrying", self.settings.host, self.settings.port)
        self.last_error = "broker unreachable"
        self._state = "connecting"

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: Any,
        properties: Properties | None,
    ) -> None:
        if self._stopping:
            self._state = "disconnected"
            return
        self._state = "connecting"
        if self.last_error is not None and self.last_error.startswith("broker refused"):
            return  # the CONNACK said why (bad credentials...); the disconnect that follows says nothing new
        self.last_error = f"connection lost: {reason_code}"
        log.warning("MQTT connection lost (%s); reconnecting", reason_code)
        self._call_in_loop(self._clear_connected_event)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.received += 1
        token = (self._generation, message.mid, message.qos)
        try:
            try:
                topic = message.topic
            except UnicodeDecodeError as exc:  # exc.object: the topic's raw bytes
                self._reject(token, BAD_TOPIC, repr(bytes(exc.object[:80])), message.payload, "topic is not UTF-8")
                return
            for extra, literal in zip(self._extra, self._extra_literal, strict=True):
                # paho's matcher builds a tree per call: only for topics that can match at all
                if topic.startswith(literal) and mqtt.topic_matches_sub(extra.topic_filter, topic):
                    self._on_extra(extra, topic, bytes(message.payload))
                    if self._client is not None:
                        self._client.ack(message.mid, message.qos)  # sightings are ephemeral: taken is done
                    return
            parts = parse_topic(topic, self.settings.topic_prefix)
            if parts is None or parts.kind == "commands":
                self._reject(token, BAD_TOPIC, topic, message.payload, "not a device telemetry, status or events topic")
                return
            try:
                item = _PARSERS[parts.kind](parts, message.payload, self._clock())
            except PayloadError as exc:
                self._reject(token, exc.reason_code, topic, message.payload, exc.message, parts.device_id)
                return
            self.accepted += 1
            with self._lock:
                pending = self._pending
                if parts.kind == "telemetry":
                    pending.readings.append(item)  # type: ignore[arg-type]
                elif parts.kind == "status":
                    pending.statuses.append(item)  # type: ignore[arg-type]
                else:
                    pending.events.append(item)  # type: ignore[arg-type]
                self._hold(token)
        except Exception as exc:
            log.exception("MQTT intake failed on a message; dead-lettering it and continuing")
            with contextlib.suppress(Exception):
                self._reject(token, INTERNAL_ERROR, str(getattr(message, "topic", "?")), message.payload,
                             f"{type(exc).__name__}: {exc}"[:200])

    def _hold(self, token: tuple[int, int, int]) -> None:
        """Under the lock: remember the message's ack, and wake the loop once per burst."""
        self._pending.acks.append(token)
        self.unacked += 1
        if len(self._pending.acks) >= self.settings.max_batch:
            self._full.append(self._pending)
            self._pending = TelemetryBatch(prefix=self.settings.topic_prefix)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._call_in_loop(self._drain)

    def _on_extra(self, extra: ExtraSubscription, topic: str, payload: bytes) -> None:
        try:
            item = extra.parse(topic, payload, self._clock())
        except extra.errors as exc:
            reason = f"{extra.name}:{getattr(exc, 'reason_code', 'rejected')}"
            if getattr(exc, "quiet", False):
                self.rejected[reason] += 1
            else:
                self._count_reject(reason, topic, payload, str(getattr(exc, "message", exc)))
            return
        self.extra_accepted[extra.name] += 1
        with self._lock:
            self._pending_extra.append((extra.queue, item))
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        self._call_in_loop(self._drain)

    def _reject(self, token: tuple[int, int, int], reason: str, topic: str, payload: bytes | bytearray,
                detail: str, device_id: str | None = None) -> None:
        """Count and log it, and pass it on for the dead-letter table; acked once that is committed."""
        with self._lock:
            self._pending.rejects.append(Rejected(topic, reason, detail, bytes(payload[:1024]), self._safe_now(),
                                                  device_id))
            self._hold(token)
        self._count_reject(reason, topic, payload, detail)

    def _safe_now(self) -> float:
        try:
            return self._clock()
        except Exception:
            return time.time()

    def _count_reject(self, reason: str, topic: str, payload: bytes | bytearray, detail: str) -> None:
        self.rejected[reason] += 1
        count = self.rejected[reason]
        if count <= LOG_FIRST or count % LOG_EVERY == 0:
            log.warning(
                "dropped MQTT message on %s: %s (%s); payload starts %r; %d dropped for this reason",
                topic,
                reason,
                detail,
                bytes(payload[:PAYLOAD_PREFIX]),
                count,
            )

    def _call_in_loop(self, callback: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:
            return
        # RuntimeError: the loop closed during shutdown; stop() drains what is pending.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(callback)

    # -- event-loop side ----------------------------------------------------------------------

    def _drain(self) -> None:
        with self._lock:
            batches, self._full = self._full, []
            if self._pending.acks:
                batches.append(self._pending)
                self._pending = TelemetryBatch(prefix=self.settings.topic_prefix)
            extras, self._pending_extra = self._pending_extra, []
            self._drain_scheduled = False
        for batch in batches:
            self.batches.put_nowait(batch)
        for queue, item in extras:
            queue.put_nowait(item)

    def _set_connected_event(self) -> None:
        if self._connected_event is not None:
            self._connected_event.set()

    def _clear_connected_event(self) -> None:
        if self._connected_event is not None:
            self._connected_event.clear()


def secure_client(client: mqtt.Client, s: MqttSettings) -> None:
    """Credentials and TLS from ``s`` (``[mqtt]``'s username, password, tls, ca_file, tls_verify,
    client_cert, client_key) on a paho client before it connects: the one place every connection the
    gateway makes to a broker gets them (the intake, the store's uplink, head office's consumer, the
    doctor), so none goes in the clear, or unverified, when another would not. A missing or unreadable
    CA or key file raises ``OSError`` here, before any connection."""
    if s.username:
        client.username_pw_set(s.username, s.password or None)
    if s.tls:
        client.tls_set(ca_certs=s.ca_file, certfile=s.client_cert, keyfile=s.client_key,
                       cert_reqs=ssl.CERT_REQUIRED if s.ca_cert_reqs else ssl.CERT_NONE)
        client.tls_insecure_set(not s.ca_cert_reqs)


def settings_from_config(m: Any, store_id: str) -> MqttSettings:
    """The intake's settings from ``[mqtt]`` of gateway.toml (gateway.app.config.MqttSettings)."""
    return MqttSettings(
        host=m.host, port=m.port, client_id=m.client_id or f"gateway-{store_id}", store_id=store_id,
        protocol="3.1.1" if m.protocol == "3.1.1" else "5", username=m.username or None,
        password=m.password or None, tls=m.tls, ca_file=m.ca_file or None, keepalive=m.keepalive,
        topic_prefix=m.topic_prefix, session_expiry=m.session_expiry, reconnect_min_delay=m.reconnect_min_delay,
        reconnect_max_delay=m.reconnect_max_delay, ca_cert_reqs=m.tls_verify, client_cert=m.client_cert or None,
        client_key=m.client_key or None, receive_maximum=m.receive_maximum, max_batch=m.max_batch,
        share_group=m.share_group or None)
