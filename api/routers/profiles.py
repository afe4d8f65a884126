from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status
from fastapi.concurrency import run_in_threadpool

import gateway.profiles.resources as resources
from api.deps import Admin, Context
from api.schemas import (
    DB_ID_MAX,
    PAGE_MAX,
    ConsentsIn,
    DbStr,
    IdentifierKind,
    LinkIn,
    ProfileIn,
    ProfileOut,
    ProfilePage,
    ProfileUpdateIn,
    Purpose,
    TokenOut,
)
from gateway.profiles.service import NewProfile

router = APIRouter(prefix="/profiles", tags=["profiles"], dependencies=[Admin])

ProfileId = Annotated[int, Path(ge=1, le=DB_ID_MAX)]


@router.post("", response_model=ProfileOut, status_code=status.HTTP_201_CREATED)
def create_profile(body: ProfileIn, ctx: Context) -> dict[str, object]:
    """Enrol a customer with their identifiers and consents. Identifiers are unique across profiles."""
    return ctx.service.create_profile(NewProfile(
        external_id=body.external_id, name=body.name, attributes=body.attributes,
        identifiers=[(i.kind, i.value) for i in body.identifiers],
        consents={str(k): v for k, v in body.consents.items()}), source=body.consent_source)


@router.get("", response_model=ProfilePage)
def list_profiles(ctx: Context,
                  q: Annotated[DbStr | None, Query(min_length=1, max_length=128,
                                                 description="Part of the name or external id")] = None,
                  external_id: Annotated[DbStr | None, Query(max_length=128)] = None,
                  identifier_kind: IdentifierKind | None = None,
                  consent: Annotated[Purpose | None, Query(description="Granted this purpose")] = None,
                  limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 50,
                  offset: Annotated[int, Query(ge=0, le=DB_ID_MAX)] = 0) -> dict[str, object]:
    """Enrolled customers, newest first, filtered; one page at a time (``next_offset`` continues)."""
    items, total = resources.list_profiles(ctx.service, q=q, external_id=external_id,
                                           identifier_kind=identifier_kind, consent=consent, limit=limit,
                                           offset=offset)
    return resources.page(items, total, limit, offset)


@router.get("/{profile_id}", response_model=ProfileOut)
def get_profile(profile_id: ProfileId, ctx: Context) -> dict[str, object]:
    return ctx.service.get_profile(profile_id)


@router.patch("/{profile_id}", response_model=ProfileOut)
def update_profile(profile_id: ProfileId, body: ProfileUpdateIn, ctx: Context) -> dict[str, object]:
    """Change the name or attributes (merged; null removes one). Live segments follow at once."""
    return ctx.service.update_profile(profile_id, name=body.name, attributes=body.attributes)


@router.post("/{profile_id}/link", response_model=ProfileOut)
async def link_profiles(profile_id: ProfileId, body: LinkIn, ctx: Context) -> dict[str, object]:
    """Link two profiles explicitly (a sighting never does): the other one's identifiers, consents it
    lacks here, history, carts and devices move to this profile, and the other profile is deleted
    (its app tokens stop working and its open streams end)."""
    view: dict[str, object] = await run_in_threadpool(ctx.service.link_profiles, profile_id, body.profile_id)
    ctx.hub.close_profile(body.profile_id)
    return view


@router.put("/{profile_id}/consents", response_model=ProfileOut)
def set_consents(profile_id: ProfileId, body: ConsentsIn, ctx: Context) -> dict[str, object]:
    """Grant or withdraw consent per purpose, with where it was given; withdrawal takes effect for the
    next decision."""
    return ctx.service.set_consents(profile_id, {str(k): v for k, v in body.consents.items()}, source=body.source)


@router.post("/{profile_id}/tokens", response_model=TokenOut, status_code=status.HTTP_201_CREATED)
def issue_token(profile_id: ProfileId, ctx: Context) -> TokenOut:
    """A signed, expiring app token that reaches only this customer's stream and notifications."""
    token, claims = ctx.service.issue_token(profile_id)
    return TokenOut(token=token, profile_id=claims.profile_id, expires_at=claims.expires_at)


@router.delete("/{profile_id}/tokens", status_code=status.HTTP_204_NO_CONTENT)
async def revoke_tokens(profile_id: ProfileId, ctx: Context) -> Response:
    """Revoke every app token issued so far for this customer (a lost phone); tokens issued later work.
    The customer's open streams end at once (a device with a new token reconnects and resumes)."""
    await run_in_threadpool(ctx.service.revoke_tokens, profile_id)
    ctx.hub.close_profile(profile_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
