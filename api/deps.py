"""What the routes depend on: the gateway's context and who is calling (admin key or app token)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from beacons.remote import AppReport
from gateway.channels import StreamHub
from gateway.service import GatewayService
from gateway.tokens import Claims, TokenError


@dataclass
class ApiContext:
    service: GatewayService
    hub: StreamHub
    admin_key: str
    health: Callable[[], dict[str, Any]]
    heartbeat_s: float = 15.0
    cors_origins: list[str] = field(default_factory=list)
    report_sightings: Callable[[int, list[AppReport]], dict[str, Any]] | None = None
    """The gateway's door for app-reported sightings: (profile id, reports) -> counts; raises Invalid."""
    ready: Callable[[], dict[str, Any]] | None = None
    """Readiness (db reachable, migrations current) for /health/ready; None: derived from ``health``."""
    metrics: Callable[[], Awaitable[str]] | None = None
    """The Prometheus exposition text for /metrics (the runtime's counters); None: the API's own streams only."""
    presence: Callable[[], dict[str, Any]] | None = None
    """Who is in which zone now (called on the event loop, where the tracker lives); None: 503."""
    devices: Any = None
    """The device registry (devices.registry.DeviceRegistry) for /v1/devices; None: 503."""
    alarms: Any = None
    """Device alarms and the maintenance loop (gateway.alarms.AlarmDesk); None: 503."""


def get_context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.context
    return ctx


Context = Annotated[ApiContext, Depends(get_context)]

_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="Admin API key")
_bearer = HTTPBearer(auto_error=False, description="Admin key or a customer's app token")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def require_admin(ctx: Context, key: Annotated[str | None, Depends(_api_key)],
                  bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    given = key or (bearer.credentials if bearer else None)
    if not given:
        raise _unauthorized("an admin API key is required (X-API-Key header)")
    if not hmac.compare_digest(given.encode(), ctx.admin_key.encode()):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this key is not an admin key")


def require_customer(
    ctx: Context,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    access_token: Annotated[str | None, Query(description="For EventSource, which cannot set headers")] = None,
) -> Claims:
    token = bearer.credentials if bearer else access_token
    if not token:
        raise _unauthorized("a customer app token is required (Authorization: Bearer ...)")
    try:
        return ctx.service.verify_token(token)
    except TokenError as exc:
        raise _unauthorized(str(exc)) from None


Admin = Depends(require_admin)
Customer = Annotated[Claims, Depends(require_customer)]
