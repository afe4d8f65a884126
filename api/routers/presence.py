"""Presence now: how many are in each zone, which enrolled customers (by profile id), and their last zone
switches with the tracker's evidence.

Unknown identities are counted per zone and never listed: they have no profile and no stored address.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path

from api.deps import Admin, Context
from api.schemas import DB_ID_MAX, PresenceOut, ZoneSwitchOut

router = APIRouter(prefix="/presence", tags=["presence"], dependencies=[Admin])


@router.get("", response_model=PresenceOut, responses={503: {"description": "No presence tracker on this gateway"}})
async def presence_now(ctx: Context) -> dict[str, Any]:
    """Who and how many per zone, right now (the tracker's live state; a zone with nobody is not listed),
    and the newest zone switches of enrolled customers."""
    # async on purpose: a snapshot of the tracks taken on the loop answers at once, whatever the database does.
    if ctx.presence is None:
        raise HTTPException(503, "presence is not tracked on this gateway")
    return ctx.presence()


@router.get("/profiles/{profile_id}", response_model=list[ZoneSwitchOut],
            responses={404: {"description": "No such profile"},
                       503: {"description": "No presence tracker on this gateway"}})
def presence_of_profile(profile_id: Annotated[int, Path(ge=1, le=DB_ID_MAX)], ctx: Context) -> list[dict[str, Any]]:
    """One customer's last zone switches (enter / exit), newest first, each with the tracker's evidence:
    why the gateway put them there. Kept in memory, a few per customer: empty after a restart."""
    if ctx.presence_profile is None:
        raise HTTPException(503, "presence is not tracked on this gateway")
    ctx.service.get_profile(profile_id)  # NotFound -> 404 for a profile that does not exist (or was erased)
    return ctx.presence_profile(profile_id)
