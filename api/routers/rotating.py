"""A profile's rotating identities (Eddystone-EID, IRK, the app's rotating iBeacon): enrol, list, remove.

The keys are never shown: only the app's secret, once, in the answer to its enrolment."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Response, status

from api.deps import Admin, Context
from api.schemas import DB_ID_MAX, RotatingEidIn, RotatingIn, RotatingIrkIn, RotatingIssued, RotatingOut
from gateway.profiles.rotating import RotatingIdentities

router = APIRouter(prefix="/profiles/{profile_id}/rotating-identities", tags=["profiles"], dependencies=[Admin])

ProfileId = Annotated[int, Path(ge=1, le=DB_ID_MAX)]
IdentityId = Annotated[int, Path(ge=1, le=DB_ID_MAX)]


def _service(ctx: Context) -> RotatingIdentities:
    svc: RotatingIdentities | None = getattr(ctx.service, "rotating", None)
    if svc is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "rotating identities are not running")
    return svc


@router.post("", response_model=RotatingIssued, response_model_exclude_none=True,
             status_code=status.HTTP_201_CREATED)
def enrol(profile_id: ProfileId, body: RotatingIn, ctx: Context) -> dict[str, Any]:
    """Enrol a rotating identity (201); a key already enrolled is 409. An ``app`` enrolment's answer holds
    the secret the app derives its beacon from: the only time it is shown."""
    svc = _service(ctx)
    if isinstance(body, RotatingEidIn):
        return svc.enrol(profile_id, "eid", identity_key=body.identity_key, k=body.k, epoch=body.epoch)
    if isinstance(body, RotatingIrkIn):
        return svc.enrol(profile_id, "irk", irk=body.irk)
    return svc.enrol(profile_id, "app")


@router.get("", response_model=list[RotatingOut], response_model_exclude_none=True)
def list_rotating(profile_id: ProfileId, ctx: Context) -> list[dict[str, Any]]:
    """The profile's rotating identities: kind, K, epoch, period; never a key."""
    return _service(ctx).list(profile_id)


@router.delete("/{identity_id}", status_code=status.HTTP_204_NO_CONTENT)
def remove(profile_id: ProfileId, identity_id: IdentityId, ctx: Context) -> Response:
    """The key is deleted; the identity is anonymous from the next advertisement on."""
    _service(ctx).remove(profile_id, identity_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
