"""Sightings that other receivers made: ESPresense nodes over MQTT, and the shop's app over HTTP.

Pure functions, values in, :class:`Sighting` out. Everything here turns a foreign naming of a
beacon into OUR beacon keys (``beacons.types``), so a remote sighting meets the same identity
index, presence tracker and campaigns as one our own adapter heard.

ESPresense layout (espresense.com/configuration/mqtt and ``reportDevice`` in ESPresense's
``src/main.cpp``): each node publishes ``espresense/devices/<id>/<room>`` with a JSON object
filled by ``BleFingerprint::fill`` (``lib/BleFingerprint/BleFingerprint.cpp``): ``mac``, ``id``,
``name``, ``idType``, ``rssi@1m``, ``rssi``, ``raw``, ``distance``, ``speed``, ``mean``, ``var``,
``int``... The ids that name a beacon identity are

- ``iBeacon:<uuid>-<major>-<minor>`` (uuid lowercase with dashes, major/minor decimal),
- ``altBeacon:<uuid>-<major>-<minor>`` (the 20-byte AltBeacon id split 16+2+2),
- ``eddy:<namespace>-<instance>`` (Eddystone-UID; the firmware prints namespace byte 4 twice,
  so the namespace has 22 hex digits; a fixed 20-digit one is accepted too).

Every other id (``mac``-style addresses, ``apple:...``, ``name:...``, ``md:...``, ``known:...``,
``irk:...``, aliases) is a fingerprint of a device, not a beacon identity: it is rejected as
:class:`UnmappedId`, counted by the intake and never stored. ESPresense payloads carry no time:
the time is when the gateway received the message.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from beacons.types import Sighting

DEFAULT_PREFIX = "espresense"
MAX_PAYLOAD = 4096  # ESPresense serialises into a 512-byte buffer; anything far larger is not from it

# Reason codes (counted by the intake, shown in logs).
BAD_TOPIC = "bad_topic"
TOO_LARGE = "too_large"
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
BAD_RSSI = "bad_rssi"
ID_MISMATCH = "id_mismatch"
UNMAPPED_ID = "unmapped_id"
BAD_BEACON = "bad_beacon"
BAD_TIME = "bad_time"

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HEX = re.compile(r"[0-9a-f]+")
_SEGMENT = re.compile(r"[^/#+\x00]+")


class RemoteError(ValueError):
    """A remote sighting that cannot become a Sighting; ``reason_code`` is one of the constants above."""

    quiet = False

    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(f"{reason_code}: {message}")
        self.reason_code = reason_code
        self.message = message


class UnmappedId(RemoteError):
    """A well-formed report about something that is not a beacon identity (a phone's fingerprint).

    Normal traffic, not an error: ``quiet`` tells the intake to count it without a warning.
    """

    quiet = True


def _u16(text: str) -> int | None:
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        return None
    value = int(text)
    return value if value <= 0xFFFF else None


def _uuid_major_minor(rest: str) -> tuple[str, int, int] | None:
    parts = rest.lower().rsplit("-", 2)
    if len(parts) != 3 or not _UUID.fullmatch(parts[0]):
        return None
    major, minor = _u16(parts[1]), _u16(parts[2])
    if major is None or minor is None:
        return None
    return parts[0], major, minor


def beacon_key(espresense_id: str) -> str:
    """OUR beacon key for an ESPresense device id; UnmappedId for fingerprints, RemoteError if garbled."""
    kind, sep, rest = espresense_id.partition(":")
    kind = kind.lower()
    if not sep or kind not in ("ibeacon", "altbeacon", "eddy"):
        raise UnmappedId(UNMAPPED_ID, f"{kind or espresense_id[:16]!r} ids are device fingerprints, not beacons")
    if kind == "eddy":
        ns, dash, inst = rest.lower().partition("-")
        if dash and len(ns) == 22 and ns[8:10] == ns[10:12]:
            ns = ns[:10] + ns[12:]  # undo the firmware's repeated namespace byte
        if not dash or len(ns) != 20 or len(inst) != 12 or not _HEX.fullmatch(ns + inst):
            raise RemoteError(BAD_BEACON, f"not an Eddystone-UID id: {espresense_id[:80]!r}")
        return f"eddystone_uid:{ns}:{inst}"
    parsed = _uuid_major_minor(rest)
    if parsed is None:
        raise RemoteError(BAD_BEACON, f"expected {kind}:<uuid>-<major>-<minor>, got {espresense_id[:80]!r}")
    uuid, major, minor = parsed
    if kind == "ibeacon":
        return f"ibeacon:{uuid}:{major}:{minor}"
    return f"altbeacon:{uuid.replace('-', '')}{major:04x}{minor:04x}"


def _int_field(body: Mapping[str, Any], name: str) -> int | None:
    """An integral JSON number, or None when absent or not one (bools are not numbers here)."""
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        return None
    return int(value)


@dataclass(frozen=True, slots=True)
class EspresenseTopic:
    device_id: str
    room: str


def parse_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> EspresenseTopic:
    """``<prefix>/devices/<id>/<room>``; anything else is BAD_TOPIC."""
    head = f"{prefix}/devices/"
    if not topic.startswith(head):
        raise RemoteError(BAD_TOPIC, f"not under {head}")
    parts = topic[len(head):].split("/")
    if len(parts) != 2 or not all(_SEGMENT.fullmatch(p) for p in parts):
        raise RemoteError(BAD_TOPIC, "expected <id>/<room> after devices/")
    return EspresenseTopic(parts[0], parts[1])


def receiver_id(room: str, rooms: Mapping[str, str] | None = None) -> str:
    """The receiver an ESPresense room is: the configured mapping, else ``espresense:<room>``."""
    if rooms and room in rooms:
        return rooms[room]
    return f"espresense:{room}"


def parse_espresense(topic: str, payload: bytes, received_at: float, *, prefix: str = DEFAULT_PREFIX,
                     rooms: Mapping[str, str] | None = None) -> Sighting:
    """One ESPresense device report -> a Sighting by receiver ``espresense:<room>`` (or the mapped id).

    ``tx_power`` is the node's ``rssi@1m`` (the beacon's calibrated power plus the node's own
    adjustment); a value that cannot be a power at 1 m (ESPresense 3.3.1 reports some as
    positive, issue #1286) is dropped so the receiver's calibration or the default applies.
    ESPresense's own ``distance`` is not used: zones come from our per-receiver calibration.
    """
    where = parse_topic(topic, prefix)
    if len(payload) > MAX_PAYLOAD:
        raise RemoteError(TOO_LARGE, f"{len(payload)} bytes > {MAX_PAYLOAD}")
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RemoteError(NOT_JSON, "payload is not JSON") from None
    if not isinstance(body, dict):
        raise RemoteError(NOT_OBJECT, "payload is not a JSON object")
    named = body.get("id")
    if named is not None and named != where.device_id:
        raise RemoteError(ID_MISMATCH, "payload id differs from the topic's")
    key = beacon_key(where.device_id)
    rssi = _int_field(body, "rssi")
    if rssi is None or not -127 < rssi < 0:
        raise RemoteError(BAD_RSSI, f"rssi must be an integer in (-127, 0), got {body.get('rssi')!r:.20}")
    tx = _int_field(body, "rssi@1m")
    if tx is not None and not -127 < tx < 0:
        tx = None
    return Sighting(key, receiver_id(where.room, rooms), rssi, received_at, tx)


# ------------------------------------------------------------------ app-reported sightings


@dataclass(frozen=True, slots=True)
class AppReport:
    """What the app says it ranged: a store beacon (by key), the RSSI and optionally tx power and time."""

    beacon: str
    rssi: int
    tx_power: int | None = None
    time: float | None = None


def app_key(profile_id: int) -> str:
    """The presence key of a customer reported by their own app (the identity index resolves it)."""
    return f"app:{profile_id}"


def store_beacon_receiver(beacon: str) -> str:
    """A store beacon, fixed in a zone, acts as the receiver of app-reported sightings."""
    return f"beacon:{beacon}"


def ibeacon_key(uuid: str, major: int, minor: int) -> str:
    return f"ibeacon:{uuid.lower()}:{major}:{minor}"


def app_sightings(profile_id: int, reports: Sequence[AppReport], now: float, *, max_age_s: float,
                  max_ahead_s: float) -> list[Sighting]:
    """The app's reports as Sightings of the customer by store-beacon receivers; all or nothing.

    A time in the future (beyond clock skew) or older than ``max_age_s`` is refused: presence
    is about now, and a replayed or delayed batch must not walk someone through the shop.
    """
    out = []
    key = app_key(profile_id)
    for i, r in enumerate(reports):
        t = now if r.time is None else r.time
        if not math.isfinite(t):
            raise RemoteError(BAD_TIME, f"[{i}].time must be a finite number of epoch seconds")
        if t > now + max_ahead_s:
            raise RemoteError(BAD_TIME, f"[{i}].time is in the future ({t:.3f} > now {now:.3f})")
        if t < now - max_age_s:
            raise RemoteError(BAD_TIME, f"[{i}].time is more than {max_age_s:g} s old")
        if not -127 < r.rssi < 0:
            raise RemoteError(BAD_RSSI, f"[{i}].rssi must be in (-127, 0)")
        tx = r.tx_power if r.tx_power is not None and -127 < r.tx_power < 0 else None
        out.append(Sighting(key, store_beacon_receiver(r.beacon), r.rssi, t, tx))
    return out
