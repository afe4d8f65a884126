"""Delivery states and dead letters: see where each notification stands per channel, and replay.

A dead letter (a channel gave up on a notification) goes back on the retry schedule with
``POST /deliveries/replay``; re-enabling a webhook URL that was disabled after repeated 410s
requeues the webhook's dead letters too, so nothing stays lost once the receiver is fixed.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

import gateway.profiles.resources as resources
from api.deps import Admin, Context
from api.schemas import (
    DB_ID_MAX,
    PAGE_MAX,
    ChannelName,
    DeliveryPage,
    DeliveryStateName,
    ReplayIn,
    ReplayOut,
    WebhookEnableIn,
    WebhookEnableOut,
    WebhookEndpointOut,
)

router = APIRouter(tags=["deliveries"], dependencies=[Admin])

Limit = Annotated[int, Query(ge=1, le=PAGE_MAX, description=f"Page size, at most {PAGE_MAX}")]
Offset = Annotated[int, Query(ge=0, le=DB_ID_MAX, description="How many to skip (next_offset of the last page)")]


@router.get("/deliveries", response_model=DeliveryPage)
def list_deliveries(ctx: Context, state: DeliveryStateName | None = None,
                    channel: Annotated[ChannelName | None, Query()] = None,
                    notification: Annotated[int | None, Query(ge=1, le=DB_ID_MAX)] = None,
                    limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    """Per (notification, channel) state, most recently changed first; ``state=dead`` lists the dead letters."""
    items, total = resources.list_deliveries(ctx.service, state=state, channel=channel, notification_id=notification,
                                             limit=limit, offset=offset)
    return resources.page(items, total, limit, offset)


@router.post("/deliveries/replay", response_model=ReplayOut)
def replay(body: ReplayIn, ctx: Context) -> dict[str, Any]:
    """Put dead letters back on the retry schedule, due now: one (``notification_id``) or all of a channel.

    Only notifications still live (not acked, cancelled or expired) are requeued.
    """
    return {"channel": body.channel,
            "requeued": resources.replay_dead_letters(ctx.service, body.channel, body.notification_id)}


@router.get("/webhook-endpoints", response_model=list[WebhookEndpointOut])
def webhook_endpoints(ctx: Context) -> list[dict[str, Any]]:
    """Every webhook URL the gateway has called, and whether it is disabled (after repeated 410 Gone)."""
    return resources.webhook_endpoints(ctx.service)


@router.post("/webhook-endpoints/enable", response_model=WebhookEnableOut)
def enable_webhook(body: WebhookEnableIn, ctx: Context) -> dict[str, Any]:
    """Re-enable a disabled webhook URL (the brand fixed it) and, by default, requeue its dead letters."""
    return resources.enable_webhook(ctx.service, body.url, body.replay)
