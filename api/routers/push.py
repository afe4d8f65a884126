"""The customer's Web Push subscriptions: the browser's PushSubscription in, removed by endpoint."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from api.deps import Context, Customer
from api.schemas import DbStr, JsonNumber
from gateway.delivery.webpush import (
    SubscriptionError,
    SubscriptionTaken,
    delete_subscription,
    list_subscriptions,
    save_subscription,
    validate_subscription,
)
from gateway.profiles.service import Conflict, Invalid

router = APIRouter(prefix="/me/push-subscriptions", tags=["customer"])

EXAMPLE_ENDPOINT = "https://fcm.googleapis.com/fcm/send/dpH5lCsTSSM:APA91bHqjZxM0VImWWqDRN7U0a3AycjUf4O-byuxb_wJ"


class PushKeys(BaseModel):
    p256dh: DbStr = Field(min_length=1, max_length=128, description="The browser's P-256 public key, base64url")
    auth: DbStr = Field(min_length=1, max_length=64, description="The 16-byte auth secret, base64url")


class PushSubscriptionIn(BaseModel):
    """``JSON.stringify(await registration.pushManager.subscribe(...))``, as the browser gives it."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "endpoint": EXAMPLE_ENDPOINT, "expirationTime": None,
        "keys": {"p256dh": "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-Ts1XbjhazAkj7I99e8QcYP7DkM",
                 "auth": "tBHItJI5svbpez7KI4CCXg"}}]})

    endpoint: DbStr = Field(min_length=8, max_length=1024)
    expirationTime: JsonNumber | None = None  # the browser's own field name (ignored: the push service says 410)
    keys: PushKeys


class PushSubscriptionOut(BaseModel):
    endpoint: str
    created_at: float
    last_success_at: float | None
    failures: int


class VapidKeyOut(BaseModel):
    public_key: str = Field(description="Pass it as applicationServerKey to PushManager.subscribe()")


@router.get("", response_model=list[PushSubscriptionOut])
def my_subscriptions(ctx: Context, claims: Customer) -> list[dict[str, Any]]:
    """The caller's own subscriptions (endpoints only; keys are never returned)."""
    return list_subscriptions(ctx.service.db, claims.profile_id)


@router.post("", response_model=PushSubscriptionOut, status_code=status.HTTP_201_CREATED,
             responses={200: {"description": "Already known: keys refreshed", "model": PushSubscriptionOut},
                        409: {"description": "Another account's subscription (different keys)"}})
def subscribe(body: PushSubscriptionIn, ctx: Context, claims: Customer, response: Response) -> dict[str, Any]:
    """Store this browser's subscription for the caller (201), or refresh it (200)."""
    try:
        sub = validate_subscription(body.endpoint, body.keys.p256dh, body.keys.auth)
    except SubscriptionError as exc:
        raise Invalid(str(exc)) from None
    try:
        view, created = save_subscription(ctx.service.db, claims.profile_id, sub, ctx.service.clock.now())
    except SubscriptionTaken as exc:
        raise Conflict(str(exc)) from None
    if not created:
        response.status_code = status.HTTP_200_OK
    return view


@router.delete("", status_code=status.HTTP_204_NO_CONTENT, responses={404: {"description": "Not one of yours"}})
def unsubscribe(ctx: Context, claims: Customer,
                endpoint: Annotated[DbStr, Query(min_length=1, max_length=1024,
                                               description="The subscription's endpoint URL")]) -> Response:
    """Forget one of the caller's subscriptions (after ``PushSubscription.unsubscribe()`` in the browser)."""
    if not delete_subscription(ctx.service.db, claims.profile_id, endpoint):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no push subscription of yours has this endpoint")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/vapid-public-key", response_model=VapidKeyOut, responses={404: {"description": "Web Push is off"}})
def vapid_public_key(request: Request, claims: Customer) -> dict[str, str]:
    """The gateway's VAPID public key, which the page needs to subscribe."""
    key = getattr(request.app.state, "vapid_public_key", None)
    if not key:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Web Push is not enabled on this gateway")
    return {"public_key": key}
