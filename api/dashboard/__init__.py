"""The staff dashboard: sign-in, the live store on its floor plan, the decision feed, campaigns, the
calibration walk.

Server-rendered pages (Jinja2) with one small script for the live view; every asset ships in this
package (static/, no CDN). The pages read the same services the API routes call (presence now, the
figures); they hold no business rules. ``Dashboard`` is what the runtime hands the app: the floor plan,
the receivers, where walks are kept, and the sign-in state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from api.dashboard.feed import DecisionFeed
from api.dashboard.plan import FloorImage, Plan, plan, zone_names
from api.dashboard.sessions import LoginTokens, Sessions
from api.dashboard.walks import Walks
from gateway.clock import Clock, SystemClock
from gateway.presence.settings import FloorZone, ReceiverSettings

Heard = Callable[[], dict[str, dict[str, Any]]]
"""Per receiver id: ``{"last": newest sample time, "tags": identities it heard lately}`` (read on the loop)."""


@dataclass
class Dashboard:
    zones: Sequence[FloorZone] = ()
    receivers: Sequence[ReceiverSettings] = ()
    data_dir: str | None = None
    """Where the calibration walks are kept (``dashboard/walks.json``); None: in memory only."""
    record_dir: str = ""
    """Where ``gateway run --record`` writes traces (shown with the labels); empty: not recording."""
    heard: Heard | None = None
    campaigns_dir: str | None = None
    """Where the file campaigns are (shown read-only as written); None: their summary only."""
    floor_image: FloorImage | None = None
    """The picture drawn under the plan (``[dashboard] floor_image``), checked at start."""
    names_purpose: str | None = None
    """The consent purpose under which the store page names enrolled customers in their zones (first name
    only); None, the default: it names nobody."""
    clock: Clock = field(default_factory=SystemClock)
    stream_every_s: float = 1.0
    """How often the live stream looks at presence; it sends only what changed (and a heartbeat)."""
    heartbeat_s: float = 15.0
    tokens: LoginTokens = field(default_factory=LoginTokens)
    sessions: Sessions = field(default_factory=Sessions)
    feed: DecisionFeed = field(default_factory=DecisionFeed)
    notes: dict[str, str] = field(default_factory=dict)
    """A session's (by its id's hash) message for the next page it opens: a walk request that was refused."""
    monotonic: Callable[[], float] = time.monotonic
    """How old the shared live view is (a real-time throttle, not the store's clock, which may be virtual)."""
    walks: Walks = field(init=False)
    _live: dict[str, tuple[float, str]] = field(init=False, default_factory=dict)
    _live_locks: dict[str, asyncio.Lock] = field(init=False, default_factory=dict)
    _closing: asyncio.Event | None = field(init=False, default=None)
    plan: Plan = field(init=False)
    zone_names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.walks = Walks(Path(self.data_dir) / "dashboard" / "walks.json" if self.data_dir else None)
        self.plan = plan(self.zones, self.receivers,
                         self.floor_image.bounds if self.floor_image is not None else None)
        self.zone_names = zone_names(self.zones, self.receivers)

    @property
    def closed(self) -> bool:
        return self._closing is not None and self._closing.is_set()

    async def wait(self, seconds: float) -> None:
        """A stream's pause between looks, cut short when the gateway stops (``close``)."""
        if self._closing is None:
            self._closing = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    def close(self) -> None:
        """The gateway is stopping: open streams end now, not at the server's graceful-shutdown timeout.
        On the event loop."""
        if self._closing is None:
            self._closing = asyncio.Event()
        self._closing.set()

    async def shared(self, compute: Callable[[], Awaitable[Any]], view: str = "store") -> str:
        """A live view (the store's, the health page's) as JSON, computed at most twice per ``stream_every_s``
        however many pages stream it: each open page would otherwise walk every tracked person (or probe the
        database) once a second itself."""
        lock = self._live_locks.setdefault(view, asyncio.Lock())
        async with lock:  # the pages that ask meanwhile take the one being computed
            now = self.monotonic()
            last = self._live.get(view)
            if last is None or now - last[0] >= self.stream_every_s / 2:
                last = self._live[view] = (now, json.dumps(await compute(), separators=(",", ":")))
            return last[1]

    def login_link(self, base_url: str) -> str:
        """A one-time sign-in link (as Jupyter prints one): it works once, within ``tokens.ttl_s``."""
        token = self.tokens.issue(self.clock.now())
        return f"{base_url.rstrip('/')}/dashboard/login?token={quote(token)}"


__all__ = ["Dashboard"]
