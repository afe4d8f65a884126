"""Limit checks as pure functions over a profile's send history (read once for the batch by the store).

A history row is (campaign id, sent at, purpose, data, notification id or None while unwritten, gone out):
"sent at" is when the customer gets it (its delivery time when held or delayed), so limits judge what the
customer sees, on both sides of a send's own time. "Gone out" is false while it is scheduled (delayed or
held): a row that has gone out yet is later than the send being judged was sent before the wall clock
stepped back, and caps count it as sent at the judged send's time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

SendRow = tuple[str, float, str, Any, int | None, bool]


@dataclass(frozen=True, slots=True)
class FrequencyCap:
    """At most ``max`` notifications per profile in any rolling ``window_s``, across campaigns; with a
    ``channel``, at most ``max`` over that channel (a full channel is left out, the others still carry it)."""

    window_s: float
    max: int
    purposes: tuple[str, ...] = ("offers", "cart_reminders")  # service messages are not capped
    channel: str | None = None


def nearest_within(history: Iterable[SendRow], campaign_id: str, at: float, window_s: float) -> float | None:
    """The campaign's send nearest to ``at`` that blocks it (a cooldown's blocker), or None: one less than
    ``window_s`` before it, or any at or after it. A later one is either still due (delayed, held) or was
    sent before the wall clock stepped back; either way the customer has it, so it blocks until the clock
    is past it: a step back can lengthen a cooldown by up to the step, never shorten it."""
    lo = at - window_s
    near = [t for cid, t, _, _, _, _ in history if cid == campaign_id and lo < t]
    return min(near, key=lambda x: abs(at - x)) if near else None


def capped(caps: Sequence[FrequencyCap], at: float, channels: tuple[str, ...], history: Iterable[SendRow],
           default_channels: Sequence[str]) -> tuple[tuple[str, ...], str | None]:
    """The channels a send at ``at`` may still use under ``caps`` (the ones that count its purpose), and why
    it may not go at all (None: it may). A full channel cap leaves that channel out; a full cap without a
    channel, or no channel left, stops the send.

    A send that has gone out at a time after ``at`` was made before the wall clock stepped back (an event is
    judged at about its own time): it counts as sent at ``at``, so a step back longer than a cap's window
    does not let the cap count afresh; the cap lasts until the clock is past such sends plus the window (a
    step back can lengthen it by up to the step, never shorten it). A scheduled send (delayed, held until
    tomorrow morning) counts at its own time, so it does not use up today's cap."""
    if caps:
        widest = max(cap.window_s for cap in caps)
        lo, hi = at - widest, at + widest
        recent = []
        for _, sent_at, purpose, data, _, out in history:
            t = at if out and sent_at > at else sent_at
            if lo < t < hi:
                recent.append((t, purpose, data))
        for cap in caps:
            if cap.channel is not None and cap.channel not in channels:
                continue
            n = sum(1 for t, purpose, data in recent if purpose in cap.purposes and abs(t - at) < cap.window_s
                    and (cap.channel is None or cap.channel in ((data or {}).get("channels") or default_channels)))
            if n < cap.max:
                continue
            where = f" on {cap.channel}" if cap.channel else ""
            detail = f"{n} sent{where} within {cap.window_s:.0f} s, cap {cap.max}"
            if cap.channel is None:
                return channels, detail
            channels = tuple(ch for ch in channels if ch != cap.channel)
            if not channels:
                return channels, detail
    if not channels:
        return channels, "none of its channels is configured"
    return channels, None


def exhausted(used: int, limit: int) -> bool:
    """A re-eligibility or budget limit (0: none) is used up."""
    return bool(limit) and used >= limit
