"""Telemetry payload schema: bytes from MQTT in, a :class:`Reading` out, or a :class:`PayloadError`.

Pure and strict, so the intake can count and drop bad input without ever stopping the stream.
The wire format is JSON::

    {"ts": 1767261600.0, "metrics": {"blade_hours": 49.6, "battery_pct": 85}}

``ts`` (seconds since the epoch) is optional and defaults to the time the gateway received
the message; ``metrics`` is a non-empty object of finite numbers. An optional integer ``seq``
(the device's message counter) makes two readings within one ``ts`` distinct: the gateway stores
each (device, seq) or, without one, each (device, ts) once, so a broker's redelivery is harmless.

Status (``.../status``): ``online`` | ``offline``, or ``{"state": "online", "firmware": "1.4.2"}``.
Events (``.../events``): ``{"ts": ..., "type": "error", "code": "E42", "data": {...}}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from devices.topics import TopicParts

MAX_PAYLOAD_BYTES = 64 * 1024

# Reason codes: stable strings, used as metric/counter keys and in logs.
TOO_LARGE = "too_large"
NOT_UTF8 = "not_utf8"
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
MISSING_METRICS = "missing_metrics"
BAD_METRIC = "bad_metric"
BAD_TS = "bad_ts"
BAD_SEQ = "bad_seq"
BAD_STATUS = "bad_status"
BAD_EVENT = "bad_event"
MAX_SEQ = 2**62


class PayloadError(ValueError):
    """A telemetry payload that cannot become a Reading; ``reason_code`` is one of the constants above."""

    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(f"{reason_code}: {message}")
        self.reason_code = reason_code
        self.message = message


@dataclass(frozen=True, slots=True)
class Reading:
    """One telemetry message from one device, validated."""

    device_id: str
    store_id: str
    time: float
    metrics: dict[str, float]
    seq: int | None = None

    @property
    def key(self) -> str:
        """The dedup key within the device: its counter if it sends one, else its timestamp."""
        return f"s{self.seq}" if self.seq is not None else f"t{self.time!r}"


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """A device's own online/offline flag (often its retained last will), maybe with its firmware."""

    device_id: str
    store_id: str
    time: float
    online: bool
    firmware: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """Something a device reports once: an error code, a button press, a service done on site."""

    device_id: str
    store_id: str
    time: float
    type: str
    code: str | None = None
    data: dict[str, Any] | None = None


def _finite_number(value: Any) -> float | None:
    """The value as a finite float, or None. bool is an int subclass but not a measurement."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)  # a huge JSON integer overflows here
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _text(payload: bytes | bytearray) -> str:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(TOO_LARGE, f"{len(payload)} bytes is over the {MAX_PAYLOAD_BYTES} byte limit")
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(NOT_UTF8, f"not UTF-8 at byte {exc.start}") from None


def _object(text: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except RecursionError:  # deeply nested arrays: still just bad input
        raise PayloadError(NOT_JSON, "JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int-too-long from the int parser
        raise PayloadError(NOT_JSON, f"not JSON ({str(exc)[:80]})") from None
    if not isinstance(document, dict):
        raise PayloadError(NOT_OBJECT, f"expected a JSON object, got {type(document).__name__}")
    return document


def _time(document: dict[str, Any], received_at: float) -> float:
    raw_ts = document.get("ts")
    if raw_ts is None:
        return received_at
    ts = _finite_number(raw_ts)
    if ts is None:
        raise PayloadError(BAD_TS, "'ts' must be a finite number of seconds since the epoch")
    return ts


def _short_str(document: dict[str, Any], name: str, reason: str, limit: int = 64) -> str | None:
    value = document.get(name)
    if value is None:
        return None
    if not isinstance(value, str | int) or isinstance(value, bool) or not str(value) or len(str(value)) > limit:
        raise PayloadError(reason, f"'{name}' must be a short string (1-{limit} characters)")
    return str(value)


def parse_status(topic_parts: TopicParts, payload: bytes | bytearray, received_at: float) -> DeviceStatus:
    """``online``/``offline`` as plain text or ``{"state": ..., "firmware": ...}``."""
    text = _text(payload).strip()
    firmware = None
    time = received_at
    if text.startswith("{"):
        document = _object(text)
        state = document.get("state")
        firmware = _short_str(document, "firmware", BAD_STATUS)
        time = _time(document, received_at)
    else:
        state = text
    if state not in ("online", "offline"):
        raise PayloadError(BAD_STATUS, "status must be 'online' or 'offline'")
    return DeviceStatus(topic_parts.device_id, topic_parts.store_id, time, state == "online", firmware)


def parse_event(topic_parts: TopicParts, payload: bytes | bytearray, received_at: float) -> DeviceEvent:
    """An event needs a ``type``; ``code`` and an object ``data`` are optional."""
    document = _object(_text(payload))
    kind = _short_str(document, "type", BAD_EVENT, 32)
    if kind is None:
        raise PayloadError(BAD_EVENT, "an event needs a 'type'")
    code = _short_str(document, "code", BAD_EVENT)
    data = document.get("data")
    if data is not None and not isinstance(data, dict):
        raise PayloadError(BAD_EVENT, "'data' must be an object")
    return DeviceEvent(topic_parts.device_id, topic_parts.store_id, _time(document, received_at), kind, code, data)


def parse_telemetry(topic_parts: TopicParts, payload: bytes | bytearray, received_at: float) -> Reading:
    """Validate one telemetry payload; raise PayloadError with a reason code on any defect."""
    document = _object(_text(payload))

    raw_metrics = document.get("metrics")
    if not isinstance(raw_metrics, dict) or not raw_metrics:
        raise PayloadError(MISSING_METRICS, "'metrics' must be a non-empty object")
    metrics: dict[str, float] = {}
    for name, value in raw_metrics.items():
        if not name:
            raise PayloadError(BAD_METRIC, "metric names must be non-empty")
        number = _finite_number(value)
        if number is None:
            raise PayloadError(BAD_METRIC, f"metric {name[:40]!r} is not a finite number")
        metrics[name] = number

    time = _time(document, received_at)
    seq = document.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < MAX_SEQ):
        raise PayloadError(BAD_SEQ, "'seq' must be a non-negative integer")
    return Reading(device_id=topic_parts.device_id, store_id=topic_parts.store_id, time=time, metrics=metrics,
                   seq=seq)
