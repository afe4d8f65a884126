"""Engagement figures per zone (issue 5 item 8: per store, zone, campaign and day): the delivery
figures of the notifications a zone's events triggered, in the range, filtered by zone, and per day."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from zoneinfo import ZoneInfo

import pytest

from gateway.campaigns.model import Campaign, CampaignIndex, parse_campaign
from gateway.engine.engine import Engine, EngineEvent
from gateway.engine.figures import figures
from gateway.profiles.service import GatewayService, NewProfile
from gateway.storage.db import Database
from gateway.storage.models import Interaction

TZ = "Europe/Paris"
T0 = dt.datetime(2026, 6, 1, 11, 0, tzinfo=ZoneInfo(TZ)).timestamp()
DAY1, DAY2 = "2026-06-01", "2026-06-02"


def camp(cid: str, trigger: dict[str, object], purpose: str = "offers") -> Campaign:
    return parse_campaign({"id": cid, "purpose": purpose, "trigger": trigger, "action": {"title": "t", "body": "b"}})


@pytest.fixture
def store(service: GatewayService) -> Iterator[Database]:
    db, svc = service.db, service
    pids = [svc.create_profile(NewProfile(external_id=f"p{i}", consents={"offers": True, "maintenance": True}))["id"]
            for i in range(3)]
    engine = Engine(CampaignIndex([camp("shoes-offer", {"type": "enter", "zone": "shoes"}),
                                   camp("apparel-offer", {"type": "enter", "zone": "apparel"}),
                                   camp("service", {"type": "telemetry", "metric": "hours", "above": 50},
                                        purpose="maintenance")]))
    sent: dict[tuple[str, int, int], int | None] = {}
    with db.session() as s:
        for day in (0, 1):
            t = T0 + day * 86400
            for p in pids:  # everyone enters shoes on both days; only the first enters apparel, on day one
                [o] = engine.handle(s, EngineEvent("enter", p, t, f"stay:shoes:{t}", "shoes"))
                sent[("shoes", day, p)] = o.notification_id
            if day == 0:
                [o] = engine.handle(s, EngineEvent("enter", pids[0], t + 60, f"stay:apparel:{t}", "apparel"))
                sent[("apparel", 0, pids[0])] = o.notification_id
                [o] = engine.handle(s, EngineEvent("telemetry", pids[1], t, "r1", facts={
                    "device": {"id": "m1"}, "reading": {"hours": 51}}))
                assert o.fired
        # Day one in shoes: two of three opened, one clicked; apparel's one was dismissed.
        s.add(Interaction(notification_id=sent[("shoes", 0, pids[0])], kind="opened", at=T0 + 5))
        s.add(Interaction(notification_id=sent[("shoes", 0, pids[1])], kind="clicked", at=T0 + 9))
        s.add(Interaction(notification_id=sent[("apparel", 0, pids[0])], kind="dismissed", at=T0 + 70))
    yield db
    db.dispose()


def test_notifications_are_summed_per_zone_of_their_event(store: Database) -> None:
    with store.session() as s:
        f = figures(s, DAY1, DAY2, TZ)
    by_zone = f["notifications"]["zones"]
    assert set(by_zone) == {"shoes", "apparel"}  # the telemetry prompt has no zone
    shoes, apparel = by_zone["shoes"], by_zone["apparel"]
    assert (shoes["notified"], shoes["opened"], shoes["clicked"]) == (6, 2, 1)
    assert shoes["engagement_rate"] == round(100 * 2 / 6, 2)
    assert (apparel["notified"], apparel["dismissed"], apparel["engagement_rate"]) == (1, 1, 0.0)
    assert f["notifications"]["total"]["notified"] == 8


def test_per_zone_figures_follow_the_zone_filter_and_come_per_day(store: Database) -> None:
    with store.session() as s:
        f = figures(s, DAY1, DAY2, TZ, zone="apparel")
    assert set(f["notifications"]["zones"]) == {"apparel"}
    day1, day2 = f["days"]
    assert day1["day"] == DAY1 and day1["notifications_by_zone"]["apparel"]["notified"] == 1
    assert day2["notifications_by_zone"] == {}
    with store.session() as s:
        days = figures(s, DAY1, DAY2, TZ)["days"]
    assert [d["notifications_by_zone"]["shoes"]["notified"] for d in days] == [3, 3]
    assert days[0]["notifications_by_zone"]["shoes"]["opened"] == 2 and days[1]["notifications_by_zone"]["shoes"][
        "opened"] == 0
