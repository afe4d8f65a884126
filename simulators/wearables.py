"""Connected products and wearables: deterministic telemetry, and a real MQTT publisher for it.

Readings are a pure function of (seed, device, reading index), so a window of readings is
the same however the time range is split; that lets the fast virtual-time mode and the
real-time demo loop share one model. Only :class:`MqttPublisher`, :class:`PipelinedPublisher`
and :func:`run_realtime` touch the network and the wall clock.

:class:`Fleet` is the larger, rougher model: hundreds of products and wearables with daily
usage, battery drain and recharge tied to use, sensor drift, faults (stuck sensors, spikes out
of range, error events), disconnects (a retained ``offline`` status, readings buffered and sent
late on reconnect) and malformed payloads on demand. It steps in simulated time, deterministic
for a seed, and yields MQTT messages; run it as ``python -m simulators.wearables --help``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
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


def topic_for(store_id: str, device_id: str, prefix: str = "stores", kind: str = "telemetry") -> str:
    """The topic a device publishes on (devices/topics.py has the layout)."""
    return f"{prefix}/{store_id}/devices/{device_id}/{kind}"


def payload(time: float, metrics: Mapping[str, Number], seq: int | None = None) -> bytes:
    """The JSON body of one reading: ``{"ts": <epoch s>, "seq": n, "metrics": {name: number}}``."""
    body: dict[str, Any] = {"ts": time, "metrics": dict(metrics)}
    if seq is not None:
        body["seq"] = seq
    return json.dumps(body).encode()


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
    Returns how many readings were published. ``gateway demo`` runs its products' telemetry with it.
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


# ---------------------------------------------------------------------------------------
# A fleet: realistic, rough telemetry for many devices


class SimMessage(NamedTuple):
    topic: str
    payload: bytes
    kind: str  # telemetry | status | events
    retain: bool = False
    valid: bool = True  # False: the gateway should refuse it (malformed, or out of its profile)


@dataclass(frozen=True)
class FleetSpec:
    devices: int = 500
    interval_s: float = 60.0
    store_id: str = "store-001"
    prefix: str = "stores"
    kinds: tuple[str, ...] = ("fitness_watch", "robot_mower", "ebike", "water_filter")
    fault_rate: float = 0.0  # per reading: a fault episode starts (stuck sensor, spike, error event)
    disconnect_rate: float = 0.0  # per reading: the device drops off for `offline_intervals`
    offline_intervals: int = 5
    bad_payload_rate: float = 0.0  # per reading: the body is replaced by a malformed one
    seed: int = 0


@dataclass
class _DeviceState:
    id: str
    kind: str
    rng: random.Random
    phase_s: float  # reporting offset inside the interval, so devices do not all speak at once
    seq: int = 0
    battery: float = 100.0
    counter: float = 0.0  # steps today, blade hours, chain km, litres
    drift: float = 0.0  # sensor offset, a slow random walk
    stuck: int = 0  # readings left with a stuck sensor
    stuck_value: float | None = None
    offline: int = 0  # intervals left offline
    buffered: list[tuple[float, int, dict[str, Number]]] = field(default_factory=list)
    day: int = -1


def _local_hour(t: float) -> float:
    return (t % 86400.0) / 3600.0


def _activity(hour: float) -> float:
    """0..1: how busy a person (or a garden) is at this hour: a day bump, a lunchtime peak."""
    if hour < 7 or hour > 21:
        return 0.02
    return 0.35 + 0.5 * math.exp(-((hour - 12.5) ** 2) / 6.0) + 0.25 * math.exp(-((hour - 18) ** 2) / 2.0)


class Fleet:
    """Devices of ``spec.kinds`` in turn; ``step(t)`` advances one interval from ``t`` and returns the
    messages of that interval (telemetry, status changes, events, and bad payloads if asked)."""

    def __init__(self, spec: FleetSpec, start: float) -> None:
        self.spec = spec
        self.t = float(start)
        self.devices: list[_DeviceState] = []
        for i in range(spec.devices):
            kind = spec.kinds[i % len(spec.kinds)]
            rng = random.Random(f"{spec.seed}/{kind}/{i}")
            self.devices.append(_DeviceState(id=f"{kind.split('_')[-1]}-{i:04d}", kind=kind, rng=rng,
                                             phase_s=rng.uniform(0, spec.interval_s),
                                             battery=rng.uniform(40, 100), counter=rng.uniform(0, 50)))
        self._bad = list(bad_payloads())
        self.counts: Counter[str] = Counter()

    def _topic(self, d: _DeviceState, kind: str) -> str:
        return topic_for(self.spec.store_id, d.id, self.spec.prefix, kind)

    def _metrics(self, d: _DeviceState, t: float) -> dict[str, Number]:
        hour = _local_hour(t)
        act = _activity(hour)
        dt_min = self.spec.interval_s / 60.0
        r = d.rng
        d.drift += r.gauss(0.0, 0.02)
        if d.kind == "fitness_watch":
            day = int(t // 86400)
            if day != d.day:
                d.day, d.counter = day, 0.0
            d.counter += max(0.0, r.gauss(90 * act, 20 * act)) * dt_min
            d.battery -= (0.04 + 0.06 * act) * dt_min
            if d.battery < 12:  # charged overnight or when it nags
                d.battery = 100.0
            hr = 62 + 55 * act * r.random() + d.drift * 3 + r.gauss(0, 3)
            return {"steps": round(d.counter), "heart_rate": round(min(200, max(40, hr))),
                    "battery_pct": round(d.battery, 1)}
        if d.kind == "robot_mower":
            mowing = 9 <= hour < 18 and d.battery > 20 and r.random() < 0.8
            if mowing:
                d.counter += dt_min / 60.0
                d.battery -= 0.9 * dt_min
            else:
                d.battery = min(100.0, d.battery + 1.5 * dt_min)
            temp = 25 + (30 if mowing else 0) + d.drift + r.gauss(0, 1)
            return {"blade_hours": round(d.counter, 3), "battery_pct": round(max(0.0, d.battery), 1),
                    "motor_temp_c": round(temp, 1)}
        if d.kind == "ebike":
            km = max(0.0, r.gauss(0.4 * act, 0.2)) * dt_min
            d.counter += km
            d.battery -= km * 1.2
            if d.battery < 10:
                d.battery = 100.0
            return {"chain_km": round(d.counter, 2), "battery_pct": round(max(0.0, d.battery), 1)}
        flow = max(0.0, r.gauss(2.5 * act, 0.8)) if r.random() < 0.3 else 0.0
        d.counter += flow * dt_min
        return {"filter_litres": round(d.counter, 1), "flow_lpm": round(flow, 2)}

    def step(self) -> list[SimMessage]:
        spec = self.spec
        out: list[SimMessage] = []
        t0, self.t = self.t, self.t + spec.interval_s
        for d in self.devices:
            t = t0 + d.phase_s
            r = d.rng
            metrics = self._metrics(d, t)
            if d.offline:
                d.offline -= 1
                d.seq += 1
                d.buffered.append((t, d.seq, metrics))
                if d.offline == 0:  # back: say so, then send what it kept while away
                    out.append(SimMessage(self._topic(d, "status"), b"online", "status", retain=True))
                    for bt, bseq, bm in d.buffered:
                        out.append(SimMessage(self._topic(d, "telemetry"), payload(bt, bm, bseq), "telemetry"))
                    self.counts["late_readings"] += len(d.buffered)
                    d.buffered.clear()
                continue
            if spec.disconnect_rate and r.random() < spec.disconnect_rate:
                d.offline = spec.offline_intervals
                out.append(SimMessage(self._topic(d, "status"), b"offline", "status", retain=True))
                self.counts["disconnects"] += 1
            valid = True
            if spec.fault_rate and not d.stuck and r.random() < spec.fault_rate:
                fault = r.choice(("stuck", "spike", "error"))
                self.counts[f"fault_{fault}"] += 1
                if fault == "stuck":
                    d.stuck, d.stuck_value = r.randint(3, 10), None
                elif fault == "spike":  # a value no profile allows
                    name = next(iter(metrics))
                    metrics[name] = -999
                    valid = False
                else:
                    code = r.choice(("E12", "E42", "E51"))
                    out.append(SimMessage(self._topic(d, "events"), json.dumps(
                        {"ts": t, "type": "error", "code": code}).encode(), "events"))
            if d.stuck:
                d.stuck -= 1
                name = next(iter(metrics))
                if d.stuck_value is None:
                    d.stuck_value = float(metrics[name])
                metrics[name] = d.stuck_value
            d.seq += 1
            body = payload(t, metrics, d.seq)
            if spec.bad_payload_rate and r.random() < spec.bad_payload_rate:
                body = self._bad[d.seq % len(self._bad)]
                valid = False
                self.counts["bad_payloads"] += 1
            out.append(SimMessage(self._topic(d, "telemetry"), body, "telemetry", valid=valid))
        self.counts["messages"] += len(out)
        return out

    def messages(self, count: int) -> list[SimMessage]:
        """At least ``count`` messages, whole intervals at a time."""
        out: list[SimMessage] = []
        while len(out) < count:
            out.extend(self.step())
        return out


class PipelinedPublisher:
    """Publishes QoS 1 without waiting for each ack (up to ``inflight`` outstanding), for fleets and the
    benchmark; ``flush`` waits until the broker has acknowledged everything."""

    def __init__(self, host: str, port: int = 1883, *, client_id: str | None = None, inflight: int = 1000,
                 clean_start: bool = True) -> None:
        self._client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                   client_id=client_id or f"fleet-{uuid.uuid4().hex[:12]}",
                                   protocol=MQTTProtocolVersion.MQTTv5)
        self._client.max_inflight_messages_set(inflight)
        self._client.max_queued_messages_set(0)
        self._connected = threading.Event()
        self._client.on_connect = lambda *a: self._connected.set()
        self._client.connect(host, port, keepalive=30, clean_start=clean_start)
        self._client.loop_start()
        if not self._connected.wait(10):
            self.close()
            raise TimeoutError(f"no CONNACK from {host}:{port}")
        self._last: mqtt.MQTTMessageInfo | None = None
        self._infos: deque[mqtt.MQTTMessageInfo] = deque()  # oldest first; acks come back about in order

    # paho's message ids are 16 bits: with 65,535 messages unacknowledged a new one collides with an old one
    # (paho refuses it), so a publisher that runs ahead of the broker waits below that.
    MAX_UNACKED = 30_000

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        info.is_published()  # raises at once if paho refused it
        infos = self._infos
        infos.append(info)
        self._drop_acknowledged()
        if len(infos) >= self.MAX_UNACKED and not self._wait_below(self.MAX_UNACKED // 2, 60.0):
            raise TimeoutError(f"the broker acknowledged nothing for 60 s ({len(infos)} messages outstanding)")

    def flush(self, timeout: float = 60.0) -> bool:
        """True once every message published so far is acknowledged."""
        return self._wait_below(1, timeout)

    def _drop_acknowledged(self) -> None:
        infos = self._infos
        while infos and infos[0].is_published():
            infos.popleft()

    def _wait_below(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._drop_acknowledged()
            if len(self._infos) < count:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._infos[0].wait_for_publish(max(0.01, min(1.0, left)))

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m simulators.wearables",
                                 description="Publish a simulated fleet of products and wearables over MQTT.")
    ap.add_argument("--broker", default="127.0.0.1:1883", help="host:port")
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--interval", type=float, default=60.0, help="simulated seconds between readings")
    ap.add_argument("--speed", type=float, default=60.0, help="simulated seconds per wall second")
    ap.add_argument("--intervals", type=int, default=60, help="how many intervals to publish")
    ap.add_argument("--store", default="store-001")
    ap.add_argument("--prefix", default="stores")
    ap.add_argument("--faults", type=float, default=0.01, help="per-reading fault probability")
    ap.add_argument("--disconnects", type=float, default=0.005, help="per-reading disconnect probability")
    ap.add_argument("--bad", type=float, default=0.0, help="per-reading malformed payload probability")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    host, _, port = args.broker.rpartition(":")
    fleet = Fleet(FleetSpec(devices=args.devices, interval_s=args.interval, store_id=args.store, prefix=args.prefix,
                            fault_rate=args.faults, disconnect_rate=args.disconnects, bad_payload_rate=args.bad,
                            seed=args.seed), start=time.time())
    pub = PipelinedPublisher(host or "127.0.0.1", int(port or 1883))
    try:
        for _ in range(args.intervals):
            started = time.monotonic()
            for m in fleet.step():
                pub.publish(m.topic, m.payload, retain=m.retain)
            pub.flush(30)
            time.sleep(max(0.0, args.interval / args.speed - (time.monotonic() - started)))
    finally:
        pub.close()
    print(json.dumps(dict(fleet.counts)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
