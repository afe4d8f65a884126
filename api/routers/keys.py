"""Admin API keys: created with scopes and shown once, listed without the key, revoked for good.

Only a key with the ``admin`` scope (or the configured ``[api] admin_key``) manages keys.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Response, status
from pydantic import BaseModel, ConfigDict, Field

from api.deps import Context, KeyAdmin, guard_of
from api.schemas import JSON_NUMBER, DbStr, OneOf
from gateway.security.auth import CONFIG_KEY_ID, SCOPES

router = APIRouter(prefix="/keys", tags=["keys"], dependencies=[KeyAdmin])

Scope = Annotated[str, OneOf(SCOPES)]
KeyId = Annotated[str, Path(min_length=1, max_length=16, pattern=r"^[A-Za-z0-9]+$")]


class KeyIn(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"name": "till integration", "scopes": ["write"]},
        {"name": "dashboard", "scopes": ["read"], "expires_in_s": 7776000}]})

    name: DbStr = Field(min_length=1, max_length=100, description="Who or what uses it")
    scopes: list[Scope] = Field(min_length=1, max_length=5)
    expires_in_s: Annotated[int, Field(ge=60, le=10 * 365 * 86400), JSON_NUMBER] | None = Field(default=None,
                                     description="None: the key works until revoked")


class KeyOut(BaseModel):
    id: str
    prefix: str = Field(description="How the key starts, to recognise it; the key itself is never shown again")
    name: str
    scopes: list[str]
    created_at: float
    expires_at: float | None
    last_used_at: float | None
    revoked_at: float | None


class KeyCreated(KeyOut):
    key: str = Field(description="The key, shown this once: send it as X-API-Key. Only its hash is kept.")


@router.post("", response_model=KeyCreated, status_code=status.HTTP_201_CREATED)
def create_key(body: KeyIn, ctx: Context) -> dict[str, Any]:
    raw, view = guard_of(ctx).create_key(body.name, body.scopes, body.expires_in_s)
    return {**view, "key": raw}


@router.get("", response_model=list[KeyOut])
def list_keys(ctx: Context) -> list[dict[str, Any]]:
    """Every key ever created, revoked ones included (never the key, never its hash)."""
    return guard_of(ctx).keys()


@router.get("/{key_id}", response_model=KeyOut, responses={404: {"description": "No such key"}})
def get_key(key_id: KeyId, ctx: Context) -> dict[str, Any]:
    view = guard_of(ctx).key(key_id)
    if view is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no API key {key_id}")
    return view


@router.delete("/{key_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={404: {"description": "No such key"}, 409: {"description": "The configured key"}})
def revoke_key(key_id: KeyId, ctx: Context) -> Response:
    """Revoke at once: the next request with the key gets 401. Revoking twice is harmless."""
    if key_id == CONFIG_KEY_ID:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            "the configured [api] admin_key cannot be revoked here: change or empty it in the config")
    if guard_of(ctx).revoke_key(key_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no API key {key_id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
