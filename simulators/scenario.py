"""A simulated store scenario (``examples/store.yaml``) as typed, frozen, validated data.

Everything downstream (walkers, radio, telemetry, carts) trusts these objects, so every
cross-reference is checked once here and a broken scenario fails with a message that names
the offending entry instead of surfacing later as a KeyError deep inside a simulation.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NamedTuple

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema, field_validator
from pydantic.json_schema import SkipJsonSchema

from devices import files

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
# The file format: what a user writes (unknown keys are ignored, as they always were)


def _text(value: Any) -> str:
    return str(value)


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _listed(value: Any) -> Any:
    return [] if value is None else value


def _uuid(value: Any) -> str:
    try:
        return str(uuidlib.UUID(str(value)))
    except ValueError:
        files.fail(f"not a UUID: {value!r}")


Text = Annotated[str, BeforeValidator(_text), WithJsonSchema({"type": "string"})]
OptText = Annotated[str | None, BeforeValidator(_text_or_none), WithJsonSchema({"type": "string"})]
Uuid = Annotated[str, BeforeValidator(_uuid), WithJsonSchema({"type": "string", "format": "uuid"})]
Finite = Annotated[float, Field(allow_inf_nan=False)]
U16 = Annotated[files.Whole, Field(ge=0, le=0xFFFF)]


class StoreFile(files.LenientModel):
    """The shop."""

    id: Text = Field(description="The store id the gateway reports under.")
    name: Annotated[str | SkipJsonSchema[None], BeforeValidator(_text)] = Field(None, description="Default: the id.")
    timezone: Text = Field("UTC", description="An IANA zone, e.g. Europe/Paris.")
    opens: Text = Field("09:00", description="Local time the virtual day of `gateway simulate` starts at.")
    size_m: tuple[Finite, Finite] = Field((0.0, 0.0), description="[width, depth] of the floor, metres.")


class ZoneFile(files.LenientModel):
    """A named area of the floor."""

    name: Text
    rect: tuple[Finite, Finite, Finite, Finite] = Field(description="[x0, y0, x1, y1], metres.")

    @field_validator("rect")
    @classmethod
    def _ordered(cls, rect: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        if not (rect[0] < rect[2] and rect[1] < rect[3]):
            files.fail("expected [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
        return rect


class BandFile(files.LenientModel):
    """A receiver sees this zone for identities closer than max_m."""

    name: Text = Field(description="A zone's name.")
    max_m: float = Field(description="Metres.")


class ReceiverFile(files.LenientModel):
    """Something that hears advertisements, and the zones it sees by distance."""

    id: Text
    position: tuple[Finite, Finite] = Field(description="[x, y], metres.")
    zones: Annotated[list[BandFile], BeforeValidator(_listed)] = Field(default_factory=list)
    measured_power: files.Whole | None = Field(None, description="RSSI at 1 m (default: radio.tx_power).")
    path_loss_exponent: float = Field(2.0, description="The log-distance model's n.")
    rssi_offset: float = Field(0.0, description="dB this receiver hears hot (+) or cold (-).")


class RadioFile(files.LenientModel):
    """How simulated tags advertise and how the air treats them."""

    tx_power: files.Whole = Field(-59, description="Measured power at 1 m the tags advertise.")
    shadowing_sigma_db: float = Field(3.0, ge=0, description="Log-normal shadowing noise, dB.")
    advert_interval_s: float = Field(1.0, gt=0, description="How often each tag advertises.")
    loss: float = Field(0.0, ge=0, lt=1, description="Share of adverts lost.")


class ItemFile(files.LenientModel):
    """A product and where it is."""

    sku: Text
    name: Text
    price: float
    zone: OptText = Field(None, description="A zone's name.")
    aisle: OptText = None


class BeaconFile(files.LenientModel):
    """The iBeacon identity a person's tag or app advertises."""

    uuid: Uuid
    major: U16
    minor: U16


_STOPS = files.non_empty("a visit needs at least one stop")


class VisitFile(files.LenientModel):
    """One trip to the store."""

    at: float = Field(ge=0, description="Seconds after the scenario start.")
    route: Annotated[list[tuple[Text, Annotated[float, Field(gt=0)]]], _STOPS] = Field(
        description="[[zone, seconds], ...]: the zones walked through and the time spent in each.")


class PersonFile(files.LenientModel):
    """An enrolled customer."""

    id: Text
    name: Annotated[str | SkipJsonSchema[None], BeforeValidator(_text)] = Field(None, description="Default: the id.")
    email: OptText = None
    beacon: BeaconFile
    consents: Annotated[list[Text], BeforeValidator(_listed)] = Field(
        default_factory=list, description="Purposes agreed to: offers, cart_reminders, maintenance, analytics...")
    attributes: Annotated[dict[Any, Any], files.or_empty(dict)] = Field(default_factory=dict)
    visits: Annotated[list[VisitFile], BeforeValidator(_listed)] = Field(default_factory=list)


def _dwell(value: tuple[float, float]) -> tuple[float, float]:
    if not 0 < value[0] <= value[1]:
        files.fail("expected [min, max] with 0 < min <= max")
    return value


class CrowdFile(files.LenientModel):
    """Anonymous shoppers: random tags nobody enrolled."""

    count: files.Whole = Field(0, ge=0)
    uuid: Uuid = ANONYMOUS_UUID
    arrivals_per_hour: float = Field(0.0, ge=0)
    first_wave: files.Whole = Field(0, ge=0, description="How many are in the store at the start.")
    route_zones: Annotated[list[Text] | None, BeforeValidator(_listed)] = Field(
        None, description="The zones they walk (default: every zone).")
    dwell_s: Annotated[tuple[Finite, Finite], AfterValidator(_dwell)] = Field(
        (5.0, 60.0), description="[min, max] seconds per zone.")


class MetricFile(files.LenientModel):
    """A simulated metric: a start value, a drift and noise (all whole numbers: reported as integers)."""

    start: float
    rate_per_min: float = 0.0
    noise: float = 0.0
    unit: OptText = None


class DeviceFile(files.LenientModel):
    """A connected product or wearable that publishes telemetry."""

    id: Text
    kind: Text = "device"
    owner: Text = Field(description="A person's id.")
    interval_s: float = Field(5.0, gt=0, description="Seconds between readings.")
    metrics: dict[Any, MetricFile]


class LineFile(files.LenientModel):
    sku: Text = Field(description="A catalogue sku.")
    quantity: files.Whole = Field(1, gt=0)


class CartFile(files.LenientModel):
    """An online cart, abandoned after idle_s."""

    id: Text
    owner: Text = Field(description="A person's id.")
    idle_s: float = 0.0
    items: Annotated[list[LineFile], BeforeValidator(_listed)]


class ScenarioFile(files.LenientModel):
    """A simulated store for `gateway demo` and `gateway simulate` (docs/presence.md, examples/store.yaml)."""

    store: StoreFile
    zones: Annotated[list[ZoneFile], BeforeValidator(_listed)] = Field(default_factory=list)
    receivers: Annotated[list[ReceiverFile], BeforeValidator(_listed)] = Field(default_factory=list)
    radio: Annotated[RadioFile, files.or_empty(dict)] = Field(default_factory=lambda: RadioFile.model_validate({}))
    catalogue: Annotated[list[ItemFile], BeforeValidator(_listed)] = Field(default_factory=list)
    people: Annotated[list[PersonFile], BeforeValidator(_listed)] = Field(default_factory=list)
    crowd: Annotated[CrowdFile, files.or_empty(dict)] = Field(default_factory=lambda: CrowdFile.model_validate({}))
    devices: Annotated[list[DeviceFile], BeforeValidator(_listed)] = Field(default_factory=list)
    carts: Annotated[list[CartFile], BeforeValidator(_listed)] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Loading: the file format to the simulators' types, cross-references checked once


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file."""
    p = Path(path)
    try:
        doc = files.read(p)
    except files.FileError as exc:
        raise ScenarioError(str(exc)) from exc
    return files.build(lambda d: _scenario(ScenarioFile.model_validate(d), d, str(p)), doc.data, ScenarioError,
                       doc.source, model=ScenarioFile, doc=doc)


def parse_scenario(data: Any, *, source: str = "<scenario>") -> Scenario:
    """Build a Scenario from already-loaded YAML/JSON data (what tests use for broken variants)."""
    return files.build(lambda d: _scenario(ScenarioFile.model_validate(d), d, source), data, ScenarioError, source,
                       model=ScenarioFile)


def _unique(ids: Sequence[str], section: str, what: str) -> None:
    seen: set[str] = set()
    for i, ident in enumerate(ids):
        if ident in seen:
            raise files.Invalid(files.Problem((section, i), f"{what} '{ident}' is defined twice"))
        seen.add(ident)


def _known(name: str, known: Iterable[str], what: str, loc: files.Loc) -> None:
    names = set(known)
    if name not in names:
        listing = ", ".join(sorted(names)) or "none"
        raise files.Invalid(files.Problem(loc, f"unknown {what} '{name}' (known: {listing})"))


def _scenario(f: ScenarioFile, raw: Mapping[str, Any], source: str) -> Scenario:
    if not f.zones:
        raise files.Invalid(files.Problem(("zones",), "a scenario needs at least one zone"))
    _unique([z.name for z in f.zones], "zones", "zone")
    zones = {z.name for z in f.zones}
    radio = Radio(f.radio.tx_power, f.radio.shadowing_sigma_db, f.radio.advert_interval_s, f.radio.loss)
    for i, rx in enumerate(f.receivers):
        for j, band in enumerate(rx.zones):
            _known(band.name, zones, "zone", ("receivers", i, "zones", j))
    _unique([rx.id for rx in f.receivers], "receivers", "receiver")
    for i, it in enumerate(f.catalogue):
        if it.zone is not None:
            _known(it.zone, zones, "zone", ("catalogue", i, "zone"))
    _unique([c.sku for c in f.catalogue], "catalogue", "catalogue sku")
    people = tuple(_person(p, zones, ("people", i)) for i, p in enumerate(f.people))
    _unique([p.id for p in people], "people", "person")
    _unique([p.beacon.key for p in people], "people", "beacon")
    owners = {p.id for p in people}
    route_zones = tuple(z.name for z in f.zones) if f.crowd.route_zones is None else tuple(f.crowd.route_zones)
    for z in route_zones:
        _known(z, zones, "zone", ("crowd", "route_zones"))
    if f.crowd.count and not route_zones:
        raise files.Invalid(files.Problem(("crowd", "route_zones"), "a crowd needs at least one zone to walk"))
    for i, d in enumerate(f.devices):
        _known(d.owner, owners, "owner", ("devices", i, "owner"))
    _unique([d.id for d in f.devices], "devices", "device")
    skus = {c.sku for c in f.catalogue}
    for i, ct in enumerate(f.carts):
        _known(ct.owner, owners, "owner", ("carts", i, "owner"))
        for j, line in enumerate(ct.items):
            _known(line.sku, skus, "sku", ("carts", i, "items", j, "sku"))
    _unique([ct.id for ct in f.carts], "carts", "cart")
    s = f.store
    return Scenario(
        store=Store(s.id, s.id if s.name is None else s.name, s.timezone, s.opens, s.size_m),
        zones=tuple(Zone(z.name, z.rect) for z in f.zones),
        receivers=tuple(Receiver(
            rx.id, rx.position, tuple(ZoneBand(b.name, b.max_m) for b in rx.zones),
            radio.tx_power if rx.measured_power is None else rx.measured_power, rx.path_loss_exponent,
            rx.rssi_offset) for rx in f.receivers),
        radio=radio,
        catalogue=tuple(CatalogItem(it.sku, it.name, it.price, it.zone, it.aisle) for it in f.catalogue),
        people=people,
        crowd=Crowd(f.crowd.count, f.crowd.uuid, f.crowd.arrivals_per_hour, f.crowd.first_wave, route_zones,
                    f.crowd.dwell_s),
        devices=tuple(_device(d, raw["devices"][i]) for i, d in enumerate(f.devices)),
        carts=tuple(Cart(ct.id, ct.owner, ct.idle_s, tuple(CartLine(li.sku, li.quantity) for li in ct.items))
                    for ct in f.carts),
        source=source,
    )


def _person(p: PersonFile, zones: set[str], loc: files.Loc) -> Person:
    for j, v in enumerate(p.visits):
        for k, (zone, _) in enumerate(v.route):
            _known(zone, zones, "zone", (*loc, "visits", j, "route", k))
    visits = [Visit(v.at, tuple(RouteStop(z, secs) for z, secs in v.route)) for v in p.visits]
    return Person(
        id=p.id,
        name=p.id if p.name is None else p.name,
        email=p.email,
        beacon=BeaconSpec(p.beacon.uuid, p.beacon.major, p.beacon.minor),
        consents=tuple(p.consents),
        attributes=dict(p.attributes),
        visits=tuple(sorted(visits, key=lambda v: v.at)),
    )


def _whole_numbers(raw: Any) -> bool:
    """Every number of a metric written as an integer (steps, bpm): its readings are integers too."""
    return isinstance(raw, Mapping) and all(
        isinstance(raw.get(k, 0), int) and not isinstance(raw.get(k, 0), bool)
        for k in ("start", "rate_per_min", "noise"))


def _device(d: DeviceFile, raw: Mapping[str, Any]) -> Device:
    metrics = {str(name): MetricSpec(m.start, m.rate_per_min, m.noise, m.unit, _whole_numbers(raw["metrics"][name]))
               for name, m in d.metrics.items()}
    return Device(d.id, d.kind, d.owner, d.interval_s, metrics)
