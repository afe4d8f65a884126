from __future__ import annotations

from fastapi import APIRouter, Path

from api.deps import Admin, Context
from api.schemas import CartIn, CartOut, CatalogItemIn

router = APIRouter(tags=["carts"], dependencies=[Admin])


@router.put("/carts/{cart_id}", response_model=CartOut)
def upsert_cart(ctx: Context, body: CartIn,
                cart_id: str = Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")) -> dict[str, object]:
    """Create or replace an online cart; it counts as abandoned once idle past the configured time."""
    return ctx.service.upsert_cart(cart_id, profile_id=body.profile_id, external_id=body.profile_external_id,
                                   items=[i.model_dump() for i in body.items], updated_at=body.updated_at,
                                   status=body.status)


@router.put("/catalogue", response_model=dict[str, int])
def upsert_catalogue(items: list[CatalogItemIn], ctx: Context) -> dict[str, int]:
    """Where each product is in the shop, so reminders can say where to find it."""
    return {"upserted": ctx.service.upsert_catalogue(i.model_dump() for i in items)}
