"""The dashboard's routes: pages, the sign-in, the live stream, the calibration walk.

Every state-changing request (sign-in, sign-out, the walk's start, taps and stop) is a POST that must
come from this origin (``Origin``, else ``Referer``) and carry the session's synchronizer token (the
sign-in form, which has no session yet, a double-submit cookie). The session's key's scopes apply:
``write`` (or ``admin``) changes, ``read`` only sees, and pages offer only the buttons the key may use.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import mimetypes
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from api.dashboard import Dashboard
from api.dashboard.sessions import Session, digest, same_token
from api.dashboard.walks import NO_ZONE, WalkError, labels_csv, walk_labels
from api.deps import ApiContext, verify_admin
from gateway.presence.record import hour_name as trace_file_of

log = logging.getLogger("api.dashboard")
HERE = Path(__file__).parent
COOKIE = "gw_dash"
LOGIN_CSRF_COOKIE = "gw_dash_login"
PATH = "/dashboard"
MAX_FORM_BYTES = 4096
CHANGE_SCOPES = ("write",)
KEY_RECHECK_S = 60.0  # an open stream checks its session's key again this often
RECENT_S = 10.0  # a receiver that heard nobody for this long is shown as quiet

_env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                   trim_blocks=True, lstrip_blocks=True)
_env.filters["clock"] = lambda t: time.strftime("%H:%M:%S", time.gmtime(t))  # the labels' times, readable (UTC)


def _load_static() -> dict[str, tuple[bytes, bytes, str, str]]:
    """Every asset once, at import: (plain, gzip, media type, etag); they are small and never change."""
    out = {}
    for path in sorted((HERE / "static").iterdir()):
        if path.is_file():
            body = path.read_bytes()
            media = mimetypes.guess_type(path.name)[0] or "text/plain"
            out[path.name] = (body, gzip.compress(body, 9, mtime=0), media, hashlib.sha256(body).hexdigest()[:16])
    return out


STATIC = _load_static()
ASSET_VERSION = hashlib.sha256("".join(v[3] for v in STATIC.values()).encode()).hexdigest()[:10]


def _gzipped(request: Request) -> bool:
    return "gzip" in request.headers.get("accept-encoding", "")


def _page(request: Request, template: str, status: int = 200, **values: Any) -> Response:
    html = _env.get_template(template).render(v=ASSET_VERSION, **values).encode()
    headers = {"Cache-Control": "no-store", "Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
               "Referrer-Policy": "same-origin", "Vary": "Accept-Encoding"}
    if _gzipped(request):
        html = gzip.compress(html, 6, mtime=0)
        headers["Content-Encoding"] = "gzip"
    return Response(html, status, headers=headers, media_type="text/html; charset=utf-8")


CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def dashboard_of(request: Request) -> Dashboard:
    dash: Dashboard = request.app.state.dashboard
    return dash


def _ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.context
    return ctx


def _session(request: Request) -> Session | None:
    """The request's live session (cookie), its key checked again when it has one (may read the database:
    call it off the event loop). A revoked or expired key ends the session."""
    dash = dashboard_of(request)
    raw = request.cookies.get(COOKIE)
    session = dash.sessions.get(raw, dash.clock.now())
    if session is not None and session.key is not None:
        try:
            verify_admin(_ctx(request), session.key)
        except HTTPException:
            dash.sessions.close(raw)
            return None
    return session


async def _session_async(request: Request) -> Session | None:
    if request.cookies.get(COOKIE) is None:
        return None
    return await asyncio.to_thread(_session, request)


def _origin_ok(request: Request) -> bool:
    """A browser names the page a POST came from; it must be this server (scheme, host and port)."""
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin")
    if origin is None:
        referer = request.headers.get("referer")
        if referer is None:
            return False
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    return origin == own


async def _form(request: Request) -> dict[str, str]:
    """A urlencoded form (the pages post nothing else), each field once; a bad body is a 400 naming why."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise HTTPException(413, f"a dashboard form is at most {MAX_FORM_BYTES} bytes")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=10)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPException(400, f"the form could not be read: {exc}") from None
    repeated = sorted(k for k, vs in fields.items() if len(vs) > 1)
    if repeated:
        raise HTTPException(400, f"form field(s) given more than once: {', '.join(repeated)}")
    return {k: vs[0] for k, vs in fields.items()}


async def _changing(request: Request, *, scopes: tuple[str, ...] | None = CHANGE_SCOPES
                    ) -> tuple[Session, dict[str, str]]:
    """A state-changing request's session and form: signed in (401), same origin and the session's CSRF
    token (403), and the key's scope (403). ``scopes`` None: any signed-in key (sign-out)."""
    session = await _session_async(request)
    if session is None:
        raise HTTPException(401, "sign in to the dashboard first")
    if not _origin_ok(request):
        raise HTTPException(403, "refused: the request did not come from this dashboard (Origin)")
    form = await _form(request)
    if not same_token(form.get("csrf") or request.headers.get("x-csrf-token"), session.csrf):
        raise HTTPException(403, "refused: the form's CSRF token is missing or wrong; reload the page")
    if scopes is not None and not session.principal.allows(scopes):
        raise HTTPException(403, f"this key may only look (the walk needs one of: {', '.join(scopes)})")
    return session, form


def _signed_in(request: Request, raw_session: str, to: str = PATH) -> Response:
    dash = dashboard_of(request)
    response = RedirectResponse(to, 303)
    response.set_cookie(COOKIE, raw_session, max_age=int(dash.sessions.ttl_s), path=PATH, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    response.delete_cookie(LOGIN_CSRF_COOKIE, path=PATH)
    return response


def _login_page(request: Request, status: int = 200, error: str | None = None) -> Response:
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)
    response = _page(request, "login.html", status, csrf=token, error=error)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=3600, path=PATH, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


def _can_change(session: Session) -> bool:
    return session.principal.allows(CHANGE_SCOPES)


def live_view(ctx: ApiContext, dash: Dashboard) -> dict[str, Any]:
    """What the live page shows, from the runtime's presence service (counts only: no one is named) and
    the receivers' last heard. On the event loop, where presence is read."""
    now = dash.clock.now()
    counts: dict[str, dict[str, int]] = {z: {"enrolled": 0, "anonymous": 0, "total": 0} for z in dash.zone_names}
    available = ctx.presence is not None
    if ctx.presence is not None:
        for z in ctx.presence()["zones"]:
            counts[z["zone"]] = {"enrolled": z["enrolled"], "anonymous": z["anonymous"], "total": z["total"]}
    heard = dash.heard() if dash.heard is not None else {}
    receivers = []
    for r in dash.receivers:
        h = heard.get(r.id)
        ago = None if h is None else max(0.0, round(now - h["last"], 1))
        receivers.append({"id": r.id, "ago_s": ago, "tags": 0 if h is None else h["tags"],
                          "quiet": ago is None or ago > RECENT_S})
    return {"presence": available, "zones": [{"zone": z, **c} for z, c in counts.items()],
            "enrolled": sum(c["enrolled"] for c in counts.values()),
            "anonymous": sum(c["anonymous"] for c in counts.values()), "receivers": receivers}


router = APIRouter(prefix=PATH, include_in_schema=False)


@router.get("")
async def home(request: Request) -> Response:
    session = await _session_async(request)
    if session is None:
        return _login_page(request)
    dash = dashboard_of(request)
    return _page(request, "store.html", session=session, plan=dash.plan, live=live_view(_ctx(request), dash),
                 can_change=_can_change(session), active="store")


@router.get("/login")
async def login_link(request: Request, token: str = "") -> Response:
    dash = dashboard_of(request)
    if not token or not dash.tokens.redeem(token, dash.clock.now()):
        return _login_page(request, 401, "That sign-in link was already used or has expired. "
                                         "Sign in with an API key, or restart the gateway for a new link.")
    from gateway.security.auth import ALL_SCOPES, CONFIG_KEY_ID, Principal

    raw, _ = dash.sessions.open(Principal(f"key:{CONFIG_KEY_ID}", ALL_SCOPES, limit_key=f"key:{CONFIG_KEY_ID}"),
                                dash.clock.now())
    log.info("dashboard: signed in with the one-time link")
    return _signed_in(request, raw)


@router.post("/login")
async def login_key(request: Request) -> Response:
    if not _origin_ok(request):
        raise HTTPException(403, "refused: the request did not come from this dashboard (Origin)")
    form = await _form(request)
    if not same_token(form.get("csrf"), request.cookies.get(LOGIN_CSRF_COOKIE) or "\0"):
        raise HTTPException(403, "refused: the sign-in form's CSRF token is missing or wrong; reload the page")
    key = form.get("key", "").strip()
    if not key:
        return _login_page(request, 401, "Enter an admin API key.")
    ctx = _ctx(request)
    try:
        principal = await asyncio.to_thread(verify_admin, ctx, key)
    except HTTPException:
        log.info("dashboard: a sign-in with a key was refused")
        return _login_page(request, 401, "That key was refused: unknown, revoked or expired.")
    dash = dashboard_of(request)
    raw, _ = dash.sessions.open(principal, dash.clock.now(), key=key)
    log.info("dashboard: %s signed in (scopes %s)", principal.id, ",".join(sorted(principal.scopes)))
    return _signed_in(request, raw)


@router.post("/logout")
async def logout(request: Request) -> Response:
    await _changing(request, scopes=None)
    dashboard_of(request).sessions.close(request.cookies.get(COOKIE))
    response = RedirectResponse(PATH, 303)
    response.delete_cookie(COOKIE, path=PATH)
    return response


@router.get("/stream")
async def stream(request: Request) -> Response:
    """One SSE stream per page: the live view whenever it changed (looked at every ``stream_every_s``),
    a comment as heartbeat; it ends when the session does."""
    session = await _session_async(request)
    if session is None:
        raise HTTPException(401, "sign in to the dashboard first")
    dash, ctx = dashboard_of(request), _ctx(request)
    raw = request.cookies.get(COOKIE)

    async def events() -> AsyncIterator[str]:
        last, quiet, unchecked = "", 0.0, 0.0
        yield "retry: 3000\n\n"
        while not dash.closed and dash.sessions.get(raw, dash.clock.now()) is not None:
            if session.key is not None and unchecked >= KEY_RECHECK_S:  # a key revoked meanwhile ends it
                unchecked = 0.0
                if await _session_async(request) is None:
                    break
            body = json.dumps(live_view(ctx, dash), separators=(",", ":"))
            if body != last:
                last, quiet = body, 0.0
                yield f"event: live\ndata: {body}\n\n"
            elif quiet >= dash.heartbeat_s:
                quiet = 0.0
                yield ": heartbeat\n\n"
            await dash.wait(dash.stream_every_s)
            quiet += dash.stream_every_s
            unchecked += dash.stream_every_s
        if not dash.closed:
            yield "event: signed-out\ndata: {}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@router.get("/zones/{zone}")
async def zone_today(request: Request, zone: str) -> dict[str, Any]:
    """A zone's footfall and dwell today, from the figures service behind /v1/figures."""
    session = await _session_async(request)
    if session is None:
        raise HTTPException(401, "sign in to the dashboard first")
    dash, ctx = dashboard_of(request), _ctx(request)
    if zone not in dash.zone_names:
        raise HTTPException(404, f"no zone {zone!r} on this floor plan")
    figures = await asyncio.to_thread(ctx.service.figures, None, None, ctx.service.timezone, zone=zone,
                                      store=ctx.service.store_id)
    mine = figures.get("zones", {}).get(zone, {})
    return {"zone": zone, "day": figures.get("from"), "footfall": mine.get("footfall", 0),
            "unique_enrolled_visitors": mine.get("unique_enrolled_visitors", 0),
            "avg_dwell_s": mine.get("avg_dwell_s_all")}


# ------------------------------------------------------------------ the calibration walk


@router.get("/calibrate")
async def calibrate_page(request: Request, tag: str = "") -> Response:
    session = await _session_async(request)
    if session is None:
        return _login_page(request)
    dash = dashboard_of(request)
    walk = dash.walks.of(tag) if tag else next((w for w in dash.walks.all() if w.active), None)
    labels = walk_labels(walk) if walk is not None else []
    traces = trace_files(walk.started, walk.stopped) if walk is not None and walk.stopped is not None else []
    return _page(request, "calibrate.html", session=session, can_change=_can_change(session), walk=walk,
                 walks=dash.walks.all(), labels=labels, zones=dash.zone_names, record_dir=dash.record_dir,
                 traces=traces,
                 no_zone=NO_ZONE, error=dash.notes.pop(digest(request.cookies.get(COOKIE) or ""), None),
                 active="calibrate", now=dash.clock.now())


def trace_files(start: float, stop: float) -> list[str]:
    """The recorder's files (one per UTC hour) a walk from ``start`` to ``stop`` falls in."""
    first, last = int(start // 3600), int(stop // 3600)
    return [trace_file_of(hour * 3600.0) for hour in range(first, min(last, first + 24) + 1)]


def _back(tag: str) -> Response:
    return RedirectResponse(f"{PATH}/calibrate?tag={quote(tag, safe='')}", 303)


async def _walk_action(request: Request, action: str) -> Response:
    _, form = await _changing(request)
    dash = dashboard_of(request)
    tag = form.get("tag", "")
    now = dash.clock.now()
    try:
        if action == "start":
            walk = dash.walks.start(tag, now)
        elif action == "tap":
            walk = dash.walks.tap(tag, form.get("zone", ""), dash.zone_names, now)
        else:
            walk = dash.walks.stop(tag, now)
    except WalkError as exc:
        if request.headers.get("accept", "").startswith("application/json"):
            raise HTTPException(422, str(exc)) from None
        # Shown once by the page the redirect leads to; kept here, not in the URL, so no link can forge one.
        if len(dash.notes) >= dash.sessions.max_sessions:  # unread ones of sessions long gone
            dash.notes.clear()
        dash.notes[digest(request.cookies.get(COOKIE) or "")] = str(exc)
        return _back(tag.strip())
    return _back(walk.tag)


@router.post("/calibrate/start")
async def walk_start(request: Request) -> Response:
    return await _walk_action(request, "start")


@router.post("/calibrate/tap")
async def walk_tap(request: Request) -> Response:
    return await _walk_action(request, "tap")


@router.post("/calibrate/stop")
async def walk_stop(request: Request) -> Response:
    return await _walk_action(request, "stop")


@router.get("/calibrate/labels.csv")
async def walk_labels_csv(request: Request, tag: str) -> Response:
    """The walk's labels as ``gateway calibrate --labels`` reads them (beacon,start,end,zone)."""
    session = await _session_async(request)
    if session is None:
        raise HTTPException(401, "sign in to the dashboard first")
    walk = dashboard_of(request).walks.of(tag)
    if walk is None:
        raise HTTPException(404, f"no walk of {tag!r}")
    name = "".join(c if c.isalnum() else "-" for c in tag)[:60]
    return Response(labels_csv(walk_labels(walk)), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="labels-{name}.csv"',
                             "Cache-Control": "no-store"})


@router.get("/static/{name}")
async def static(request: Request, name: str) -> Response:
    asset = STATIC.get(name)
    if asset is None:
        raise HTTPException(404, "no such asset")
    plain, packed, media, etag = asset
    headers = {"ETag": f'"{etag}"', "Cache-Control": "public, max-age=86400", "Vary": "Accept-Encoding",
               "X-Content-Type-Options": "nosniff"}
    if request.headers.get("if-none-match") == f'"{etag}"':
        return Response(status_code=304, headers=headers)
    if _gzipped(request):
        headers["Content-Encoding"] = "gzip"
        return Response(packed, media_type=media, headers=headers)
    return Response(plain, media_type=media, headers=headers)


def install(app: FastAPI, dashboard: Dashboard) -> None:
    app.state.dashboard = dashboard
    app.include_router(router)
