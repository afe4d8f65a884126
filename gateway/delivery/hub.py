"""Delivery channels behind one interface; the live stream (SSE) is the first.

A channel takes a committed notification's message and tries to hand it over. The stream hub
keeps one bounded queue per connected client: a slow client is cut off (it reconnects and
replays from the outbox with Last-Event-ID) instead of stalling everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from enum import StrEnum
from typing import Any, Protocol

from gateway.storage.models import ChannelName

Message = dict[str, Any]



class Outcome(StrEnum):
    """The words a channel returns (and the deliveries table records). The dispatcher maps them to a
    per-channel state: delivered, waiting (nothing to retry), retry later, or dead."""

    STREAMED = "streamed"  # handed to at least one open stream (SSE or WebSocket) of the profile
    DELIVERED = "delivered"  # a remote service accepted it
    NO_LISTENER = "no_listener"  # no stream open: not a failure, the stream replays on connect
    RETRY = "retry"  # a transient failure (timeout, 5xx, 429): try again after a backoff
    ERROR = "error"  # the channel raised: treated as transient
    DEAD = "dead"  # a permanent failure (bad request, disabled endpoint): never retried
    GONE = "gone"  # the endpoint no longer exists (HTTP 404/410): never retried


DELIVERED_LIVE = Outcome.STREAMED
DELIVERED = frozenset({Outcome.STREAMED, Outcome.DELIVERED})  # the outcomes that mean a channel took it


class Channel(Protocol):
    """One way to reach a customer. ``inline = True`` (class attribute) marks an in-process channel
    the dispatcher feeds in commit order and never awaits for long (the stream hub); any other
    channel is remote: sent concurrently, bounded, so a slow one never holds the streams back."""

    name: str

    async def deliver(self, profile_id: int, message: Message) -> str:
        """Try one delivery; return an outcome word (above) recorded in the deliveries table.

        Raising is allowed and counts as a transient failure (``error``), retried with backoff.
        """
        ...


class StreamHub:
    """In-process fan-out to the live streams (SSE and WebSocket) of each profile."""

    name: str = ChannelName.SSE
    inline = True  # publish is a put_nowait per open stream: fed in commit order, never blocks

    def __init__(self, queue_size: int = 256) -> None:
        self.queue_size = queue_size
        self._subs: dict[int, set[asyncio.Queue[Message | None]]] = defaultdict(set)
        self._token_of: dict[asyncio.Queue[Message | None], str] = {}  # which app token opened a stream
        self.dropped_clients = 0

    def subscribe(self, profile_id: int, token_id: str | None = None) -> asyncio.Queue[Message | None]:
        """``token_id`` (the token's jti) lets a logout end only the streams that token opened."""
        q: asyncio.Queue[Message | None] = asyncio.Queue(self.queue_size)
        self._subs[profile_id].add(q)
        if token_id is not None:
            self._token_of[q] = token_id
        return q

    def unsubscribe(self, profile_id: int, q: asyncio.Queue[Message | None]) -> None:
        self._token_of.pop(q, None)
        subs = self._subs.get(profile_id)
        if subs is not None:
            subs.discard(q)
            if not subs:
                del self._subs[profile_id]

    def close_profile(self, profile_id: int, token_id: str | None = None) -> int:
        """End a profile's open streams (all, or only those one token opened); returns how many.

        A token checked once at connect would otherwise keep a stream alive after the customer is
        erased or their tokens revoked. A client whose token is still good reconnects and resumes."""
        closed = 0
        for q in list(self._subs.get(profile_id, ())):
            if token_id is not None and self._token_of.get(q) != token_id:
                continue
            self.unsubscribe(profile_id, q)
            q._queue.clear()  # type: ignore[attr-defined]  # make room for the close marker
            q.put_nowait(None)
            closed += 1
        return closed

    def listeners(self, profile_id: int) -> int:
        return len(self._subs.get(profile_id, ()))

    def open_streams(self) -> int:
        """Open SSE and WebSocket streams, all profiles together (a gauge for /metrics)."""
        return sum(len(subs) for subs in self._subs.values())

    def publish(self, profile_id: int, message: Message) -> int:
        delivered = 0
        for q in list(self._subs.get(profile_id, ())):
            try:
                q.put_nowait(message)
                delivered += 1
            except asyncio.QueueFull:
                self.dropped_clients += 1
                self.unsubscribe(profile_id, q)
                q._queue.clear()  # type: ignore[attr-defined]  # make room for the close marker
                q.put_nowait(None)  # tells the stream to end; the client resumes by Last-Event-ID
        return delivered

    async def deliver(self, profile_id: int, message: Message) -> str:
        return Outcome.STREAMED if self.publish(profile_id, message) else Outcome.NO_LISTENER

    def close_all(self) -> None:
        for subs in self._subs.values():
            for q in subs:
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(None)
        self._subs.clear()
        self._token_of.clear()
