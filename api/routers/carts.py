"""Online carts and the catalogue: the shop's systems write them; staff and tools read them back."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

import gateway.profiles.resources as resources
from api.deps import Admin, Context
from api.schemas import (
    DB_ID_MAX,
    PAGE_MAX,
    CartIn,
    CartOut,
    CartPage,
    CartStatus,
    CartView,
    CatalogItemIn,
    CatalogItemOut,
    CataloguePage,
    DbStr,
)

router = APIRouter(tags=["carts"], dependencies=[Admin])

CartId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
Sku = Annotated[DbStr, Path(min_length=1, max_length=64)]
Limit = Annotated[int, Query(ge=1, le=PAGE_MAX, description=f"Page size, at most {PAGE_MAX}")]
Offset = Annotated[int, Query(ge=0, le=DB_ID_MAX, description="How many to skip (next_offset of the last page)")]


@router.put("/carts/{cart_id}", response_model=CartOut)
def upsert_cart(ctx: Context, body: CartIn, cart_id: CartId) -> dict[str, object]:
    """Create or replace an online cart; it counts as abandoned once idle past the configured time."""
    return ctx.service.upsert_cart(cart_id, profile_id=body.profile_id, external_id=body.profile_external_id,
                                   items=[i.model_dump() for i in body.items], updated_at=body.updated_at,
                                   status=body.status)


@router.get("/carts", response_model=CartPage)
def list_carts(ctx: Context, profile: Annotated[int | None, Query(ge=1, le=DB_ID_MAX)] = None,
               status: CartStatus | None = None,
               abandoned: Annotated[bool | None, Query(description="Seen abandoned by the gateway (or not)")] = None,
               limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    """Most recently updated first, filtered by profile, status and abandonment."""
    items, total = resources.list_carts(ctx.service, profile_id=profile, status=status, abandoned=abandoned,
                                        limit=limit, offset=offset)
    return resources.page(items, total, limit, offset)


@router.get("/carts/{cart_id}", response_model=CartView)
def get_cart(cart_id: CartId, ctx: Context) -> dict[str, Any]:
    return resources.get_cart(ctx.service, cart_id)


@router.put("/catalogue", response_model=dict[str, int])
def upsert_catalogue(items: list[CatalogItemIn], ctx: Context) -> dict[str, int]:
    """Where each product is in the shop, so reminders can say where to find it."""
    return {"upserted": ctx.service.upsert_catalogue(i.model_dump() for i in items)}


@router.get("/catalogue", response_model=CataloguePage)
def list_catalogue(ctx: Context, zone: Annotated[DbStr | None, Query(min_length=1, max_length=64)] = None,
                   q: Annotated[DbStr | None, Query(min_length=1, max_length=200,
                                                    description="Part of the name")] = None,
                   limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    """The catalogue by sku, filtered by zone or name."""
    items, total = resources.list_catalogue(ctx.service, zone=zone, q=q, limit=limit, offset=offset)
    return resources.page(items, total, limit, offset)


@router.get("/catalogue/{sku}", response_model=CatalogItemOut)
def get_catalogue_item(sku: Sku, ctx: Context) -> dict[str, Any]:
    return resources.get_catalogue_item(ctx.service, sku)
