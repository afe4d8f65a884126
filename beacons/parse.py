"""Parse BLE advertisements into beacon frames: pure functions, bytes in, frames out.

Every call either returns frames or counts why it did not (``ParseStats.rejected``); no
input bytes make a parser raise, because the radio hears anything and a bad advert must
cost a counter, never the scan loop. Non-bytes arguments may raise TypeError.

This is the hot path: every advert in the shop goes through it, in drains: ``parse_adverts`` is the
parser, and the single calls (``parse_payload``, ``parse_advertisement``, ``parse_bleak``) are drains
of one. The shapes that repeat (the same beacon advertising the same bytes many times a second) are
answered from small bounded caches of immutable frames, read in one place (``parse_adverts``), so the
common case is one dict lookup; a miss walks the AD structures (raw bytes) or reads bleak's
dictionaries entry by entry, and puts an identity frame in the cache of its shape.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from beacons.types import (
    Advertisement,
    AltBeacon,
    EddystoneEID,
    EddystoneTLM,
    EddystoneUID,
    EddystoneURL,
    Frame,
    IBeacon,
)

__all__ = [
    "EDDYSTONE_SERVICE_UUID",
    "FORMATS",
    "MAX_PAYLOAD",
    "MalformedAD",
    "ParseStats",
    "Parsed",
    "iter_ad_structures",
    "parse_ad_structure",
    "parse_advertisement",
    "parse_adverts",
    "parse_bleak",
    "parse_manufacturer",
    "parse_payload",
    "parse_service_data",
]

MAX_PAYLOAD = 1650
"""Largest advertising data a controller reports (Bluetooth 5 extended advertising)."""

AD_MANUFACTURER_DATA = 0xFF
AD_SERVICE_DATA_16 = 0x16
APPLE_COMPANY_ID = 0x004C
EDDYSTONE_SERVICE_UUID = "0000feaa-0000-1000-8000-00805f9b34fb"
_EDDYSTONE_UUID_SPELLINGS = frozenset({EDDYSTONE_SERVICE_UUID, "feaa", "0xfeaa", "0000feaa"})

FORMATS = tuple(cls.format for cls in (IBeacon, AltBeacon, EddystoneUID, EddystoneURL, EddystoneTLM,
                                     EddystoneEID))
_CACHE_MAX = 16384  # distinct beacons remembered; a few MB at most
_SIGNED8 = tuple(range(128)) + tuple(range(-128, 0))

# Eddystone-URL: scheme prefix byte, then printable ASCII with 0x00-0x0d as expansions.
_URL_SCHEMES = ("http://www.", "https://www.", "http://", "https://")
_URL_EXPANSIONS = (".com/", ".org/", ".edu/", ".net/", ".info/", ".biz/", ".gov/",
                   ".com", ".org", ".edu", ".net", ".info", ".biz", ".gov")
_URL_CODES: tuple[str | None, ...] = tuple(
    _URL_EXPANSIONS[b] if b < len(_URL_EXPANSIONS) else chr(b) if 0x20 < b < 0x7F else None
    for b in range(256)
)



class _Recent(dict[bytes, Any]):
    """A bounded memo that keeps what is in use: when ``size`` entries are held, they become the old
    generation and a new one starts; an old entry asked for again moves back. A hit is one C-level
    dict lookup (``cache[key]``, None when absent); at most 2 x ``size`` entries are held, so a flood of
    distinct adverts costs memory that stays flat, and the shop's own beacons stay cached through it."""

    __slots__ = ("old", "size")

    def __init__(self, size: int) -> None:
        super().__init__()
        self.old: dict[bytes, Any] = {}
        self.size = size

    def __missing__(self, key: bytes) -> Any:
        value = self.old.pop(key, None)
        if value is not None:
            self.put(key, value)
        return value

    def put(self, key: bytes, value: Any) -> None:
        if len(self) >= self.size:
            self.old = dict(self)
            super().clear()
        self[key] = value

    def clear(self) -> None:
        super().clear()
        self.old = {}


class _NoFrame:
    """The payload cache's answer for raw data that is well formed and holds no beacon at all (a phone's
    other adverts, a vendor's data): what the walk would say (``not_a_beacon``) without walking again."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<no frame>"


NO_FRAME: Any = _NoFrame()
_PAYLOAD_CACHE = _Recent(_CACHE_MAX)  # raw advertising data -> its one identity frame, or NO_FRAME
_IBEACON_CACHE = _Recent(_CACHE_MAX)  # Apple manufacturer data (the one entry of an advert) -> IBeacon
_EDDYSTONE_CACHE = _Recent(_CACHE_MAX)  # Eddystone service data (the one entry of an advert) -> identity frame
_UUID_CACHE = _Recent(_CACHE_MAX)
_IBEACON_BODY = struct.Struct(">16sHHb")  # uuid, major, minor, measured power (signed)


class ParseStats:
    """Accepted frames per format and rejected inputs per reason code.

    Each parse call adds at least one count, so ``total`` tells how much was looked at.
    Reasons: ``empty``, ``oversized``, ``truncated_ad`` (framing, whole advert dropped),
    ``not_a_beacon`` (well formed, no beacon in it), and per format ``ibeacon_length``,
    ``altbeacon_length``, ``eddystone_empty``, ``eddystone_unknown_frame``,
    ``eddystone_{uid,url,tlm,eid}_length``, ``eddystone_url_scheme``,
    ``eddystone_url_reserved_code``, ``eddystone_tlm_version``.
    The counts live in plain dicts (a Counter subclass doubles the cost of an increment,
    which shows at half a million adverts a second); ``accepted`` and ``rejected`` hand
    out Counter snapshots for reading.
    """

    __slots__ = ("_accepted", "_rejected")

    def __init__(self) -> None:
        # Pre-filled so the hot path can `+= 1` without a lookup default.
        self._accepted: dict[str, int] = dict.fromkeys(FORMATS, 0)
        self._rejected: dict[str, int] = {}

    @property
    def accepted(self) -> Counter[str]:
        return Counter({fmt: n for fmt, n in self._accepted.items() if n})

    @property
    def rejected(self) -> Counter[str]:
        return Counter(self._rejected)

    @property
    def total(self) -> int:
        return sum(self._accepted.values()) + sum(self._rejected.values())

    def reject(self, reason: str) -> None:
        self._rejected[reason] = self._rejected.get(reason, 0) + 1

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"accepted": dict(self.accepted), "rejected": dict(self._rejected)}

    def __repr__(self) -> str:
        return f"ParseStats(accepted={dict(self.accepted)}, rejected={self._rejected})"


class MalformedAD(ValueError):
    """An AD structure whose length runs past the end of the payload."""

    def __init__(self, offset: int, length: int, size: int) -> None:
        self.offset = offset
        self.reason = "truncated_ad"
        super().__init__(
            f"truncated AD structure at offset {offset}: length {length} needs {length + 1} bytes, "
            f"{size - offset} left in the {size}-byte payload"
        )


def iter_ad_structures(payload: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield (ad_type, data) per AD structure; a zero length ends the data (padding).

    Raises MalformedAD when a structure runs past the end; structures before it have
    already been yielded, so callers wanting all-or-nothing should collect first.
    """
    i, n = 0, len(payload)
    while i < n:
        length = payload[i]
        if length == 0:
            return
        end = i + 1 + length
        if end > n:
            raise MalformedAD(i, length, n)
        yield payload[i + 1], payload[i + 2:end]
        i = end


def _uuid_str(raw: bytes) -> str:
    text: str | None = _UUID_CACHE[raw]
    if text is None:
        h = raw.hex()
        text = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        _UUID_CACHE.put(raw, text)
    return text


def _ibeacon(data: bytes) -> IBeacon | str:
    """Apple manufacturer data of subtype 0x02: 0x02 0x15 uuid(16) major minor tx."""
    if len(data) != 23 or data[1] != 0x15:
        return "ibeacon_length"
    raw, major, minor, tx = _IBEACON_BODY.unpack_from(data, 2)
    return IBeacon(_uuid_str(raw), major, minor, tx)


def _altbeacon(company_id: int, data: bytes) -> AltBeacon | str:
    """0xBEAC id(20) ref_rssi [mfg_reserved]; beacons that omit the last byte are common."""
    n = len(data)
    if n == 24:
        reserved: int | None = data[23]
    elif n == 23:
        reserved = None
    else:
        return "altbeacon_length"
    return AltBeacon(data[2:22].hex(), _SIGNED8[data[22]], reserved, company_id)


def _manufacturer(company_id: int, data: bytes) -> Frame | str | None:
    """A frame, a reject reason, or None when the data is not a beacon format at all."""
    if company_id == APPLE_COMPANY_ID and data[:1] == b"\x02":
        return _ibeacon(data)
    if data[:2] == b"\xbe\xac":
        return _altbeacon(company_id, data)
    return None


def _eddystone_url(data: bytes) -> EddystoneURL | str:
    n = len(data)
    if n < 3 or n > 20:
        return "eddystone_url_length"
    if data[2] >= len(_URL_SCHEMES):
        return "eddystone_url_scheme"
    parts = [_URL_SCHEMES[data[2]]]
    for b in data[3:]:
        text = _URL_CODES[b]
        if text is None:
            return "eddystone_url_reserved_code"
        parts.append(text)
    return EddystoneURL("".join(parts), _SIGNED8[data[1]])


def _eddystone_tlm(data: bytes) -> EddystoneTLM | str:
    if len(data) >= 2 and data[1] != 0:
        return "eddystone_tlm_version"  # 0x01 is encrypted TLM: no key, nothing to read
    if len(data) != 14:
        return "eddystone_tlm_length"
    temp = int.from_bytes(data[4:6], "big", signed=True)  # 8.8 fixed point
    return EddystoneTLM(
        voltage_mv=(data[2] << 8 | data[3]) or None,
        temperature_c=None if temp == -0x8000 else temp / 256,
        advertising_count=int.from_bytes(data[6:10], "big"),
        uptime_s=int.from_bytes(data[10:14], "big") / 10,
    )


def _eddystone(data: bytes) -> Frame | str:
    """Eddystone service data (after the 0xFEAA UUID): frame type byte, then the frame."""
    if not data:
        return "eddystone_empty"
    kind = data[0]
    if kind == 0x00:
        if len(data) != 20 and len(data) != 18:  # 18: older UIDs omit the two RFU bytes
            return "eddystone_uid_length"
        return EddystoneUID(data[2:12].hex(), data[12:18].hex(), _SIGNED8[data[1]])
    if kind == 0x10:
        return _eddystone_url(data)
    if kind == 0x20:
        return _eddystone_tlm(data)
    if kind == 0x30:
        if len(data) != 10:
            return "eddystone_eid_length"
        return EddystoneEID(data[2:10].hex(), _SIGNED8[data[1]])
    return "eddystone_unknown_frame"


def _is_eddystone_uuid(uuid: str) -> bool:
    return uuid == EDDYSTONE_SERVICE_UUID or uuid.lower() in _EDDYSTONE_UUID_SPELLINGS


def _structure(ad_type: int, data: bytes) -> Frame | str | None:
    if ad_type == AD_MANUFACTURER_DATA:
        if len(data) >= 2:
            return _manufacturer(data[0] | data[1] << 8, data[2:])
    elif ad_type == AD_SERVICE_DATA_16 and data[:2] == b"\xaa\xfe":
        return _eddystone(data[2:])
    return None


def _reject(stats: ParseStats | None, reason: str) -> list[Frame]:
    if stats is not None:
        stats.reject(reason)
    return []


def _count_one(result: Frame | str | None, stats: ParseStats | None) -> Frame | None:
    if result is None or isinstance(result, str):
        if stats is not None:
            stats.reject(result or "not_a_beacon")
        return None
    if stats is not None:
        stats._accepted[result.format] += 1
    return result


def _add(reasons: list[str] | None, reason: str) -> list[str]:
    """Rejects are rare, so their list is only made when one happens."""
    if reasons is None:
        return [reason]
    reasons.append(reason)
    return reasons


def _finish(frames: list[Frame], reasons: list[str] | None, stats: ParseStats | None) -> list[Frame]:
    """Count the outcome of one advert: its frames, its rejects, or 'not_a_beacon'."""
    if stats is not None:
        accepted = stats._accepted
        for frame in frames:
            accepted[frame.format] += 1
        if reasons:
            for reason in reasons:
                stats.reject(reason)
        elif not frames:
            rejected = stats._rejected
            rejected["not_a_beacon"] = rejected.get("not_a_beacon", 0) + 1
    return frames


def parse_ad_structure(ad_type: int, data: bytes, stats: ParseStats | None = None) -> Frame | None:
    """Parse one AD structure's type and data (for receivers that forward structures)."""
    return _count_one(_structure(ad_type, data), stats)


def parse_payload(payload: bytes, stats: ParseStats | None = None) -> list[Frame]:
    """Parse raw advertising data (AD structures) into beacon frames.

    All or nothing: a truncated structure or an oversized payload rejects the whole
    advert, since bytes after a framing error cannot be trusted. bytearray and
    memoryview are copied to bytes first.
    """
    return _frames(Advertisement("", 0, 0.0, "", payload), stats)


def _walk(payload: bytes, stats: ParseStats | None) -> list[Frame]:
    """Raw bytes the cache missed: every AD structure in turn, the whole advert rejected on a framing error."""
    n = len(payload)
    if n == 0:
        return _reject(stats, "empty")
    if n > MAX_PAYLOAD:
        return _reject(stats, "oversized")
    frames: list[Frame] = []
    reasons: list[str] | None = None
    i = 0
    while i < n:
        length = payload[i]
        if length == 0:
            break
        end = i + 1 + length
        if end > n:
            return _reject(stats, "truncated_ad")
        ad_type = payload[i + 1]
        if ad_type in (AD_MANUFACTURER_DATA, AD_SERVICE_DATA_16):
            result = _structure(ad_type, payload[i + 2:end])
            if isinstance(result, str):
                reasons = _add(reasons, result)
            elif result is not None:
                frames.append(result)
        i = end
    if len(frames) == 1 and not reasons and frames[0].key is not None:
        _PAYLOAD_CACHE.put(payload, frames[0])  # TLM churns; identity frames repeat
    elif not frames and not reasons:
        _PAYLOAD_CACHE.put(payload, NO_FRAME)  # so do a phone's frameless adverts
    return _finish(frames, reasons, stats)


def parse_manufacturer(company_id: int, data: bytes, stats: ParseStats | None = None) -> Frame | None:
    """Parse one manufacturer-data entry as bleak gives it: company id, bytes after the id."""
    return _count_one(_manufacturer(company_id, data), stats)


def parse_service_data(uuid: str, data: bytes, stats: ParseStats | None = None) -> Frame | None:
    """Parse one service-data entry keyed by its (bleak: full 128-bit) UUID string."""
    return _count_one(_eddystone(data) if _is_eddystone_uuid(uuid) else None, stats)


def _maps(manufacturer_data: Mapping[int, bytes], service_data: Mapping[str, bytes],
          stats: ParseStats | None) -> list[Frame]:
    """bleak's dictionaries the caches missed, entry by entry; a one-entry iBeacon or Eddystone identity
    is put in the cache that ``parse_adverts`` reads for that shape (TLM churns: not kept)."""
    frames: list[Frame] = []
    reasons: list[str] | None = None
    if manufacturer_data:
        for company_id, data in manufacturer_data.items():
            result = _manufacturer(company_id, data)
            if result is None:
                continue
            if isinstance(result, str):
                reasons = _add(reasons, result)
            else:
                frames.append(result)
    elif not service_data:
        return _reject(stats, "empty")
    if service_data:
        for uuid, data in service_data.items():
            if _is_eddystone_uuid(uuid):
                found = _eddystone(data)
                if isinstance(found, str):
                    reasons = _add(reasons, found)
                else:
                    frames.append(found)
    if len(frames) == 1 and not reasons and frames[0].key is not None:
        frame = frames[0]
        if not service_data and len(manufacturer_data) == 1 and isinstance(frame, IBeacon):
            _IBEACON_CACHE.put(manufacturer_data[APPLE_COMPANY_ID], frame)
        elif not manufacturer_data and len(service_data) == 1 and EDDYSTONE_SERVICE_UUID in service_data:
            _EDDYSTONE_CACHE.put(service_data[EDDYSTONE_SERVICE_UUID], frame)
    return _finish(frames, reasons, stats)


def parse_advertisement(adv: Advertisement, stats: ParseStats | None = None) -> list[Frame]:
    """Parse an Advertisement: its raw payload when it has one, else bleak's dictionaries."""
    return _frames(adv, stats)


def parse_bleak(advertisement_data: Any, stats: ParseStats | None = None) -> list[Frame]:
    """Parse a bleak AdvertisementData (duck-typed: .manufacturer_data, .service_data)."""
    return _frames(Advertisement("", 0, 0.0, "", b"", getattr(advertisement_data, "manufacturer_data", None) or {},
                                 getattr(advertisement_data, "service_data", None) or {}), stats)


def _frames(adv: Advertisement, stats: ParseStats | None) -> list[Frame]:
    """One advert's frames: a drain of one."""
    return [frame for _, frame in parse_adverts((adv,), stats)]


def _as_bytes(payload: Any) -> Any:
    """bytearray and memoryview as bytes (the caches need hashable, immutable keys); anything else as given."""
    return bytes(payload) if isinstance(payload, bytearray | memoryview) else payload


class Parsed(list[tuple[Advertisement, Frame]]):
    """``parse_adverts``' answer: the (advert, frame) pairs, and in ``frameless`` the adverts that gave no
    frame, in order (the rotating resolver's input for addresses: no second pass over the drain to find them)."""

    __slots__ = ("frameless",)

    def __init__(self) -> None:
        super().__init__()
        self.frameless: list[Advertisement] = []


def parse_adverts(adverts: Iterable[Advertisement], stats: ParseStats | None = None) -> Parsed:
    """A scanner drain: (advert, frame) for every frame found, in order, each advert counted in ``stats``
    (its frames by format, or why it gave none); the adverts without a frame in ``.frameless``. An advert
    seen before (a beacon's raw bytes, with or without a frame, or bleak's one-entry dictionary) is one cache
    lookup; the rest are walked or read entry by entry."""
    out = Parsed()
    append = out.append
    frameless = out.frameless.append
    no_frame = NO_FRAME
    n_no_frame = 0
    ibeacons, eddystones, payloads = _IBEACON_CACHE, _EDDYSTONE_CACHE, _PAYLOAD_CACHE
    apple, eddystone = APPLE_COMPANY_ID, EDDYSTONE_SERVICE_UUID
    accepted = stats._accepted if stats is not None else None
    n_ibeacons = 0  # the usual hit, counted once per drain
    for adv in adverts:
        payload = adv.payload
        if payload:
            if type(payload) is not bytes:
                payload = _as_bytes(payload)
            frame = payloads[payload]
            if frame is None:
                found = _walk(payload, stats)
                for frame in found:
                    append((adv, frame))
                if not found:
                    frameless(adv)
                continue
            if frame is no_frame:
                n_no_frame += 1
                frameless(adv)
                continue
        else:
            mfr, svc = adv.manufacturer_data, adv.service_data
            if not svc and len(mfr) == 1:
                frame = ibeacons[mfr.get(apple, b"")]
                if frame is not None:
                    n_ibeacons += 1
                    append((adv, frame))
                    continue
            elif not mfr and len(svc) == 1:
                frame = eddystones[svc.get(eddystone, b"")]
            else:
                frame = None
            if frame is None:
                found = _maps(mfr, svc, stats)
                for frame in found:
                    append((adv, frame))
                if not found:
                    frameless(adv)
                continue
        if accepted is not None:
            accepted[frame.format] += 1
        append((adv, frame))
    if stats is not None:
        if n_ibeacons:
            stats._accepted["ibeacon"] += n_ibeacons
        if n_no_frame:
            rejected = stats._rejected
            rejected["not_a_beacon"] = rejected.get("not_a_beacon", 0) + n_no_frame
    return out
