"""Plain data that crosses the BLE stages: advertisement in, beacon identity, sighting out.

Each frame type is a small frozen dataclass with a ``format`` tag, an optional identity
``key`` (the string profiles use as an identifier) and ``as_dict()`` for `gateway decode`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class Advertisement:
    """One BLE advertisement as received.

    ``payload`` holds the raw AD structures when the source has them (HCI, simulator);
    bleak on BlueZ gives only the decoded dictionaries, so those are accepted too.
    """

    address: str
    rssi: int
    time: float
    receiver: str
    payload: bytes = b""
    manufacturer_data: Mapping[int, bytes] = field(default_factory=dict)
    service_data: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IBeacon:
    uuid: str
    major: int
    minor: int
    tx_power: int
    format: ClassVar[str] = "ibeacon"

    @property
    def key(self) -> str:
        return f"ibeacon:{self.uuid}:{self.major}:{self.minor}"

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "uuid": self.uuid, "major": self.major,
                "minor": self.minor, "tx_power": self.tx_power}


@dataclass(frozen=True, slots=True)
class Sighting:
    """An advertisement resolved to a beacon identity, as heard by one receiver.

    ``tx_power`` is the measured power at 1 m the beacon advertises (None when unknown).
    The device address is deliberately absent: identities, never addresses, flow on.
    """

    key: str
    receiver: str
    rssi: int
    time: float
    tx_power: int | None = None
