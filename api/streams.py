"""The customer's live stream, one loop for SSE (routers/me.py) and the WebSocket (routers/ws.py).

Subscribed to the hub before the backlog is read, so nothing committed between the two is missed;
the backlog is replayed, then live messages follow, each sent once. Live messages are filtered by the
replayed ids, not by "greater than the last id": a scheduled send released later carries an older
id and must still go out. How each message is written is the transport's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fastapi.concurrency import run_in_threadpool

from api.deps import ApiContext
from gateway.security.tokens import Claims


@dataclass(frozen=True)
class Pushed:
    """One notification for the stream; ``replayed``: from the backlog, not live."""

    message: dict[str, Any]
    replayed: bool


class CustomerStream:
    """One open stream of one customer's token; ``close()`` it when the transport ends."""

    def __init__(self, ctx: ApiContext, claims: Claims, queue: asyncio.Queue[dict[str, Any] | None],
                 backlog: list[dict[str, Any]]) -> None:
        self.ctx, self.claims, self.queue, self.backlog = ctx, claims, queue, backlog

    @classmethod
    async def open(cls, ctx: ApiContext, claims: Claims, after: int) -> CustomerStream:
        """Subscribe, then read the unacked notifications after ``after`` (off the loop)."""
        queue = ctx.hub.subscribe(claims.profile_id, claims.token_id)
        try:
            backlog = await run_in_threadpool(ctx.service.replay, claims.profile_id, after)
        except BaseException:
            ctx.hub.unsubscribe(claims.profile_id, queue)
            raise
        return cls(ctx, claims, queue, backlog)

    def close(self) -> None:
        self.ctx.hub.unsubscribe(self.claims.profile_id, self.queue)

    def expired(self) -> bool:
        return self.claims.expires_at <= self.ctx.service.clock.now()

    async def messages(self) -> AsyncGenerator[Pushed | None, None]:
        """The backlog, then live messages; ``None`` after a heartbeat's idle time (the transport pings).

        Ends when the hub ends the stream (too slow, the customer erased, the token revoked) or the
        token expired while it was open: the app reconnects with its last id.
        """
        replayed = {old["id"] for old in self.backlog}
        for old in self.backlog:
            yield Pushed(old, replayed=True)
        while True:
            try:
                async with asyncio.timeout(self.ctx.heartbeat_s):  # no task per message, unlike wait_for
                    msg = await self.queue.get()
            except TimeoutError:
                if self.expired():
                    return
                yield None
                continue
            if msg is None:
                return
            if msg["id"] not in replayed:  # committed between subscribe and replay: sent once
                yield Pushed(msg, replayed=False)
