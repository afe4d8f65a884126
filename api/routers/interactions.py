"""Interactions: the app reports opens, clicks and dismissals; staff confirm redemptions at the till."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import Admin, Context, Customer
from api.schemas import InteractionIn, RedemptionIn

router = APIRouter(tags=["interactions"])


@router.post("/me/notifications/{notification_id}/interactions")
def interact(notification_id: int, body: InteractionIn, ctx: Context, claims: Customer) -> dict[str, Any]:
    """Record that the customer opened, clicked or dismissed one of their own notifications."""
    return ctx.service.record_interaction(claims.profile_id, notification_id, body.kind)


@router.post("/redemptions", dependencies=[Admin])
def redeem(body: RedemptionIn, ctx: Context) -> dict[str, Any]:
    """Staff confirm an offer's redemption code; a code works once."""
    return ctx.service.redeem(body.code)
