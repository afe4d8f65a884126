"""Why a campaign did or did not fire, and what would happen for a synthetic event.

A dry run uses a fresh engine (no in-memory history) inside a transaction that is rolled back,
so it sees the same durable state (consents, cooldowns, caps, budgets) and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway.campaigns.model import CampaignIndex
from gateway.engine.engine import Engine, EngineEvent, FrequencyCap
from gateway.storage.models import Decision


def why(session: Session, profile_id: int, campaign_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The most recent decisions for a profile (and a campaign), newest first."""
    q = select(Decision).where(Decision.profile_id == profile_id)
    if campaign_id is not None:
        q = q.where(Decision.campaign_id == campaign_id)
    rows = session.scalars(q.order_by(Decision.id.desc()).limit(limit))
    return [{"id": d.id, "at": d.at, "campaign": d.campaign_id, "event": d.event_kind, "event_key": d.event_key,
             "fired": d.fired, "reason": d.reason, "detail": d.detail, "variant": d.variant} for d in rows]


def recent(session: Session, limit: int = 50, store: str | None = None) -> list[dict[str, Any]]:
    """The store's most recent decisions for every profile, newest first (the staff's decision feed)."""
    q = select(Decision)
    if store is not None:
        q = q.where(Decision.store_id == store)
    rows = session.scalars(q.order_by(Decision.id.desc()).limit(limit))
    return [{"id": d.id, "at": d.at, "profile_id": d.profile_id, "campaign": d.campaign_id, "event": d.event_kind,
             "event_key": d.event_key, "fired": d.fired, "reason": d.reason, "detail": d.detail,
             "variant": d.variant} for d in rows]


def counts(session: Session, since: float, store: str | None = None) -> dict[str, dict[str, int]]:
    """Per campaign, its decisions since ``since``: fired and suppressed (any other reason)."""
    q = select(Decision.campaign_id, Decision.fired, func.count()).where(Decision.at >= since)
    if store is not None:
        q = q.where(Decision.store_id == store)
    out: dict[str, dict[str, int]] = {}
    for campaign, fired, n in session.execute(q.group_by(Decision.campaign_id, Decision.fired)):
        out.setdefault(campaign, {"fired": 0, "suppressed": 0})["fired" if fired else "suppressed"] += int(n)
    return out


def dry_run(session: Session, event: EngineEvent, *, engine: Engine | None = None,
            campaigns: CampaignIndex | None = None, abandon_after_s: float = 1800.0, timezone: str = "UTC",
            caps: Sequence[FrequencyCap] = ()) -> list[dict[str, Any]]:
    """Evaluate ``event`` as the engine would, then roll everything back: nothing is sent or stored.

    ``engine`` is a fresh engine configured like the live one (``Engine.clone()``): segments, tiers,
    caps, channels and timezone included, so the answer is the one the live engine would give."""
    if engine is None:
        assert campaigns is not None, "give an engine or the campaigns"
        engine = Engine(campaigns, abandon_after_s=abandon_after_s, timezone=timezone, caps=caps)
    nested = session.begin_nested()
    try:
        outcomes = engine.handle(session, event)
        return [{k: v for k, v in asdict(o).items() if k not in ("notification_id", "who")} for o in outcomes]
    finally:
        nested.rollback()
