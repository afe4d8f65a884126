"""Pydantic schemas at the edge: shapes only; meaning is checked by the gateway's service."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Purpose = Literal["offers", "cart_reminders", "maintenance", "analytics"]
IdentifierKind = Literal["beacon", "device", "app_install", "email_sha256"]


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
    sku: str = Field(min_length=1, max_length=64)
    name: str | None = Field(default=None, max_length=200)
    price: float | None = Field(default=None, ge=0)
    quantity: int = Field(default=1, ge=1, le=10_000)


class CartIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "profile_external_id": "alice", "items": [{"sku": "SH-100", "name": "Trail runner shoes",
                                                    "price": 89.9, "quantity": 1}]}]})

    profile_id: int | None = None
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
