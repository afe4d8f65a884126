"""Notifications, staff side: every notification with filters, and one with its deliveries and interactions."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

import gateway.profiles.resources as resources
from api.deps import Admin, Context
from api.schemas import DB_ID_MAX, PAGE_MAX, DbStr, NotificationDetailOut, NotificationPage, NotificationStatus

router = APIRouter(prefix="/notifications", tags=["notifications"], dependencies=[Admin])

Limit = Annotated[int, Query(ge=1, le=PAGE_MAX, description=f"Page size, at most {PAGE_MAX}")]
Offset = Annotated[int, Query(ge=0, le=DB_ID_MAX, description="How many to skip (next_offset of the last page)")]


@router.get("", response_model=NotificationPage)
def list_notifications(ctx: Context,
                       profile: Annotated[int | None, Query(ge=1, le=DB_ID_MAX, description="Profile id")] = None,
                       campaign: Annotated[DbStr | None, Query(min_length=1, max_length=128)] = None,
                       status: NotificationStatus | None = None,
                       limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    """Newest first, filtered by profile, campaign and status."""
    items, total = resources.list_notifications(ctx.service, profile_id=profile, campaign=campaign, status=status,
                                                limit=limit, offset=offset)
    return resources.page(items, total, limit, offset)


@router.get("/{notification_id}", response_model=NotificationDetailOut)
def get_notification(notification_id: Annotated[int, Path(ge=1, le=DB_ID_MAX)], ctx: Context) -> dict[str, Any]:
    """One notification: its state per channel, every delivery attempt, and what the customer did with it."""
    return resources.get_notification(ctx.service, notification_id)
