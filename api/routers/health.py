"""Operations: liveness, readiness and Prometheus metrics, unauthenticated and unversioned.

``/health/live`` says only that the process answers (a supervisor restarts it when it does not);
``/health/ready`` says whether it should get traffic (database reachable, schema migrated);
``/health`` keeps the per-component view. None of them reveals data, so none needs a key.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.deps import Context
from api.schemas import HealthOut, LiveOut, ReadyOut
from gateway.metrics import CONTENT_TYPE, hub_families, render

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}})
def health(ctx: Context) -> JSONResponse:
    """Each component's state; 503 when the database is down, so a supervisor can restart us."""
    body = ctx.health()
    return JSONResponse(body, status_code=503 if body["components"].get("db") != "ok" else 200)


@router.get("/health/live", response_model=LiveOut)
async def live() -> dict[str, str]:
    """The process is up and its event loop answers (nothing else is checked: no dependency can fail it)."""
    return {"status": "alive"}


@router.get("/health/ready", response_model=ReadyOut,
            responses={503: {"model": ReadyOut, "description": "Not ready: database down or migrations behind"}})
async def ready(ctx: Context) -> JSONResponse:
    """Ready for traffic: the database answers and its schema is at this version's migrations; else 503."""
    if ctx.ready is not None:
        body = await run_in_threadpool(ctx.ready)
    else:
        db = (await run_in_threadpool(ctx.health))["components"].get("db")
        body = {"status": "ready" if db == "ok" else "not_ready", "components": {"db": db or "unknown"}}
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format 0.0.4"}})
async def metrics(ctx: Context) -> Response:
    """Counters, gauges and latency histograms in the Prometheus text format (see docs/operations.md)."""
    if ctx.metrics is not None:
        return Response(await ctx.metrics(), media_type=CONTENT_TYPE)
    # An API without a runtime behind it (embedded, tests): what the API itself knows, its streams.
    return Response(render(hub_families(ctx.hub)), media_type=CONTENT_TYPE)
