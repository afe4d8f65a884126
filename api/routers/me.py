"""The customer's own door: their live stream, their notifications, their acks."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Path, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from api.deps import Context, Customer
from api.schemas import DB_ID_MAX, NotificationOut
from api.streams import CustomerStream

router = APIRouter(prefix="/me", tags=["customer"])


def sse(msg: dict[str, Any]) -> str:
    return f"id: {msg['id']}\nevent: notification\ndata: {json.dumps(msg, separators=(',', ':'))}\n\n"


@router.get("/stream", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "Server-sent events; `id` is the notification id"}})
async def stream(ctx: Context, claims: Customer,
                 last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
                 after: Annotated[int | None, Query(ge=0, le=DB_ID_MAX, description="Same as Last-Event-ID")] = None
                 ) -> StreamingResponse:
    """Live notifications. Unacked ones after Last-Event-ID are replayed first, so nothing is missed."""
    try:
        start = int(last_event_id) if last_event_id else (after or 0)
    except ValueError:
        start = -1
    if not 0 <= start <= DB_ID_MAX:
        raise HTTPException(400, "Last-Event-ID must be a notification id")
    live = await CustomerStream.open(ctx, claims, start)

    async def events() -> AsyncIterator[str]:
        last = start
        try:
            yield f"retry: 2000\n: stream for profile {claims.profile_id}\n\n"
            async with contextlib.aclosing(live.messages()) as pushed:
                async for item in pushed:
                    if item is None:
                        yield ": heartbeat\n\n"
                    elif item.replayed or item.message["id"] > last:
                        last = item.message["id"]
                        yield sse(item.message)
                    else:  # an older id released late (a scheduled send): no `id:`, so Last-Event-ID stays put
                        yield sse(item.message).split("\n", 1)[1]
        finally:
            live.close()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/notifications", response_model=list[NotificationOut])
def my_notifications(ctx: Context, claims: Customer,
                     after: Annotated[int, Query(ge=0, le=DB_ID_MAX)] = 0) -> list[dict[str, Any]]:
    """Unacked notifications after an id: the polling fallback for apps without a stream."""
    return ctx.service.replay(claims.profile_id, after)


@router.post("/notifications/{notification_id}/ack", response_model=NotificationOut)
def ack(notification_id: Annotated[int, Path(ge=1, le=DB_ID_MAX)], ctx: Context, claims: Customer) -> dict[str, Any]:
    """The app has it: recorded as delivered, and never replayed again."""
    return ctx.service.ack(claims.profile_id, notification_id)


@router.delete("/token", status_code=204)
async def logout(ctx: Context, claims: Customer) -> Response:
    """Log out: the token this request carries stops working at once, and the streams it opened end
    (the customer's other devices keep theirs)."""
    await run_in_threadpool(ctx.service.revoke_token, claims)
    ctx.hub.close_profile(claims.profile_id, claims.token_id)
    return Response(status_code=204)
