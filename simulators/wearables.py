"""Connected products and wearables: deterministic telemetry, and a real MQTT publisher for it.

Readings are a pure function of (seed, device, reading index), so a window of readings is
the same however the time range is split; that lets the fast virtual-time mode and the
real-time demo loop share one model. Only :class:`MqttPublisher` and :func:`run_realtime`
touch the network and the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from gateway.clock import Clock
from simulators.scenario import Device, MetricSpec, Scenario

Number = int | float


class TelemetryReading(NamedTuple):
    device_id: str
    time: float
    metrics: dict[str, Number]


def topic_for(store_id: str, device_id: str) -> str:
    """The topic a device publishes its readings on."""
    return f"stores/{store_id}/devices/{device_id}/telemetry"


def payload(time: float, metrics: Mapping[str, Number]) -> bytes:
    """The JSON body of one reading: ``{"ts": <epoch s>, "metrics": {name: number}}``."""
    return json.dumps({"ts": time, "metrics": dict(metrics)}).encode()


def bad_payloads() -> Iterator[bytes]:
    """Malformed reading bodies an ingest must count and drop, never crash on."""
    yield b"not json at all"
    yield b"\xff\xfe\x00\x81"  # not even UTF-8
    yield b""  # empty
    yield b'[{"ts": 1767261600.0, "metrics": {"blade_hours": 49.6}}]'  # an array, not an object
    yield b'{"ts": 1767261600.0}'  # no metrics
    yield b'{"ts": 1767261600.0, "metrics": [49.6]}'  # metrics not an object
    yield b'{"ts": 1767261600.0, "metrics": {"blade_hours": "lots"}}'  # non-numeric metric


def _value(spec: MetricSpec, minutes: float, rng: random.Random | None) -> Number:
    v = spec.start + spec.rate_per_min * minutes
    if spec.noise and rng is not None:
        v += rng.gauss(0.0, spec.noise)
    if spec.unit == "%":
        v = min(100.0, max(0.0, v))
    # Counters and vitals declared in whole numbers (steps, bpm) read as integers, as devices send them.
    return round(v) if spec.integer else round(v, 2)


class TelemetryModel:
    """Every device of the scenario reports every ``interval_s`` from ``start`` (epoch s)."""

    def __init__(self, scenario: Scenario, start: float, seed: int = 0) -> None:
        self.scenario = scenario
        self.start = float(start)
        self.seed = seed

    @property
    def store_id(self) -> str:
        return self.scenario.store.id

    def reading(self, device: Device, k: int) -> TelemetryReading:
        """The ``k``-th reading of ``device`` (k = 0 at ``start``)."""
        elapsed = k * device.interval_s
        noisy = any(m.noise for m in device.metrics.values())
        rng = random.Random(f"{self.seed}/{device.id}/{k}") if noisy else None
        metrics = {name: _value(spec, elapsed / 60.0, rng) for name, spec in device.metrics.items()}
        return TelemetryReading(device.id, self.start + elapsed, metrics)

    def _first_index(self, device: Device, t0: float) -> int:
        k = max(0, math.ceil((t0 - self.start) / device.interval_s))
        # Guard against float rounding so consecutive windows neither skip nor repeat a reading.
        while self.start + k * device.interval_s < t0:
            k += 1
        while k > 0 and self.start + (k - 1) * device.interval_s >= t0:
            k -= 1
        return k

    def readings(self, t0: float, t1: float) -> list[TelemetryReading]:
        """Readings with ``t0 <= time < t1``, in time order (ties in scenario device order)."""
        out: list[TelemetryReading] = []
        for device in self.scenario.devices:
            k = self._first_index(device, t0)
            while self.start + k * device.interval_s < t1:
                out.append(self.reading(device, k))
                k += 1
        out.sort(key=lambda r: r.time)
        return out

    def messages(self, t0: float, t1: float) -> list[tuple[str, bytes]]:
        """(topic, payload) pairs for the window, ready to publish."""
        store = self.store_id
        return [(topic_for(store, r.device_id), payload(r.time, r.metrics)) for r in self.readings(t0, t1)]


# ---------------------------------------------------------------------------------------
# MQTT


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None: ...


_PROTOCOLS = {
    "3.1.1": MQTTProtocolVersion.MQTTv311,
    "5": MQTTProtocolVersion.MQTTv5,
    "5.0": MQTTProtocolVersion.MQTTv5,
}


class MqttPublisher:
    """A paho-mqtt 2.x client that publishes like a device: each publish waits for its ack.

    Waiting per message keeps the simulator honest (a reading counts as sent only once the
    broker has it) at the price of throughput, which the simulated devices never need.
    """

    def __init__(
        self,
        host: str,
        port: int = 1883,
        *,
        protocol: str = "3.1.1",
        client_id: str | None = None,
        timeout_s: float = 5.0,
        keepalive: int = 30,
    ) -> None:
        if protocol not in _PROTOCOLS:
            raise ValueError(f"unknown MQTT protocol {protocol!r} (use one of {', '.join(_PROTOCOLS)})")
        self.host, self.port, self.protocol = host, port, protocol
        self.timeout_s = timeout_s
        self.keepalive = keepalive
        self._connected = threading.Event()
        self._connect_result: Any = None
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"simulator-{uuid.uuid4().hex[:12]}",
            protocol=_PROTOCOLS[protocol],
        )
        self._client.on_connect = self._on_connect
        self._started = False

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self._connect_result = reason_code
        self._connected.set()

    def connect(self) -> None:
        """Connect and wait for the broker's CONNACK; raise if refused or too slow."""
        self._connected.clear()
        self._client.connect(self.host, self.port, keepalive=self.keepalive)
        self._client.loop_start()
        self._started = True
        if not self._connected.wait(self.timeout_s):
            self.close()
            raise TimeoutError(f"no CONNACK from {self.host}:{self.port} within {self.timeout_s} s")
        rc = self._connect_result
        if getattr(rc, "is_failure", False):
            self.close()
            raise ConnectionError(f"MQTT broker {self.host}:{self.port} refused the connection: {rc}")

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Publish and wait until the broker acknowledged it (QoS 1/2) or it was sent (QoS 0)."""
        info = self._client.publish(topic, payload, qos=qos)
        info.wait_for_publish(self.timeout_s)
        if not info.is_published():
            raise TimeoutError(f"publish to {topic} not acknowledged within {self.timeout_s} s")

    def close(self) -> None:
        if self._started:
            self._client.disconnect()
            self._client.loop_stop()
            self._started = False

    def __enter__(self) -> MqttPublisher:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _publish_all(publisher: Publisher, messages: Sequence[tuple[str, bytes]]) -> None:
    for topic, body in messages:
        publisher.publish(topic, body, qos=1)


async def run_realtime(
    model: TelemetryModel,
    publisher: Publisher,
    clock: Clock,
    stop_event: asyncio.Event,
    *,
    since: float | None = None,
    tick_s: float = 1.0,
) -> int:
    """Publish the readings that fell due, about every ``tick_s`` of wall time, until stopped.

    Readings come from ``since`` (default: the model's start) up to ``clock.now()``; a last
    pass runs after ``stop_event`` is set so nothing due is skipped. Publishing blocks on
    acks, so it runs in a worker thread to keep the event loop (the gateway) responsive.
    Returns how many readings were published.
    """
    last = model.start if since is None else since
    sent = 0
    while True:
        now = clock.now()
        if now > last:
            batch = model.messages(last, now)
            if batch:
                await asyncio.to_thread(_publish_all, publisher, batch)
                sent += len(batch)
            last = now
        if stop_event.is_set():
            return sent
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_event.wait(), tick_s)
