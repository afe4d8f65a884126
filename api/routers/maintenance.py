"""Device alarms and the maintenance loop: staff see alarms, owners acknowledge or book, staff record the service.

The loop: a device rule raises an alarm -> the owner is prompted through the campaign engine ->
``POST /me/alarms/{id}/ack`` or ``/book`` from the owner's app -> ``POST /devices/{id}/service``
by staff resets the device's counters and resolves its alarms -> ``GET /maintenance/figures`` reports
the time from prompt to resolution. All rules live in gateway/telemetry/alarms.py.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query

from api.deps import Admin, ApiContext, Context, Customer
from api.schemas import (
    DB_ID_MAX,
    AlarmOut,
    AlarmStatus,
    BookingIn,
    DbStr,
    DeviceRuleOut,
    MaintenanceFiguresOut,
    ServiceIn,
    ServiceOut,
)
from gateway.telemetry.alarms import AlarmDesk

router = APIRouter(tags=["maintenance"])
AlarmId = Annotated[int, Path(ge=1, le=DB_ID_MAX)]
DeviceId = Annotated[DbStr, Path(min_length=1, max_length=128)]


def _desk(ctx: ApiContext) -> AlarmDesk:
    if ctx.alarms is None:
        raise HTTPException(503, "device rules are not running on this gateway")
    desk: AlarmDesk = ctx.alarms
    return desk


@router.get("/me/alarms", response_model=list[AlarmOut])
def my_alarms(ctx: Context, claims: Customer) -> list[dict[str, Any]]:
    """Alarms of the customer's own devices, newest first."""
    return _desk(ctx).my_alarms(claims.profile_id)


@router.post("/me/alarms/{alarm_id}/ack", response_model=AlarmOut)
def acknowledge(alarm_id: AlarmId, ctx: Context, claims: Customer) -> dict[str, Any]:
    """The owner has seen the prompt. Repeating it keeps the first time."""
    return _desk(ctx).acknowledge(claims.profile_id, alarm_id)


@router.post("/me/alarms/{alarm_id}/book", response_model=AlarmOut)
def book(alarm_id: AlarmId, body: BookingIn, ctx: Context, claims: Customer) -> dict[str, Any]:
    """The owner books a service (optionally for a slot); this acknowledges the alarm too."""
    return _desk(ctx).book(claims.profile_id, alarm_id, body.slot)


@router.get("/alarms", response_model=list[AlarmOut], dependencies=[Admin])
def alarms(ctx: Context, status: AlarmStatus | None = None,
           device_id: Annotated[DbStr | None, Query(max_length=128)] = None,
           limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[dict[str, Any]]:
    """The staff alerts list: ``?status=active`` for what needs attention now."""
    return _desk(ctx).list_alarms(status, device_id, limit)


@router.post("/devices/{device_id}/service", response_model=ServiceOut, dependencies=[Admin])
def record_service(device_id: DeviceId, body: ServiceIn, ctx: Context) -> dict[str, Any]:
    """A service was done: the device's rule counters restart from zero and its open alarms are resolved."""
    return _desk(ctx).record_service(device_id, body.note)


@router.get("/devices/{device_id}/rules", response_model=list[DeviceRuleOut], dependencies=[Admin])
def device_rules(device_id: DeviceId, ctx: Context) -> list[dict[str, Any]]:
    """Each device rule's live state for the device: counters, pending timers, the raised severity."""
    return _desk(ctx).device_rules(device_id)


@router.get("/maintenance/figures", response_model=MaintenanceFiguresOut, dependencies=[Admin])
def figures(ctx: Context, since: Annotated[float | None, Query(ge=0, allow_inf_nan=False)] = None
            ) -> dict[str, Any]:
    """Alarms prompted, acknowledged, booked and resolved; mean and p90 time from prompt to resolution."""
    return _desk(ctx).figures(since)
