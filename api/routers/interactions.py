"""Interactions: the app reports opens, clicks and dismissals; staff confirm redemptions at the till.

``delivered`` is not reported here: it is recorded when the app acks (stream, WebSocket or POST
.../ack) or when a remote channel confirms (webhook 2xx, Web Push 201). Conversions are not
reported either: a checkout within the configured window credits the last notification before it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from api.deps import Admin, Context, Customer
from api.schemas import DB_ID_MAX, InteractionIn, InteractionRecorded, RedemptionIn, RedemptionOut

router = APIRouter(tags=["interactions"])


@router.post("/me/notifications/{notification_id}/interactions", response_model=InteractionRecorded)
def interact(notification_id: Annotated[int, Path(ge=1, le=DB_ID_MAX)], body: InteractionIn, ctx: Context,
             claims: Customer) -> dict[str, Any]:
    """Record that the customer opened, clicked or dismissed one of their own notifications (once per kind)."""
    return ctx.service.record_interaction(claims.profile_id, notification_id, body.kind)


@router.post("/redemptions", dependencies=[Admin], response_model=RedemptionOut)
def redeem(body: RedemptionIn, ctx: Context) -> dict[str, Any]:
    """Staff confirm an offer's redemption code; a code works once."""
    return ctx.service.redeem(body.code)
