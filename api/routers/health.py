from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import Context
from api.schemas import HealthOut

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}})
def health(ctx: Context) -> JSONResponse:
    """Each component's state; 503 when the database is down, so a supervisor can restart us."""
    body = ctx.health()
    return JSONResponse(body, status_code=503 if body["components"].get("db") != "ok" else 200)
