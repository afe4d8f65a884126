"""The app's door for presence: store beacons it ranged, reported with the customer's token.

Shapes only here; the gateway decides what a report means (time window, which receivers exist).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException

from api.deps import Context, Customer
from api.schemas import AppSightingIn, SightingsAccepted
from beacons.remote import AppReport, ibeacon_key

router = APIRouter(prefix="/me", tags=["customer"])

MAX_REPORTS = 100


def _report(s: AppSightingIn) -> AppReport:
    b = s.beacon
    key = b.strip().lower() if isinstance(b, str) else ibeacon_key(b.uuid, b.major, b.minor)
    return AppReport(key, s.rssi, s.tx_power, s.time)


@router.post("/sightings", status_code=202, response_model=SightingsAccepted)
def report_sightings(ctx: Context, claims: Customer,
                     body: Annotated[list[AppSightingIn], Body(min_length=1, max_length=MAX_REPORTS)]
                     ) -> dict[str, Any]:
    """Store beacons the app ranged (a beacon fixed in a zone acts as a receiver): the customer is
    placed in that beacon's zones. All reports are checked before any is used; 422 changes nothing."""
    if ctx.report_sightings is None:
        raise HTTPException(503, "app-reported sightings are not available on this gateway")
    return ctx.report_sightings(claims.profile_id, [_report(s) for s in body])
