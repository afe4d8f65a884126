"""Limits that hold before any route runs: the size of a request body, and a credential before a body is read.

FastAPI reads a JSON body whole and parses it on the event loop before a route's dependencies run, auth
included. Without these, an anonymous client could make the gateway buffer and parse any amount of JSON
while every other request (``/health/live`` too) waits. Both are pure ASGI middleware: a refusal costs
the request's headers, never its body.

- ``BodyLimit``: a declared ``Content-Length`` over the route's limit is a 413 at once; a body sent
  without one (chunked) is counted as it arrives and cut off at the limit, also with a 413.
- ``CredentialFirst``: a request with a body to a protected route is refused (401, as the route itself
  would) when it carries no credential, or one that is unknown, revoked or expired (checked off the event
  loop); what it found is left in the scope, so the route's dependency does not check it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import VERIFIED_SCOPE_KEY, ApiContext, Audience, audience_of, credential_of, missing_credential, verify
from api.problem import problem
from api.routes import Route, http_routes

CATALOGUE_IMPORT = ("PUT", "/v1/catalogue")
"""The one route allowed a bigger body: a whole catalogue at once (``[api] catalogue_max_body_bytes``)."""


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes its limit. FastAPI lets an HTTPException from the body
    read through to the app's handler (a problem+json 413); BodyLimit answers it for any other reader."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than this route accepts ({limit} bytes at most)")


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope["headers"] if k == name), None)


def _declared_length(scope: Scope) -> int | None:
    raw = _header(scope, b"content-length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _carries_body(scope: Scope) -> bool:
    """Whether the request says a body follows: a non-zero Content-Length, or chunked transfer."""
    declared = _declared_length(scope)
    return bool(declared) or _header(scope, b"transfer-encoding") is not None


class BodyLimit:
    """Refuses a request body over ``default`` bytes (or its route's own limit in ``per_route``)."""

    def __init__(self, app: ASGIApp, default: int, per_route: Mapping[tuple[str, str], int] | None = None) -> None:
        self.app, self.default, self.per_route = app, default, dict(per_route or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_route.get((scope["method"], scope["path"]), self.default)
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            too_large = BodyTooLarge(limit)
            await problem(413, str(too_large.detail))(scope, receive, send)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    if started:  # too late for a 413: the reader is told the client went away
                        return {"type": "http.disconnect"}
                    raise BodyTooLarge(limit)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge as exc:
            if started:
                raise
            await problem(413, str(exc.detail))(scope, receive, send)


class CredentialFirst:
    """Refuses a request with a body to a protected route before the body is read, when its credential
    is missing or not valid; public routes (health, metrics, docs) and unknown paths pass untouched."""

    def __init__(self, app: ASGIApp, ctx: ApiContext, api: FastAPI) -> None:
        self.app, self.ctx, self.api = app, ctx, api
        self._routes: list[tuple[Route, Audience | None]] | None = None

    def _audience(self, scope: Scope) -> Audience | None:
        """Whom the route this request reaches is for (the first route matching path and method, as the
        router picks it); None for a public route or no route at all."""
        path, method = scope["path"], scope["method"]
        if self._routes is None:  # built on the first request, once every router is in
            self._routes = [(r, audience_of(r.route.dependant) if getattr(r.route, "dependant", None) else None)
                            for r in http_routes(self.api)]
        for r, audience in self._routes:
            if method in r.methods and r.regex.match(path):
                return audience
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _carries_body(scope):
            await self.app(scope, receive, send)
            return
        audience = self._audience(scope)
        if audience is None:
            await self.app(scope, receive, send)
            return
        given = await credential_of(HTTPConnection(scope), audience)
        if not given:
            await self._refuse(missing_credential(audience), scope, receive, send)
            return
        try:
            found: Any = await run_in_threadpool(verify, self.ctx, audience, given)
        except HTTPException as exc:
            await self._refuse(exc, scope, receive, send)
            return
        except SQLAlchemyError:  # the database is away: the route's own dependency answers (503)
            found = None
        if found is not None:
            scope[VERIFIED_SCOPE_KEY] = (given, found)
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(exc: HTTPException, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(exc.headers) if exc.headers else None
        await problem(exc.status_code, str(exc.detail), headers=headers)(scope, receive, send)


def install(app: FastAPI, ctx: ApiContext) -> None:
    """The size limit outermost, so even a body with a valid credential is bounded; then the credential."""
    policy = ctx.auth_policy
    app.add_middleware(CredentialFirst, ctx=ctx, api=app)
    app.add_middleware(BodyLimit, default=policy.max_body_bytes,
                       per_route={CATALOGUE_IMPORT: policy.catalogue_max_body_bytes})
