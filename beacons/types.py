"""Plain data that crosses the BLE stages: advertisement in, beacon identity, sighting out.

Each frame type is a small frozen dataclass with a ``format`` tag, an optional identity
``key`` (the string profiles use as an identifier) and ``as_dict()`` for `gateway decode`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, TypeAlias

#: Eddystone frames advertise their power at 0 m; the distance model wants it at 1 m. The
#: Eddystone spec's own conversion: "add 41 dBm" to the 1 m RSSI to get the 0 m value.
EDDYSTONE_0M_TO_1M_DB = 41


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
    # key and ref_power are computed once, in every frame type: the parser caches frames, and the hot
    # path reads both for every advert.
    key: str = field(init=False, repr=False, compare=False)
    ref_power: int = field(init=False, repr=False, compare=False)  # measured power at 1 m: as advertised

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"ibeacon:{self.uuid}:{self.major}:{self.minor}")
        object.__setattr__(self, "ref_power", self.tx_power)

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "uuid": self.uuid, "major": self.major,
                "minor": self.minor, "tx_power": self.tx_power}


class Sighting(NamedTuple):
    """An advertisement resolved to a beacon identity, as heard by one receiver.

    ``tx_power`` is the measured power at 1 m the beacon advertises (None when unknown).
    The device address is deliberately absent: identities, never addresses, flow on.
    Immutable like the frames, but a named tuple: one is made per advert, and a tuple is made
    in half the time of a frozen dataclass.
    """

    key: str
    receiver: str
    rssi: int
    time: float
    tx_power: int | None = None


@dataclass(frozen=True, slots=True)
class AltBeacon:
    """AltBeacon: manufacturer data with beacon code 0xBEAC, any company id.

    The 20-byte id is conventionally split 16+2+2 (uuid, major, minor), like iBeacon;
    ``mfg_reserved`` is None for beacons that omit that last byte.
    """

    beacon_id: str
    tx_power: int
    mfg_reserved: int | None
    company_id: int
    format: ClassVar[str] = "altbeacon"
    key: str = field(init=False, repr=False, compare=False)
    ref_power: int = field(init=False, repr=False, compare=False)  # AltBeacon advertises it at 1 m

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"altbeacon:{self.beacon_id}")
        object.__setattr__(self, "ref_power", self.tx_power)

    @property
    def uuid(self) -> str:
        h = self.beacon_id
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"

    @property
    def major(self) -> int:
        return int(self.beacon_id[32:36], 16)

    @property
    def minor(self) -> int:
        return int(self.beacon_id[36:40], 16)

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "beacon_id": self.beacon_id, "tx_power": self.tx_power,
                "mfg_reserved": self.mfg_reserved, "uuid": self.uuid, "major": self.major,
                "minor": self.minor}


@dataclass(frozen=True, slots=True)
class EddystoneUID:
    """Eddystone-UID: 10-byte namespace + 6-byte instance; ``tx_power`` is at 0 m, not 1 m."""

    namespace: str
    instance: str
    tx_power: int
    format: ClassVar[str] = "eddystone_uid"
    key: str = field(init=False, repr=False, compare=False)
    ref_power: int = field(init=False, repr=False, compare=False)  # the 0 m power brought to 1 m

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"eddystone_uid:{self.namespace}:{self.instance}")
        object.__setattr__(self, "ref_power", self.tx_power - EDDYSTONE_0M_TO_1M_DB)

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "namespace": self.namespace, "instance": self.instance,
                "tx_power": self.tx_power}


@dataclass(frozen=True, slots=True)
class EddystoneURL:
    """Eddystone-URL, expanded to the full URL; ``tx_power`` is at 0 m."""

    url: str
    tx_power: int
    format: ClassVar[str] = "eddystone_url"
    key: str = field(init=False, repr=False, compare=False)
    ref_power: int = field(init=False, repr=False, compare=False)  # the 0 m power brought to 1 m

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"eddystone_url:{self.url}")
        object.__setattr__(self, "ref_power", self.tx_power - EDDYSTONE_0M_TO_1M_DB)

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "url": self.url, "tx_power": self.tx_power}


@dataclass(frozen=True, slots=True)
class EddystoneTLM:
    """Unencrypted Eddystone-TLM (version 0): telemetry without identity, so ``key`` is None.

    None marks a value the beacon says it does not measure (voltage 0, temperature 0x8000).
    """

    voltage_mv: int | None
    temperature_c: float | None
    advertising_count: int
    uptime_s: float
    format: ClassVar[str] = "eddystone_tlm"
    tx_power: ClassVar[None] = None
    key: ClassVar[None] = None  # telemetry only: no identity
    ref_power: ClassVar[None] = None  # and no power

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "voltage_mv": self.voltage_mv,
                "temperature_c": self.temperature_c, "advertising_count": self.advertising_count,
                "uptime_s": self.uptime_s}


@dataclass(frozen=True, slots=True)
class EddystoneEID:
    """Eddystone-EID: an 8-byte rotating identifier the gateway may resolve; ``tx_power`` at 0 m."""

    eid: str
    tx_power: int
    format: ClassVar[str] = "eddystone_eid"
    key: str = field(init=False, repr=False, compare=False)
    ref_power: int = field(init=False, repr=False, compare=False)  # the 0 m power brought to 1 m

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"eddystone_eid:{self.eid}")
        object.__setattr__(self, "ref_power", self.tx_power - EDDYSTONE_0M_TO_1M_DB)

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "eid": self.eid, "tx_power": self.tx_power}


Frame: TypeAlias = IBeacon | AltBeacon | EddystoneUID | EddystoneURL | EddystoneTLM | EddystoneEID
"""Any beacon frame the parsers return."""
