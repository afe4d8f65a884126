"""Pydantic schemas at the edge: shapes only; meaning is checked by the gateway's service."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StrictBool,
    StrictFloat,
    field_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from devices.rules import SEVERITIES
from gateway import health
from gateway.campaigns.model import TRIGGERS
from gateway.documents import DocumentError, check_document, text_problem
from gateway.profiles import devices, identity
from gateway.profiles.service import INTERACTIONS
from gateway.storage import models


class OneOf:
    """``Annotated[str, OneOf(words)]``: a closed set's field from the set's one definition (a StrEnum or
    the core's tuple of words), validated and documented exactly as a ``Literal`` of its words: an inline
    ``enum`` list in the OpenAPI document, "Input should be 'a' or 'b'". The value is the plain word (a
    StrEnum member compares equal to it). Not the StrEnum as the field's type: FastAPI would add a
    component for it, and a Literal of its members would say "<Kind.A: 'a'>"."""

    def __init__(self, words: Iterable[str]) -> None:
        self.words = [str(w) for w in words]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.literal_schema(self.words)


Purpose = Annotated[str, OneOf(models.Purpose)]
IdentifierKind = Annotated[str, OneOf(identity.IdentifierKind)]
CartStatus = Annotated[str, OneOf(models.CartStatus)]

DB_ID_MAX = 2_147_483_647  # ids are 32-bit INTEGER on PostgreSQL: a larger one is a 422, not a 500


def _json_number(value: Any) -> Any:
    """pydantic's lax mode takes ``true`` as 1 and ``"12"`` as 12 in a number field; the schema says number."""
    if isinstance(value, bool | str | bytes):
        raise PydanticCustomError("number_type", "Input should be a number, not {kind}",
                                  {"kind": "a boolean" if isinstance(value, bool) else "text"})
    return value


JSON_NUMBER = BeforeValidator(_json_number)
"""Put after any bounds in an ``Annotated`` (``Annotated[int, Field(ge=1), JSON_NUMBER]``): before them,
pydantic still enforces the bounds but writes ``ge``/``le`` into the schema, which no JSON Schema reader knows."""
JsonInt = Annotated[int, JSON_NUMBER]
"""A JSON integer in a body: 12 (or 12.0, an integer to JSON Schema too); never true/false or "12"."""
JsonNumber = StrictFloat
"""A JSON number in a body: 12 or 12.5; never true/false or "12"."""
JsonBool = StrictBool
"""true or false in a body; never 0/1 or "yes"."""
DbId = Annotated[int, Field(ge=1, le=DB_ID_MAX), JSON_NUMBER]
"""A row id in a body."""


def _iso_date(value: Any) -> Any:
    """pydantic would also read ``0`` as 1970-01-01 and take ``2026-06-01T00:00``; the schema says YYYY-MM-DD."""
    if isinstance(value, str) and not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        raise PydanticCustomError("date_format", "Input should be a date as YYYY-MM-DD")
    return value


IsoDate = Annotated[dt.date, BeforeValidator(_iso_date)]
"""A day in a query (OpenAPI ``format: date``): YYYY-MM-DD and nothing else."""


def _storable_text(value: str) -> str:
    problem = text_problem(value)
    if problem:
        raise PydanticCustomError("text_not_storable", f"the text {problem}")
    return value


def _storable_document(value: dict[str, Any]) -> dict[str, Any]:
    try:
        check_document(value)
    except DocumentError as exc:
        raise PydanticCustomError("document_not_storable", str(exc)) from None
    return value


class _SchemaPattern:
    """A ``pattern`` for the schema only, saying what a validator enforces with a better message than a
    pattern's (and, unlike a second constraint, not replacing the field's own pattern). With ``default``,
    a pattern the field sets itself wins; that one must then exclude NUL too."""

    def __init__(self, pattern: str, *, default: bool = False) -> None:
        self.pattern, self.default = pattern, default

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        out = handler(schema)
        target = handler.resolve_ref_schema(out)
        if target.get("type") == "string" and not (self.default and "pattern" in target):
            target["pattern"] = self.pattern
        return out


NO_NUL = r"^[^\x00]*$"
DbStr = Annotated[str, AfterValidator(_storable_text), _SchemaPattern(NO_NUL, default=True)]
"""Text a database can hold (no NUL, no lone surrogate): every string field, query and path parameter."""
STORED_VALUE = "StoredValue"
"""The component (api/openapi.py defines it) for any JSON value a stored document may hold."""


class _SaysStorable:
    """A stored document's schema says what the validator enforces on every key and string inside it, down
    to any depth (no NUL), through the recursive ``StoredValue`` component."""

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        out = handler(schema)
        target = handler.resolve_ref_schema(out)
        target["propertyNames"] = {"pattern": NO_NUL}
        target["additionalProperties"] = {"$ref": f"#/components/schemas/{STORED_VALUE}"}
        return out


Document = Annotated[dict[str, Any], AfterValidator(_storable_document), _SaysStorable()]
"""A free-form JSON object the gateway stores: bounded in depth and size, made of storable text
(gateway/documents.py has the limits)."""


WS = r"\t-\r\x1c- \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
"""Whitespace as Python's str.strip() sees it, spelled out for a pattern: ``\\s`` differs between Python,
pydantic's Rust regex and JSON Schema's ECMA dialect (U+001C-U+001F, U+FEFF), so a pattern with it would
say one thing and the server do another."""


class IdentifierIn(BaseModel):
    kind: IdentifierKind
    value: DbStr = Field(min_length=1, max_length=256, json_schema_extra={"pattern": rf"^[^\x00]*[^{WS}\x00][^\x00]*$"},
                         description="Compared without surrounding whitespace, so some other character is needed")


ConsentSource = Annotated[str, Field(
    min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/@-]*$",
    description="Where the consent was given (recorded with each purpose's state and time), "
                "e.g. app:onboarding, kiosk:store-001, crm")]


class ProfileIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "external_id": "alice", "name": "Alice Martin", "attributes": {"tier": "gold"},
        "identifiers": [{"kind": "beacon", "value": "ibeacon:8f3c0a52-6d1e-4b7a-9c2d-5e4f3a2b1c00:100:1"},
                        {"kind": "email_sha256", "value": "alice@example.com"}],
        "consents": {"offers": True, "cart_reminders": True, "maintenance": False},
        "consent_source": "app:onboarding"}]})

    external_id: DbStr | None = Field(default=None, max_length=128)
    name: DbStr | None = Field(default=None, max_length=200)
    attributes: Document = Field(default_factory=dict)
    identifiers: list[IdentifierIn] = Field(default_factory=list, max_length=50)
    consents: dict[Purpose, JsonBool] = Field(default_factory=dict)
    consent_source: ConsentSource = "api"


class ConsentState(BaseModel):
    granted: bool
    updated_at: float
    source: str


class ProfileOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 7, "external_id": "alice", "name": "Alice Martin", "attributes": {"tier": "gold"},
        "created_at": 1780300800.0,
        "identifiers": [{"kind": "beacon", "value": "ibeacon:8f3c0a52-6d1e-4b7a-9c2d-5e4f3a2b1c00:100:1"}],
        "consents": {"offers": {"granted": True, "updated_at": 1780300800.0, "source": "api"}}}]})
    id: int
    external_id: str | None
    name: str | None
    attributes: dict[str, Any]
    created_at: float
    identifiers: list[IdentifierIn]
    consents: dict[str, ConsentState]


class ConsentsIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "consents": {"offers": True, "cart_reminders": False}, "source": "app:settings"}]})
    consents: dict[Purpose, JsonBool]
    source: ConsentSource = "api"


class ProfileUpdateIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"attributes": {"language": "fr"}}]})
    name: DbStr | None = Field(default=None, max_length=200)
    attributes: Document | None = Field(default=None, description="Merged in; a null value removes one")


class LinkIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"profile_id": 7}]})
    profile_id: JsonInt = Field(ge=1, le=DB_ID_MAX, description="The profile merged into this one, then deleted")


_HEX16 = r"(?:[0-9A-Fa-f]{2}[:\- ]?){15}[0-9A-Fa-f]{2}"  # 16 bytes: 32 hex digits, bytes maybe separated
_B64_16 = r"[A-Za-z0-9+/]{21}[AQgw](?:==)?"  # 16 bytes as base64, with or without its padding
KEY16 = rf"^(?![0:\- ]*$)(?!A{{22}}(?:==)?$)(?:{_HEX16}|{_B64_16})$"
"""16 key bytes, hex or base64, not all zeros (no device distributes such a key)."""


class RotatingEidIn(BaseModel):
    """An Eddystone-EID beacon: its identity key, K, and the Unix second its clock counts from."""

    model_config = ConfigDict(extra="forbid", regex_engine="python-re", json_schema_extra={"examples": [
        {"kind": "eid", "identity_key": "e2c56db5dffb48d2b060d0f5a71096e0", "k": 10, "epoch": 1780000000}]})
    kind: Literal["eid"]
    identity_key: str = Field(pattern=KEY16, repr=False,
                              description="The 16-byte identity key, 32 hex digits or base64")
    k: Annotated[int, Field(ge=0, le=15), JSON_NUMBER] = Field(
        description="The rotation exponent: an EID lasts 2^k seconds")
    epoch: Annotated[int, Field(ge=0, le=2**40), JSON_NUMBER] = Field(
        default=0, description="The Unix second the beacon's clock counts from (its time 0)")


class RotatingIrkIn(BaseModel):
    """A phone or wearable by its identity resolving key."""

    model_config = ConfigDict(extra="forbid", regex_engine="python-re", json_schema_extra={"examples": [
        {"kind": "irk", "irk": "ec0234a357c8ad05341010a60a397d9b"}]})
    kind: Literal["irk"]
    irk: str = Field(pattern=KEY16, repr=False,
                     description="The IRK: 32 hex digits, most significant byte first as the Core spec prints "
                                 "it, or base64 (least significant byte first, as Apple exports it)")


class RotatingAppIn(BaseModel):
    """The shop's app: the gateway issues the secret its rotating iBeacon is derived from."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"kind": "app"}]})
    kind: Literal["app"]


RotatingIn = Annotated[RotatingEidIn | RotatingIrkIn | RotatingAppIn, Field(discriminator="kind")]
"""One rotating identity for a profile; ``kind`` says which fields it has."""


class RotatingOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": 3, "profile_id": 7, "kind": "eid", "created_at": 1780300800.0, "k": 10, "epoch": 1780000000}]})
    id: int
    profile_id: int
    kind: str
    created_at: float
    k: int | None = None
    epoch: int | None = None
    period_s: int | None = None


class RotatingIssued(RotatingOut):
    """The enrolment's answer; for ``app`` the secret, shown this once (the gateway keeps it encrypted)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": 4, "profile_id": 7, "kind": "app", "created_at": 1780300800.0, "period_s": 900,
         "uuid": "d0e7033a-1e52-423c-a694-c5474a38b74e",
         "secret": "9f0c...64 hex digits"}]})
    secret: str | None = Field(default=None, description="app: the 32-byte secret (hex); never shown again")
    uuid: str | None = Field(default=None, description="app: the iBeacon uuid the app advertises")


class TokenOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "token": "v1.eyJwIjo3LCJleHAiOjE3ODI4OTI4MDB9.3q2-7w", "profile_id": 7, "expires_at": 1782892800.0}]})
    token: str = Field(description="Shown once; the gateway keeps no copy")
    profile_id: int
    expires_at: float


class CartItemIn(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    sku: DbStr = Field(min_length=1, max_length=64)
    name: DbStr | None = Field(default=None, max_length=200)
    price: JsonNumber | None = Field(default=None, ge=0)
    quantity: JsonInt = Field(default=1, ge=1, le=10_000)


class CartIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [{
        "profile_external_id": "alice", "items": [{"sku": "SH-100", "name": "Trail runner shoes",
                                                    "price": 89.9, "quantity": 1}]}]})

    profile_id: DbId | None = None
    profile_external_id: DbStr | None = Field(default=None, max_length=128)
    items: list[CartItemIn] = Field(max_length=500)
    updated_at: JsonNumber | None = Field(default=None, description="Epoch seconds; default now")
    status: CartStatus = models.CartStatus.OPEN


class CartOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "cart-1001", "profile_id": 7, "status": "open", "updated_at": 1780300800.0,
        "items": [{"sku": "SH-100", "name": "Trail runner shoes", "price": 89.9, "quantity": 1}]}]})
    id: str
    profile_id: int
    status: str
    items: list[dict[str, Any]]
    updated_at: float


class CartView(CartOut):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "cart-1001", "profile_id": 7, "status": "checked_out", "updated_at": 1780300800.0,
        "abandoned_at": None, "checked_out_at": 1780300800.0,
        "items": [{"sku": "SH-100", "name": "Trail runner shoes", "price": 89.9, "quantity": 1}]}]})
    abandoned_at: float | None = Field(description="When the gateway saw it abandoned (idle past the limit)")
    checked_out_at: float | None


class CatalogItemIn(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, json_schema_extra={"examples": [{
        "sku": "SH-100", "name": "Trail runner shoes", "price": 89.9, "zone": "shoes", "aisle": "A3"}]})

    sku: DbStr = Field(min_length=1, max_length=64)
    name: DbStr = Field(min_length=1, max_length=200)
    price: JsonNumber | None = Field(default=None, ge=0)
    zone: DbStr | None = Field(default=None, max_length=64)
    aisle: DbStr | None = Field(default=None, max_length=32)


class NotificationOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 12, "campaign": "shoes-dwell-offer", "purpose": "offers", "title": "10% off shoes",
        "body": "Show code AB12CD34 at the till", "data": {"zone": "shoes"}, "created_at": 1780300800.0,
        "status": "sent"}]})
    id: int
    campaign: str
    purpose: str
    title: str
    body: str
    data: dict[str, Any]
    created_at: float
    status: str


class HealthOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "status": "ok", "components": {"db": "ok", "mqtt": "connected", "scanner": "running"}}]})
    status: Annotated[str, OneOf(health.Health)]
    components: dict[str, str]


class StoreIBeacon(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uuid: str = Field(pattern=r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")
    major: JsonInt = Field(ge=0, le=0xFFFF)
    minor: JsonInt = Field(ge=0, le=0xFFFF)


BeaconKey = Annotated[str, AfterValidator(_storable_text),
                      _SchemaPattern(rf"^[{WS}]*[A-Za-z_]+:[^{WS}\x00]{{1,200}}[{WS}]*$")]
"""A beacon's key, e.g. ibeacon:<uuid>:<major>:<minor> (its format's name, a colon, the rest)."""


class AppSightingIn(BaseModel):
    """A store beacon the app ranged: by iBeacon uuid/major/minor, or by its key (any beacon format)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "beacon": {"uuid": "f7826da6-4fa2-4e98-8024-bc5b71e0893e", "major": 1, "minor": 7},
        "rssi": -63, "tx_power": -59, "time": 1780300800.0}]})

    beacon: StoreIBeacon | BeaconKey = Field(
        description="{uuid, major, minor} or a key like ibeacon:<uuid>:1:7")
    rssi: JsonInt = Field(gt=-127, lt=0)
    tx_power: Annotated[int, Field(gt=-127, lt=0), JSON_NUMBER] | None = Field(
        default=None, description="Measured power at 1 m, if known")
    time: JsonNumber | None = Field(default=None, allow_inf_nan=False,
                                    description="Epoch seconds when ranged; default now")

    @field_validator("beacon")
    @classmethod
    def _key_shape(cls, v: StoreIBeacon | str) -> StoreIBeacon | str:
        if isinstance(v, str) and not re.fullmatch(r"[A-Za-z_]+:\S{1,200}", v.strip()):  # BeaconKey's pattern
            raise ValueError("expected a beacon key such as ibeacon:<uuid>:<major>:<minor>")
        return v


class SightingsAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"received": 2, "accepted": 1, "unknown_beacon": 1}]})
    received: int
    accepted: int
    unknown_beacon: int = Field(description="Reports of beacons no receiver is configured for (not used)")


class DecisionOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 31, "at": 1780300830.0, "campaign": "shoes-dwell-offer", "event": "dwell",
        "event_key": "stay:shoes:1780300800.000", "fired": False, "reason": "cooldown",
        "detail": "sent 2 h ago; cooldown 24 h", "variant": None}]})
    id: int
    at: float
    campaign: str
    event: str
    event_key: str
    fired: bool
    reason: str
    detail: str | None
    variant: str | None


class SyntheticEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Annotated[str, OneOf(TRIGGERS)]
    zone: DbStr | None = Field(default=None, max_length=64)
    dwell_s: JsonNumber = Field(default=0.0, ge=0)
    facts: Document = Field(default_factory=dict, description="e.g. {device: {...}, reading: {...}}")


class DryRunIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "profile_id": 1, "event": {"kind": "dwell", "zone": "shoes", "dwell_s": 30}}]})
    profile_id: DbId
    event: SyntheticEvent


class DryRunOutcome(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "campaign_id": "shoes-dwell-offer", "profile_id": 1, "fired": True, "reason": "fired", "detail": None,
        "variant": None}]})
    campaign_id: str
    profile_id: int
    fired: bool
    reason: str
    detail: str | None
    variant: str | None
    deliver_at: float | None = Field(default=None, description="When it would go out, if later (delay, quiet hours)")


class InteractionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"kind": "opened"}]})
    kind: Annotated[str, OneOf(INTERACTIONS)]  # the kinds the app reports


class RedemptionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"code": "AB12CD34"}]})
    code: str = Field(min_length=4, max_length=32, pattern=r"^[A-Za-z0-9]+$")


class InteractionRecorded(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"notification_id": 12, "kind": "opened",
                                                               "recorded": True}]})
    notification_id: int
    kind: str
    recorded: bool = Field(description="False when this kind was already recorded (it counts once)")


class RedemptionOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "notification_id": 12, "campaign": "shoes-dwell-offer", "profile_id": 7, "offer": {"code": "SHOES10"},
        "redeemed_at": 1780300900.0}]})
    notification_id: int
    campaign: str
    profile_id: int
    offer: Any = Field(description="The offer the notification carried (its data.offer)")
    redeemed_at: float


# ------------------------------------------------------------------ operations and admin resources (issue 6)

PAGE_MAX = 500  # no list returns more than this at once; page on with offset
Limit = Annotated[int, Field(ge=1, le=PAGE_MAX)]
NotificationStatus = Annotated[str, OneOf(models.NotificationStatus)]
DeliveryStateName = Annotated[str, OneOf(models.ChannelState)]
ChannelName = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z0-9_-]+$")]


class Problem(BaseModel):
    """An error (RFC 9457, ``application/problem+json``)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "type": "about:blank", "title": "Not Found", "status": 404, "detail": "profile 42 not found"}]})
    type: str = "about:blank"
    title: str
    status: int
    detail: str


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str


class ValidationProblem(Problem):
    """A request the gateway cannot accept (422): ``detail`` names the first problem, ``errors`` all."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "type": "about:blank", "title": "Unprocessable Content", "status": 422,
        "detail": "query.limit: Input should be less than or equal to 500",
        "errors": [{"loc": ["query", "limit"], "msg": "Input should be less than or equal to 500"}]}]})
    errors: list[FieldError] = Field(default_factory=list)


class LiveOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "alive"}]})
    status: Annotated[str, OneOf(health.Liveness)]


class ReadyOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"status": "ready", "components": {"db": "ok", "migrations": "current"}},
        {"status": "not_ready", "components": {"db": "ok", "migrations": "behind"}}]})
    status: Annotated[str, OneOf(health.Readiness)]
    components: dict[str, str]


class PageMeta(BaseModel):
    total: int = Field(description="How many match the filters, over all pages")
    limit: int
    offset: int
    next_offset: int | None = Field(description="Pass as offset for the next page; null on the last one")


class ZonePresence(BaseModel):
    zone: str
    profiles: list[int] = Field(description="Enrolled customers in the zone now, by profile id")
    enrolled: int
    anonymous: int = Field(description="Unknown identities in the zone: counted, never identified")
    total: int


class HeardOut(BaseModel):
    receiver: str = Field(description="A receiver id of [[receivers]] (beacon:<key> for a store beacon the app ranged)")
    rssi: float = Field(description="Its filtered RSSI (dBm) for the identity")


class StateOut(BaseModel):
    zone: str | None = Field(description="A zone, or null: in no zone")
    posterior: float = Field(ge=0, le=1)


class WhyOut(BaseModel):
    """What the tracker had when it switched: the receivers heard lately, loudest first, and its likeliest
    states before this step's evidence and after it."""

    heard: list[HeardOut]
    before: list[StateOut]
    after: list[StateOut]


class ZoneSwitchOut(BaseModel):
    """An enrolled customer entered or left a zone, and what the tracker had heard when it decided."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "profile_id": 7, "event": "enter", "zone": "shoes", "time": 1780300812.5, "since": 1780300812.5,
        "why": {"heard": [{"receiver": "hci0", "rssi": -61.2}, {"receiver": "esp-entrance", "rssi": -78.4}],
                "before": [{"zone": "entrance", "posterior": 0.52}, {"zone": "shoes", "posterior": 0.45},
                           {"zone": None, "posterior": 0.03}],
                "after": [{"zone": "shoes", "posterior": 0.71}, {"zone": "entrance", "posterior": 0.27},
                          {"zone": None, "posterior": 0.02}]}}]})
    profile_id: int
    event: str = Field(description="enter or exit")
    zone: str | None
    time: float = Field(description="When the gateway decided (epoch seconds)")
    since: float | None = Field(description="When the stay began: the enter's time, or the exited stay's start")
    why: WhyOut | None = Field(
        default=None, description="The tracker's evidence for the switch; null for an exit on silence")


class PresenceOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "at": 1780300800.0, "enrolled": 1, "anonymous": 2,
        "zones": [{"zone": "shoes", "profiles": [7], "enrolled": 1, "anonymous": 2, "total": 3}],
        "recent": [{"profile_id": 7, "event": "enter", "zone": "shoes", "time": 1780300790.5,
                    "since": 1780300790.0, "why": None}]}]})
    at: float
    zones: list[ZonePresence]
    enrolled: int
    anonymous: int
    recent: list[ZoneSwitchOut] = Field(
        default_factory=list, description="The newest zone switches of enrolled customers, newest first "
                                          "(kept in memory, a few per customer; unknown identities never)")


class AdminNotificationOut(NotificationOut):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 12, "profile_id": 7, "campaign": "shoes-dwell-offer", "purpose": "offers", "title": "10% off shoes",
        "body": "Show code AB12CD34 at the till", "data": {"zone": "shoes"}, "created_at": 1780300800.0,
        "status": "sent", "acked_at": None, "deliver_at": None, "expires_at": None, "variant": None,
        "redemption_code": "AB12CD34"}]})
    profile_id: int
    acked_at: float | None
    deliver_at: float | None
    expires_at: float | None
    variant: str | None
    redemption_code: str | None


class ChannelStateOut(BaseModel):
    channel: str
    state: str
    attempts: int
    next_attempt_at: float | None
    last_error: str | None


class AttemptOut(BaseModel):
    channel: str
    at: float
    outcome: str


class InteractionOut(BaseModel):
    kind: str
    at: float


class NotificationDetailOut(AdminNotificationOut):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 12, "profile_id": 7, "campaign": "shoes-dwell-offer", "purpose": "offers", "title": "10% off shoes",
        "body": "Show code AB12CD34 at the till", "data": {"zone": "shoes"}, "created_at": 1780300800.0,
        "status": "acked", "acked_at": 1780300801.2, "deliver_at": None, "expires_at": None, "variant": None,
        "redemption_code": "AB12CD34",
        "channels": [{"channel": "sse", "state": "delivered", "attempts": 1, "next_attempt_at": None,
                      "last_error": None},
                     {"channel": "webhook", "state": "pending", "attempts": 2, "next_attempt_at": 1780300808.0,
                      "last_error": "HTTP 503"}],
        "attempts": [{"channel": "sse", "at": 1780300800.0, "outcome": "streamed"},
                     {"channel": "webhook", "at": 1780300800.0, "outcome": "retry"},
                     {"channel": "webhook", "at": 1780300804.0, "outcome": "retry"}],
        "interactions": [{"kind": "delivered", "at": 1780300801.2}, {"kind": "opened", "at": 1780300840.0}]}]})
    channels: list[ChannelStateOut] = Field(description="Where it stands on each channel")
    attempts: list[AttemptOut] = Field(description="Every delivery attempt, oldest first")
    interactions: list[InteractionOut]


class NotificationPage(PageMeta):
    items: list[AdminNotificationOut]


class DeliveryStateOut(ChannelStateOut):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "notification_id": 12, "channel": "webhook", "state": "dead", "attempts": 8, "next_attempt_at": None,
        "last_error": "HTTP 500", "updated_at": 1780300900.0, "profile_id": 7, "campaign": "shoes-dwell-offer",
        "notification_status": "sent"}]})
    notification_id: int
    updated_at: float
    profile_id: int
    campaign: str
    notification_status: str


class DeliveryPage(PageMeta):
    items: list[DeliveryStateOut]


class ReplayIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"channel": "webhook"}]})
    channel: ChannelName
    notification_id: DbId | None = Field(default=None, description="One dead letter; omit for all of the channel")


class ReplayOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"channel": "webhook", "requeued": [12, 15]}]})
    channel: str
    requeued: list[int] = Field(description="Notifications put back on the retry schedule, due now")


class WebhookEndpointOut(BaseModel):
    url: str = Field(description="Without credentials or query")
    disabled_at: float | None
    consecutive_gone: int
    last_status: int | None
    last_attempt_at: float | None
    last_success_at: float | None


class WebhookEnableIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "url": "https://push.brand.example/gateway", "replay": True}]})
    url: DbStr = Field(min_length=8, max_length=1024)
    replay: JsonBool = Field(default=True, description="Also requeue the webhook's dead letters")


class WebhookEnableOut(BaseModel):
    url: str
    was_disabled: bool
    requeued: list[int]


class ProfilePage(PageMeta):
    items: list[ProfileOut]


class IdentifierOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "kind": "app_install", "value": "3f2c9a7e-1b4d-4e8f-9a6b-0c5d7e8f9a1b", "created_at": 1780300800.0}]})
    kind: str
    value: str
    created_at: float


class IdentifierCreate(IdentifierIn):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "kind": "app_install", "value": "3f2c9a7e-1b4d-4e8f-9a6b-0c5d7e8f9a1b"}]})


class CartPage(PageMeta):
    items: list[CartView]


class CatalogItemOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "sku": "SH-100", "name": "Trail runner shoes", "price": 89.9, "zone": "shoes", "aisle": "A3"}]})
    sku: str
    name: str
    price: float | None
    zone: str | None
    aisle: str | None


class CataloguePage(PageMeta):
    items: list[CatalogItemOut]


# -- devices (api/routers/devices.py) ------------------------------------------------------------

DeviceStatus = Annotated[str, OneOf(devices.DeviceStatus)]


class DeviceIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "id": "mower-alice", "kind": "robot_mower", "device_profile": "robot_mower", "owner_profile_id": 1,
        "firmware": "2.4.1"}]})
    id: DbStr = Field(min_length=1, max_length=128, pattern=r"^[^/+#\x00]+$")
    kind: DbStr | None = Field(default=None, max_length=64)
    device_profile: DbStr | None = Field(default=None, max_length=64)
    owner_profile_id: DbId | None = None
    firmware: DbStr | None = Field(default=None, max_length=64)
    store_id: DbStr | None = Field(default=None, max_length=64, pattern=r"^[^/+#\x00]+$")


class DevicePatch(BaseModel):
    """Only the fields given change; ``owner_profile_id: null`` unsets the owner, ``quarantined: false``
    accepts a quarantined device."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"quarantined": False,
                                                                               "device_profile": "robot_mower"}]})
    kind: DbStr | None = Field(default=None, max_length=64)
    device_profile: DbStr | None = Field(default=None, max_length=64)
    owner_profile_id: DbId | None = None
    firmware: DbStr | None = Field(default=None, max_length=64)
    quarantined: JsonBool | None = None


class DeviceOut(BaseModel):
    id: str
    kind: str | None
    device_profile: str | None
    owner_profile_id: int | None
    store_id: str | None
    firmware: str | None
    status: DeviceStatus
    status_at: float | None
    last_seen: float | None
    registered_at: float | None
    state: dict[str, Any]


class ReadingOut(BaseModel):
    ts: float
    key: str
    metrics: dict[str, float]
    received_at: float


class RollupOut(BaseModel):
    start: float
    period_s: int
    metric: str
    count: int
    min: float
    max: float
    mean: float | None
    last: float


class DeadLetterOut(BaseModel):
    id: int
    received_at: float
    topic: str
    device_id: str | None
    reason: str
    detail: str | None
    payload: str



# ------------------------------------------------------------------ device alarms and the maintenance loop (issue 4)

AlarmStatus = Annotated[str, OneOf(models.AlarmStatus)]


class AlarmOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 3, "device_id": "bike-bruno", "profile_id": 2, "rule": "ebike-chain-service",
        "name": "E-bike chain service due", "severity": "warning", "status": "active", "created_at": 1780300800.0,
        "updated_at": 1780304400.0, "count": 12, "last_value": 1012.0,
        "detail": "km_since_service 1012 gte 1000.0", "cleared_at": None, "clear_reason": None,
        "prompted_at": 1780300800.0, "notification_id": 41, "acknowledged_at": None, "booked_at": None,
        "booked_for": None, "resolved_at": None, "service_event_id": None}]})
    id: int
    device_id: str
    profile_id: int | None
    rule: str
    name: str
    severity: Annotated[str, OneOf(SEVERITIES)]
    status: AlarmStatus
    created_at: float
    updated_at: float
    count: int = Field(description="Readings that met the create condition while it was raised")
    last_value: float | None
    detail: str | None
    cleared_at: float | None
    clear_reason: str | None
    prompted_at: float | None = Field(description="When the owner's prompt (a notification) was created")
    notification_id: int | None
    acknowledged_at: float | None
    booked_at: float | None
    booked_for: float | None = Field(description="The service slot the owner asked for (epoch s)")
    resolved_at: float | None = Field(description="When a service event resolved it")
    service_event_id: int | None


class BookingIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"slot": 1780387200.0}]})
    slot: JsonNumber | None = Field(default=None, allow_inf_nan=False, gt=0,
                               description="The service slot the owner asks for (epoch s); omitted: any time")


class ServiceIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"note": "chain and sprocket"}]})
    note: DbStr | None = Field(default=None, max_length=2000)


class ServiceOut(BaseModel):
    id: int
    device_id: str
    at: float
    note: str | None
    counters_reset: dict[str, dict[str, float]] = Field(description="Per rule, the counters before the reset")
    alarms_resolved: list[int]


class DeviceRuleOut(BaseModel):
    rule: str
    name: str
    active: str | None = Field(description="The raised alarm's severity, if any")
    counters: dict[str, float]
    pending: dict[str, float] = Field(description="Per severity, since when its condition holds (for timers)")
    due_at: float | None = Field(description="When a timer fires if no reading comes first")


class Durations(BaseModel):
    count: int
    mean: float | None
    p90: float | None


class MaintenanceFiguresOut(BaseModel):
    alarms: int
    active: int
    cleared: int
    resolved: int
    prompted: int
    acknowledged: int
    booked: int
    prompt_to_resolution_s: Durations = Field(description="From the owner's prompt to the service that resolved it")
    prompt_to_ack_s: Durations
