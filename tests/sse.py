"""A small, strict SSE client over httpx for tests: parses the wire format the way browsers do."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class SseEvent:
    id: str | None
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class SseReader:
    """Reads one stream in a background task and collects its events."""

    client: httpx.AsyncClient
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    events: list[SseEvent] = field(default_factory=list)
    status: int | None = None
    comments: int = 0
    _task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> SseReader:
        self._task = asyncio.create_task(self._run())
        await self.wait(lambda r: r.status is not None, timeout=10)
        return self

    async def _run(self) -> None:
        async with self.client.stream("GET", self.url, headers=self.headers, timeout=None) as resp:
            self.status = resp.status_code
            self._changed.set()
            if resp.status_code != 200:
                return
            ev: dict[str, Any] = {"id": None, "event": "message", "data": []}
            async for line in resp.aiter_lines():
                if line == "":
                    if ev["data"]:
                        self.events.append(SseEvent(ev["id"], ev["event"], "\n".join(ev["data"])))
                        self._changed.set()
                    ev = {"id": ev["id"], "event": "message", "data": []}
                elif line.startswith(":"):
                    self.comments += 1
                else:
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "data":
                        ev["data"].append(value)
                    elif name in ("id", "event"):
                        ev[name] = value

    async def wait(self, predicate: Any, timeout: float = 10.0) -> bool:
        """Wait (bounded) until predicate(self) holds; returns whether it did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            remaining = deadline - loop.time()
            if remaining <= 0 or (self._task is not None and self._task.done()):
                return bool(predicate(self))
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
