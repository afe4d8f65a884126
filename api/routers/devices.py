"""Devices over the API: the registry (list, read, register, update), readings and chart rollups, dead letters."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, status

from api.deps import Admin, Context
from api.schemas import (
    DbStr,
    DeadLetterOut,
    DeviceIn,
    DeviceOut,
    DevicePatch,
    DeviceStatus,
    OneOf,
    ReadingOut,
    RollupOut,
)
from gateway.profiles.devices import PERIODS, DeviceRegistry

router = APIRouter(tags=["devices"], dependencies=[Admin])

DeviceId = Annotated[DbStr, Path(min_length=1, max_length=128)]
Since = Annotated[float | None, Query(description="Epoch seconds, inclusive", allow_inf_nan=False)]
Until = Annotated[float | None, Query(description="Epoch seconds, exclusive", allow_inf_nan=False)]


def _registry(ctx: Context) -> DeviceRegistry:
    registry: DeviceRegistry | None = getattr(ctx, "devices", None)
    if registry is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the device registry is not running")
    return registry


@router.get("/devices", response_model=list[DeviceOut])
def list_devices(ctx: Context, status_: Annotated[DeviceStatus | None, Query(alias="status")] = None,
                 limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                 offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0) -> list[dict[str, Any]]:
    return _registry(ctx).list_devices(status_, limit, offset)


@router.post("/devices", response_model=DeviceOut, status_code=status.HTTP_201_CREATED)
def register_device(body: DeviceIn, ctx: Context) -> dict[str, Any]:
    """Register a device before it first reports (with the `reject` or `quarantine` policy it must be)."""
    return _registry(ctx).register(body.id, kind=body.kind, device_profile=body.device_profile,
                                   owner_profile_id=body.owner_profile_id, firmware=body.firmware,
                                   store_id=body.store_id)


@router.get("/devices/{device_id}", response_model=DeviceOut)
def get_device(device_id: DeviceId, ctx: Context) -> dict[str, Any]:
    return _registry(ctx).get_device(device_id)


@router.patch("/devices/{device_id}", response_model=DeviceOut)
def update_device(device_id: DeviceId, body: DevicePatch, ctx: Context) -> dict[str, Any]:
    return _registry(ctx).update(device_id, **body.model_dump(exclude_unset=True))


@router.get("/devices/{device_id}/readings", response_model=list[ReadingOut])
def readings(device_id: DeviceId, ctx: Context, since: Since = None, until: Until = None,
             limit: Annotated[int, Query(ge=1, le=5000)] = 500) -> list[dict[str, Any]]:
    """Raw readings, newest first (kept for `[devices] raw_retention_days`)."""
    return _registry(ctx).readings(device_id, since, until, limit)


@router.get("/devices/{device_id}/rollups", response_model=list[RollupOut])
def rollups(device_id: DeviceId, ctx: Context, period: Annotated[str, OneOf(PERIODS)] = "minute",
            metric: Annotated[DbStr | None, Query(max_length=64)] = None, since: Since = None, until: Until = None,
            limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> list[dict[str, Any]]:
    """Per-minute or per-hour count/min/max/mean/last per metric, oldest first: what a chart needs."""
    return _registry(ctx).rollups(device_id, period, metric, since, until, limit)


@router.get("/dead-letters", response_model=list[DeadLetterOut])
def dead_letters(ctx: Context, device_id: Annotated[DbStr | None, Query(max_length=128)] = None,
                 reason: Annotated[DbStr | None, Query(max_length=48)] = None,
                 limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
    """MQTT messages the gateway refused, newest first, with the reason and the start of the payload."""
    return _registry(ctx).dead_letters(device_id, reason, limit)
