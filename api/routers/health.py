"""Operations: liveness, readiness and Prometheus metrics, unauthenticated and unversioned.

``/health/live`` says only that the process answers (a supervisor restarts it when it does not);
``/health/ready`` says whether it should get traffic (a write could start: the database is reachable,
not locked by another process, not full; schema migrated);
``/health`` keeps the per-component view. None of them reveals data, so none needs a key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.deps import ApiContext, Context
from api.schemas import HealthOut, LiveOut, ReadyOut
from gateway.health import DbState, Health, Liveness, Readiness, SchemaState
from gateway.metrics import CONTENT_TYPE, hub_families, render

router = APIRouter(tags=["operations"])
PROBE_S = 2.0
"""How long a health answer waits for the database's probe; past it the database counts as down."""


async def _probe(ctx: ApiContext, name: str, probe: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """The probe off the event loop, bounded in time, and one at a time per kind: a supervisor polling
    a hung database gets its answer in PROBE_S and never piles up blocked threads. None: timed out."""
    running: asyncio.Future[dict[str, Any]] | None = ctx.probes.get(name)
    if running is None or running.done():
        running = ctx.probes[name] = asyncio.ensure_future(run_in_threadpool(probe))
    try:
        return await asyncio.wait_for(asyncio.shield(running), PROBE_S)
    except TimeoutError:
        return None


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}})
async def health(ctx: Context) -> JSONResponse:
    """Each component's state; 503 unless the database can take a write now (locked, full or down:
    503), so a supervisor can act."""
    body = await _probe(ctx, "health", ctx.health)
    if body is None:
        body = {"status": Health.DEGRADED, "components": {"db": DbState.TIMEOUT}}
    return JSONResponse(body, status_code=503 if body["components"].get("db") != DbState.OK else 200)


@router.get("/health/live", response_model=LiveOut)
async def live() -> dict[str, str]:
    """The process is up and its event loop answers (nothing else is checked: no dependency can fail it)."""
    return {"status": Liveness.ALIVE}


@router.get("/health/ready", response_model=ReadyOut,
            responses={503: {"model": ReadyOut, "description": "Not ready: database down or migrations behind"}})
async def ready(ctx: Context) -> JSONResponse:
    """Ready for traffic: the database answers and its schema is at this version's migrations; else 503."""
    if ctx.ready is not None:
        body = await _probe(ctx, "ready", ctx.ready)
    else:
        seen = await _probe(ctx, "health", ctx.health)
        db = seen["components"].get("db") if seen is not None else DbState.TIMEOUT
        body = {"status": Readiness.READY if db == DbState.OK else Readiness.NOT_READY,
                "components": {"db": db or DbState.UNKNOWN}}
    if body is None:
        body = {"status": Readiness.NOT_READY, "components": {"db": DbState.TIMEOUT, "migrations": SchemaState.UNKNOWN}}
    ready = body["status"] == Readiness.READY
    return JSONResponse(body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "5"})


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format 0.0.4"}})
async def metrics(ctx: Context) -> Response:
    """Counters, gauges and latency histograms in the Prometheus text format (see docs/operations.md)."""
    if ctx.metrics is not None:
        return Response(await ctx.metrics(), media_type=CONTENT_TYPE)
    # An API without a runtime behind it (embedded, tests): what the API itself knows, its streams.
    return Response(render(hub_families(ctx.hub)), media_type=CONTENT_TYPE)
