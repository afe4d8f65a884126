"""The `exit` and `visit_end` triggers through the runtime's pipeline (presence event -> engine ->
outbox): a campaign on leaving a zone fires once, on that zone's exit only, with the stay's dwell in
its template; a campaign on the end of a visit fires once, at the end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select

from gateway.app.config import Settings
from gateway.app.pipeline import Pipeline
from gateway.campaigns.model import CampaignIndex, parse_campaign
from gateway.presence.settings import ReceiverSettings, ZoneBand
from gateway.presence.tracker import PresenceEvent
from gateway.profiles.service import GatewayService, NewProfile
from gateway.storage.db import Database
from gateway.storage.models import Decision, Notification

T0 = 1_780_300_800.0
KEY = "ibeacon:aa:1:1"
BYE = {"id": "bye-shoes", "purpose": "offers", "trigger": {"type": "exit", "zone": "shoes"},
       "action": {"title": "You spent {event.dwell_s} s in {event.zone}", "body": "b"}}
THANKS = {"id": "thanks", "purpose": "offers", "trigger": {"type": "visit_end"},
          "action": {"title": "Thanks for coming, {profile.first_name}", "body": "b"}}


@pytest.fixture
def shop(service: GatewayService) -> Iterator[tuple[Database, Pipeline, int]]:
    s = Settings()
    s.receivers = [ReceiverSettings("rx", [ZoneBand("shoes", 5.0), ZoneBand("apparel", 9.0)])]
    s.device_rules.dir = ""
    db, ids, svc = service.db, service.identities, service
    pid = svc.create_profile(NewProfile(external_id="ann", name="Ann Lee", identifiers=[("beacon", KEY)],
                                        consents={"offers": True}))["id"]
    pipe = Pipeline(s, db, CampaignIndex([parse_campaign(BYE), parse_campaign(THANKS)]), ids)
    yield db, pipe, pid


def sent(db: Database) -> list[tuple[str, str]]:
    with db.session() as s:
        return [(n.campaign_id, n.title) for n in s.scalars(select(Notification).order_by(Notification.id))]


def test_exit_and_visit_end_campaigns_fire_once_at_their_moment(shop: tuple[Database, Pipeline, int]) -> None:
    db, pipe, _ = shop
    t = T0
    assert pipe.handle_presence([PresenceEvent("visit_start", KEY, t, "apparel", t, t),
                                 PresenceEvent("enter", KEY, t, "apparel", t, t),
                                 PresenceEvent("dwell", KEY, t + 10, "apparel", t, t, 10.0)]) == []
    assert pipe.handle_presence([PresenceEvent("exit", KEY, t + 30, "apparel", t, t, 30.0)]) == []  # another zone
    assert pipe.handle_presence([PresenceEvent("enter", KEY, t + 31, "shoes", t + 31, t),
                                 PresenceEvent("dwell", KEY, t + 45, "shoes", t + 31, t, 14.0)]) == []
    [bye] = pipe.handle_presence([PresenceEvent("exit", KEY, t + 76, "shoes", t + 31, t, 45.0)])
    assert sent(db) == [("bye-shoes", "You spent 45 s in shoes")]
    [thanks] = pipe.handle_presence([PresenceEvent("visit_end", KEY, t + 200, None, None, t, 200.0)])
    assert bye < thanks and sent(db)[1] == ("thanks", "Thanks for coming, Ann")
    with db.session() as s:
        decisions = [(d.campaign_id, d.event_kind, d.reason) for d in s.scalars(select(Decision).order_by(Decision.id))]
    assert decisions == [("bye-shoes", "exit", "fired"), ("thanks", "visit_end", "fired")]


def test_a_repeated_exit_of_the_same_stay_is_judged_once(shop: tuple[Database, Pipeline, int]) -> None:
    db, pipe, _ = shop
    t = T0
    pipe.handle_presence([PresenceEvent("visit_start", KEY, t, "shoes", t, t),
                          PresenceEvent("enter", KEY, t, "shoes", t, t)])
    assert len(pipe.handle_presence([PresenceEvent("exit", KEY, t + 20, "shoes", t, t, 20.0)])) == 1
    assert pipe.handle_presence([PresenceEvent("exit", KEY, t + 21, "shoes", t, t, 21.0)]) == []
    assert [c for c, _ in sent(db)] == ["bye-shoes"]
