"""A customer's rights: a copy of everything, and erasure everywhere."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response, status
from fastapi.concurrency import run_in_threadpool

from api.deps import Context, Privacy
from api.schemas import DB_ID_MAX

router = APIRouter(prefix="/profiles", tags=["privacy"], dependencies=[Privacy])

ProfileId = Annotated[int, Path(ge=1, le=DB_ID_MAX)]


@router.get("/{profile_id}/export")
def export(profile_id: ProfileId, ctx: Context) -> dict[str, Any]:
    """Every row stored about this customer, table by table."""
    return ctx.service.export_profile(profile_id)


@router.delete("/{profile_id}", status_code=status.HTTP_204_NO_CONTENT)
async def erase(profile_id: ProfileId, ctx: Context) -> Response:
    """Erase the profile and all its data; its tokens stop working, its open streams end and its
    beacon becomes anonymous."""
    await run_in_threadpool(ctx.service.erase_profile, profile_id)
    ctx.hub.close_profile(profile_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
