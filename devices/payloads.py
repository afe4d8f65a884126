"""Telemetry payload schema: bytes from MQTT in, a :class:`Reading` out, or a :class:`PayloadError`.

Pure and strict, so the intake can count and drop bad input without ever stopping the stream.
The wire format is JSON::

    {"ts": 1767261600.0, "metrics": {"blade_hours": 49.6, "battery_pct": 85}}

``ts`` (seconds since the epoch) is optional and defaults to the time the gateway received
the message; ``metrics`` is a non-empty object of finite numbers.
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


def _finite_number(value: Any) -> float | None:
    """The value as a finite float, or None. bool is an int subclass but not a measurement."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)  # a huge JSON integer overflows here
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def parse_telemetry(topic_parts: TopicParts, payload: bytes | bytearray, received_at: float) -> Reading:
    """Validate one telemetry payload; raise PayloadError with a reason code on any defect."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(TOO_LARGE, f"{len(payload)} bytes is over the {MAX_PAYLOAD_BYTES} byte limit")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(NOT_UTF8, f"not UTF-8 at byte {exc.start}") from None
    try:
        document = json.loads(text)
    except RecursionError:  # deeply nested arrays: still just bad input
        raise PayloadError(NOT_JSON, "JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int-too-long from the int parser
        raise PayloadError(NOT_JSON, f"not JSON ({str(exc)[:80]})") from None
    if not isinstance(document, dict):
        raise PayloadError(NOT_OBJECT, f"expected a JSON object, got {type(document).__name__}")

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

    raw_ts = document.get("ts")
    if raw_ts is None:
        time = received_at
    else:
        ts = _finite_number(raw_ts)
        if ts is None:
            raise PayloadError(BAD_TS, "'ts' must be a finite number of seconds since the epoch")
        time = ts

    return Reading(device_id=topic_parts.device_id, store_id=topic_parts.store_id, time=time, metrics=metrics)
