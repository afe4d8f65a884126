"""Build raw advertising payloads (AD structures): for simulators and tests, the inverse of parse."""

from __future__ import annotations

import struct
import uuid as uuidlib

FLAGS_LE_GENERAL_NO_BREDR = bytes((0x02, 0x01, 0x06))


def ad_structure(ad_type: int, data: bytes) -> bytes:
    if len(data) > 254:
        raise ValueError("an AD structure carries at most 254 bytes")
    return bytes((len(data) + 1, ad_type)) + data


def ibeacon_payload(uuid: str, major: int, minor: int, tx_power: int = -59, *, flags: bool = True) -> bytes:
    """Flags + Apple manufacturer data: company 0x004C (little-endian on air, 4c 00), 0x02, 0x15."""
    body = struct.pack("<H", 0x004C) + b"\x02\x15" + uuidlib.UUID(uuid).bytes + struct.pack(
        ">HHb", major, minor, tx_power
    )
    return (FLAGS_LE_GENERAL_NO_BREDR if flags else b"") + ad_structure(0xFF, body)


EDDYSTONE_UUID_LE = b"\xaa\xfe"
_URL_SCHEMES = (("https://www.", 1), ("http://www.", 0), ("https://", 3), ("http://", 2))
# Longest first, so ".com/" wins over ".com"; the codes are the Eddystone-URL spec's.
_URL_EXPANSIONS = sorted(
    ((text, code) for code, text in enumerate((".com/", ".org/", ".edu/", ".net/", ".info/", ".biz/",
                                               ".gov/", ".com", ".org", ".edu", ".net", ".info",
                                               ".biz", ".gov"))),
    key=lambda item: -len(item[0]),
)


def _hex_bytes(value: bytes | str, size: int, what: str) -> bytes:
    raw = bytes.fromhex(value.replace("-", "")) if isinstance(value, str) else bytes(value)
    if len(raw) != size:
        raise ValueError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


def altbeacon_payload(beacon_id: bytes | str, tx_power: int = -59, mfg_reserved: int = 0,
                      company_id: int = 0x0118, *, flags: bool = True) -> bytes:
    """Flags + manufacturer data: company id, 0xBEAC, 20-byte id, reference RSSI, reserved.

    ``beacon_id`` may be 20 bytes or hex (dashes allowed, so ``uuid + major + minor`` hex works).
    """
    body = (struct.pack("<H", company_id) + b"\xbe\xac" + _hex_bytes(beacon_id, 20, "beacon_id")
            + struct.pack(">bB", tx_power, mfg_reserved))
    return (FLAGS_LE_GENERAL_NO_BREDR if flags else b"") + ad_structure(0xFF, body)


def eddystone_payload(frame: bytes, *, flags: bool = True) -> bytes:
    """Wrap an Eddystone frame as the spec lays it out: flags, 0xFEAA UUID list, service data."""
    return ((FLAGS_LE_GENERAL_NO_BREDR if flags else b"") + ad_structure(0x03, EDDYSTONE_UUID_LE)
            + ad_structure(0x16, EDDYSTONE_UUID_LE + frame))


def eddystone_uid_frame(namespace: bytes | str, instance: bytes | str, tx_power: int = -20) -> bytes:
    """UID frame (service data after the UUID): 0x00, tx at 0 m, namespace(10), instance(6), RFU(2)."""
    return (struct.pack(">Bb", 0x00, tx_power) + _hex_bytes(namespace, 10, "namespace")
            + _hex_bytes(instance, 6, "instance") + b"\x00\x00")


def encode_url(url: str) -> bytes:
    """Compress a URL the Eddystone-URL way: scheme byte, then text with expansion codes."""
    for prefix, code in _URL_SCHEMES:
        if url[:len(prefix)].lower() == prefix:
            out, rest = bytearray((code,)), url[len(prefix):]
            break
    else:
        raise ValueError(f"URL must start with http:// or https://: {url!r}")
    i = 0
    while i < len(rest):
        for text, code in _URL_EXPANSIONS:
            if rest.startswith(text, i):
                out.append(code)
                i += len(text)
                break
        else:
            char = ord(rest[i])
            if not 0x20 < char < 0x7F:
                raise ValueError(f"URL character {rest[i]!r} cannot be sent in Eddystone-URL")
            out.append(char)
            i += 1
    if len(out) > 18:
        raise ValueError(f"URL encodes to {len(out) - 1} bytes, Eddystone-URL carries at most 17")
    return bytes(out)


def eddystone_url_frame(url: str, tx_power: int = -20) -> bytes:
    return struct.pack(">Bb", 0x10, tx_power) + encode_url(url)


def eddystone_tlm_frame(voltage_mv: int | None, temperature_c: float | None, advertising_count: int,
                        uptime_s: float) -> bytes:
    """Unencrypted TLM: None encodes 'not supported' (voltage 0, temperature 0x8000)."""
    temp = 0x8000 if temperature_c is None else round(temperature_c * 256) & 0xFFFF
    return struct.pack(">BBHHII", 0x20, 0x00, voltage_mv or 0, temp, advertising_count,
                       round(uptime_s * 10))


def eddystone_eid_frame(eid: bytes | str, tx_power: int = -20) -> bytes:
    return struct.pack(">Bb", 0x30, tx_power) + _hex_bytes(eid, 8, "eid")


def eddystone_uid_payload(namespace: bytes | str, instance: bytes | str, tx_power: int = -20, *,
                          flags: bool = True) -> bytes:
    return eddystone_payload(eddystone_uid_frame(namespace, instance, tx_power), flags=flags)


def eddystone_url_payload(url: str, tx_power: int = -20, *, flags: bool = True) -> bytes:
    return eddystone_payload(eddystone_url_frame(url, tx_power), flags=flags)


def eddystone_tlm_payload(voltage_mv: int | None, temperature_c: float | None, advertising_count: int,
                          uptime_s: float, *, flags: bool = True) -> bytes:
    return eddystone_payload(
        eddystone_tlm_frame(voltage_mv, temperature_c, advertising_count, uptime_s), flags=flags)


def eddystone_eid_payload(eid: bytes | str, tx_power: int = -20, *, flags: bool = True) -> bytes:
    return eddystone_payload(eddystone_eid_frame(eid, tx_power), flags=flags)
