"""The customer's live stream over a WebSocket: the SSE stream's semantics, plus acks on the socket.

Same outbox, same hub: unacked notifications after the client's last id are replayed, then new
ones are pushed live; ids are the outbox ids, so they only go up and the app dedups by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import SQLAlchemyError

from api.deps import ApiContext, guard_of
from api.schemas import DB_ID_MAX
from api.streams import CustomerStream
from gateway.profiles.service import NotFound
from gateway.security.auth import retry_after
from gateway.security.tokens import Claims, TokenError
from gateway.storage.db import is_transient

router = APIRouter(prefix="/me", tags=["customer"])

WS_UNAUTHORIZED = 4401  # the 4xxx range is the application's; 4401 mirrors HTTP 401
WS_BAD_REQUEST = 4400
WS_TRY_AGAIN = 1013  # cut off (fell behind, or erased / token revoked or expired): reconnect with after=<last id>
WS_RATE_LIMITED = 4429  # mirrors HTTP 429: too many connections or requests with this token
AUTH_TIMEOUT_S = 10.0

Send = Callable[[dict[str, Any]], Awaitable[None]]


def _compact(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


async def _ws_auth(ws: WebSocket, ctx: ApiContext, token: str | None, after: int) -> tuple[Claims, int] | None:
    """The token from the query, the Authorization header or the first message ``{"token", "after"}``."""
    if token is None:
        auth = ws.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            token = auth[7:].strip()
    if token is None:  # browsers cannot set headers on a WebSocket: the first message carries it
        try:
            first = json.loads(await asyncio.wait_for(ws.receive_text(), AUTH_TIMEOUT_S))
            token = first.get("token") if isinstance(first, dict) else None
            after = int(first.get("after", after) or 0)
        except (TimeoutError, ValueError, TypeError, KeyError):
            token = None
    if not isinstance(token, str) or not token:
        await ws.close(WS_UNAUTHORIZED, "a customer app token is required")
        return None
    if not 0 <= after <= DB_ID_MAX:
        await ws.close(WS_BAD_REQUEST, "after must be a notification id")
        return None
    try:  # off the loop: the check reads the database, which may be locked or away
        return await run_in_threadpool(ctx.service.verify_token, token), after
    except TokenError as exc:
        await ws.close(WS_UNAUTHORIZED, str(exc)[:120])
        return None
    except SQLAlchemyError as exc:
        if not is_transient(exc):
            raise
        ctx.service.db.outage.failed(exc)
        await ws.close(WS_TRY_AGAIN, "the database is unavailable right now; reconnect later")
        return None


async def _ws_push(ws_send: Send, live: CustomerStream) -> None:
    """Replay, then live (api/streams.py); an idle socket gets a ping every heartbeat."""
    async with contextlib.aclosing(live.messages()) as pushed:
        async for item in pushed:
            if item is None:
                await ws_send({"type": "ping"})
            else:
                await ws_send({"type": "notification", "id": item.message["id"], "notification": item.message})


async def _ws_acks(ws: WebSocket, ws_send: Send, ctx: ApiContext, profile_id: int) -> None:
    """``{"ack": <id>}`` is POST .../ack over the socket; ``{"type": "ping"}`` gets a pong."""
    while True:
        text = await ws.receive_text()
        try:
            req = json.loads(text)
        except ValueError:
            await ws_send({"type": "error", "detail": "messages are JSON objects, e.g. {\"ack\": 12}"})
            continue
        if isinstance(req, dict) and req.get("type") == "ping":
            await ws_send({"type": "pong"})
            continue
        nid = req.get("ack") if isinstance(req, dict) else None
        if not isinstance(nid, int) or isinstance(nid, bool) or not 1 <= nid <= DB_ID_MAX:
            await ws_send({"type": "error", "detail": "expected {\"ack\": <notification id>}"})
            continue
        try:
            acked = await run_in_threadpool(ctx.service.ack, profile_id, nid)
        except NotFound as exc:
            await ws_send({"type": "error", "ack": nid, "detail": str(exc)})
            continue
        await ws_send({"type": "acked", "id": nid, "status": acked["status"]})


@router.websocket("/ws")
async def ws_stream(ws: WebSocket, access_token: str | None = None, after: int = 0) -> None:
    """The live stream over a WebSocket, with acks on the same socket.

    Auth: ``?access_token=``, ``Authorization: Bearer``, or a first message ``{"token": ..., "after": N}``;
    a bad or missing token closes with 4401. Unacked notifications after ``after`` are replayed, then
    new ones are pushed as ``{"type": "notification", "id": N, "notification": {...}}``; an idle
    socket gets ``{"type": "ping"}`` every heartbeat. The client sends ``{"ack": N}`` and gets
    ``{"type": "acked", "id": N}``. A client too slow to keep up is closed with 1013 and resumes
    with ``after`` = the last id it saw; so is one whose token expired or was revoked, or whose
    profile was erased (its reconnect is then refused with 4401).
    """
    ctx: ApiContext = ws.app.state.context
    await ws.accept()
    auth = await _ws_auth(ws, ctx, access_token, after)
    if auth is None:
        return
    claims, start = auth
    guard = guard_of(ctx)
    wait = guard.throttle(guard.customer(claims))
    if wait:
        await ws.close(WS_RATE_LIMITED, f"rate limit exceeded; retry in {retry_after(wait)} s")
        return
    live = await CustomerStream.open(ctx, claims, start)
    lock = asyncio.Lock()

    async def send(obj: dict[str, Any]) -> None:
        async with lock:  # the pusher and the ack replies share the socket
            await ws.send_text(_compact(obj))

    tasks: set[asyncio.Task[None]] = set()
    try:
        pusher = asyncio.create_task(_ws_push(send, live))
        tasks = {pusher, asyncio.create_task(_ws_acks(ws, send, ctx, claims.profile_id))}
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if pusher in done and pusher.exception() is None:
            await ws.close(WS_TRY_AGAIN, "stream ended: reconnect with after=<last id>")
    except WebSocketDisconnect:
        pass
    finally:
        live.close()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
