"""MQTT telemetry intake: a paho-mqtt 2.x client feeding validated Readings to asyncio.

paho runs its network loop in its own thread (``loop_start``); this module is the only place
that crosses from that thread into the event loop. Messages are parsed on the paho thread (cheap,
pure) and handed over in batches: the first reading of a burst schedules one drain callback with
``call_soon_threadsafe`` and the rest just join the pending list, so a burst of N messages costs
one event-loop wake-up instead of N.

Bad input never stops the stream: a malformed payload is counted in ``stats`` by reason code and
logged with its topic (rate-limited, never more than a short prefix of the payload).

Other publishers on the same broker (ESPresense nodes reporting BLE sightings) ride on the same
connection through :class:`ExtraSubscription`: one more filter, its own parser and queue, its
rejects counted in ``stats`` as ``<name>:<reason>``.

The session is persistent by default (clean start off, with a session expiry on MQTT 5): while the
gateway is away the broker keeps its subscription and queues QoS 1 telemetry for it. paho
acknowledges a QoS 1 message when ``on_message`` returns, that is once the reading is queued in
memory, not once it is persisted: a crash loses what is still in ``readings``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devices.payloads import PayloadError, Reading, parse_telemetry
from devices.topics import DEFAULT_PREFIX, gateway_status_topic, parse_topic, telemetry_filter

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


class MqttIntake:
    """Subscribe to device telemetry and put each valid :class:`Reading` on ``readings``.

    Lifecycle: ``await start()`` (returns at once; the connection is made, and remade after any
    loss, by paho's thread with exponential backoff), then ``await stop()``.
    """

    def __init__(
        self,
        settings: MqttSettings,
        readings: asyncio.Queue[Reading] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if readings is not None and readings.maxsize:
            # By the time a reading is here paho has acknowledged it: a full queue could only drop it.
            raise ValueError("the readings queue must be unbounded; the consumer owns backpressure")
        self.settings = settings
        self.readings: asyncio.Queue[Reading] = readings if readings is not None else asyncio.Queue()
        self.stats: Counter[str] = Counter()
        """Dropped messages by reason code (PayloadError codes, ``bad_topic``, ``internal_error``)."""
        self.received = 0
        self.accepted = 0
        self.last_error: str | None = None
        self._clock = clock
        self._filter = telemetry_filter(settings.topic_prefix)
        self._status_topic = gateway_status_topic(
            settings.store_id, settings.client_id, settings.topic_prefix
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._state: State = "disconnected"
        self._stopping = False
        self._lock = threading.Lock()
        self._pending: list[Reading] = []
        self._drain_scheduled = False
        self._connected_event: asyncio.Event | None = None
        self._subscribe_mid: int | None = None
        self._extra: list[ExtraSubscription] = []
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
        return self._filter

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
        self._drain()  # readings parsed before the stop are delivered, not lost
        log.info("MQTT intake stopped (%d accepted, %d dropped)", self.accepted, sum(self.stats.values()))

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        """Publish from any thread; QoS 1 messages published while offline go out on reconnect."""
        if self._client is None:
            raise RuntimeError("MqttIntake is not started")
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    # -- paho side (runs in paho's thread) ----------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        if s.protocol == "5":
            client = mqtt.Client(
                callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                client_id=s.client_id,
                protocol=mqtt.MQTTv5,
            )
        else:
            client = mqtt.Client(
                callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                client_id=s.client_id,
                protocol=mqtt.MQTTv311,
                clean_session=s.clean_start,
            )
        client.enable_logger(_paho_log)
        client.suppress_exceptions = True  # a bug in a callback must not end the network thread
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls:
            client.tls_set(ca_certs=s.ca_file)
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
        # Subscribe on every connect: cheap, and correct even if the broker lost our session.
        # We count as connected only once the SUBACK is back (see _on_subscribe).
        if self._extra:  # one SUBSCRIBE for all filters: one SUBACK says we are connected
            filters = [(self._filter, self.settings.qos), *((e.topic_filter, self.settings.qos) for e in self._extra)]
            _, self._subscribe_mid = client.subscribe(filters)
        else:
            _, self._subscribe_mid = client.subscribe(self._filter, qos=self.settings.qos)
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
        log.info("MQTT subscribed to %s", self._filter)
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
        self.last_error = f"connection lost: {reason_code}"
        log.warning("MQTT connection lost (%s); reconnecting", reason_code)
        self._call_in_loop(self._clear_connected_event)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.received += 1
        try:
            try:
                topic = message.topic
            except UnicodeDecodeError:
                self._reject(BAD_TOPIC, repr(message._topic[:80]), message.payload, "topic is not UTF-8")
                return
            for extra in self._extra:
                if mqtt.topic_matches_sub(extra.topic_filter, topic):
                    self._on_extra(extra, topic, bytes(message.payload))
                    return
            parts = parse_topic(topic, self.settings.topic_prefix)
            if parts is None or parts.kind != "telemetry":
                self._reject(BAD_TOPIC, topic, message.payload, "not a device telemetry topic")
                return
            try:
                reading = parse_telemetry(parts, message.payload, self._clock())
            except PayloadError as exc:
                self._reject(exc.reason_code, topic, message.payload, exc.message)
                return
            self.accepted += 1
            with self._lock:
                self._pending.append(reading)
                if self._drain_scheduled:
                    return
                self._drain_scheduled = True
            self._call_in_loop(self._drain)
        except Exception:
            self.stats[INTERNAL_ERROR] += 1
            log.exception("MQTT intake failed on a message; continuing")

    def _on_extra(self, extra: ExtraSubscription, topic: str, payload: bytes) -> None:
        try:
            item = extra.parse(topic, payload, self._clock())
        except extra.errors as exc:
            reason = f"{extra.name}:{getattr(exc, 'reason_code', 'rejected')}"
            if getattr(exc, "quiet", False):
                self.stats[reason] += 1
            else:
                self._reject(reason, topic, payload, str(getattr(exc, "message", exc)))
            return
        self.extra_accepted[extra.name] += 1
        with self._lock:
            self._pending_extra.append((extra.queue, item))
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        self._call_in_loop(self._drain)

    def _reject(self, reason: str, topic: str, payload: bytes | bytearray, detail: str) -> None:
        self.stats[reason] += 1
        count = self.stats[reason]
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
            batch, self._pending = self._pending, []
            extras, self._pending_extra = self._pending_extra, []
            self._drain_scheduled = False
        put = self.readings.put_nowait
        for reading in batch:
            put(reading)
        for queue, item in extras:
            queue.put_nowait(item)

    def _set_connected_event(self) -> None:
        if self._connected_event is not None:
            self._connected_event.set()

    def _clear_connected_event(self) -> None:
        if self._connected_event is not None:
            self._connected_event.clear()
