"""A profile's identifiers as a sub-resource: list, add and remove after enrolment."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response, status

import gateway.profiles.resources as resources
from api.deps import Admin, Context
from api.schemas import DB_ID_MAX, DbStr, IdentifierCreate, IdentifierKind, IdentifierOut

router = APIRouter(prefix="/profiles/{profile_id}/identifiers", tags=["profiles"], dependencies=[Admin])

ProfileId = Annotated[int, Path(ge=1, le=DB_ID_MAX)]


@router.get("", response_model=list[IdentifierOut])
def list_identifiers(profile_id: ProfileId, ctx: Context) -> list[dict[str, Any]]:
    """Everything that points at this customer (beacon keys, devices, app installs, hashed e-mail)."""
    return resources.list_identifiers(ctx.service, profile_id)


@router.post("", response_model=IdentifierOut, status_code=status.HTTP_201_CREATED,
             responses={200: {"model": IdentifierOut, "description": "Already this profile's: unchanged"}})
def add_identifier(profile_id: ProfileId, body: IdentifierCreate, ctx: Context, response: Response) -> dict[str, Any]:
    """Attach an identifier (201); the same one again is 200; one that belongs to another profile is 409."""
    view, created = resources.add_identifier(ctx.service, profile_id, body.kind, body.value)
    if not created:
        response.status_code = status.HTTP_200_OK
    return view


@router.delete("/{kind}/{value}", status_code=status.HTTP_204_NO_CONTENT)
def remove_identifier(profile_id: ProfileId, kind: IdentifierKind, ctx: Context,
                      value: Annotated[DbStr, Path(min_length=1, max_length=256)]) -> Response:
    """Detach one identifier: that beacon or device is anonymous from the next advertisement on."""
    resources.remove_identifier(ctx.service, profile_id, kind, value)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
