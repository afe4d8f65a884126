"""What a scanner drain leaves in the database, on SQLite and on PostgreSQL: the visit with its zones, the
zone stays, loyalty points, segment memberships, decisions and notifications (the drain's events are judged
in bulk, each after its own visit or stay is written), anonymous footfall added up across ticks, and
scheduled sends released whoever scheduled them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from gateway.app.config import Settings
from gateway.app.pipeline import Pipeline
from gateway.campaigns.model import CampaignIndex, load_segments, parse_campaign
from gateway.engine.engine import RELEASE_RESCAN_S, Engine, EngineEvent
from gateway.presence.tracker import PresenceEvent
from gateway.profiles.service import GatewayService, NewProfile
from gateway.storage.db import Database
from gateway.storage.models import (
    Decision,
    FootfallCount,
    Notification,
    Profile,
    SegmentMembership,
    Visit,
    ZoneStay,
)

T0 = 1_780_000_000.0
KEY = "ibeacon:8f3c0a52-6d1e-4b7a-9c2d-5e4f3a2b1c00:100:1"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "campaigns"


def _campaigns() -> CampaignIndex:
    def camp(cid: str, trigger: dict[str, Any], **over: Any) -> Any:
        return parse_campaign({"id": cid, "purpose": "offers", "trigger": trigger,
                               "action": {"title": "Hi {profile.first_name} in {event.zone}", "body": "b"}, **over})

    return CampaignIndex([
        camp("shoes-hello", {"type": "enter", "zone": "shoes"}),
        camp("gold-welcome", {"type": "visit_start"},
             conditions={"fact": "profile.attributes.tier", "op": "eq", "value": "gold"}),
        camp("first-timers", {"type": "enter", "zone": "apparel"},
             conditions={"fact": "segments", "op": "contains", "value": "first_timer"}),
    ])


@pytest.fixture
def db(any_db: Database) -> Database:
    """Every test here runs on both engines (the shared ``service`` too)."""
    return any_db


def _world(service: GatewayService) -> tuple[Database, Pipeline, int]:
    db, ids, svc = service.db, service.identities, service
    pid = svc.create_profile(NewProfile(external_id="alice", name="Alice Smith", attributes={"tier": "silver"},
                                        consents={"offers": True}, identifiers=[("beacon", KEY)]))["id"]
    return db, Pipeline(Settings(), db, _campaigns(), ids, segments=load_segments(EXAMPLES)), pid


def _visit(p: Pipeline, start: float) -> None:
    """One visit in three drains: start and enter the shoes, on to the apparel, leave."""
    v, shoes, apparel = start, start + 1, start + 40
    p.handle_presence([PresenceEvent("visit_start", KEY, v, visit_since=v),
                       PresenceEvent("enter", KEY, shoes, "shoes", zone_since=shoes, visit_since=v)])
    p.handle_presence([PresenceEvent("exit", KEY, start + 39, "shoes", zone_since=shoes, visit_since=v, dwell_s=38),
                       PresenceEvent("enter", KEY, apparel, "apparel", zone_since=apparel, visit_since=v)])
    p.handle_presence([PresenceEvent("exit", KEY, start + 90, "apparel", zone_since=apparel, visit_since=v,
                                     dwell_s=50),
                       PresenceEvent("visit_end", KEY, start + 100, visit_since=v, dwell_s=100)])


def test_a_visit_is_stored_with_its_zones_stays_points_and_decisions(service: GatewayService) -> None:
    db, p, pid = _world(service)
    try:
        _visit(p, T0)
        with db.session() as s:
            (visit,) = s.scalars(select(Visit)).all()
            assert (visit.profile_id, visit.started_at, visit.ended_at, visit.zones) == (
                pid, T0, T0 + 100, ["shoes", "apparel"])
            stays = [(z.zone, z.visit_id, z.entered_at, z.exited_at)
                     for z in s.scalars(select(ZoneStay).order_by(ZoneStay.id))]
            assert stays == [("shoes", visit.id, T0 + 1, T0 + 39), ("apparel", visit.id, T0 + 40, T0 + 90)]
            assert s.get(Profile, pid).points == Settings().loyalty.points_per_visit  # type: ignore[union-attr]
            decided = {(d.campaign_id, d.event_kind): d.reason for d in s.scalars(select(Decision))}
            assert decided == {("gold-welcome", "visit_start"): "condition_false",
                               ("shoes-hello", "enter"): "fired",
                               ("first-timers", "enter"): "fired"}  # a first visit: in the first_timer segment
            sent = [(n.campaign_id, n.title) for n in s.scalars(select(Notification).order_by(Notification.id))]
            assert sent == [("shoes-hello", "Hi Alice in shoes"), ("first-timers", "Hi Alice in apparel")]
            assert set(s.scalars(select(SegmentMembership.segment_id))) == {"first_timer"}
        assert (p.figures["visits_new"], p.figures["visits_returning"]) == (1, 0)

        _visit(p, T0 + 3600)  # a second visit: returning, and no longer a first timer
        with db.session() as s:
            assert len(s.scalars(select(Visit)).all()) == 2
            assert s.get(Profile, pid).points == 2 * Settings().loyalty.points_per_visit  # type: ignore[union-attr]
            again = [d.reason for d in s.scalars(select(Decision).where(Decision.campaign_id == "first-timers",
                                                                       Decision.at > T0 + 3600))]
            assert again == ["condition_false"]
        assert (p.figures["visits_new"], p.figures["visits_returning"]) == (1, 1)
    finally:
        db.dispose()


def test_anonymous_footfall_adds_up_across_ticks(service: GatewayService) -> None:
    db, p, _ = _world(service)
    try:
        for i, t in enumerate((T0, T0 + 10)):  # two ticks, each with new passers-by in the same day and zone
            anon = f"ibeacon:0a1b2c3d-0000-4000-8000-00000000abcd:1:{i}"
            p.handle_presence([PresenceEvent("visit_start", anon, t, visit_since=t),
                               PresenceEvent("exit", anon, t + 5, "shoes", zone_since=t, visit_since=t, dwell_s=4.5)])
            p.tick(t + 6)
        with db.session() as s:
            rows = {r.zone: (r.anonymous_visits, r.anonymous_dwell_s) for r in s.scalars(select(FootfallCount))}
        assert rows == {"": (2, 0.0), "shoes": (2, 9.0)}
    finally:
        db.dispose()


def test_scheduled_sends_are_released_on_time_whoever_scheduled_them(service: GatewayService) -> None:
    """The engine asks the outbox only when a send it scheduled may be due, or at its periodic rescan: its own
    delayed send goes out at its time, one another process scheduled within the rescan after its time."""
    db, _, pid = _world(service)
    engine = Engine(CampaignIndex([parse_campaign({
        "id": "later", "purpose": "offers", "trigger": {"type": "enter", "zone": "shoes"},
        "action": {"title": "t", "body": "b", "delay_s": 2}})]))
    try:
        with db.session() as s:
            assert engine.release_due(s, T0) == []  # nothing scheduled: not asked again before the rescan
        with db.session() as s:  # another process schedules one for half a minute from now
            s.execute(insert(Notification), [{
                "profile_id": pid, "campaign_id": "elsewhere", "purpose": "offers", "dedup_key": "elsewhere:1",
                "title": "t", "body": "b", "data": {}, "created_at": T0, "status": "scheduled",
                "deliver_at": T0 + 30.5}])
        released: dict[int, float] = {}
        for t in range(1, 80):
            with db.session() as s:
                if t == 33:  # this engine schedules its own, due at T0 + 35 (between two rescans)
                    (mine,) = engine.handle(s, EngineEvent("enter", pid, T0 + 33, "stay:shoes:1", "shoes"))
                released.update((nid, T0 + t) for nid in engine.release_due(s, T0 + t))
        with db.session() as s:
            by_campaign = {n.campaign_id: n.id for n in s.scalars(select(Notification))}
            assert {n.status for n in s.scalars(select(Notification))} == {"pending"}
        assert released[by_campaign["later"]] == T0 + 35  # on time
        # Found by the rescan (within RELEASE_RESCAN_S of its time), before this engine scheduled anything.
        assert T0 + 30.5 <= released[by_campaign["elsewhere"]] <= min(T0 + 30.5 + RELEASE_RESCAN_S, T0 + 32)
        assert mine.notification_id == by_campaign["later"]
    finally:
        db.dispose()
