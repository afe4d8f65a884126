"""The FastAPI application: routers per resource, problem+json errors, no business rules."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import conformance, idempotency, limits, openapi, write_timeout
from api.dashboard import Dashboard
from api.deps import ApiContext
from api.problem import PROBLEM as PROBLEM  # where the tests and callers have always found it
from api.problem import problem
from api.routers import (
    campaigns,
    carts,
    deliveries,
    devices,
    health,
    identifiers,
    insights,
    interactions,
    keys,
    maintenance,
    me,
    notifications,
    presence,
    privacy,
    profiles,
    push,
    rotating,
    sightings,
    ws,
)
from gateway.profiles.service import Conflict, Invalid, NotFound
from gateway.security.auth import install_log_redaction
from gateway.storage.db import describe, is_transient

log = logging.getLogger("api")

RETRY_AFTER_S = 5  # what a 503 for a database outage tells the client to wait


def create_app(ctx: ApiContext, dashboard: Dashboard | None = None) -> FastAPI:
    """``dashboard``: the staff pages under /dashboard (api/dashboard/), mounted when the runtime gives one."""
    app = FastAPI(title="Engagement gateway", version="0.1.0",
                  description="Profiles, carts and the customer notification stream of one store's gateway.")
    app.state.context = ctx
    conformance.install(app)  # before the routers: literal paths first, each scalar query parameter once
    idempotency.install(app, ctx)  # inside CORS, so refusals and replays carry CORS headers too
    limits.install(app, ctx)  # outside idempotency (which buffers a body), inside CORS
    install_log_redaction()  # uvicorn's access log would show ?access_token= (EventSource)
    if ctx.cors_origins:  # bearer tokens, not cookies: no credentials mode
        app.add_middleware(CORSMiddleware, allow_origins=ctx.cors_origins, allow_methods=ctx.cors_methods,
                           allow_headers=ctx.cors_headers, max_age=600,
                           expose_headers=["Retry-After", "Idempotent-Replayed", "Location", "WWW-Authenticate"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette's Allow names one route's methods; the path may have more
            headers = conformance.allow_headers(request, headers)
        return problem(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        unparsable = conformance.unparsable_body(exc)
        if unparsable is not None:
            return problem(400, unparsable)
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        detail = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        return problem(422, detail, errors=errors)

    @app.exception_handler(NotFound)
    async def not_found(_: Request, exc: NotFound) -> JSONResponse:
        return problem(404, str(exc))

    @app.exception_handler(Conflict)
    async def conflict(_: Request, exc: Conflict) -> JSONResponse:
        return problem(409, str(exc))

    @app.exception_handler(Invalid)
    async def invalid(_: Request, exc: Invalid) -> JSONResponse:
        return problem(422, str(exc))

    @app.exception_handler(SQLAlchemyError)
    async def database_error(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        """The database's state (locked, full, unreachable) is a 503 the client may retry, logged once per
        outage; any other database error is a bug: a 500 with one log line, no traceback per request."""
        if is_transient(exc):
            ctx.service.db.outage.failed(exc)
            return problem(503, "the database is unavailable right now; retry later",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        log.error("%s %s failed: %s", request.method, request.url.path, describe(exc))
        return problem(500, "the gateway failed to handle this request; it has been logged")

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        """A bug is still an RFC 9457 answer; the details go to the log, not to the caller."""
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return problem(500, "the gateway failed to handle this request; it has been logged")

    app.include_router(health.router)
    app.include_router(profiles.router, prefix="/v1")
    app.include_router(carts.router, prefix="/v1")
    app.include_router(me.router, prefix="/v1")
    app.include_router(ws.router, prefix="/v1")
    app.include_router(sightings.router, prefix="/v1")
    app.include_router(push.router, prefix="/v1")
    app.include_router(interactions.router, prefix="/v1")
    app.include_router(privacy.router, prefix="/v1")
    app.include_router(insights.router, prefix="/v1")
    app.include_router(campaigns.router, prefix="/v1")
    app.include_router(keys.router, prefix="/v1")
    app.include_router(devices.router, prefix="/v1")
    app.include_router(identifiers.router, prefix="/v1")
    app.include_router(rotating.router, prefix="/v1")
    app.include_router(presence.router, prefix="/v1")
    app.include_router(notifications.router, prefix="/v1")
    app.include_router(deliveries.router, prefix="/v1")
    app.include_router(maintenance.router, prefix="/v1")
    if dashboard is not None:
        from api.dashboard.mount import install as install_dashboard

        install_dashboard(app, dashboard)
    openapi.install(app)  # errors documented as problem+json, as the handlers above send them
    write_timeout.install(app, ctx.stream_write_timeout_s)  # outermost: it needs the server's own send
    return app
