"""Pydantic schemas at the edge: shapes only; meaning is checked by the gateway's service."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Purpose = Literal["offers", "cart_reminders", "maintenance", "analytics"]
IdentifierKind = Literal["beacon", "device", "app_install", "email_sha256"]

DB_ID_MAX = 2_147_483_647  # ids are 32-bit INTEGER on PostgreSQL: a larger one is a 422, not a 500
DbId = Annotated[int, Field(ge=1, le=DB_ID_MAX)]


def _finite(value: Any) -> Any:
    """JSON from Python may carry NaN/Infinity; no database column or client wants them."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers must be finite (no NaN or Infinity)")
    if isinstance(value, dict):
        for v in value.values():
            _finite(v)
    elif isinstance(value, list):
        for v in value:
            _finite(v)
    return value


class IdentifierIn(BaseModel):
    kind: IdentifierKind
    value: str = Field(min_length=1, max_length=256)


class ProfileIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "external_id": "alice", "name": "Alice Martin", "attributes": {"tier": "gold"},
        "identifiers": [{"kind": "beacon", "value": "ibeacon:8f3c0a52-6d1e-4b7a-9c2d-5e4f3a2b1c00:100:1"},
                        {"kind": "email_sha256", "value": "alice@example.com"}],
        "consents": {"offers": True, "cart_reminders": True, "maintenance": False}}]})

    external_id: str | None = Field(default=None, max_length=128)
    name: str | None = Field(default=None, max_length=200)
    attributes: dict[str, Any] = Field(default_factory=dict)
    identifiers: list[IdentifierIn] = Field(default_factory=list, max_length=50)
    consents: dict[Purpose, bool] = Field(default_factory=dict)

    _attributes_finite = field_validator("attributes")(_finite)


class ConsentState(BaseModel):
    granted: bool
    updated_at: float
    source: str


class ProfileOut(BaseModel):
    id: int
    external_id: str | None
    name: str | None
    attributes: dict[str, Any]
    created_at: float
    identifiers: list[IdentifierIn]
    consents: dict[str, ConsentState]


class ConsentsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    consents: dict[Purpose, bool]


class TokenOut(BaseModel):
    token: str = Field(description="Shown once; the gateway keeps no copy")
    profile_id: int
    expires_at: float


class CartItemIn(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    sku: str = Field(min_length=1, max_length=64)
    name: str | None = Field(default=None, max_length=200)
    price: float | None = Field(default=None, ge=0)
    quantity: int = Field(default=1, ge=1, le=10_000)


class CartIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [{
        "profile_external_id": "alice", "items": [{"sku": "SH-100", "name": "Trail runner shoes",
                                                    "price": 89.9, "quantity": 1}]}]})

    profile_id: DbId | None = None
    profile_external_id: str | None = Field(default=None, max_length=128)
    items: list[CartItemIn] = Field(max_length=500)
    updated_at: float | None = Field(default=None, description="Epoch seconds; default now")
    status: Literal["open", "checked_out"] = "open"


class CartOut(BaseModel):
    id: str
    profile_id: int
    status: str
    items: list[dict[str, Any]]
    updated_at: float


class CatalogItemIn(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    sku: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=200)
    price: float | None = Field(default=None, ge=0)
    zone: str | None = Field(default=None, max_length=64)
    aisle: str | None = Field(default=None, max_length=32)


class NotificationOut(BaseModel):
    id: int
    campaign: str
    purpose: str
    title: str
    body: str
    data: dict[str, Any]
    created_at: float
    status: str


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    components: dict[str, str]


class StoreIBeacon(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uuid: str = Field(pattern=r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")
    major: int = Field(ge=0, le=0xFFFF)
    minor: int = Field(ge=0, le=0xFFFF)


class AppSightingIn(BaseModel):
    """A store beacon the app ranged: by iBeacon uuid/major/minor, or by its key (any beacon format)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "beacon": {"uuid": "f7826da6-4fa2-4e98-8024-bc5b71e0893e", "major": 1, "minor": 7},
        "rssi": -63, "tx_power": -59, "time": 1780300800.0}]})

    beacon: StoreIBeacon | str = Field(description="{uuid, major, minor} or a key like ibeacon:<uuid>:1:7")
    rssi: int = Field(gt=-127, lt=0)
    tx_power: int | None = Field(default=None, gt=-127, lt=0, description="Measured power at 1 m, if known")
    time: float | None = Field(default=None, allow_inf_nan=False, description="Epoch seconds when ranged; default now")

    @field_validator("beacon")
    @classmethod
    def _key_shape(cls, v: StoreIBeacon | str) -> StoreIBeacon | str:
        if isinstance(v, str) and not re.fullmatch(r"[a-z_]+:\S{1,200}", v.strip().lower()):
            raise ValueError("expected a beacon key such as ibeacon:<uuid>:<major>:<minor>")
        return v


class SightingsAccepted(BaseModel):
    received: int
    accepted: int
    unknown_beacon: int = Field(description="Reports of beacons no receiver is configured for (not used)")


class DecisionOut(BaseModel):
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
    kind: Literal["visit_start", "enter", "dwell", "exit", "visit_end", "telemetry", "cart_abandoned", "purchase"]
    zone: str | None = Field(default=None, max_length=64)
    dwell_s: float = Field(default=0.0, ge=0)
    facts: dict[str, Any] = Field(default_factory=dict, description="e.g. {device: {...}, reading: {...}}")


class DryRunIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "profile_id": 1, "event": {"kind": "dwell", "zone": "shoes", "dwell_s": 30}}]})
    profile_id: int
    event: SyntheticEvent


class DryRunOutcome(BaseModel):
    campaign_id: str
    profile_id: int
    fired: bool
    reason: str
    detail: str | None
    variant: str | None


class InteractionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["opened", "clicked", "dismissed"]


class RedemptionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(min_length=4, max_length=32, pattern=r"^[A-Za-z0-9]+$")
