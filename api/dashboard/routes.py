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
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError

from api.dashboard import Dashboard
from api.dashboard.campaigns import (
    MAX_YAML_BYTES,
    Problem,
    as_yaml,
    campaign_of,
    campaign_rows,
    check_yaml,
    condition_rows,
    file_definition,
    starter_yaml,
)
from api.dashboard.feed import REASONS, first_name, first_names, item_row, view
from api.dashboard.sessions import Session, digest, same_token
from api.dashboard.walks import NO_ZONE, WalkError, labels_csv, walk_labels
from api.deps import ApiContext, verify_admin
from api.schemas import DB_ID_MAX
from gateway.errors import Conflict, Invalid, NotFound
from gateway.presence.record import hour_name as trace_file_of

log = logging.getLogger("api.dashboard")
HERE = Path(__file__).parent
COOKIE = "gw_dash"
LOGIN_CSRF_COOKIE = "gw_dash_login"
PATH = "/dashboard"
MAX_FORM_BYTES = 4096
CHANGE_SCOPES = ("write",)
VIEW_SCOPES = ("read",)  # what the API's GET routes take: a page shows no more than its key may read there
CAMPAIGN_VIEW_SCOPES = ("read", "campaigns")  # as GET /v1/campaigns: a campaigns key sees the campaign pages
MAX_YAML_FORM = 3 * MAX_YAML_BYTES + 256  # a campaign's YAML, urlencoded (at worst three bytes a byte)
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


class SignInFirst(Exception):
    """A page asked for without a session: the app answers with the sign-in form (mount.py's handler)."""


def view_scopes(path: str) -> tuple[str, ...]:
    """The scopes a page (or its data) needs, as its API route would."""
    return CAMPAIGN_VIEW_SCOPES if path.startswith(f"{PATH}/campaigns") else VIEW_SCOPES


def _may_view(request: Request, session: Session) -> None:
    wanted = view_scopes(request.url.path)
    if not session.principal.allows(wanted):
        raise HTTPException(403, f"this key may not see this page: it needs the {' or '.join(wanted)} scope")


async def page_session(request: Request) -> Session:
    """Every page's dependency: the signed-in session, or the sign-in form in the page's place; a 403 when
    the key's scopes would not read the same over the API."""
    session = await _session_async(request)
    if session is None:
        raise SignInFirst
    _may_view(request, session)
    return session


async def viewer(request: Request) -> Session:
    """The same check for a page's data (its stream, a CSV, a picture): 401 without a session, not a form."""
    session = await _session_async(request)
    if session is None:
        raise HTTPException(401, "sign in to the dashboard first")
    _may_view(request, session)
    return session


PageSession = Annotated[Session, Depends(page_session)]


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


async def _form(request: Request, max_bytes: int = MAX_FORM_BYTES) -> dict[str, str]:
    """A urlencoded form (the pages post nothing else), each field once; a bad body is a 400 naming why."""
    body = await request.body()
    if len(body) > max_bytes:
        raise HTTPException(413, f"a dashboard form is at most {max_bytes} bytes")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=10)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPException(400, f"the form could not be read: {exc}") from None
    repeated = sorted(k for k, vs in fields.items() if len(vs) > 1)
    if repeated:
        raise HTTPException(400, f"form field(s) given more than once: {', '.join(repeated)}")
    return {k: vs[0] for k, vs in fields.items()}


async def _changing(request: Request, *, scopes: tuple[str, ...] | None = CHANGE_SCOPES,
                    max_bytes: int = MAX_FORM_BYTES) -> tuple[Session, dict[str, str]]:
    """A state-changing request's session and form: signed in (401), same origin and the session's CSRF
    token (403), and the key's scope (403). ``scopes`` None: any signed-in key (sign-out)."""
    session = await _session_async(request)
    if session is None:
        raise HTTPException(401, "sign in to the dashboard first")
    if not _origin_ok(request):
        raise HTTPException(403, "refused: the request did not come from this dashboard (Origin)")
    form = await _form(request, max_bytes)
    if not same_token(form.get("csrf") or request.headers.get("x-csrf-token"), session.csrf):
        raise HTTPException(403, "refused: the form's CSRF token is missing or wrong; reload the page")
    if scopes is not None and not session.principal.allows(scopes):
        raise HTTPException(403, f"this key may only look (this needs one of: {', '.join(scopes)})")
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


def live_view(ctx: ApiContext, dash: Dashboard, presence: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the live page shows, from the runtime's presence service (counts only: no one is named) and
    the receivers' last heard. On the event loop, where presence is read."""
    now = dash.clock.now()
    counts: dict[str, dict[str, int]] = {z: {"enrolled": 0, "anonymous": 0, "total": 0} for z in dash.zone_names}
    available = ctx.presence is not None
    if presence is None and ctx.presence is not None:
        presence = ctx.presence()
    if presence is not None:
        for z in presence["zones"]:
            counts[z["zone"]] = {"enrolled": z["enrolled"], "anonymous": z["anonymous"], "total": z["total"]}
    heard = dash.heard() if dash.heard is not None else {}
    receivers = []
    for r in dash.receivers:
        h = heard.get(r.id) or {}
        last = h.get("last")
        ago = None if last is None else max(0.0, round(now - last, 1))
        receivers.append({"id": r.id, "ago_s": ago, "tags": h.get("tags", 0),
                          "adverts_per_s": h.get("adverts_per_s", 0.0), "quiet": ago is None or ago > RECENT_S})
    return {"presence": available, "zones": [{"zone": z, **c} for z, c in counts.items()],
            "enrolled": sum(c["enrolled"] for c in counts.values()),
            "anonymous": sum(c["anonymous"] for c in counts.values()), "receivers": receivers}


async def store_view(ctx: ApiContext, dash: Dashboard) -> dict[str, Any]:
    """The live view, and, when the shop turned it on (``[dashboard] show_customers``), per zone the first
    names of the enrolled customers there who consented to ``show_purpose``; nobody else is named."""
    presence = ctx.presence() if ctx.presence is not None else None
    out = live_view(ctx, dash, presence)
    if dash.names_purpose is not None:
        zones = presence["zones"] if presence is not None else []
        ids = {pid for z in zones for pid in z["profiles"]}
        names = await asyncio.to_thread(ctx.service.consenting_names, ids, dash.names_purpose) if ids else {}
        out["people"] = {z["zone"]: sorted(first_name(names[p]) or f"customer #{p}" for p in z["profiles"]
                                           if p in names) for z in zones}
    return out


router = APIRouter(prefix=PATH, include_in_schema=False)


@router.get("")
async def home(request: Request, session: PageSession) -> Response:
    dash = dashboard_of(request)
    return _page(request, "store.html", session=session, plan=dash.plan, live=await store_view(_ctx(request), dash),
                 image_v=dash.floor_image.etag if dash.floor_image is not None else "",
                 named=dash.names_purpose is not None, can_change=_can_change(session), active="store")


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
    if not principal.allows(CAMPAIGN_VIEW_SCOPES):  # privacy or admin-of-keys only: nothing here to see
        log.info("dashboard: a sign-in with a key without read scope was refused")
        return _login_page(request, 403, "That key cannot open the dashboard: it needs the read scope "
                                         "(or campaigns, for the campaign pages).")
    dash = dashboard_of(request)
    raw, _ = dash.sessions.open(principal, dash.clock.now(), key=key)
    log.info("dashboard: %s signed in (scopes %s)", principal.id, ",".join(sorted(principal.scopes)))
    return _signed_in(request, raw, PATH if principal.allows(VIEW_SCOPES) else f"{PATH}/campaigns")


@router.post("/logout")
async def logout(request: Request) -> Response:
    await _changing(request, scopes=None)
    dashboard_of(request).sessions.close(request.cookies.get(COOKIE))
    response = RedirectResponse(PATH, 303)
    response.delete_cookie(COOKIE, path=PATH)
    return response


@router.get("/stream")
async def stream(request: Request, after: int | None = None) -> Response:
    """One SSE stream per page: the store page's live view whenever it changed (looked at every
    ``stream_every_s``), or, given ``after`` (the decision feed's page), each decision after that sequence
    number as it is made; a comment as heartbeat; it ends when the session does."""
    session = await viewer(request)
    dash, ctx = dashboard_of(request), _ctx(request)

    async def decisions(seq: int) -> tuple[int, str | None]:
        items = dash.feed.after(seq)
        if not items:
            return seq, None
        names = await asyncio.to_thread(first_names, ctx.service.get_profile, (i.profile_id for i in items))
        shown = [v for v in (view(item_row(i), names, ctx.service.timezone) for i in items) if v is not None]
        body = json.dumps(shown, separators=(",", ":")) if shown else None
        return items[-1].seq, body

    seq = after
    last = ""

    async def next_event() -> tuple[str, str] | None:
        nonlocal seq, last
        if seq is None:
            body = await dash.shared(lambda: store_view(ctx, dash))
            if body == last:
                return None
            last = body
            return "live", body
        seq, shown = await decisions(seq)
        return None if shown is None else ("decisions", shown)

    return session_stream(request, session, next_event)


def session_stream(request: Request, session: Session, next_event: Callable[[], Awaitable[tuple[str, str] | None]]
                   ) -> StreamingResponse:
    """A page's one SSE stream: ``next_event()`` (an event name and its data, or None for nothing new) every
    ``stream_every_s``, a heartbeat comment when quiet, and the end when the session does (signed out,
    expired, its key revoked: checked again every ``KEY_RECHECK_S``) or the gateway stops."""
    dash = dashboard_of(request)
    raw = request.cookies.get(COOKIE)

    async def events() -> AsyncIterator[str]:
        quiet, unchecked = 0.0, 0.0
        yield "retry: 3000\n\n"
        while not dash.closed and dash.sessions.get(raw, dash.clock.now()) is not None:
            if session.key is not None and unchecked >= KEY_RECHECK_S:  # a key revoked meanwhile ends it
                unchecked = 0.0
                if await _session_async(request) is None:
                    break
            event = await next_event()
            if event is not None:
                quiet = 0.0
                yield f"event: {event[0]}\ndata: {event[1]}\n\n"
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


@router.get("/floor-image")
async def floor_image(request: Request) -> Response:
    """The picture under the floor plan, to signed-in staff only (a shop's layout is not for the street)."""
    await viewer(request)
    image = dashboard_of(request).floor_image
    if image is None:
        raise HTTPException(404, "no floor image is configured ([dashboard] floor_image)")
    etag = f'"{image.etag}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff",
               "Content-Security-Policy": "default-src 'none'"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(image.body, media_type=image.media_type, headers=headers)


@router.get("/zones/{zone}")
async def zone_today(request: Request, zone: str) -> dict[str, Any]:
    """A zone's footfall and dwell today, from the figures service behind /v1/figures."""
    await viewer(request)
    dash, ctx = dashboard_of(request), _ctx(request)
    if zone not in dash.zone_names:
        raise HTTPException(404, f"no zone {zone!r} on this floor plan")
    figures = await asyncio.to_thread(ctx.service.figures, None, None, ctx.service.timezone, zone=zone,
                                      store=ctx.service.store_id)
    mine = figures.get("zones", {}).get(zone, {})
    return {"zone": zone, "day": figures.get("from"), "footfall": mine.get("footfall", 0),
            "unique_enrolled_visitors": mine.get("unique_enrolled_visitors", 0),
            "avg_dwell_s": mine.get("avg_dwell_s_all")}


# ------------------------------------------------------------------ the decision feed

FEED_SHOWN = 50  # decisions a page is drawn with (from the table); the stream adds the new ones on top


def _feed_rows(ctx: ApiContext) -> list[dict[str, Any]]:
    """The latest decisions from the table, named (off the loop)."""
    rows = ctx.service.recent_decisions(FEED_SHOWN)
    names = first_names(ctx.service.get_profile, (r["profile_id"] for r in rows))
    return [v for v in (view(r, names, ctx.service.timezone) for r in rows) if v is not None]


@router.get("/decisions")
async def decisions_page(request: Request, session: PageSession) -> Response:
    dash, ctx = dashboard_of(request), _ctx(request)
    start = dash.feed.start_for_page()  # before the table is read: nothing decided meanwhile is missed
    rows = await asyncio.to_thread(_feed_rows, ctx)
    return _page(request, "decisions.html", session=session, rows=rows, after=start, active="decisions")


@router.get("/decisions/explain")
async def explain_page(request: Request, session: PageSession, profile: Annotated[int, Query(ge=1, le=DB_ID_MAX)],
                       campaign: Annotated[str, Query(max_length=128)],
                       key: Annotated[str, Query(max_length=256)]) -> Response:
    """Why one decision went as it did: the engine's recorded verdict (GatewayService.decisions, the service
    behind GET /v1/profiles/{id}/decisions) beside the campaign's conditions as written."""
    ctx = _ctx(request)

    def load() -> tuple[dict[str, Any] | None, Any]:
        try:
            found = ctx.service.decisions(profile, campaign, 500)
        except NotFound:
            return None, None
        row = next((r for r in found if r["event_key"] == key), None)
        if row is None:
            return None, None
        names = first_names(ctx.service.get_profile, [profile])
        shown = view({**row, "profile_id": profile}, names, ctx.service.timezone)
        return shown, campaign_of(ctx.service, campaign)

    decision, camp = await asyncio.to_thread(load)
    if decision is None:
        raise HTTPException(404, "no such decision recorded (its profile may have been erased)")
    failing = decision["detail"] if decision["reason"] == "condition_false" else None
    rows = condition_rows(camp.conditions if camp is not None else None, failing)
    dry = {"profile": profile, "kind": decision["event"], "zone": decision.get("zone") or ""}
    return _page(request, "explain.html", session=session, d=decision, campaign=camp, conditions=rows,
                 dry=dry, active="decisions")


# ------------------------------------------------------------------ campaigns

CAMPAIGN_SCOPES = ("campaigns",)
CAMPAIGN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def _campaign_id(cid: str) -> str:
    if not CAMPAIGN_ID.match(cid):
        raise HTTPException(404, "no such campaign")
    return cid


def _note(request: Request, text: str) -> None:
    """A message the session's next page shows once (kept here, not in the URL)."""
    dash = dashboard_of(request)
    if len(dash.notes) >= dash.sessions.max_sessions:
        dash.notes.clear()
    dash.notes[digest(request.cookies.get(COOKIE) or "")] = text


def _take_note(request: Request) -> str | None:
    return dashboard_of(request).notes.pop(digest(request.cookies.get(COOKIE) or ""), None)


@router.get("/campaigns")
async def campaigns_page(request: Request, session: PageSession) -> Response:
    dash, ctx = dashboard_of(request), _ctx(request)
    rows = await asyncio.to_thread(campaign_rows, ctx.service, dash.clock.now())
    return _page(request, "campaigns.html", session=session, rows=rows, note=_take_note(request),
                 can_edit=session.principal.allows(CAMPAIGN_SCOPES), active="campaigns")


@router.get("/campaigns/dry-run")
async def dry_run_page(request: Request, session: PageSession,
                       profile: Annotated[int | None, Query(ge=1, le=DB_ID_MAX)] = None,
                       kind: Annotated[str, Query(max_length=32)] = "",
                       zone: Annotated[str, Query(max_length=64)] = "",
                       dwell_s: Annotated[str, Query(max_length=32)] = "0",
                       facts: Annotated[str, Query(max_length=MAX_FACTS_TEXT)] = "",
                       q: Annotated[str, Query(max_length=128)] = "") -> Response:
    """Would this customer get it now, and if not, why: GatewayService.dry_run (the service behind
    POST /v1/decisions/dry-run), a read that sends and stores nothing."""
    dash, ctx = dashboard_of(request), _ctx(request)
    from api.schemas import SyntheticEvent
    from gateway.campaigns.model import TRIGGERS
    from gateway.profiles.resources import list_profiles

    error, outcomes = None, None
    if profile is not None and kind:
        try:
            extra = event_facts(facts)
            event = SyntheticEvent.model_validate({"kind": kind, "zone": zone or None, "dwell_s": float(dwell_s),
                                                   "facts": extra})
        except (ValidationError, ValueError) as exc:
            error = f"the synthetic event is not valid: {_first_error(exc)}"
        else:
            try:
                outcomes = await asyncio.to_thread(ctx.service.dry_run, profile, event.kind, event.zone,
                                                   float(event.dwell_s), dict(event.facts))
            except (NotFound, Invalid) as exc:
                error = str(exc)
    people, _ = await asyncio.to_thread(list_profiles, ctx.service, q=q.strip() or None, limit=50)
    choices = [{"id": p["id"], "label": f"{first_name(p['name']) or 'customer'} · #{p['id']}"
                + (f" · {p['external_id']}" if p["external_id"] else "")} for p in people]
    return _page(request, "dryrun.html", session=session, choices=choices, triggers=TRIGGERS,
                 zones=dash.zone_names,
                 chosen={"profile": profile, "kind": kind, "zone": zone, "dwell_s": dwell_s, "facts": facts, "q": q},
                 outcomes=outcomes, error=error, reasons=REASONS, active="campaigns")


MAX_FACTS_TEXT = 4096


def event_facts(text: str) -> dict[str, Any]:
    """The dry run's extra facts as the page takes them: YAML (or JSON, which is YAML) mapping names to what
    the engine would read, e.g. ``device: {kind: ebike}`` and ``reading: {battery_pct: 12}``. A problem is a
    ValueError naming its line."""
    if not text.strip():
        return {}
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ValueError(f"facts: {where}{getattr(exc, 'problem', None) or 'not YAML'}") from exc
    if not isinstance(doc, dict) or not all(isinstance(k, str) for k in doc):
        raise ValueError("facts: expected a mapping of names to values, e.g. reading: {battery_pct: 12}")
    return doc


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        e = exc.errors()[0]
        return f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
    return str(exc)


async def _editor(request: Request, session: Session, cid: str, text: str | None = None,
                  problems: list[Problem] | None = None, status: int = 200) -> Response:
    dash, ctx = dashboard_of(request), _ctx(request)

    may_edit = session.principal.allows(CAMPAIGN_SCOPES)

    def load() -> tuple[str, str | None, bool]:
        if cid in ctx.service.file_campaigns:
            found = file_definition(dash.campaigns_dir, cid)
            if found is None:
                return as_yaml(ctx.service.get_campaign(cid)), "a campaign file", False
            return as_yaml(found[1]), found[0], False
        try:
            return as_yaml(ctx.service.get_campaign(cid)["definition"]), None, False
        except NotFound:
            if not may_edit:
                raise
            return starter_yaml(cid, dash.zone_names), None, True  # a new one: saved by put_campaign

    try:
        shown, file, new = await asyncio.to_thread(load)
    except NotFound:
        raise HTTPException(404, f"no campaign {cid!r}") from None
    return _page(request, "campaign.html", status, session=session, cid=cid, text=shown if text is None else text,
                 file=file, new=new, problems=problems or [], note=_take_note(request),
                 can_edit=file is None and may_edit, active="campaigns")


@router.get("/campaigns/new")
async def campaign_new(request: Request, session: PageSession,
                       id: Annotated[str, Query(max_length=200)] = "") -> Response:
    """The new campaign's id, then its editor (a starter YAML; nothing exists until it is saved)."""
    cid = id.strip()
    if not CAMPAIGN_ID.match(cid):
        _note(request, "A campaign id is 1-128 letters, digits, '-', '_' or '.'.")
        return RedirectResponse(f"{PATH}/campaigns", 303)
    return RedirectResponse(f"{PATH}/campaigns/{quote(cid, safe='')}", 303)


@router.get("/campaigns/{cid}")
async def campaign_page(request: Request, session: PageSession, cid: str) -> Response:
    return await _editor(request, session, _campaign_id(cid))


@router.post("/campaigns/{cid}/check")
async def campaign_check(request: Request, cid: str) -> dict[str, Any]:
    """The YAML's problems by line, before anything is saved (the page asks as you type)."""
    _, form = await _changing(request, scopes=CAMPAIGN_SCOPES, max_bytes=MAX_YAML_FORM)
    _, found = check_yaml(form.get("yaml", ""), _campaign_id(cid))
    return {"valid": not found, "problems": [{"line": p.line, "message": p.message} for p in found]}


@router.post("/campaigns/{cid}/save")
async def campaign_save(request: Request, cid: str) -> Response:
    session, form = await _changing(request, scopes=CAMPAIGN_SCOPES, max_bytes=MAX_YAML_FORM)
    cid, text = _campaign_id(cid), form.get("yaml", "")
    ctx = _ctx(request)
    if cid in ctx.service.file_campaigns:
        raise HTTPException(409, f"campaign {cid!r} is defined in a file; edit the file instead")
    definition, found = check_yaml(text, cid)
    if definition is not None:
        try:
            await asyncio.to_thread(ctx.service.put_campaign, cid, definition)
        except (Invalid, Conflict) as exc:
            found = [Problem(None, str(exc))]
    if found:  # nothing saved: the same text again, with its problems
        return await _editor(request, session, cid, text, found, 422)
    _note(request, f"Saved {cid}.")
    return RedirectResponse(f"{PATH}/campaigns/{quote(cid, safe='')}", 303)


async def _toggle(request: Request, cid: str, enabled: bool) -> Response:
    await _changing(request, scopes=CAMPAIGN_SCOPES)
    ctx = _ctx(request)
    try:
        await asyncio.to_thread(ctx.service.set_campaign_enabled, _campaign_id(cid), enabled)
        _note(request, f"{cid} is {'on' if enabled else 'off'}.")
    except (Conflict, NotFound, Invalid) as exc:
        _note(request, str(exc))
    return RedirectResponse(f"{PATH}/campaigns", 303)


@router.post("/campaigns/{cid}/delete")
async def campaign_delete(request: Request, cid: str) -> Response:
    """Delete an API campaign (``GatewayService.delete_campaign``, as ``DELETE /v1/campaigns/{id}``). The form
    carries ``confirm`` = the campaign's id, typed or ticked on its page, so a stray tap deletes nothing."""
    _, form = await _changing(request, scopes=CAMPAIGN_SCOPES)
    cid = _campaign_id(cid)
    if form.get("confirm") != cid:
        _note(request, f"Not deleted: confirm by ticking the box beside Delete for {cid}.")
        return RedirectResponse(f"{PATH}/campaigns/{quote(cid, safe='')}", 303)
    try:
        await asyncio.to_thread(_ctx(request).service.delete_campaign, cid)
    except (Conflict, NotFound) as exc:
        _note(request, str(exc))
        return RedirectResponse(f"{PATH}/campaigns", 303)
    _note(request, f"Deleted {cid}.")
    return RedirectResponse(f"{PATH}/campaigns", 303)


@router.post("/campaigns/{cid}/enable")
async def campaign_enable(request: Request, cid: str) -> Response:
    return await _toggle(request, cid, True)


@router.post("/campaigns/{cid}/disable")
async def campaign_disable(request: Request, cid: str) -> Response:
    return await _toggle(request, cid, False)


# ------------------------------------------------------------------ the calibration walk


@router.get("/calibrate")
async def calibrate_page(request: Request, session: PageSession, tag: str = "") -> Response:
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
    await viewer(request)
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
