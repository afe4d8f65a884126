"""Campaigns over the API: list, read, create or replace, enable, disable, delete, validate.

Campaigns defined in files are listed but read-only here; API campaigns live in the database and
take effect at once (the engine's index is swapped; cooldowns and caps are durable, so nothing resets).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Response, status

from api.deps import Campaigns, Context
from api.schemas import Document

router = APIRouter(prefix="/campaigns", tags=["campaigns"], dependencies=[Campaigns])

CampaignId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]
EXAMPLE = {"name": "Welcome back", "purpose": "offers", "trigger": {"type": "visit_start"},
           "conditions": {"all": [{"fact": "segments", "op": "contains", "value": "occasional"}]},
           "action": {"title": "Welcome back, {profile.first_name}", "body": "5 % off today with code {offer.code}",
                      "data": {"offer": {"code": "BACK5"}}},
           "limits": {"cooldown_s": 604800, "quiet_hours": {"start": "20:00", "end": "09:00", "mode": "drop"}},
           "priority": 3}
Definition = Annotated[Document, Body(examples=[EXAMPLE])]


@router.get("")
def list_campaigns(ctx: Context) -> list[dict[str, Any]]:
    return ctx.service.list_campaigns()


@router.post("/validate")
def validate(definition: Definition, ctx: Context) -> dict[str, Any]:
    """Check a definition without saving it: 200 when valid, 422 naming the first problem."""
    c = ctx.service.validate_campaign({"id": "validate", **definition})
    return {"valid": True, "id": c.id, "trigger": c.trigger.type, "purpose": c.purpose}


@router.get("/{campaign_id}")
def get_campaign(campaign_id: CampaignId, ctx: Context) -> dict[str, Any]:
    return ctx.service.get_campaign(campaign_id)


@router.put("/{campaign_id}", responses={201: {"description": "Created (200: replaced)"}})
def put_campaign(campaign_id: CampaignId, definition: Definition, ctx: Context, response: Response) -> dict[str, Any]:
    view, created = ctx.service.put_campaign(campaign_id, definition)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return view


@router.post("/{campaign_id}/enable")
def enable(campaign_id: CampaignId, ctx: Context) -> dict[str, Any]:
    return ctx.service.set_campaign_enabled(campaign_id, True)


@router.post("/{campaign_id}/disable")
def disable(campaign_id: CampaignId, ctx: Context) -> dict[str, Any]:
    return ctx.service.set_campaign_enabled(campaign_id, False)


@router.delete("/{campaign_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete(campaign_id: CampaignId, ctx: Context) -> Response:
    ctx.service.delete_campaign(campaign_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
