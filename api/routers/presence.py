"""Presence now: how many are in each zone, and which enrolled customers (by profile id).

Unknown identities are counted per zone and never listed: they have no profile and no stored address.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from api.deps import Admin, Context
from api.schemas import PresenceOut

router = APIRouter(prefix="/presence", tags=["presence"], dependencies=[Admin])


@router.get("", response_model=PresenceOut, responses={503: {"description": "No presence tracker on this gateway"}})
async def presence_now(ctx: Context) -> dict[str, Any]:
    """Who and how many per zone, right now (the tracker's live state; a zone with nobody is not listed)."""
    # async on purpose: a snapshot of the tracks taken on the loop answers at once, whatever the database does.
    if ctx.presence is None:
        raise HTTPException(503, "presence is not tracked on this gateway")
    return ctx.presence()
