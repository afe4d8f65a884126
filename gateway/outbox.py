"""The outbox: notifications are committed first, then handed to channels; nothing is lost.

A notification stays ``pending`` until a channel takes it, ``sent`` after that, and ``acked``
once the app confirms. Streams replay every unacked notification after the client's
Last-Event-ID, so a restart or a dropped connection loses nothing and the app dedups by id.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from gateway.channels import DELIVERED_LIVE, Channel, Message
from gateway.storage.db import Database
from gateway.storage.models import Delivery, Interaction, Notification

log = logging.getLogger("gateway.outbox")


def message(n: Notification) -> Message:
    return {"id": n.id, "campaign": n.campaign_id, "purpose": n.purpose, "title": n.title,
            "body": n.body, "data": n.data, "created_at": n.created_at, "status": n.status}


def replay(session: Session, profile_id: int, after_id: int = 0, limit: int = 500) -> list[Message]:
    rows = session.scalars(
        select(Notification)
        .where(Notification.profile_id == profile_id, Notification.id > after_id,
               Notification.status != "acked")
        .order_by(Notification.id).limit(limit)
    )
    return [message(n) for n in rows]


class AckError(LookupError):
    pass


def ack(session: Session, profile_id: int, notification_id: int, now: float) -> Notification:
    """Record that the app has the notification; idempotent, and only for its own profile."""
    n = session.get(Notification, notification_id)
    if n is None or n.profile_id != profile_id:
        raise AckError(f"notification {notification_id} not found")
    if n.status != "acked":
        n.status, n.acked_at = "acked", now
        session.add(Interaction(notification_id=n.id, kind="delivered", at=now))
    return n


class Dispatcher:
    """Hands committed notifications to every channel and records each attempt."""

    def __init__(self, db: Database, channels: Sequence[Channel]) -> None:
        self.db = db
        self.channels = list(channels)
        self.outcomes: Counter[tuple[str, str]] = Counter()

    async def dispatch(self, notification_ids: Sequence[int], now: float) -> None:
        if not notification_ids:
            return
        with self.db.session() as s:
            rows = list(s.scalars(select(Notification).where(Notification.id.in_(notification_ids))
                                  .order_by(Notification.id)))
            msgs: list[tuple[int, Message]] = [(n.profile_id, message(n)) for n in rows]
        results: list[tuple[int, str, str]] = []
        for profile_id, msg in msgs:
            for ch in self.channels:
                try:
                    outcome = await ch.deliver(profile_id, msg)
                except Exception as exc:  # one failing channel must not stop the others
                    log.warning("channel %s failed for notification %s: %s", ch.name, msg["id"], exc)
                    outcome = "error"
                results.append((msg["id"], ch.name, outcome))
                self.outcomes[(ch.name, outcome)] += 1
        sent = sorted({nid for nid, _, outcome in results if outcome == DELIVERED_LIVE})
        with self.db.session() as s:
            s.add_all(Delivery(notification_id=nid, channel=ch, at=now, outcome=o) for nid, ch, o in results)
            if sent:
                s.execute(update(Notification).where(Notification.id.in_(sent), Notification.status == "pending")
                          .values(status="sent"))


def counts_by_status(session: Session) -> dict[str, Any]:
    from sqlalchemy import func

    return dict(session.execute(select(Notification.status, func.count()).group_by(Notification.status)).all())
