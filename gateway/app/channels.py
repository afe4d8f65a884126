"""The remote channels the config enables (webhook, Web Push), built for the runtime's dispatcher."""

from __future__ import annotations

from typing import Any

from gateway.app.config import Settings
from gateway.clock import Clock
from gateway.storage.db import Database


def build_channels(settings: Settings, db: Database, clock: Clock) -> list[Any]:
    """The enabled remote channels, configured; raises ValueError naming a missing or bad setting."""
    channels: list[Any] = []
    if settings.webhook.enabled:
        from gateway.delivery.webhook import WebhookChannel

        channels.append(WebhookChannel(settings.webhook, db, store_id=settings.store.id, clock=clock))
    if settings.webpush.enabled:
        from gateway.delivery.webpush import WebPushChannel, load_vapid

        vapid = load_vapid(settings.webpush, settings.data_dir)
        channels.append(WebPushChannel(settings.webpush, db, vapid, clock=clock))
    return channels


async def close_channels(channels: list[Any]) -> None:
    """Close the HTTP clients of the channels that keep one."""
    for ch in channels:
        aclose = getattr(ch, "aclose", None)
        if aclose is not None:
            await aclose()
