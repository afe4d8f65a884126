"""What the routes depend on: the gateway's context and who is calling (a scoped admin key or an app token).

Every dependency that lets a caller in also spends one token of the caller's rate limit and, for a
POST carrying an ``Idempotency-Key``, claims the key (api/idempotency.py keeps the answer), so no
route can forget either.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.dependencies.models import Dependant
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from api.schemas import DbStr
from beacons.remote import AppReport
from gateway.delivery.hub import StreamHub
from gateway.profiles.service import GatewayService
from gateway.security.auth import AuthError, AuthPolicy, Guard, Principal, Stored, retry_after
from gateway.security.tokens import Claims, TokenError

CORS_METHODS = ["GET", "POST", "PUT", "DELETE"]
CORS_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID", "X-API-Key"]
IDEMPOTENCY_SCOPE_KEY = "gateway.idempotency"
VERIFIED_SCOPE_KEY = "gateway.verified"
"""(credential, Principal or Claims): checked before the body was read (api/limits.py), not checked again."""
ADMIN_KEY_REQUIRED = "an admin API key is required (X-API-Key header)"
CUSTOMER_TOKEN_REQUIRED = "a customer app token is required (Authorization: Bearer ...)"

Audience = Literal["admin", "customer"]
"""Who a protected route is for: admin keys, or customers' app tokens."""


@dataclass
class ApiContext:
    service: GatewayService
    hub: StreamHub
    admin_key: str
    """The configured full-scope key; the guard keeps only its hash."""
    health: Callable[[], dict[str, Any]]
    heartbeat_s: float = 15.0
    stream_write_timeout_s: float = 30.0
    """A send the client has not taken in this long closes its connection (api/write_timeout.py); 0: never."""
    cors_origins: list[str] = field(default_factory=list)
    report_sightings: Callable[[int, list[AppReport]], dict[str, Any]] | None = None
    """The gateway's door for app-reported sightings: (profile id, reports) -> counts; raises Invalid."""
    cors_methods: list[str] = field(default_factory=lambda: list(CORS_METHODS))
    cors_headers: list[str] = field(default_factory=lambda: list(CORS_HEADERS))
    auth_policy: AuthPolicy = field(default_factory=AuthPolicy)
    """Rate limits and the idempotency window (no rate limit unless configured)."""
    guard: Guard | None = None
    """Built from the rest on first use (see guard_of)."""
    ready: Callable[[], dict[str, Any]] | None = None
    """Readiness (db reachable, migrations current) for /health/ready; None: derived from ``health``."""
    metrics: Callable[[], Awaitable[str]] | None = None
    """The Prometheus exposition text for /metrics (the runtime's counters); None: the API's own streams only."""
    presence: Callable[[], dict[str, Any]] | None = None
    """Who is in which zone now (called on the event loop, where the tracker lives); None: 503."""
    presence_profile: Callable[[int], list[dict[str, Any]]] | None = None
    """One enrolled profile's last zone switches with their evidence, newest first; None: 503."""
    devices: Any = None
    """The device registry (gateway.profiles.devices.DeviceRegistry) for /v1/devices; None: 503."""
    alarms: Any = None
    """Device alarms and the maintenance loop (gateway.telemetry.alarms.AlarmDesk); None: 503."""
    probes: dict[str, Any] = field(default_factory=dict)
    """Health probes under way (api/routers/health.py runs one of each kind at a time)."""


_guard_lock = threading.Lock()


def guard_of(ctx: ApiContext) -> Guard:
    if ctx.guard is None:
        with _guard_lock:
            if ctx.guard is None:
                svc = ctx.service
                ctx.guard = Guard(svc.db, svc.clock, ctx.admin_key, svc.signer.derive_key("idempotency"),
                                  ctx.auth_policy)
    return ctx.guard


def get_context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.context
    return ctx


Context = Annotated[ApiContext, Depends(get_context)]

_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="Admin API key")
_bearer = HTTPBearer(auto_error=False, description="Admin key or a customer's app token")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def missing_credential(audience: Audience) -> HTTPException:
    """The 401 for a request that carries no credential at all."""
    return _unauthorized(ADMIN_KEY_REQUIRED if audience == "admin" else CUSTOMER_TOKEN_REQUIRED)


async def credential_of(request: HTTPConnection, audience: Audience) -> str | None:
    """The credential a route for ``audience`` takes from this request, read by the same security
    schemes as the route's own dependency (so a check before the route agrees with it)."""
    bearer = await _bearer(request)
    if audience == "admin":
        return await _api_key(request) or (bearer.credentials if bearer else None)
    return bearer.credentials if bearer else request.query_params.get("access_token")


def verify_admin(ctx: ApiContext, given: str) -> Principal:
    """The admin key's principal; 401 for an unknown, revoked or expired key, 403 for an app token.
    May read the database: call it off the event loop."""
    try:
        return guard_of(ctx).admin(given)
    except AuthError as exc:
        if given.startswith("v1."):  # an app token in the wrong place: say so, once it is a real one
            try:
                ctx.service.verify_token(given)
            except TokenError:
                pass
            else:
                raise HTTPException(status.HTTP_403_FORBIDDEN,
                                    "a customer app token cannot call admin endpoints") from None
        raise _unauthorized(exc.detail) from None


def verify_customer(ctx: ApiContext, token: str) -> Claims:
    """The app token's claims; 401 if it is malformed, expired or revoked. May read the database."""
    try:
        return ctx.service.verify_token(token)
    except TokenError as exc:
        raise _unauthorized(str(exc)) from None


def verify(ctx: ApiContext, audience: Audience, given: str) -> Principal | Claims:
    return verify_admin(ctx, given) if audience == "admin" else verify_customer(ctx, given)


_Verified = TypeVar("_Verified", Principal, Claims)


def _verified(request: Request, given: str, kind: type[_Verified]) -> _Verified | None:
    """What api/limits.py found this credential to be before the body was read, if it looked."""
    seen = request.scope.get(VERIFIED_SCOPE_KEY)
    if seen is not None and seen[0] == given and isinstance(seen[1], kind):
        return seen[1]
    return None


_AUDIENCES: dict[Callable[..., Any], Audience] = {}


def audience_of(dependant: Dependant) -> Audience | None:
    """Whom a route is for, from the auth dependency among its dependencies; None: a public route."""
    for dep in dependant.dependencies:
        found = _AUDIENCES.get(dep.call) if dep.call is not None else None
        if found is None:
            found = audience_of(dep)
        if found is not None:
            return found
    return None


@dataclass
class IdempotencySlot:
    """Put in the ASGI scope by the middleware for a POST with an Idempotency-Key; filled in here."""

    key: str
    request_hash: str
    row_id: int | None = None
    profile_id: int | None = None
    decided: bool = False


class IdempotentReplay(Exception):
    """The stored answer to an earlier request with the same key and body (api/idempotency.py sends it)."""

    def __init__(self, stored: Stored) -> None:
        super().__init__("replay")
        self.stored = stored


def _admit(request: Request, guard: Guard, principal: Principal) -> None:
    """Rate limit, then the idempotency claim; called once the caller is known and allowed."""
    wait = guard.throttle(principal)
    if wait:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                            f"rate limit exceeded for this credential; retry in {retry_after(wait)} s",
                            headers={"Retry-After": retry_after(wait)})
    guard.maybe_purge()
    slot: IdempotencySlot | None = request.scope.get(IDEMPOTENCY_SCOPE_KEY)
    if slot is None or slot.decided:
        return
    slot.decided = True
    claim = guard.idempotency.claim(principal.id, request.method, request.url.path, slot.key, slot.request_hash,
                                    guard.clock.now())
    if claim.outcome == "replay":
        assert claim.stored is not None
        raise IdempotentReplay(claim.stored)
    if claim.outcome == "mismatch":
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            "this Idempotency-Key was already used with a different request; use a new key")
    if claim.outcome == "in_progress":
        raise HTTPException(status.HTTP_409_CONFLICT,
                            "a request with this Idempotency-Key is still being processed; retry shortly",
                            headers={"Retry-After": "1"})
    slot.row_id = claim.row_id
    owner = principal.profile_id if principal.profile_id is not None else request.path_params.get("profile_id")
    try:
        slot.profile_id = int(owner) if owner is not None else None
    except ValueError:
        slot.profile_id = None


def require_scope(*change: str, read: tuple[str, ...] = ("read",)) -> Callable[..., Principal]:
    """A dependency: GET needs one of the ``read`` scopes, any other method one of ``change``.

    ``admin`` passes everything. No credential, an unknown, revoked or expired key: 401. A valid
    customer app token, or a key without the scope: 403.
    """
    needs = change or ("write",)

    def dependency(request: Request, ctx: Context, key: Annotated[str | None, Depends(_api_key)],
                   bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
        given = key or (bearer.credentials if bearer else None)
        if not given:
            raise missing_credential("admin")
        principal = _verified(request, given, Principal) or verify_admin(ctx, given)
        wanted = read if request.method in ("GET", "HEAD") else needs
        if not principal.allows(wanted):
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"this API key lacks the scope for this call (one of: {', '.join(wanted)})")
        _admit(request, guard_of(ctx), principal)
        return principal

    _AUDIENCES[dependency] = "admin"
    return dependency


def require_customer(
    request: Request,
    ctx: Context,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    access_token: Annotated[DbStr | None, Query(description="For EventSource, which cannot set headers")] = None,
) -> Claims:
    token = bearer.credentials if bearer else access_token
    if not token:
        raise missing_credential("customer")
    claims = _verified(request, token, Claims) or verify_customer(ctx, token)
    guard = guard_of(ctx)
    _admit(request, guard, guard.customer(claims))
    return claims


_AUDIENCES[require_customer] = "customer"


Admin = Depends(require_scope())
"""The default for admin routes: GET needs ``read``, anything else ``write``."""
Read = Depends(require_scope("read", "campaigns", read=("read", "campaigns")))
"""``read`` or ``campaigns`` whatever the method (a dry run changes nothing)."""
Campaigns = Depends(require_scope("campaigns", read=("read", "campaigns")))
"""Changing campaigns needs ``campaigns``; reading them, ``read`` or ``campaigns``."""
Privacy = Depends(require_scope("privacy", read=("privacy",)))
"""Export and erasure: ``privacy`` only, even to read."""
KeyAdmin = Depends(require_scope("admin", read=("admin",)))
"""API key management: ``admin`` only."""
Customer = Annotated[Claims, Depends(require_customer)]
