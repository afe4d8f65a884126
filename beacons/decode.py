"""`gateway decode HEX`: explain one raw advertisement, with errors a person can act on.

Unlike the hot-path parser, which only counts what it drops, this says what is wrong
and where, since it serves someone holding a capture and asking "why is it not seen?".
"""

from __future__ import annotations

import string
from typing import Any

from beacons.parse import MAX_PAYLOAD, MalformedAD, ParseStats, iter_ad_structures, parse_ad_structure

__all__ = ["DecodeError", "decode_hex"]

_HEX_DIGITS = frozenset(string.hexdigits)


class DecodeError(ValueError):
    """The input is not a decodable beacon advertisement; the message says why."""


def _unhex(text: str) -> bytes:
    """Hex with optional 0x prefix, spaces and colons (as tools print captures)."""
    cleaned = "".join(text.split()).replace(":", "")
    if cleaned[:2].lower() == "0x":
        cleaned = cleaned[2:]
    if not cleaned:
        raise DecodeError("malformed hex: no digits")
    bad = next((c for c in cleaned if c not in _HEX_DIGITS), None)
    if bad is not None:
        raise DecodeError(f"malformed hex: {bad!r} is not a hex digit")
    if len(cleaned) % 2:
        raise DecodeError(f"malformed hex: odd number of digits ({len(cleaned)})")
    return bytes.fromhex(cleaned)


def decode_hex(text: str) -> list[dict[str, Any]]:
    """Decode raw advertising data given as hex into one dict per beacon frame found."""
    payload = _unhex(text)
    if len(payload) > MAX_PAYLOAD:
        raise DecodeError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte maximum")
    try:
        structures = list(iter_ad_structures(payload))
    except MalformedAD as exc:
        raise DecodeError(str(exc)) from None
    stats = ParseStats()
    frames = [frame for ad_type, data in structures
              if (frame := parse_ad_structure(ad_type, data, stats)) is not None]
    if not frames:
        rejected = sorted(reason for reason in stats.rejected if reason != "not_a_beacon")
        detail = f" (rejected: {', '.join(rejected)})" if rejected else ""
        raise DecodeError(f"no beacon found in {len(structures)} AD structures{detail}")
    return [frame.as_dict() for frame in frames]
