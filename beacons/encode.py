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
    """Flags + Apple manufacturer data 0x004C, subtype 0x02, length 0x15."""
    body = struct.pack(">H", 0x004C) + b"\x02\x15" + uuidlib.UUID(uuid).bytes + struct.pack(
        ">HHb", major, minor, tx_power
    )
    return (FLAGS_LE_GENERAL_NO_BREDR if flags else b"") + ad_structure(0xFF, body)
