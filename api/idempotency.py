"""``Idempotency-Key`` on creating POSTs (draft-ietf-httpapi-idempotency-key-header).

The middleware reads the body (to hash it) and puts a slot in the ASGI scope; the auth dependency,
once it knows the caller, claims the key in the database (api/deps.py). When the route answers 2xx
or 3xx, the answer is stored (sealed) *before* it is sent, so a retry that follows a lost response
finds it; any other answer releases the claim (a 4xx changed nothing, a 5xx may be retried).

- same key, same body, answered: the stored status and body, with ``Idempotent-Replayed: true``;
- same key, different body: 422; same key while the first is still running: 409 with Retry-After.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import IDEMPOTENCY_SCOPE_KEY, ApiContext, IdempotencySlot, IdempotentReplay, guard_of
from gateway.security.auth import IDEMPOTENCY_KEY_MAX, request_hash, valid_idempotency_key

log = logging.getLogger("api.idempotency")

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_BODY = 1 << 20  # creating requests are small; a bigger body with a key is refused, not buffered


def _problem(status: int, detail: str) -> JSONResponse:
    from http import HTTPStatus

    return JSONResponse({"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status,
                         "detail": detail}, status_code=status, media_type="application/problem+json")


def _owner(path: str, body: bytes, content_type: str | None, known: int | None) -> int | None:
    """The customer an answer is about, so erasing them removes it: the caller, the path's profile, or
    the new profile or ``profile_id`` in a JSON answer."""
    if known is not None:
        return known
    if not (content_type or "").startswith("application/json"):
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    value = doc.get("profile_id")
    if value is None and path.rstrip("/").endswith("/profiles"):
        value = doc.get("id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class IdempotencyMiddleware:
    def __init__(self, app: ASGIApp, ctx: ApiContext) -> None:
        self.app, self.ctx = app, ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        key = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"idempotency-key"), None)
        if key is None:
            await self.app(scope, receive, send)
            return
        if not valid_idempotency_key(key):
            await _problem(400, f"{HEADER} must be 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters")(
                scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                await _problem(413, f"a request with an {HEADER} may carry at most {MAX_BODY} bytes")(
                    scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        slot = IdempotencySlot(key, request_hash("POST", scope["path"], scope.get("query_string", b"").decode(
            "latin-1"), body))
        scope[IDEMPOTENCY_SCOPE_KEY] = slot
        replayed = False

        async def replay_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        held: list[Message] = []

        async def hold_send(message: Message) -> None:
            if slot.row_id is None:
                await send(message)
                return
            held.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await self._finish(slot, scope["path"], held)
                slot.row_id = None  # answered: anything after this passes straight through
                for m in held:
                    await send(m)

        try:
            await self.app(scope, replay_receive, hold_send)
        finally:
            if slot.row_id is not None:  # the route raised before answering
                await self._release(slot.row_id)

    async def _finish(self, slot: IdempotencySlot, path: str, held: list[Message]) -> None:
        assert slot.row_id is not None
        start = held[0]
        status = int(start["status"])
        if not 200 <= status < 400:
            await self._release(slot.row_id)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in start.get("headers", [])}
        body = b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body")
        content_type = headers.get("content-type")
        store = guard_of(self.ctx).idempotency
        try:
            await run_in_threadpool(store.complete, slot.row_id, status, content_type, body,
                                    _owner(path, body, content_type, slot.profile_id))
        except SQLAlchemyError as exc:  # e.g. the profile was erased meanwhile: keep nothing about it
            log.warning("idempotency answer not kept (%s): %s", type(exc).__name__, path)
            await self._release(slot.row_id)

    async def _release(self, row_id: int) -> None:
        store = guard_of(self.ctx).idempotency
        try:
            await run_in_threadpool(store.release, row_id)
        except SQLAlchemyError as exc:
            log.warning("idempotency claim not released (%s); it lapses after a minute", type(exc).__name__)


async def _replay(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, IdempotentReplay)
    s = exc.stored
    return Response(s.body, status_code=s.status, media_type=s.content_type, headers={REPLAYED: "true"})


def _document(app: FastAPI) -> None:
    """Name the header on every POST in the OpenAPI document."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = original()
        param = {"name": HEADER, "in": "header", "required": False,
                 "description": "Makes a retry safe: the first answer is replayed for 24 h to the same caller "
                                "with the same body (see docs/api-auth.md).",
                 "schema": {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX,
                            "pattern": "^[!-~]+$"}}
        for ops in doc.get("paths", {}).values():
            op = ops.get("post")
            if op is not None and not any(p.get("name") == HEADER for p in op.get("parameters", [])):
                op.setdefault("parameters", []).append(param)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI, ctx: ApiContext) -> None:
    app.add_middleware(IdempotencyMiddleware, ctx=ctx)
    app.add_exception_handler(IdempotentReplay, _replay)
    _document(app)
