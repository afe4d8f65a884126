"""A simulated store scenario (``examples/store.yaml``) as typed, frozen, validated data.

Everything downstream (walkers, radio, telemetry, carts) trusts these objects, so every
cross-reference is checked once here and a broken scenario fails with a message that names
the offending entry instead of surfacing later as a KeyError deep inside a simulation.
"""

from __future__ import annotations

import math
import uuid as uuidlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import yaml

T = TypeVar("T")


ANONYMOUS_UUID = "00000000-0000-4000-8000-000000000000"


class ScenarioError(ValueError):
    """The scenario file is unreadable or inconsistent; the message names the entry."""


# ---------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True, slots=True)
class Store:
    id: str
    name: str
    timezone: str = "UTC"
    opens: str = "09:00"
    size_m: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True, slots=True)
class Zone:
    """A named area; ``rect`` is (x0, y0, x1, y1) in metres with x0 < x1 and y0 < y1."""

    name: str
    rect: tuple[float, float, float, float]

    def contains(self, x: float, y: float) -> bool:
        x0, y0, x1, y1 = self.rect
        return x0 <= x <= x1 and y0 <= y <= y1


class ZoneBand(NamedTuple):
    """A receiver sees ``name`` for identities closer than ``max_m``."""

    name: str
    max_m: float


@dataclass(frozen=True, slots=True)
class Receiver:
    id: str
    position: tuple[float, float]
    zones: tuple[ZoneBand, ...]
    measured_power: int
    path_loss_exponent: float = 2.0
    rssi_offset: float = 0.0


@dataclass(frozen=True, slots=True)
class Radio:
    tx_power: int = -59
    shadowing_sigma_db: float = 3.0
    advert_interval_s: float = 1.0
    loss: float = 0.0


@dataclass(frozen=True, slots=True)
class CatalogItem:
    sku: str
    name: str
    price: float
    zone: str | None = None
    aisle: str | None = None


@dataclass(frozen=True, slots=True)
class BeaconSpec:
    """The iBeacon identity a tag or app advertises (uuid is canonical lowercase)."""

    uuid: str
    major: int
    minor: int

    @property
    def key(self) -> str:
        return f"ibeacon:{self.uuid}:{self.major}:{self.minor}"


class RouteStop(NamedTuple):
    zone: str
    seconds: float


@dataclass(frozen=True, slots=True)
class Visit:
    """One trip to the store: ``at`` seconds after the scenario start, then the route."""

    at: float
    route: tuple[RouteStop, ...]


@dataclass(frozen=True, slots=True)
class Person:
    id: str
    name: str
    email: str | None
    beacon: BeaconSpec
    consents: tuple[str, ...] = ()
    attributes: Mapping[str, Any] = field(default_factory=dict)
    visits: tuple[Visit, ...] = ()


@dataclass(frozen=True, slots=True)
class Crowd:
    """Anonymous shoppers: ``count`` random tags under ``uuid`` that nobody enrolled."""

    count: int = 0
    uuid: str = ANONYMOUS_UUID
    arrivals_per_hour: float = 0.0
    first_wave: int = 0
    route_zones: tuple[str, ...] = ()
    dwell_s: tuple[float, float] = (5.0, 60.0)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    start: float
    rate_per_min: float = 0.0
    noise: float = 0.0
    unit: str | None = None
    #: All numbers were written as integers (steps, bpm): readings are reported as integers too.
    integer: bool = False


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    kind: str
    owner: str
    interval_s: float
    metrics: Mapping[str, MetricSpec]


class CartLine(NamedTuple):
    sku: str
    quantity: int


@dataclass(frozen=True, slots=True)
class Cart:
    id: str
    owner: str
    idle_s: float
    items: tuple[CartLine, ...]


@dataclass(frozen=True, slots=True)
class Scenario:
    store: Store
    zones: tuple[Zone, ...]
    receivers: tuple[Receiver, ...]
    radio: Radio
    catalogue: tuple[CatalogItem, ...]
    people: tuple[Person, ...]
    crowd: Crowd
    devices: tuple[Device, ...]
    carts: tuple[Cart, ...]
    source: str = "<scenario>"

    def zone(self, name: str) -> Zone:
        for z in self.zones:
            if z.name == name:
                return z
        raise KeyError(name)

    def person(self, person_id: str) -> Person:
        for p in self.people:
            if p.id == person_id:
                return p
        raise KeyError(person_id)

    def item(self, sku: str) -> CatalogItem:
        for it in self.catalogue:
            if it.sku == sku:
                return it
        raise KeyError(sku)

    def beacon_key(self, person: Person | str) -> str:
        """The identifier string profiles and sightings use: ``ibeacon:<uuid>:<major>:<minor>``."""
        p = self.person(person) if isinstance(person, str) else person
        return p.beacon.key


# ---------------------------------------------------------------------------------------
# Parsing


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {p}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ScenarioError(f"scenario {p} is not valid YAML: {exc}") from exc
    return parse_scenario(data, source=str(p))


def parse_scenario(data: Any, *, source: str = "<scenario>") -> Scenario:
    """Build a Scenario from already-loaded YAML/JSON data (what tests use for broken variants)."""
    try:
        return _parse(data, source)
    except ScenarioError as exc:
        raise ScenarioError(f"{source}: {exc}") from None


def _req(entry: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in entry:
        raise ScenarioError(f"{where}: missing '{key}'")
    return entry[key]


def _conv(fn: Callable[[Any], T], value: Any, where: str) -> T:
    try:
        return fn(value)
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"{where}: invalid value {value!r} ({exc})") from None


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ScenarioError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _seq(value: Any, where: str) -> Sequence[Any]:
    if value is None:
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ScenarioError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _floats(value: Any, n: int, where: str) -> tuple[float, ...]:
    seq = _seq(value, where)
    if len(seq) != n:
        raise ScenarioError(f"{where}: expected {n} numbers, got {len(seq)}")
    out = tuple(_conv(float, v, where) for v in seq)
    if not all(math.isfinite(v) for v in out):
        raise ScenarioError(f"{where}: numbers must be finite")
    return out


def _uuid(value: Any, where: str) -> str:
    return _conv(lambda v: str(uuidlib.UUID(str(v))), value, where)


def _u16(value: Any, where: str) -> int:
    v = _conv(int, value, where)
    if not 0 <= v <= 0xFFFF:
        raise ScenarioError(f"{where}: {v} is outside 0..65535")
    return v


def _unique(ids: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise ScenarioError(f"{what} '{i}' is defined twice")
        seen.add(i)


def _known(name: str, known: Mapping[str, Any] | set[str], what: str, where: str) -> None:
    if name not in known:
        listing = ", ".join(sorted(known)) or "none"
        raise ScenarioError(f"{where}: unknown {what} '{name}' (known: {listing})")


def _parse(data: Any, source: str) -> Scenario:
    root = _mapping(data, "scenario")

    s = _mapping(_req(root, "store", "scenario"), "store")
    size = _floats(s.get("size_m", [0.0, 0.0]), 2, "store.size_m")
    store = Store(
        id=str(_req(s, "id", "store")),
        name=str(s.get("name", s["id"])),
        timezone=str(s.get("timezone", "UTC")),
        opens=str(s.get("opens", "09:00")),
        size_m=(size[0], size[1]),
    )

    zones: list[Zone] = []
    for i, z in enumerate(_seq(root.get("zones"), "zones")):
        z = _mapping(z, f"zones[{i}]")
        name = str(_req(z, "name", f"zones[{i}]"))
        where = f"zones[{name}]"
        x0, y0, x1, y1 = _floats(_req(z, "rect", where), 4, f"{where}.rect")
        if not (x0 < x1 and y0 < y1):
            raise ScenarioError(f"{where}.rect: expected [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
        zones.append(Zone(name, (x0, y0, x1, y1)))
    if not zones:
        raise ScenarioError("zones: a scenario needs at least one zone")
    _unique([z.name for z in zones], "zone")
    zone_names = {z.name for z in zones}

    r = _mapping(root.get("radio") or {}, "radio")
    radio = Radio(
        tx_power=_conv(int, r.get("tx_power", -59), "radio.tx_power"),
        shadowing_sigma_db=_conv(float, r.get("shadowing_sigma_db", 3.0), "radio.shadowing_sigma_db"),
        advert_interval_s=_conv(float, r.get("advert_interval_s", 1.0), "radio.advert_interval_s"),
        loss=_conv(float, r.get("loss", 0.0), "radio.loss"),
    )
    if radio.advert_interval_s <= 0:
        raise ScenarioError("radio.advert_interval_s: must be positive")
    if not 0.0 <= radio.loss < 1.0:
        raise ScenarioError("radio.loss: must be in [0, 1)")
    if radio.shadowing_sigma_db < 0:
        raise ScenarioError("radio.shadowing_sigma_db: must not be negative")

    receivers: list[Receiver] = []
    for i, rx in enumerate(_seq(root.get("receivers"), "receivers")):
        rx = _mapping(rx, f"receivers[{i}]")
        rid = str(_req(rx, "id", f"receivers[{i}]"))
        where = f"receivers[{rid}]"
        pos = _floats(_req(rx, "position", where), 2, f"{where}.position")
        bands: list[ZoneBand] = []
        for j, b in enumerate(_seq(rx.get("zones"), f"{where}.zones")):
            b = _mapping(b, f"{where}.zones[{j}]")
            bname = str(_req(b, "name", f"{where}.zones[{j}]"))
            _known(bname, zone_names, "zone", f"{where}.zones[{j}]")
            bands.append(ZoneBand(bname, _conv(float, _req(b, "max_m", f"{where}.zones[{j}]"), where)))
        receivers.append(Receiver(
            id=rid,
            position=(pos[0], pos[1]),
            zones=tuple(bands),
            measured_power=_conv(int, rx.get("measured_power", radio.tx_power), f"{where}.measured_power"),
            path_loss_exponent=_conv(float, rx.get("path_loss_exponent", 2.0), f"{where}.path_loss_exponent"),
            rssi_offset=_conv(float, rx.get("rssi_offset", 0.0), f"{where}.rssi_offset"),
        ))
    _unique([rx.id for rx in receivers], "receiver")

    catalogue: list[CatalogItem] = []
    for i, it in enumerate(_seq(root.get("catalogue"), "catalogue")):
        it = _mapping(it, f"catalogue[{i}]")
        sku = str(_req(it, "sku", f"catalogue[{i}]"))
        where = f"catalogue[{sku}]"
        zone = it.get("zone")
        if zone is not None:
            _known(str(zone), zone_names, "zone", where)
        catalogue.append(CatalogItem(
            sku=sku,
            name=str(_req(it, "name", where)),
            price=_conv(float, _req(it, "price", where), f"{where}.price"),
            zone=None if zone is None else str(zone),
            aisle=None if it.get("aisle") is None else str(it["aisle"]),
        ))
    _unique([c.sku for c in catalogue], "catalogue sku")
    skus = {c.sku for c in catalogue}

    people: list[Person] = []
    for i, p in enumerate(_seq(root.get("people"), "people")):
        p = _mapping(p, f"people[{i}]")
        pid = str(_req(p, "id", f"people[{i}]"))
        where = f"people[{pid}]"
        b = _mapping(_req(p, "beacon", where), f"{where}.beacon")
        beacon = BeaconSpec(
            uuid=_uuid(_req(b, "uuid", f"{where}.beacon"), f"{where}.beacon.uuid"),
            major=_u16(_req(b, "major", f"{where}.beacon"), f"{where}.beacon.major"),
            minor=_u16(_req(b, "minor", f"{where}.beacon"), f"{where}.beacon.minor"),
        )
        visits: list[Visit] = []
        for j, v in enumerate(_seq(p.get("visits"), f"{where}.visits")):
            vw = f"{where}.visits[{j}]"
            v = _mapping(v, vw)
            stops: list[RouteStop] = []
            for k, stop in enumerate(_seq(_req(v, "route", vw), f"{vw}.route")):
                sw = f"{vw}.route[{k}]"
                stop = _seq(stop, sw)
                if len(stop) != 2:
                    raise ScenarioError(f"{sw}: expected [zone, seconds]")
                _known(str(stop[0]), zone_names, "zone", sw)
                secs = _conv(float, stop[1], sw)
                if secs <= 0:
                    raise ScenarioError(f"{sw}: seconds must be positive")
                stops.append(RouteStop(str(stop[0]), secs))
            if not stops:
                raise ScenarioError(f"{vw}.route: a visit needs at least one stop")
            at = _conv(float, _req(v, "at", vw), f"{vw}.at")
            if at < 0:
                raise ScenarioError(f"{vw}.at: must not be negative")
            visits.append(Visit(at, tuple(stops)))
        people.append(Person(
            id=pid,
            name=str(p.get("name", pid)),
            email=None if p.get("email") is None else str(p["email"]),
            beacon=beacon,
            consents=tuple(str(c) for c in _seq(p.get("consents"), f"{where}.consents")),
            attributes=dict(_mapping(p.get("attributes") or {}, f"{where}.attributes")),
            visits=tuple(sorted(visits, key=lambda v: v.at)),
        ))
    _unique([p.id for p in people], "person")
    _unique([p.beacon.key for p in people], "beacon")
    person_ids = {p.id for p in people}

    c = _mapping(root.get("crowd") or {}, "crowd")
    all_zones = [z.name for z in zones]
    route_zones = tuple(str(z) for z in _seq(c.get("route_zones", all_zones), "crowd.route_zones"))
    for z in route_zones:
        _known(z, zone_names, "zone", "crowd.route_zones")
    dwell = _floats(c.get("dwell_s", [5.0, 60.0]), 2, "crowd.dwell_s")
    crowd = Crowd(
        count=_conv(int, c.get("count", 0), "crowd.count"),
        uuid=_uuid(c.get("uuid", ANONYMOUS_UUID), "crowd.uuid"),
        arrivals_per_hour=_conv(float, c.get("arrivals_per_hour", 0.0), "crowd.arrivals_per_hour"),
        first_wave=_conv(int, c.get("first_wave", 0), "crowd.first_wave"),
        route_zones=route_zones,
        dwell_s=(dwell[0], dwell[1]),
    )
    if crowd.count < 0 or crowd.first_wave < 0 or crowd.arrivals_per_hour < 0:
        raise ScenarioError("crowd: count, first_wave and arrivals_per_hour must not be negative")
    if not 0 < crowd.dwell_s[0] <= crowd.dwell_s[1]:
        raise ScenarioError("crowd.dwell_s: expected [min, max] with 0 < min <= max")
    if crowd.count and not route_zones:
        raise ScenarioError("crowd.route_zones: a crowd needs at least one zone to walk")

    devices: list[Device] = []
    for i, d in enumerate(_seq(root.get("devices"), "devices")):
        d = _mapping(d, f"devices[{i}]")
        did = str(_req(d, "id", f"devices[{i}]"))
        where = f"devices[{did}]"
        owner = str(_req(d, "owner", where))
        _known(owner, person_ids, "owner", where)
        metrics: dict[str, MetricSpec] = {}
        for mname, m in _mapping(_req(d, "metrics", where), f"{where}.metrics").items():
            mw = f"{where}.metrics.{mname}"
            m = _mapping(m, mw)
            metrics[str(mname)] = MetricSpec(
                start=_conv(float, _req(m, "start", mw), f"{mw}.start"),
                rate_per_min=_conv(float, m.get("rate_per_min", 0.0), f"{mw}.rate_per_min"),
                noise=_conv(float, m.get("noise", 0.0), f"{mw}.noise"),
                unit=None if m.get("unit") is None else str(m["unit"]),
                integer=all(
                    isinstance(m.get(k, 0), int) and not isinstance(m.get(k, 0), bool)
                    for k in ("start", "rate_per_min", "noise")
                ),
            )
        interval = _conv(float, d.get("interval_s", 5.0), f"{where}.interval_s")
        if interval <= 0:
            raise ScenarioError(f"{where}.interval_s: must be positive")
        devices.append(Device(did, str(d.get("kind", "device")), owner, interval, metrics))
    _unique([d.id for d in devices], "device")

    carts: list[Cart] = []
    for i, ct in enumerate(_seq(root.get("carts"), "carts")):
        ct = _mapping(ct, f"carts[{i}]")
        cid = str(_req(ct, "id", f"carts[{i}]"))
        where = f"carts[{cid}]"
        owner = str(_req(ct, "owner", where))
        _known(owner, person_ids, "owner", where)
        lines: list[CartLine] = []
        for j, line in enumerate(_seq(_req(ct, "items", where), f"{where}.items")):
            lw = f"{where}.items[{j}]"
            line = _mapping(line, lw)
            sku = str(_req(line, "sku", lw))
            _known(sku, skus, "sku", lw)
            qty = _conv(int, line.get("quantity", 1), f"{lw}.quantity")
            if qty <= 0:
                raise ScenarioError(f"{lw}.quantity: must be positive")
            lines.append(CartLine(sku, qty))
        carts.append(Cart(cid, owner, _conv(float, ct.get("idle_s", 0.0), f"{where}.idle_s"), tuple(lines)))
    _unique([ct.id for ct in carts], "cart")

    return Scenario(
        store=store,
        zones=tuple(zones),
        receivers=tuple(receivers),
        radio=radio,
        catalogue=tuple(catalogue),
        people=tuple(people),
        crowd=crowd,
        devices=tuple(devices),
        carts=tuple(carts),
        source=source,
    )
