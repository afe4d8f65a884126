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

Whatever a parser returns can be stored as it is: every name (the topic's store and device ids, metric
names, an event's type and code, a firmware) is text within its column's length (no control character,
no lone surrogate: Python's json decodes ``"\\ud800"`` and ``"\\u0000"``, PostgreSQL and UTF-8 refuse
them), numbers are finite and within bounds that keep sums and dates finite, and an event's data is
strict JSON of bounded depth. A message that breaks this is this message's fault and is dead-lettered
with its reason; left to the database, it would fail the commit of its whole batch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from devices.topics import TopicParts, ids_problem, is_text

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
BAD_STORE_ID = "bad_store_id"
BAD_DEVICE_ID = "bad_device_id"
MAX_SEQ = 2**62

# Column lengths in gateway/storage/models.py: reading_rollups.metric, device_events.type and .code,
# devices.firmware.
MAX_METRIC_NAME = 64
MAX_EVENT_TYPE = 32
MAX_EVENT_CODE = 64
MAX_FIRMWARE = 64
MAX_TS = 32_503_680_000.0
"""3000-01-01 UTC. A time the rules and the engine turn into a local date must be one ``datetime`` has."""
MAX_MAGNITUDE = 1e100
"""Far beyond any measurement, and far enough from float overflow that the rollups' sums and the rules'
counters stay finite: PostgreSQL refuses a float8 sum that overflows, and JSON has no Infinity."""
MAX_DATA_DEPTH = 32
"""Nesting of an event's ``data``: it is serialised again deep in the commit, where the recursion limit
is nearer than it was for the parser."""


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


class LinkState(StrEnum):
    """What a status message says (a device's, or the gateway's own retained flag and last will)."""

    ONLINE = "online"
    OFFLINE = "offline"

    @classmethod
    def of(cls, online: bool) -> LinkState:
        return cls.ONLINE if online else cls.OFFLINE


_LINK_STATES = tuple(LinkState)  # a tuple: a JSON value may be unhashable


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


def _measurement(value: Any) -> float | None:
    """A metric's value: a finite number within +-MAX_MAGNITUDE, or None."""
    number = _finite_number(value)
    return number if number is not None and -MAX_MAGNITUDE <= number <= MAX_MAGNITUDE else None


_NOT_JSON_TEXT = re.compile("[\x00\ud800-\udfff]")


def _strict_json(value: Any, depth: int = 0) -> bool:
    """True if json.dumps writes ``value`` back as strict JSON that PostgreSQL stores and UTF-8 encodes:
    no NaN or Infinity, no NUL or lone surrogate in a string or a key, at most MAX_DATA_DEPTH deep."""
    if isinstance(value, str):
        return _NOT_JSON_TEXT.search(value) is None
    if value is None or isinstance(value, bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if depth >= MAX_DATA_DEPTH:
        return False
    if isinstance(value, dict):
        return all(_NOT_JSON_TEXT.search(k) is None and _strict_json(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_strict_json(v, depth + 1) for v in value)
    return False


# What passed the text checks before: a fleet sends the same ids and metric names in every message, so each
# is checked once (per process, up to KNOWN_MAX of each; then the sets start over). Only the intake's
# thread parses, and a set's add is atomic anyway.
KNOWN_MAX = 10_000  # a few MB at most
_KNOWN_IDS: set[tuple[str, str]] = set()
_KNOWN_NAMES: set[str] = set()


def _remember(known: set[Any], value: Any) -> None:
    if len(known) >= KNOWN_MAX:
        known.clear()
    known.add(value)


def _check_ids(parts: TopicParts) -> None:
    """The topic's ids go into the registry: refuse here the ones its columns would refuse at commit."""
    ids = (parts.store_id, parts.device_id)
    if ids in _KNOWN_IDS:
        return
    problem = ids_problem(parts)
    if problem is None:
        _remember(_KNOWN_IDS, ids)
        return
    which, why = problem
    raise PayloadError(BAD_STORE_ID if which == "store_id" else BAD_DEVICE_ID, f"the topic's {which}: {why}")


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
    if ts is None or not 0.0 <= ts < MAX_TS:
        raise PayloadError(BAD_TS, "'ts' must be a number of seconds since the epoch, before the year 3000")
    return ts


def _short_str(document: dict[str, Any], name: str, reason: str, limit: int = 64) -> str | None:
    value = document.get(name)
    if value is None:
        return None
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # "code": 42
    if not isinstance(text, str) or not is_text(text, limit):
        raise PayloadError(reason, f"'{name}' must be text of 1-{limit} characters without control characters")
    return text


def parse_status(topic_parts: TopicParts, payload: bytes | bytearray, received_at: float) -> DeviceStatus:
    """``online``/``offline`` as plain text or ``{"state": ..., "firmware": ...}``."""
    _check_ids(topic_parts)
    text = _text(payload).strip()
    firmware = None
    time = received_at
    if text.startswith("{"):
        document = _object(text)
        state = document.get("state")
        firmware = _short_str(document, "firmware", BAD_STATUS, MAX_FIRMWARE)
        time = _time(document, received_at)
    else:
        state = text
    if state not in _LINK_STATES:
        raise PayloadError(BAD_STATUS, "status must be 'online' or 'offline'")
    return DeviceStatus(topic_parts.device_id, topic_parts.store_id, time, state == LinkState.ONLINE, firmware)


def parse_event(topic_parts: TopicParts, payload: bytes | bytearray, received_at: float) -> DeviceEvent:
    """An event needs a ``type``; ``code`` and an object ``data`` are optional."""
    _check_ids(topic_parts)
    document = _object(_text(payload))
    kind = _short_str(document, "type", BAD_EVENT, MAX_EVENT_TYPE)
    if kind is None:
        raise PayloadError(BAD_EVENT, "an event needs a 'type'")
    code = _short_str(document, "code", BAD_EVENT, MAX_EVENT_CODE)
    data = document.get("data")
    if data is not None and not isinstance(data, dict):
        raise PayloadError(BAD_EVENT, "'data' must be an object")
    if data is not None and not _strict_json(data):
        raise PayloadError(BAD_EVENT, f"'data' must be strict JSON (no NaN, NUL or lone surrogate), "
                                      f"at most {MAX_DATA_DEPTH} levels deep")
    return DeviceEvent(topic_parts.device_id, topic_parts.store_id, _time(document, received_at), kind, code, data)


def parse_telemetry(topic_parts: TopicParts, payload: bytes | bytearray, received_at: float) -> Reading:
    """Validate one telemetry payload; raise PayloadError with a reason code on any defect."""
    _check_ids(topic_parts)
    document = _object(_text(payload))

    raw_metrics = document.get("metrics")
    if not isinstance(raw_metrics, dict) or not raw_metrics:
        raise PayloadError(MISSING_METRICS, "'metrics' must be a non-empty object")
    metrics: dict[str, float] = {}
    for name, value in raw_metrics.items():
        if name not in _KNOWN_NAMES:
            if not is_text(name, MAX_METRIC_NAME):
                raise PayloadError(BAD_METRIC, f"metric name {name[:40]!r} must be text of 1-{MAX_METRIC_NAME} "
                                               "characters without control characters")
            _remember(_KNOWN_NAMES, name)
        number = _measurement(value)
        if number is None:
            raise PayloadError(BAD_METRIC, f"metric {name!r} is not a finite number within +-{MAX_MAGNITUDE:g}")
        metrics[name] = number

    time = _time(document, received_at)
    seq = document.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < MAX_SEQ):
        raise PayloadError(BAD_SEQ, "'seq' must be a non-negative integer")
    return Reading(device_id=topic_parts.device_id, store_id=topic_parts.store_id, time=time, metrics=metrics,
                   seq=seq)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message the gateway will not use; it goes to the dead-letter table with ``reason``."""

    topic: str
    reason: str
    detail: str
    payload: bytes
    received_at: float
    device_id: str | None = None


@dataclass(slots=True)
class TelemetryBatch:
    """What one drain of the MQTT intake hands to the pipeline. ``acks`` belong to the intake."""

    readings: list[Reading] = field(default_factory=list)
    statuses: list[DeviceStatus] = field(default_factory=list)
    events: list[DeviceEvent] = field(default_factory=list)
    rejects: list[Rejected] = field(default_factory=list)
    prefix: str = "stores"
    """The topic prefix the messages came under, to name the topic of a message refused here."""
    acks: list[tuple[int, int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.readings) + len(self.statuses) + len(self.events) + len(self.rejects)

    def extend(self, other: TelemetryBatch) -> None:
        self.readings.extend(other.readings)
        self.statuses.extend(other.statuses)
        self.events.extend(other.events)
        self.rejects.extend(other.rejects)
        self.acks.extend(other.acks)
