"""Staff-facing reads: why a campaign did or did not fire, what would happen, and the figures."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from api.deps import Admin, Context, Read
from api.schemas import DB_ID_MAX, DbStr, DecisionOut, DryRunIn, DryRunOutcome, IsoDate

router = APIRouter(tags=["insights"])  # scopes per route: a dry run is a read


@router.get("/profiles/{profile_id}/decisions", response_model=list[DecisionOut], dependencies=[Admin])
def decisions(profile_id: Annotated[int, Path(ge=1, le=DB_ID_MAX)], ctx: Context,
              campaign: Annotated[DbStr | None, Query(max_length=128)] = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[dict[str, Any]]:
    """Why: every evaluation of a campaign for this customer, newest first, with its reason code."""
    return ctx.service.decisions(profile_id, campaign, limit)


@router.post("/decisions/dry-run", response_model=list[DryRunOutcome], dependencies=[Read])
def dry_run(body: DryRunIn, ctx: Context) -> list[dict[str, Any]]:
    """What the engine would decide for a synthetic event, now. Nothing is sent or stored."""
    return ctx.service.dry_run(body.profile_id, body.event.kind, body.event.zone, body.event.dwell_s,
                               body.event.facts)


@router.get("/figures", dependencies=[Admin])
def figures(ctx: Context,
            day_from: Annotated[IsoDate | None, Query(alias="from", description=(
                "First local day, YYYY-MM-DD; default: today in the store's timezone"))] = None,
            day_to: Annotated[IsoDate | None, Query(alias="to", description="Last local day; default: from")] = None,
            zone: Annotated[DbStr | None, Query(min_length=1, max_length=64, description="Only this zone")] = None,
            campaign: Annotated[DbStr | None, Query(min_length=1, max_length=128,
                                                  description="Only this campaign")] = None,
            store: Annotated[DbStr | None, Query(min_length=1, max_length=64, description=(
                "Another store sharing the database (its [store] id); default: this gateway's. "
                "A store with no rows gives empty figures"))] = None,
            ) -> dict[str, Any]:
    """The store's figures for a range of local days, with a row per day (``days``) and, for a one-day
    range, per local hour (``hours``: footfall, enrolled and anonymous visits): footfall, unique visitors,
    new vs returning, dwell and bounce per zone (``zones.<zone>.bounce_rate``), bounce of enrolled visits
    (``bounce_rate``) and of everyone (``bounce_rate_all``), engagement, CTR, redemption, conversion,
    experiment arms with lift against the holdout, and response time to maintenance prompts. Only the rows
    this store's gateway wrote count, so stores sharing one database keep their figures apart."""
    return ctx.service.figures(day_from.isoformat() if day_from else None,
                               day_to.isoformat() if day_to else None, ctx.service.timezone, zone=zone,
                               campaign=campaign, store=store or ctx.service.store_id)
