"""The outbox: notifications are committed first, then handed to channels; nothing is lost.

A notification stays ``pending`` until a channel takes it, ``sent`` after that, and ``acked``
once the app confirms. Streams replay every unacked notification after the client's
Last-Event-ID, so a restart or a dropped connection loses nothing and the app dedups by id.
Per channel, ``DeliveryState`` keeps the retry schedule (exponential backoff with jitter) and
dead-letters a delivery after a limit; it lives in the database, so retries survive a restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from gateway.channels import DEAD, DELIVERED, ERROR, GONE, NO_LISTENER, Channel, Message
from gateway.storage.db import Database
from gateway.storage.models import Delivery, DeliveryState, Interaction, Notification

log = logging.getLogger("gateway.outbox")


# Only these reach a stream: scheduled sends wait for their time; cancelled/expired/acked never go.
LIVE_STATUSES = ("pending", "sent")


# (message key, Notification attribute): one definition for ORM objects and for plain rows.
_FIELDS = (("id", "id"), ("campaign", "campaign_id"), ("purpose", "purpose"), ("title", "title"),
           ("body", "body"), ("data", "data"), ("created_at", "created_at"), ("status", "status"))
_KEYS = tuple(k for k, _ in _FIELDS)


def message(n: Notification) -> Message:
    return {k: getattr(n, a) for k, a in _FIELDS}


def messages(session: Session, notification_ids: Sequence[int]) -> list[tuple[int, Message]]:
    """(profile id, message) in id order, from plain rows: a fan-out to thousands skips the ORM."""
    cols = [getattr(Notification, a) for _, a in _FIELDS]
    rows = session.execute(select(Notification.profile_id, *cols).where(Notification.id.in_(notification_ids))
                           .order_by(Notification.id))
    return [(row[0], dict(zip(_KEYS, row[1:], strict=True))) for row in rows]


def replay(session: Session, profile_id: int, after_id: int = 0, limit: int = 500) -> list[Message]:
    rows = session.scalars(
        select(Notification)
        .where(Notification.profile_id == profile_id, Notification.id > after_id,
               Notification.status.in_(LIVE_STATUSES))
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


INLINE_LOAD_MAX = 32
# Internal outcomes of a due retry that is not attempted (and not logged as a delivery):
ACKED = "acked"  # the app has the notification already: the channel counts as delivered
WITHDRAWN = "withdrawn"  # the notification was cancelled or expired: the channel is dead for it
SKIPPED = (ACKED, WITHDRAWN)


class Backoff:
    """Exponential backoff with jitter: how long to wait before attempt ``n + 1`` after ``n`` failures.

    The delay doubles from ``base_s`` up to ``max_s``; ``jitter`` (0..1) takes a random share off
    it so that a channel coming back is not hit by every retry at once. ``rng`` is injectable so
    tests know the exact schedule.
    """

    def __init__(self, base_s: float = 2.0, max_s: float = 600.0, factor: float = 2.0, jitter: float = 0.5,
                 max_attempts: int = 8, rng: Callable[[], float] = random.random) -> None:
        if base_s <= 0 or max_s < base_s or factor < 1 or not 0 <= jitter <= 1 or max_attempts < 1:
            raise ValueError("backoff needs 0 < base_s <= max_s, factor >= 1, 0 <= jitter <= 1, max_attempts >= 1")
        self.base_s, self.max_s, self.factor, self.jitter = base_s, max_s, factor, jitter
        self.max_attempts = max_attempts
        self.rng = rng

    def delay(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts (1 for the first failure)."""
        full = min(self.max_s, self.base_s * self.factor ** max(0, attempts - 1))
        return full * (1.0 - self.jitter * self.rng())


def classify(outcome: str) -> str:
    """A channel's outcome word -> the delivery state it leads to (``retry`` means transient)."""
    if outcome in DELIVERED:
        return "delivered"
    if outcome == NO_LISTENER:
        return "waiting"
    if outcome in (DEAD, GONE):
        return "dead"
    return "retry"  # RETRY, "error" (the channel raised) and any word we do not know


class Dispatcher:
    """Hands committed notifications to every channel, records each attempt and keeps per-channel state.

    Every attempt leaves a ``Delivery`` row; ``DeliveryState`` holds the schedule: a transient
    failure is retried after ``backoff.delay(attempts)``, and after ``backoff.max_attempts``
    failures (or a permanent one) the channel is dead-lettered for that notification. A stream
    without a listener is not a failure: it stays pending with nothing scheduled, because the
    stream replays unacked notifications when the app connects.
    """

    def __init__(self, db: Database, channels: Sequence[Channel], backoff: Backoff | None = None) -> None:
        self.db = db
        self.channels = list(channels)
        self.backoff = backoff or Backoff()
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.dead_lettered: Counter[str] = Counter()
        self._order = asyncio.Lock()

    async def dispatch(self, notification_ids: Sequence[int], now: float) -> None:
        """First delivery of freshly committed notifications, on every channel."""
        if not notification_ids:
            return
        async with self._order:  # batches reach the streams in commit order: their ids only go up
            # A few ids (a shopper walking in) load faster here than a thread hop; a broadcast loads off the loop.
            small = len(notification_ids) <= INLINE_LOAD_MAX
            msgs = self._load(notification_ids) if small else await asyncio.to_thread(self._load, notification_ids)
            results: list[tuple[int, str, str, str | None]] = []
            for ch in self.channels:
                deliver = ch.deliver
                for profile_id, msg in msgs:
                    results.append((msg["id"], ch.name, *await _attempt(deliver, ch.name, profile_id, msg)))
        # Off the event loop: the streams write what was just published while the attempts are recorded.
        await asyncio.to_thread(self._record, results, now)

    def _load(self, notification_ids: Sequence[int]) -> list[tuple[int, Message]]:
        with self.db.session() as s:
            return messages(s, notification_ids)

    async def retry_due(self, now: float, limit: int = 500) -> int:
        """Retry every delivery whose time has come (the runtime's retry loop); returns how many were tried."""
        with self.db.session() as s:
            due = s.execute(
                select(DeliveryState.notification_id, DeliveryState.channel, Notification)
                .join(Notification, Notification.id == DeliveryState.notification_id)
                .where(DeliveryState.state == "pending", DeliveryState.next_attempt_at.is_not(None),
                       DeliveryState.next_attempt_at <= now)
                .order_by(DeliveryState.next_attempt_at).limit(limit)
            ).all()
            work = [(ch, n.profile_id, message(n)) for _, ch, n in due]
        by_name = {ch.name: ch for ch in self.channels}
        results: list[tuple[int, str, str, str | None]] = []
        for name, profile_id, msg in work:
            ch = by_name.get(name)
            if ch is None:  # the channel was removed from the config: nobody can deliver it
                results.append((msg["id"], name, DEAD, f"channel {name} is not configured"))
            elif msg["status"] == "acked":  # the app has it: a late push would only be a duplicate
                results.append((msg["id"], name, ACKED, None))
            elif msg["status"] not in LIVE_STATUSES:  # cancelled or expired while it waited: never sent
                results.append((msg["id"], name, WITHDRAWN, f"notification {msg['status']}"))
            else:
                results.append((msg["id"], name, *await _attempt(ch.deliver, name, profile_id, msg)))
        await asyncio.to_thread(self._record, results, now)
        return len(results)

    def undispatched(self, limit: int = 500) -> list[int]:
        """Notifications committed but never handed to a channel (the gateway died in between)."""
        with self.db.session() as s:
            has_state = select(DeliveryState.notification_id).where(
                DeliveryState.notification_id == Notification.id).exists()
            return list(s.scalars(select(Notification.id).where(Notification.status.in_(LIVE_STATUSES), ~has_state)
                                  .order_by(Notification.id).limit(limit)))

    async def recover(self, now: float) -> int:
        """At start: dispatch what a crash left between commit and dispatch; returns how many."""
        total = 0
        while ids := self.undispatched():
            await self.dispatch(ids, now)
            total += len(ids)
        return total

    def _record(self, results: list[tuple[int, str, str, str | None]], now: float) -> None:
        """One transaction per batch: the attempt log, the new states, and ``sent`` for what went out."""
        if not results:
            return
        with self.db.session() as s:
            ids = sorted({nid for nid, *_ in results})
            known = {(st.notification_id, st.channel): st.attempts for st in s.scalars(
                select(DeliveryState).where(DeliveryState.notification_id.in_(ids)))}
            fresh: list[dict[str, Any]] = []
            changed: list[dict[str, Any]] = []
            logged: list[dict[str, Any]] = []
            sent: set[int] = set()
            for nid, name, outcome, error in results:
                self.outcomes[(name, outcome)] += 1
                if outcome not in SKIPPED:
                    logged.append({"notification_id": nid, "channel": name, "at": now, "outcome": outcome})
                before = known.get((nid, name))
                row = self._next_state(nid, name, outcome, error, (before or 0) + (outcome not in SKIPPED), now)
                if row["state"] == "delivered" and outcome in DELIVERED:
                    sent.add(nid)
                (fresh if before is None else changed).append(row)
            if logged:
                s.execute(insert(Delivery), logged)
            if fresh:
                s.execute(insert(DeliveryState), fresh)
            if changed:
                s.execute(update(DeliveryState), changed)
            if sent:
                s.execute(update(Notification).where(Notification.id.in_(sorted(sent)),
                                                     Notification.status == "pending").values(status="sent"))

    def _next_state(self, nid: int, name: str, outcome: str, error: str | None, attempts: int,
                    now: float) -> dict[str, Any]:
        kind = {ACKED: "delivered", WITHDRAWN: "dead"}.get(outcome) or classify(outcome)
        row: dict[str, Any] = {"notification_id": nid, "channel": name, "attempts": attempts, "updated_at": now,
                               "state": "pending", "next_attempt_at": None, "last_error": error}
        if kind == "delivered":
            row["state"] = "delivered"
        elif kind == "dead" or (kind == "retry" and attempts >= self.backoff.max_attempts):
            row["state"] = "dead"
            row["last_error"] = error or outcome
            self.dead_lettered[name] += 1
            log.warning("notification %s dead-lettered on %s after %d attempt(s): %s", nid, name, attempts,
                        row["last_error"])
        elif kind == "retry":
            row["next_attempt_at"] = now + self.backoff.delay(attempts)
            row["last_error"] = error or outcome
        return row


async def _attempt(deliver: Callable[[int, Message], Awaitable[str]], name: str, profile_id: int,
                   msg: Message) -> tuple[str, str | None]:
    """One delivery; a channel that raises is a transient failure, never a crash of the dispatcher."""
    try:
        return await deliver(profile_id, msg), None
    except Exception as exc:  # one failing channel must not stop the others
        log.warning("channel %s failed for notification %s: %s", name, msg["id"], exc)
        return ERROR, f"{type(exc).__name__}: {exc}"[:500]


def delivery_states(session: Session, notification_id: int) -> dict[str, dict[str, Any]]:
    """Per channel: state, attempts, next attempt and last error of one notification (for the API)."""
    rows = session.scalars(select(DeliveryState).where(DeliveryState.notification_id == notification_id))
    return {r.channel: {"state": r.state, "attempts": r.attempts, "next_attempt_at": r.next_attempt_at,
                        "last_error": r.last_error} for r in rows}


def counts_by_status(session: Session) -> dict[str, Any]:
    from sqlalchemy import func

    return dict(session.execute(select(Notification.status, func.count()).group_by(Notification.status)).all())
