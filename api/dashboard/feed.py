"""The decision feed: each engine decision as it happens, kept briefly in memory for the open pages.

The pipeline hands every outcome to its ``on_outcome`` hook on the worker thread; ``DecisionFeed.hook``
wraps the runtime's hook so each one is also kept here (a bounded deque, so memory stays flat however
many decisions a day makes). The live stream sends the items after the sequence number its page was drawn
at; a reload draws the latest from the decisions table (``GatewayService.recent_decisions``), so nothing
here needs to survive a restart. Only the profile id is kept: the first name is looked up when an item is
shown, so an erased profile's name never comes back.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from gateway.engine.engine import EngineEvent, Outcome, Reason
from gateway.errors import NotFound

FEED_SIZE = 200
"""Decisions kept in memory for open pages; a page drawn earlier than these were made reloads from the table."""
OVERLAP = 20
"""A page's stream starts this many items before its drawing: a decision made while the page read the table
(not yet committed) still reaches it; the page skips the ones it already shows (same key)."""

REASONS: dict[str, str] = {
    Reason.FIRED: "fired",
    Reason.NO_CONSENT: "no consent for the campaign's purpose",
    Reason.CONDITION_FALSE: "a condition did not hold",
    Reason.COOLDOWN: "cooling down",
    Reason.LOST_ARBITRATION: "another campaign won (priority)",
    Reason.DUPLICATE: "already sent for this occurrence",
    Reason.CAPPED: "frequency cap reached",
    Reason.QUIET_HOURS: "quiet hours",
    Reason.HOLDOUT: "in the experiment's holdout",
    Reason.BUDGET_EXHAUSTED: "budget used up",
    Reason.NOT_REELIGIBLE: "already had it as often as allowed",
    Reason.CANCELLED: "a scheduled send was withdrawn",
    Reason.EXPIRED: "a scheduled send expired while it waited",
}
"""Each engine reason in words for staff; the code stays beside it on the page."""

Hook = Callable[[Outcome, EngineEvent], None]


@dataclass(frozen=True, slots=True)
class FeedItem:
    seq: int
    at: float
    profile_id: int
    campaign: str
    event: str
    event_key: str
    zone: str | None
    fired: bool
    reason: str
    detail: str | None
    variant: str | None


class DecisionFeed:
    """The latest decisions, appended from the pipeline's worker thread and read on the event loop."""

    def __init__(self, size: int = FEED_SIZE) -> None:
        self._items: deque[FeedItem] = deque(maxlen=size)
        self._lock = threading.Lock()
        self._seq = 0

    def record(self, o: Outcome, ev: EngineEvent) -> None:
        with self._lock:
            self._seq += 1
            self._items.append(FeedItem(self._seq, ev.time, o.profile_id, o.campaign_id, ev.kind, ev.key, ev.zone,
                                        o.fired, str(o.reason), o.detail, o.variant))

    def hook(self, inner: Hook | None) -> Hook:
        """The pipeline's outcome hook: the runtime's own (logging), then this feed."""

        def both(o: Outcome, ev: EngineEvent) -> None:
            if inner is not None:
                inner(o, ev)
            self.record(o, ev)

        return both

    @property
    def last_seq(self) -> int:
        return self._seq

    def start_for_page(self) -> int:
        """Where a page drawn now starts its stream (see OVERLAP)."""
        return max(0, self._seq - OVERLAP)

    def after(self, seq: int) -> list[FeedItem]:
        with self._lock:
            return [i for i in self._items if i.seq > seq]

    def forget(self, profile_id: int) -> None:
        """An erased (or linked-away) profile's decisions leave the feed (any thread)."""
        with self._lock:
            kept = [i for i in self._items if i.profile_id != profile_id]
            self._items.clear()
            self._items.extend(kept)


def first_name(name: str | None) -> str | None:
    """What the feed calls a customer: the first word of the profile's name (never an address or id)."""
    words = (name or "").split()
    return words[0] if words else None


def first_names(get_profile: Callable[[int], Mapping[str, Any]], ids: Iterable[int]) -> dict[int, str | None]:
    """Per profile id that still exists, its first name (None: no name given). Off the event loop."""
    out: dict[int, str | None] = {}
    for pid in sorted(set(ids)):
        try:
            out[pid] = first_name(get_profile(pid).get("name"))
        except NotFound:
            continue  # erased since: its decision is not shown
    return out


def decision_key(campaign: str, profile_id: int, event_key: str) -> str:
    """One decision's identity (a campaign judges an occurrence once), shared by the table and the feed."""
    return f"{campaign}|{profile_id}|{event_key}"


def view(row: Mapping[str, Any], names: Mapping[int, str | None], timezone: str) -> dict[str, Any] | None:
    """A decision as the page shows it, from a table row (``recent_decisions``) or a FeedItem's fields;
    None when its profile is gone."""
    pid = int(row["profile_id"])
    if pid not in names:
        return None
    local = dt.datetime.fromtimestamp(float(row["at"]), ZoneInfo(timezone))
    reason = str(row["reason"])
    query = urlencode({"profile": pid, "campaign": row["campaign"], "key": row["event_key"]})
    return {"key": decision_key(row["campaign"], pid, row["event_key"]), "at": row["at"],
            "time": f"{local:%H:%M:%S}", "customer": names[pid] or f"customer #{pid}", "profile_id": pid,
            "campaign": row["campaign"], "event": row["event"], "zone": row.get("zone"), "fired": bool(row["fired"]),
            "reason": reason, "reason_text": REASONS.get(reason, reason), "detail": row.get("detail"),
            "variant": row.get("variant"), "explain": f"/dashboard/decisions/explain?{query}"}


def item_row(i: FeedItem) -> dict[str, Any]:
    return {"at": i.at, "profile_id": i.profile_id, "campaign": i.campaign, "event": i.event,
            "event_key": i.event_key, "zone": i.zone, "fired": i.fired, "reason": i.reason, "detail": i.detail,
            "variant": i.variant}
