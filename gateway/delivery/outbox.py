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
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from enum import StrEnum
from typing import Any

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.orm import Session

from gateway.delivery.backoff import Backoff
from gateway.delivery.hub import DELIVERED, Channel, Message, Outcome
from gateway.documents import servable
from gateway.metrics import Histogram
from gateway.storage.db import Database
from gateway.storage.models import (
    ChannelState,
    Delivery,
    DeliveryState,
    Interaction,
    InteractionKind,
    Notification,
    NotificationStatus,
)

log = logging.getLogger("gateway.delivery.outbox")


# Only these reach a stream: scheduled sends wait for their time; cancelled/expired/acked never go.
LIVE_STATUSES = (NotificationStatus.PENDING, NotificationStatus.SENT)


# (message key, Notification attribute): one definition for ORM objects and for plain rows.
_FIELDS = (("id", "id"), ("campaign", "campaign_id"), ("purpose", "purpose"), ("title", "title"),
           ("body", "body"), ("data", "data"), ("created_at", "created_at"), ("status", "status"))
_KEYS = tuple(k for k, _ in _FIELDS)


def message(n: Notification) -> Message:
    """The notification as the app and the API see it; data that cannot be served is replaced by a marker."""
    view = {k: getattr(n, a) for k, a in _FIELDS}
    view["data"] = servable(view["data"], f"notification {n.id} data")
    return view


def messages(session: Session, notification_ids: Sequence[int]) -> list[tuple[int, Message]]:
    """(profile id, message) in id order, from plain rows: a fan-out to thousands skips the ORM."""
    cols = [getattr(Notification, a) for _, a in _FIELDS]
    rows = session.execute(select(Notification.profile_id, *cols).where(Notification.id.in_(notification_ids))
                           .order_by(Notification.id))
    return [(row[0], dict(zip(_KEYS, row[1:], strict=True))) for row in rows]


def replay(session: Session, profile_id: int, after_id: int = 0, limit: int = 500) -> list[Message]:
    """Unacked live notifications a stream resuming after ``after_id`` may not have, in stream order.

    Not only ``id > after_id``: a delayed or quiet-hours send keeps its older id, and if it was
    released while the client was away (``released_after >= after_id``) it is replayed too. The app
    dedups by id, so a replay that repeats an unacked one it already has is harmless; acked ones
    never come back.
    """
    position = func.coalesce(Notification.released_after, Notification.id)
    rows = session.scalars(
        select(Notification)
        .where(Notification.profile_id == profile_id, Notification.status.in_(LIVE_STATUSES),
               or_(Notification.id > after_id, Notification.released_after >= after_id))
        .order_by(position, Notification.id).limit(limit)
    )
    return [message(n) for n in rows]


class AckError(LookupError):
    pass


def ack(session: Session, profile_id: int, notification_id: int, now: float) -> Notification:
    """Record that the app has the notification; idempotent, and only for its own profile."""
    n = session.get(Notification, notification_id)
    if n is None or n.profile_id != profile_id:
        raise AckError(f"notification {notification_id} not found")
    if n.status != NotificationStatus.ACKED:
        n.status, n.acked_at = NotificationStatus.ACKED, now
        session.add(Interaction(notification_id=n.id, kind=InteractionKind.DELIVERED, at=now))
    return n


Result = tuple[int, str, str, str | None]  # (notification id, channel, outcome word, error)


class Skipped(StrEnum):
    """Internal outcomes of a due retry that is not attempted (and not logged as a delivery)."""

    ACKED = "acked"  # the app has the notification already: the channel counts as delivered
    WITHDRAWN = "withdrawn"  # the notification was cancelled or expired: the channel is dead for it


class Verdict(StrEnum):
    """What an outcome means for the channel's state."""

    DELIVERED = "delivered"
    WAITING = "waiting"  # pending with nothing scheduled: the stream replays on connect
    RETRY = "retry"  # transient: pending, retried after a backoff
    DEAD = "dead"


SKIPPED: dict[str, Verdict] = {Skipped.ACKED: Verdict.DELIVERED, Skipped.WITHDRAWN: Verdict.DEAD}


def classify(outcome: str) -> Verdict:
    """A channel's outcome word -> the delivery state it leads to."""
    if outcome in DELIVERED:
        return Verdict.DELIVERED
    if outcome == Outcome.NO_LISTENER:
        return Verdict.WAITING
    if outcome in (Outcome.DEAD, Outcome.GONE):
        return Verdict.DEAD
    return Verdict.RETRY  # retry, error (the channel raised) and any word we do not know


class Dispatcher:
    """Hands committed notifications to every channel, records each attempt and keeps per-channel state.

    Every attempt leaves a ``Delivery`` row; ``DeliveryState`` holds the schedule: a transient
    failure is retried after ``backoff.delay(attempts)``, and after ``backoff.max_attempts``
    failures (or a permanent one) the channel is dead-lettered for that notification. A stream
    without a listener is not a failure: it stays pending with nothing scheduled, because the
    stream replays unacked notifications when the app connects.

    Inline channels (the in-process streams) are fed in commit order under one lock, so their ids
    only go up. Remote channels (webhook, Web Push) are sent outside it, concurrently, at most
    ``concurrency`` in flight per channel: a slow receiver delays only its own channel, never the
    streams or the next batch.
    """

    def __init__(self, db: Database, channels: Sequence[Channel], backoff: Backoff | None = None,
                 concurrency: int = 16) -> None:
        if concurrency < 1:
            raise ValueError("dispatcher concurrency must be >= 1")
        self.db = db
        self.channels = list(channels)
        self.backoff = backoff or Backoff()
        self.concurrency = concurrency
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.dead_lettered: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()  # remote sends started and not yet answered, per channel
        self.latency = Histogram("gateway_commit_to_delivery_seconds",
                                 "From a notification's commit to a channel taking it (streamed or accepted)",
                                 labelnames=("channel",))
        self._order = asyncio.Lock()
        self._limits: dict[str, asyncio.Semaphore] = {}

    @property
    def inline(self) -> list[Channel]:
        return [ch for ch in self.channels if getattr(ch, "inline", False)]

    @property
    def remote(self) -> list[Channel]:
        return [ch for ch in self.channels if not getattr(ch, "inline", False)]

    def _limit(self, name: str) -> asyncio.Semaphore:
        sem = self._limits.get(name)
        if sem is None:
            sem = self._limits[name] = asyncio.Semaphore(self.concurrency)
        return sem

    async def dispatch(self, notification_ids: Sequence[int], now: float, committed_at: float | None = None) -> None:
        """First delivery of freshly committed notifications, on every channel.

        ``committed_at`` (``time.perf_counter()`` at the commit) starts the commit-to-delivery clock.
        """
        if not notification_ids:
            return
        t0 = time.perf_counter() if committed_at is None else committed_at
        results: list[Result] = []
        async with self._order:  # batches reach the streams in commit order: their ids only go up
            # Off the loop, however few: a locked or unreachable database must never stall the streams.
            msgs = await asyncio.to_thread(self._load, notification_ids)
            for ch in self.inline:
                deliver = ch.deliver
                for profile_id, msg in msgs:
                    if goes_on(msg, ch.name):
                        results.append((msg["id"], ch.name, *await _attempt(deliver, ch.name, profile_id, msg)))
            self._observe(results, t0)
        # A campaign's channels (or a full per-channel cap) leave some out; one left with none is withdrawn.
        results += [(msg["id"], self.channels[0].name, Skipped.WITHDRAWN, "none of its channels is configured")
                    for _, msg in msgs if self.channels and not any(goes_on(msg, ch.name) for ch in self.channels)]
        # The lock is free: the next batch streams while this one goes to the remote channels.
        results += await self._send_remote([(ch, pid, msg) for ch in self.remote for pid, msg in msgs
                                            if goes_on(msg, ch.name)], t0)
        # Off the event loop: the streams write what was just published while the attempts are recorded.
        # One turn of the loop first: the woken streams write before the thread competes for the GIL.
        await asyncio.sleep(0)
        await asyncio.to_thread(self._record, results, now)

    async def _send_remote(self, work: Sequence[tuple[Channel, int, Message]], t0: float | None) -> list[Result]:
        """Every (channel, profile, message) concurrently, bounded per channel; results in work order."""
        if not work:
            return []

        async def one(ch: Channel, profile_id: int, msg: Message) -> Result:
            async with self._limit(ch.name):
                self.in_flight[ch.name] += 1
                try:
                    outcome, error = await _attempt(ch.deliver, ch.name, profile_id, msg)
                finally:
                    self.in_flight[ch.name] -= 1
            if t0 is not None and outcome in DELIVERED:
                self.latency.observe(time.perf_counter() - t0, ch.name)
            return msg["id"], ch.name, outcome, error

        return list(await asyncio.gather(*(one(ch, pid, msg) for ch, pid, msg in work)))

    def _observe(self, results: Sequence[Result], t0: float) -> None:
        elapsed = time.perf_counter() - t0
        for _, name, outcome, _ in results:
            if outcome in DELIVERED:
                self.latency.observe(elapsed, name)

    def _load(self, notification_ids: Sequence[int]) -> list[tuple[int, Message]]:
        with self.db.session() as s:
            return messages(s, notification_ids)

    def _due(self, now: float, limit: int) -> list[tuple[str, int, Message]]:
        with self.db.session() as s:
            due = s.execute(
                select(DeliveryState.notification_id, DeliveryState.channel, Notification)
                .join(Notification, Notification.id == DeliveryState.notification_id)
                .where(DeliveryState.state == ChannelState.PENDING, DeliveryState.next_attempt_at.is_not(None),
                       DeliveryState.next_attempt_at <= now)
                .order_by(DeliveryState.next_attempt_at).limit(limit)
            ).all()
            return [(ch, n.profile_id, message(n)) for _, ch, n in due]

    async def retry_due(self, now: float, limit: int = 500) -> int:
        """Retry every delivery whose time has come (the runtime's retry loop); returns how many were tried."""
        work = await asyncio.to_thread(self._due, now, limit)
        by_name = {ch.name: ch for ch in self.channels}
        results: list[Result] = []
        attempts: list[tuple[Channel, int, Message]] = []
        for name, profile_id, msg in work:
            ch = by_name.get(name)
            if ch is None:  # the channel was removed from the config: nobody can deliver it
                results.append((msg["id"], name, Outcome.DEAD, f"channel {name} is not configured"))
            elif msg["status"] == NotificationStatus.ACKED:  # the app has it: a late push would only be a duplicate
                results.append((msg["id"], name, Skipped.ACKED, None))
            elif msg["status"] not in LIVE_STATUSES:  # cancelled or expired while it waited: never sent
                results.append((msg["id"], name, Skipped.WITHDRAWN, f"notification {msg['status']}"))
            else:
                attempts.append((ch, profile_id, msg))
        results += await self._send_remote(attempts, None)
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
        while ids := await asyncio.to_thread(self.undispatched):
            await self.dispatch(ids, now)
            total += len(ids)
        return total

    def _record(self, results: list[Result], now: float) -> None:
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
            confirmed: set[int] = set()
            for nid, name, outcome, error in results:
                self.outcomes[(name, outcome)] += 1
                if outcome not in SKIPPED:
                    logged.append({"notification_id": nid, "channel": name, "at": now, "outcome": outcome})
                before = known.get((nid, name))
                row = self._next_state(nid, name, outcome, error, (before or 0) + (outcome not in SKIPPED), now)
                if row["state"] == ChannelState.DELIVERED and outcome in DELIVERED:
                    sent.add(nid)
                    if outcome != Outcome.STREAMED:
                        confirmed.add(nid)
                (fresh if before is None else changed).append(row)
            if logged:
                s.execute(insert(Delivery), logged)
            if fresh:
                s.execute(insert(DeliveryState), fresh)
            if changed:
                s.execute(update(DeliveryState), changed)
            if sent:
                s.execute(update(Notification).where(Notification.id.in_(sorted(sent)),
                                                     Notification.status == NotificationStatus.PENDING)
                          .values(status=NotificationStatus.SENT))
            if confirmed:  # a remote service took it (webhook 2xx, push 201): delivered, once per notification
                have = set(s.scalars(select(Interaction.notification_id).where(
                    Interaction.notification_id.in_(sorted(confirmed)), Interaction.kind == InteractionKind.DELIVERED)))
                rows = [{"notification_id": nid, "kind": InteractionKind.DELIVERED, "at": now}
                        for nid in sorted(confirmed - have)]
                if rows:
                    s.execute(insert(Interaction), rows)

    def _next_state(self, nid: int, name: str, outcome: str, error: str | None, attempts: int,
                    now: float) -> dict[str, Any]:
        kind = SKIPPED.get(outcome) or classify(outcome)
        row: dict[str, Any] = {"notification_id": nid, "channel": name, "attempts": attempts, "updated_at": now,
                               "state": ChannelState.PENDING, "next_attempt_at": None, "last_error": error}
        if kind == Verdict.DELIVERED:
            row["state"] = ChannelState.DELIVERED
        elif kind == Verdict.DEAD or (kind == Verdict.RETRY and attempts >= self.backoff.max_attempts):
            row["state"] = ChannelState.DEAD
            row["last_error"] = error or outcome
            self.dead_lettered[name] += 1
            log.warning("notification %s dead-lettered on %s after %d attempt(s): %s", nid, name, attempts,
                        row["last_error"])
        elif kind == Verdict.RETRY:
            row["next_attempt_at"] = now + self.backoff.delay(attempts)
            row["last_error"] = error or outcome
        return row


def goes_on(msg: Message, channel: str) -> bool:
    """Whether a notification goes out on ``channel``: ``data.channels`` (set by the engine) lists them."""
    allowed = (msg.get("data") or {}).get("channels")
    return allowed is None or channel in allowed


async def _attempt(deliver: Callable[[int, Message], Awaitable[str]], name: str, profile_id: int,
                   msg: Message) -> tuple[str, str | None]:
    """One delivery; a channel that raises is a transient failure, never a crash of the dispatcher."""
    try:
        return await deliver(profile_id, msg), None
    except Exception as exc:  # one failing channel must not stop the others
        log.warning("channel %s failed for notification %s: %s", name, msg["id"], exc)
        return Outcome.ERROR, f"{type(exc).__name__}: {exc}"[:500]


def delivery_states(session: Session, notification_id: int) -> dict[str, dict[str, Any]]:
    """Per channel: state, attempts, next attempt and last error of one notification (for the API)."""
    rows = session.scalars(select(DeliveryState).where(DeliveryState.notification_id == notification_id))
    return {r.channel: {"state": r.state, "attempts": r.attempts, "next_attempt_at": r.next_attempt_at,
                        "last_error": r.last_error} for r in rows}


# ------------------------------------------------------------------ admin views (the API's notifications, deliveries)


def admin_view(n: Notification) -> dict[str, Any]:
    return {**message(n), "profile_id": n.profile_id, "acked_at": n.acked_at, "deliver_at": n.deliver_at,
            "expires_at": n.expires_at, "variant": n.variant, "redemption_code": n.redemption_code}


def list_notifications(session: Session, *, profile_id: int | None = None, campaign: str | None = None,
                       status: str | None = None, limit: int = 50, offset: int = 0
                       ) -> tuple[list[dict[str, Any]], int]:
    """Newest first, filtered; returns (one page, the total that matched)."""
    where = []
    if profile_id is not None:
        where.append(Notification.profile_id == profile_id)
    if campaign is not None:
        where.append(Notification.campaign_id == campaign)
    if status is not None:
        where.append(Notification.status == status)
    total = session.scalar(select(func.count()).select_from(Notification).where(*where)) or 0
    rows = session.scalars(select(Notification).where(*where).order_by(Notification.id.desc())
                           .limit(limit).offset(offset))
    return [admin_view(n) for n in rows], int(total)


def notification_detail(session: Session, notification_id: int) -> dict[str, Any] | None:
    """One notification with its state per channel, every attempt, and its interactions."""
    n = session.get(Notification, notification_id)
    if n is None:
        return None
    attempts = session.scalars(select(Delivery).where(Delivery.notification_id == n.id).order_by(Delivery.id))
    seen = session.scalars(select(Interaction).where(Interaction.notification_id == n.id).order_by(Interaction.id))
    return {**admin_view(n),
            "channels": [{"channel": ch, **st} for ch, st in sorted(delivery_states(session, n.id).items())],
            "attempts": [{"channel": d.channel, "at": d.at, "outcome": d.outcome} for d in attempts],
            "interactions": [{"kind": i.kind, "at": i.at} for i in seen]}


def state_view(st: DeliveryState, n: Notification) -> dict[str, Any]:
    return {"notification_id": st.notification_id, "channel": st.channel, "state": st.state,
            "attempts": st.attempts, "next_attempt_at": st.next_attempt_at, "last_error": st.last_error,
            "updated_at": st.updated_at, "profile_id": n.profile_id, "campaign": n.campaign_id,
            "notification_status": n.status}


def list_delivery_states(session: Session, *, state: str | None = None, channel: str | None = None,
                         notification_id: int | None = None, limit: int = 50, offset: int = 0
                         ) -> tuple[list[dict[str, Any]], int]:
    """Delivery states (``state=ChannelState.DEAD``: the dead letters), most recently changed first."""
    where = []
    if state is not None:
        where.append(DeliveryState.state == state)
    if channel is not None:
        where.append(DeliveryState.channel == channel)
    if notification_id is not None:
        where.append(DeliveryState.notification_id == notification_id)
    total = session.scalar(select(func.count()).select_from(DeliveryState).where(*where)) or 0
    rows = session.execute(select(DeliveryState, Notification)
                           .join(Notification, Notification.id == DeliveryState.notification_id).where(*where)
                           .order_by(DeliveryState.updated_at.desc(), DeliveryState.notification_id.desc(),
                                     DeliveryState.channel).limit(limit).offset(offset)).all()
    return [state_view(st, n) for st, n in rows], int(total)


class ReplayRefused(ValueError):
    pass


def requeue(session: Session, now: float, *, channel: str, notification_id: int | None = None) -> list[int]:
    """Put dead letters back on the retry schedule (due now, attempts reset); returns their notification ids.

    With ``notification_id``, that one delivery (refused unless it is dead and the notification is
    still live); without, every dead letter of ``channel`` whose notification is still live (after
    the receiver was fixed or a disabled webhook URL re-enabled). The retry loop sends them.
    """
    where = [DeliveryState.channel == channel, DeliveryState.state == ChannelState.DEAD]
    if notification_id is not None:
        st = session.get(DeliveryState, (notification_id, channel))
        if st is None:
            raise LookupError(f"notification {notification_id} has no delivery on {channel}")
        if st.state != ChannelState.DEAD:
            raise ReplayRefused(f"the delivery of notification {notification_id} on {channel} is {st.state}, "
                                "not dead")
        n = session.get(Notification, notification_id)
        if n is None or n.status not in LIVE_STATUSES:
            raise ReplayRefused(f"notification {notification_id} is {n.status if n else 'gone'}: "
                                "nothing to deliver")
        where.append(DeliveryState.notification_id == notification_id)
    live = select(Notification.id).where(Notification.status.in_(LIVE_STATUSES))
    ids = list(session.scalars(select(DeliveryState.notification_id).where(
        *where, DeliveryState.notification_id.in_(live)).order_by(DeliveryState.notification_id)))
    if ids:
        session.execute(update(DeliveryState).where(DeliveryState.channel == channel,
                                                    DeliveryState.notification_id.in_(ids))
                        .values(state=ChannelState.PENDING, attempts=0, next_attempt_at=now, updated_at=now))
    return ids


def depths(session: Session) -> dict[str, int]:
    """Queue depths kept in the database, for /metrics: what the outbox still has to hand over."""
    pending = session.scalar(select(func.count()).select_from(Notification)
                             .where(Notification.status == NotificationStatus.PENDING)) or 0
    scheduled = session.scalar(select(func.count()).select_from(Notification)
                               .where(Notification.status == NotificationStatus.SCHEDULED)) or 0
    retries = session.scalar(select(func.count()).select_from(DeliveryState).where(
        DeliveryState.state == ChannelState.PENDING, DeliveryState.next_attempt_at.is_not(None))) or 0
    dead = session.scalar(select(func.count()).select_from(DeliveryState)
                          .where(DeliveryState.state == ChannelState.DEAD)) or 0
    return {"outbox_pending": int(pending), "outbox_scheduled": int(scheduled), "retries_due": int(retries),
            "dead_letters": int(dead)}
