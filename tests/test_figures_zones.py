"""Engagement figures per zone (per store, zone, campaign and day): the delivery figures of the
notifications a zone's events triggered, in the range, filtered by zone, and per day; and, from people walked
through the real pipeline (enrolled and anonymous, in two hours), footfall per hour and bounce per zone."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from gateway.app.config import FigureSettings, Settings, StoreSettings
from gateway.app.pipeline import Pipeline
from gateway.campaigns.model import Campaign, CampaignIndex, parse_campaign
from gateway.clock import VirtualClock
from gateway.engine.engine import Engine, EngineEvent
from gateway.engine.figures import figures
from gateway.presence.tracker import PresenceEvent
from gateway.presence.visits import Visits
from gateway.profiles.service import GatewayService, NewProfile, ServiceOptions
from gateway.storage.db import Database
from gateway.storage.models import FootfallCount, FootfallHour, Interaction
from tests.fixtures import make_service

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


# ------------------------------------------------------------------ people through the pipeline, two hours

BOUNCE_S = 45.0  # [figures] bounce_s: a 50 s stay is no bounce here, though it would be at the default 60


def tag(name: str) -> str:
    """A beacon key (as the tracker names an iBeacon) per person."""
    return f"ibeacon:8f3c0a52-6d1e-4b7a-9c2d-5e4f3a2b1c00:7:{sum(map(ord, name))}"


def at(hour: int, minute: int, second: int = 0) -> float:
    return dt.datetime(2026, 6, 1, hour, minute, second, tzinfo=ZoneInfo(TZ)).timestamp()


def walk(p: Pipeline, key: str, zones: list[tuple[str, float]], start: float) -> None:
    """One visit through the pipeline, a drain per step: in at ``start``, each (zone, seconds) in turn, out
    5 s after the last zone (as the tracker reports them: visit start and enter together, exit on leaving)."""
    t = start
    for i, (zone, stay_s) in enumerate(zones):
        first = [PresenceEvent("visit_start", key, t, zone, t, t)] if i == 0 else []
        p.handle_presence([*first, PresenceEvent("enter", key, t, zone, t, start)])
        p.handle_presence([PresenceEvent("exit", key, t + stay_s, zone, t, start, stay_s)])
        t += stay_s
    p.handle_presence([PresenceEvent("visit_end", key, t + 5, None, None, start, t + 5 - start)])
    p.flush_footfall()  # a tick: anonymous counts reach the database


@pytest.fixture
def pipeline(any_db: Database) -> Iterator[tuple[Pipeline, GatewayService]]:
    """A pipeline as ``gateway run`` builds it (store time in Paris, bounce at 45 s), on SQLite and PostgreSQL,
    with two enrolled customers; every other tag is anonymous."""
    svc = make_service(any_db, VirtualClock(at(9, 0)), options=ServiceOptions(timezone=TZ, bounce_s=BOUNCE_S))
    for name in ("alice", "bob"):
        svc.create_profile(NewProfile(external_id=name, consents={"offers": True},
                                      identifiers=[("beacon", tag(name))]))
    settings = Settings(store=StoreSettings(timezone=TZ), figures=FigureSettings(bounce_s=BOUNCE_S))
    yield Pipeline(settings, any_db, CampaignIndex([]), svc.identities), svc


def test_footfall_per_hour_and_bounce_per_zone_count_anonymous_and_enrolled_people(
        pipeline: tuple[Pipeline, GatewayService]) -> None:
    p, svc = pipeline
    # 10:00-11:00: Alice glances at the shoes (30 s, a bounce) then stays in apparel; a stranger stays in shoes.
    walk(p, tag("alice"), [("shoes", 30), ("apparel", 240)], at(10, 5))
    walk(p, tag("x"), [("shoes", 200)], at(10, 20))
    # 14:00-15:00: a stranger in and out of the shoes in 20 s (a bounce, of the zone and of the visit); another
    # stays 50 s (no bounce at 45 s); Bob spends 90 s in apparel.
    walk(p, tag("y"), [("shoes", 20)], at(14, 0, 10))
    walk(p, tag("z"), [("shoes", 50)], at(14, 10))
    walk(p, tag("bob"), [("apparel", 90)], at(14, 30))
    f = svc.figures(DAY1, None, TZ)
    busy = {h["hour"]: (h["footfall"], h["enrolled_visits"], h["anonymous_visits"]) for h in f["hours"]
            if h["footfall"]}
    assert busy == {"10:00": (2, 1, 1), "14:00": (3, 1, 2)}
    assert len(f["hours"]) == 24 and sum(h["footfall"] for h in f["hours"]) == f["footfall"] == 5
    shoes, apparel = f["zones"]["shoes"], f["zones"]["apparel"]
    # shoes: Alice 30 s (bounce), strangers 200, 20 (bounce) and 50 s: 2 of 4 stays
    assert (shoes["enrolled_bounces"], shoes["anonymous_bounces"], shoes["bounce_rate"]) == (1, 1, 50.0)
    assert (shoes["footfall"], shoes["enrolled"], shoes["anonymous"]) == (4, 1, 3)
    assert (apparel["enrolled_bounces"], apparel["anonymous_bounces"], apparel["bounce_rate"]) == (0, 0, 0.0)
    # The store: Alice saw two zones, Bob stayed 120 s; of the strangers only y's 25 s visit bounced.
    assert (f["bounce_rate"], f["anonymous_bounces"], f["bounce_rate_all"]) == (0.0, 1, 20.0)
    [day] = f["days"]
    assert day["zones"]["shoes"]["bounce_rate"] == 50.0 and day["bounce_rate_all"] == 20.0
    with svc.db.session() as s:  # counts only: no key, no address in either table
        hours = {(r.hour, r.zone): r.anonymous_visits for r in s.scalars(select(FootfallHour))}
        daily = {r.zone: (r.anonymous_visits, r.anonymous_ended, r.anonymous_bounces)
                 for r in s.scalars(select(FootfallCount))}
    assert hours == {(10, ""): 1, (10, "shoes"): 1, (14, ""): 2, (14, "shoes"): 2}
    assert daily == {"": (3, 3, 1), "shoes": (3, 3, 1)}
    assert svc.figures(DAY2, None, TZ)["hours"][10]["footfall"] == 0  # another day: its own hours
    assert "hours" not in svc.figures(DAY1, DAY2, TZ)  # only a one-day range has hours
    elsewhere = svc.figures(DAY1, None, TZ, store="store-elsewhere")  # another store's: none of these
    assert sum(h["footfall"] for h in elsewhere["hours"]) == 0 and elsewhere["bounce_rate_all"] is None


def test_a_day_counted_before_bounces_were_is_left_out_of_the_bounce_rate(
        pipeline: tuple[Pipeline, GatewayService]) -> None:
    p, svc = pipeline
    with svc.db.session() as s:  # as migration 0013 leaves a row written before it: none judged
        s.add(FootfallCount(day=DAY1, zone="shoes", anonymous_visits=7, anonymous_dwell_s=700.0))
        s.commit()
    walk(p, tag("y"), [("shoes", 20)], at(14, 0))  # the same day's row then counts from there
    with svc.db.session() as s:
        row = s.scalars(select(FootfallCount).where(FootfallCount.zone == "shoes")).one()
    assert (row.anonymous_visits, row.anonymous_ended, row.anonymous_bounces) == (8, 1, 1)
    with svc.db.session() as s:
        s.add(FootfallCount(day=DAY2, zone="shoes", anonymous_visits=5, anonymous_dwell_s=500.0))
        s.commit()
    zones = svc.figures(DAY1, DAY2, TZ)["zones"]
    # Footfall counts all 13; the bounce rate only the one stay judged (not 12 unjudged ones as no bounce).
    assert zones["shoes"]["anonymous"] == 13 and zones["shoes"]["bounce_rate"] == 100.0


def test_the_hour_repeated_when_the_clocks_go_back_keeps_its_own_count(any_db: Database) -> None:
    visits = Visits("store-001", TZ, bounce_s=BOUNCE_S)
    first = dt.datetime(2026, 10, 25, 2, 30, tzinfo=ZoneInfo(TZ)).timestamp()  # 02:30 CEST
    visits.per_profile([PresenceEvent("visit_start", tag("a"), first, "shoes", first, first),
                        PresenceEvent("visit_start", tag("b"), first + 3600, "shoes", first + 3600, first + 3600)],
                       lambda key: None)  # 02:30 CET, an hour later, the clocks showing the same time
    visits.flush_footfall(any_db.engine)
    with any_db.session() as s:
        hours = figures(s, "2026-10-25", "2026-10-25", TZ)["hours"]
    assert len(hours) == 25
    assert [(h["hour"], h["anonymous_visits"]) for h in hours[1:5]] == [
        ("01:00", 0), ("02:00", 1), ("02:00", 1), ("03:00", 0)]
