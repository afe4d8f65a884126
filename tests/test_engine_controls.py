"""Issue 5's remaining controls, each with a test that fails if the control is removed: send-time
cooldowns and caps, per-channel caps and campaign channels, redemption budgets, live segments and
segment_entered, schedules, behaviour facts, the trigger index, loyalty, linking, retention, dry runs."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway.campaigns.model import CampaignError, CampaignIndex, Segment, parse_campaign
from gateway.delivery.hub import DELIVERED_LIVE
from gateway.delivery.outbox import Dispatcher
from gateway.engine.engine import Engine, EngineEvent, FrequencyCap, Outcome
from gateway.engine.explain import dry_run
from gateway.profiles.service import Invalid, NewProfile, ServiceHooks
from gateway.storage.db import Database
from gateway.storage.models import (
    Cart,
    Decision,
    Interaction,
    Notification,
    Profile,
    SegmentMembership,
    Visit,
    ZoneStay,
)
from tests.fixtures import make_service

TZ = "Europe/Paris"
T0 = dt.datetime(2026, 6, 1, 11, 0, tzinfo=ZoneInfo(TZ)).timestamp()  # a Monday


def run_schedules(engine: Engine, s: Session, now: float) -> list[Outcome]:
    """Each due schedule's audience judged as one batch, as the pipeline's tick does."""
    return [o for c, evs in engine.schedule_audiences(s, now) for outs in engine.handle_many(s, evs, [c]) for o in outs]


def local(day: int, hhmm: str) -> float:
    hh, mm = map(int, hhmm.split(":"))
    return dt.datetime(2026, 6, day, hh, mm, tzinfo=ZoneInfo(TZ)).timestamp()


def camp(cid: str = "c", **over: Any):
    base: dict[str, Any] = {"id": cid, "purpose": "offers", "trigger": {"type": "enter", "zone": "z"},
                            "action": {"title": "t", "body": "b"}}
    base.update(over)
    return parse_campaign(base)


@pytest.fixture
def world(service):
    db, svc = service.db, service
    ann = svc.create_profile(NewProfile(external_id="ann", name="Ann Lee", consents={"offers": True}))["id"]
    yield db, svc, ann


def run(db: Database, engine: Engine, ev: EngineEvent):
    with db.session() as s:
        return engine.handle(s, ev)


def enter(pid: int, t: float, key: str, zone: str = "z") -> EngineEvent:
    return EngineEvent("enter", pid, t, key, zone)


# ---------------------------------------------------------------- cooldowns and caps at send time

def test_cooldown_is_judged_at_send_time_so_held_sends_never_arrive_together(world):
    db, _, ann = world
    c = camp(limits={"cooldown_s": 3600, "quiet_hours": {"start": "21:00", "end": "08:00", "mode": "hold"}})
    engine = Engine(CampaignIndex([c]), timezone=TZ)
    first = run(db, engine, enter(ann, local(1, "22:00"), "s1"))[0]
    assert first.fired and first.deliver_at == local(2, "08:00")
    # Nine hours later by the trigger, but it would be delivered at the same 08:00.
    second = run(db, engine, enter(ann, local(2, "07:30"), "s2"))[0]
    assert second.reason == "cooldown" and "one is due at 08:00" in (second.detail or "")


def test_caps_count_held_sends_at_their_delivery_time(world):
    db, _, ann = world
    held = [camp(f"h{i}", trigger={"type": "enter", "zone": f"n{i}"},
                 limits={"quiet_hours": {"start": "21:00", "end": "08:00"}}) for i in range(2)]
    morning = camp("m", trigger={"type": "enter", "zone": "day"})
    engine = Engine(CampaignIndex([*held, morning]), timezone=TZ, caps=[FrequencyCap(3600, 2)])
    assert run(db, engine, enter(ann, local(1, "22:00"), "a", "n0"))[0].fired
    assert run(db, engine, enter(ann, local(1, "23:00"), "b", "n1"))[0].fired  # both reach her at 08:00
    late = run(db, engine, enter(ann, local(2, "08:10"), "c", "day"))[0]
    assert late.reason == "capped" and "cap 2" in (late.detail or "")


def test_an_out_of_order_event_respects_later_sends(world):
    db, _, ann = world
    engine = Engine(CampaignIndex([camp(limits={"cooldown_s": 600})]))
    assert run(db, engine, enter(ann, T0 + 1000, "late"))[0].fired
    assert run(db, engine, enter(ann, T0 + 700, "early"))[0].reason == "cooldown"  # arrived late, 300 s before


# ---------------------------------------------------------------- channels

def test_a_full_channel_cap_leaves_that_channel_out_then_caps_when_none_is_left(world):
    db, _, ann = world
    cs = [camp(f"c{i}", trigger={"type": "enter", "zone": f"z{i}"}) for i in range(4)]
    engine = Engine(CampaignIndex(cs), channels=("sse", "webpush"),
                    caps=[FrequencyCap(3600, 1, channel="webpush"), FrequencyCap(3600, 3, channel="sse")])
    outcomes = [run(db, engine, enter(ann, T0 + i, f"s{i}", f"z{i}"))[0] for i in range(4)]
    assert [o.reason for o in outcomes] == ["fired", "fired", "fired", "capped"]
    assert "not on webpush" in (outcomes[1].detail or "")
    with db.session() as s:
        data = [s.get(Notification, o.notification_id).data for o in outcomes[:3]]
    assert "channels" not in data[0] and data[1]["channels"] == ["sse"] and data[2]["channels"] == ["sse"]
    assert "on sse" in (outcomes[3].detail or "")


def test_campaign_channels_are_validated_and_limit_the_send(world):
    db, _, ann = world
    with pytest.raises(CampaignError, match="channels"):
        camp(channels=["carrier-pigeon"])
    engine = Engine(CampaignIndex([camp(channels=["webpush"])]), channels=("sse",))
    [o] = run(db, engine, enter(ann, T0, "s1"))
    assert o.reason == "capped" and "none of its channels" in (o.detail or "")


class Recorder:
    inline = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.got: list[int] = []

    async def deliver(self, profile_id: int, message: dict[str, Any]) -> str:
        self.got.append(message["id"])
        return DELIVERED_LIVE


async def test_the_dispatcher_sends_only_on_the_notifications_channels(world):
    db, _, ann = world
    engine = Engine(CampaignIndex([camp("everywhere"), camp("push-only", trigger={"type": "enter", "zone": "p"},
                                                            channels=["webpush"])]),
                    channels=("sse", "webpush"))
    a = run(db, engine, enter(ann, T0, "s1"))[0].notification_id
    b = run(db, engine, enter(ann, T0, "s2", "p"))[0].notification_id
    sse, push = Recorder("sse"), Recorder("webpush")
    await Dispatcher(db, [sse, push]).dispatch([a, b], T0)
    assert sse.got == [a] and push.got == [a, b]


# ---------------------------------------------------------------- budgets

def test_a_redemption_budget_stops_the_campaign_once_used(world):
    db, svc, ann = world
    bob = svc.create_profile(NewProfile(external_id="bob", consents={"offers": True}))["id"]
    engine = Engine(CampaignIndex([camp(limits={"budget": {"max_redemptions": 1}})]))
    [o] = run(db, engine, enter(ann, T0, "s1"))
    assert run(db, engine, enter(bob, T0, "s1"))[0].fired  # sent twice: nothing redeemed yet
    with db.session() as s:
        s.add(Interaction(notification_id=o.notification_id, kind="redeemed", at=T0 + 5))
    cy = svc.create_profile(NewProfile(external_id="cy", consents={"offers": True}))["id"]
    late = run(db, engine, enter(cy, T0 + 10, "s1"))[0]
    assert late.reason == "budget_exhausted" and "1 of 1 redemptions" in (late.detail or "")


# ---------------------------------------------------------------- segments, behaviour, loyalty

def test_segment_entered_fires_once_when_a_profile_joins(world):
    db, _, ann = world
    regular = Segment("regular", {"all": [{"fact": "behaviour.visits_in_days.14", "op": "gte", "value": 3}]})
    welcome = camp("welcome", trigger={"type": "segment_entered", "segment": "regular"},
                   action={"title": "You are a regular, {profile.first_name}", "body": "b"})
    engine = Engine(CampaignIndex([welcome]), segments=[regular])
    fired = []
    for day in range(4):  # visits on four days: she joins on the third
        t = T0 + day * 86400
        with db.session() as s:
            s.add(Visit(profile_id=ann, started_at=t, zones=[]))
        fired.append([o.reason for o in run(db, engine, EngineEvent("visit_start", ann, t, f"v{day}"))])
    assert fired == [[], [], ["fired"], []]
    with db.session() as s:
        assert s.scalars(select(SegmentMembership.segment_id)).all() == ["regular"]
        assert s.scalars(select(Notification.title)).all() == ["You are a regular, Ann"]
    # Thirty days on she is no longer a regular; coming back three times makes her enter again.
    with db.session() as s:
        t = T0 + 40 * 86400
        s.add(Visit(profile_id=ann, started_at=t, zones=[]))
    assert run(db, engine, EngineEvent("visit_start", ann, T0 + 40 * 86400, "v40")) == []
    with db.session() as s:
        assert s.scalars(select(SegmentMembership)).all() == []


def test_behaviour_facts_cover_visits_in_n_days_last_purchase_and_dwell(world):
    db, _, ann = world
    c = camp(conditions={"all": [
        {"fact": "behaviour.visits_in_days.10", "op": "eq", "value": 2},
        {"fact": "behaviour.days_since_last_purchase", "op": "lt", "value": 3},
        {"fact": "behaviour.avg_dwell_s_by_zone.shoes", "op": "gte", "value": 100},
        {"fact": "behaviour.avg_dwell_s", "op": "eq", "value": 110.0}]})
    engine = Engine(CampaignIndex([c]))
    with db.session() as s:
        for days_ago in (2, 8, 20):
            s.add(Visit(profile_id=ann, started_at=T0 - days_ago * 86400, ended_at=T0 - days_ago * 86400 + 600,
                        zones=["shoes"]))
        s.add(ZoneStay(profile_id=ann, zone="shoes", entered_at=T0 - 86400, exited_at=T0 - 86400 + 100))
        s.add(ZoneStay(profile_id=ann, zone="shoes", entered_at=T0 - 2 * 86400, exited_at=T0 - 2 * 86400 + 120))
        s.add(Cart(id="k", profile_id=ann, status="checked_out", items=[], updated_at=T0 - 86400,
                   checked_out_at=T0 - 86400))
    assert run(db, engine, enter(ann, T0, "s1"))[0].fired
    with db.session() as s:
        s.get(Cart, "k").checked_out_at = T0 - 5 * 86400
    [o] = run(db, engine, enter(ann, T0 + 10, "s2"))
    assert o.reason == "condition_false" and "days_since_last_purchase" in (o.detail or "")


def test_the_two_line_frequent_and_occasional_segments(world):
    from pathlib import Path

    from gateway.campaigns.model import load_segments

    db, svc, ann = world
    segs = {s.id: s for s in load_segments(Path(__file__).resolve().parents[1] / "examples/campaigns")}
    engine = Engine(CampaignIndex([camp(conditions={"fact": "segments", "op": "contains", "value": "frequent"}),
                                   camp("o", conditions={"fact": "segments", "op": "contains", "value": "occasional"},
                                        trigger={"type": "enter", "zone": "z"}, priority=-1)]),
                    segments=[segs["frequent"], segs["occasional"]])
    bob = svc.create_profile(NewProfile(external_id="bob", consents={"offers": True}))["id"]
    with db.session() as s:
        for day in range(1, 6):
            s.add(Visit(profile_id=ann, started_at=T0 - day * 86400, zones=[]))
        for day in (3, 100):
            s.add(Visit(profile_id=bob, started_at=T0 - day * 86400, zones=[]))
    a = {o.campaign_id: o.reason for o in run(db, engine, enter(ann, T0, "s1"))}
    b = {o.campaign_id: o.reason for o in run(db, engine, enter(bob, T0, "s1"))}
    assert a == {"c": "fired", "o": "condition_false"}
    assert b == {"c": "condition_false", "o": "fired"}


def test_loyalty_points_once_per_visit_and_tiers_in_conditions(service):
    from gateway.app.config import Settings
    from gateway.app.pipeline import Pipeline
    from gateway.presence.settings import ReceiverSettings, ZoneBand
    from gateway.presence.tracker import PresenceEvent

    s = Settings()
    s.receivers = [ReceiverSettings("rx", [ZoneBand("z", 5.0)])]
    s.device_rules.dir = ""
    db, ids, svc = service.db, service.identities, service
    pid = svc.create_profile(NewProfile(external_id="ann", identifiers=[("beacon", "ibeacon:aa:1:1")],
                                        consents={"offers": True}))["id"]
    silver = camp(conditions={"fact": "loyalty.tier", "op": "eq", "value": "silver"})
    pipe = Pipeline(s, db, CampaignIndex([silver]), ids)
    key = "ibeacon:aa:1:1"
    for v in range(5):
        t = T0 + v * 86400
        pipe.handle_presence([PresenceEvent("visit_start", key, t, "z", t, t),
                              PresenceEvent("enter", key, t, "z", t, t),
                              PresenceEvent("dwell", key, t + 10, "z", t, t, 10.0),
                              PresenceEvent("exit", key, t + 60, "z", t, t, 60.0),
                              PresenceEvent("enter", key, t + 70, "z", t + 70, t),  # back in, same visit
                              PresenceEvent("visit_end", key, t + 200, None, None, t, 200.0)])
    with db.session() as sess:
        assert sess.get(Profile, pid).points == 5 * s.loyalty.points_per_visit  # not per enter or dwell
        fired = sess.scalars(select(Decision.event_key).where(Decision.fired.is_(True))).all()
    fifth = T0 + 4 * 86400  # 50 points, silver, only from the fifth visit's start on
    assert fired == [f"stay:z:{fifth:.3f}", f"stay:z:{fifth + 70:.3f}"]
    db.dispose()


# ---------------------------------------------------------------- schedules

def test_a_schedule_runs_once_per_occurrence_for_its_consenting_audience(world):
    db, svc, ann = world
    svc.create_profile(NewProfile(external_id="nope", consents={"offers": False}))
    weekly = camp("weekly", trigger={"type": "schedule", "at": "10:00", "days": ["mon"], "within_s": 1800},
                  action={"title": "This week, {profile.first_name}", "body": "b"})
    engine = Engine(CampaignIndex([weekly]), timezone=TZ)
    with db.session() as s:
        assert run_schedules(engine, s, local(1, "09:59")) == []
        [o] = run_schedules(engine, s, local(1, "10:05"))
        assert o.fired and o.profile_id == ann
        assert run_schedules(engine, s, local(1, "10:06")) == []
    restarted = Engine(CampaignIndex([weekly]), timezone=TZ)  # memory lost: the decisions remember
    with db.session() as s:
        assert run_schedules(restarted, s, local(1, "10:10")) == []
        assert run_schedules(restarted, s, local(1, "10:31")) == []  # past its window: missed, not late
        assert run_schedules(restarted, s, local(2, "10:05")) == []  # Tuesday is not a day of it
        assert [o.fired for o in run_schedules(restarted, s, local(8, "10:00"))] == [True]
    with pytest.raises(CampaignError, match="schedule needs 'at'"):
        camp(trigger={"type": "schedule"})
    with pytest.raises(CampaignError, match="weekdays"):
        camp(trigger={"type": "schedule", "at": "10:00", "days": ["someday"]})


# ---------------------------------------------------------------- index, dry run

def test_an_event_meets_only_the_campaigns_of_its_trigger(world):
    db, _, ann = world
    many = [camp(f"d{i}", trigger={"type": "dwell", "zone": "z"}) for i in range(50)]
    index = CampaignIndex([*many, camp("e")])
    assert [c.id for c in index.candidates("enter", "z")] == ["e"]
    engine = Engine(index)
    run(db, engine, enter(ann, T0, "s1"))
    assert engine.evaluations == 1  # not 51
    with db.session() as s:
        assert s.scalars(select(Decision.campaign_id)).all() == ["e"]


def test_a_dry_run_sees_segments_and_tiers_and_stores_nothing(world):
    db, _, ann = world
    seg = Segment("anyone", {"fact": "behaviour.visits_365d", "op": "gte", "value": 0})
    c = camp(conditions={"all": [{"fact": "segments", "op": "contains", "value": "anyone"},
                                 {"fact": "loyalty.tier", "op": "eq", "value": "bronze"}]},
             action={"title": "t", "body": "b", "delay_s": 60})
    live = Engine(CampaignIndex([c]), segments=[seg], tiers=[("bronze", 0)])
    with db.session() as s:
        [would] = dry_run(s, enter(ann, T0, "dry"), engine=live.clone())
    assert would["fired"] and would["deliver_at"] == T0 + 60
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Notification)) == 0
        assert s.scalar(select(func.count()).select_from(Decision)) == 0


# ---------------------------------------------------------------- profiles: linking

def test_profiles_are_linked_only_explicitly_and_keep_everything(world):
    db, svc, ann = world
    other = svc.create_profile(NewProfile(external_id="ann-app", identifiers=[("app_install", "inst-1")],
                                          attributes={"language": "fr"},
                                          consents={"offers": False, "cart_reminders": True}))["id"]
    svc.upsert_cart("k1", profile_id=other, external_id=None, items=[{"sku": "A"}], updated_at=T0)
    with db.session() as s:
        s.add(Visit(profile_id=other, started_at=T0 - 86400, zones=[]))
        s.get(Profile, other).points = 30
    with pytest.raises(Invalid):
        svc.link_profiles(ann, ann)
    view = svc.link_profiles(ann, other)
    assert {i["kind"] for i in view["identifiers"]} == {"app_install"}
    assert view["consents"]["offers"]["granted"] is True  # hers wins
    assert view["consents"]["cart_reminders"]["granted"] is True  # filled from the other
    assert view["attributes"] == {"language": "fr"}
    assert svc.identities.lookup("app_install", "inst-1") == ann
    with db.session() as s:
        assert s.get(Profile, other) is None and s.get(Profile, ann).points == 30
        assert s.get(Cart, "k1").profile_id == ann
        assert s.scalar(select(func.count()).select_from(Visit).where(Visit.profile_id == ann)) == 1


def test_attribute_changes_re_evaluate_segments(world):
    db, svc, ann = world
    fr = Segment("french", {"fact": "profile.attributes.language", "op": "eq", "value": "fr"})
    hello = camp("bonjour", trigger={"type": "segment_entered", "segment": "french"})
    engine = Engine(CampaignIndex([hello]), segments=[fr])
    seen: list[int] = []
    svc = make_service(db, svc.clock, hooks=ServiceHooks(on_profile_changed=seen.append))  # the runtime's hook
    svc.update_profile(ann, attributes={"language": "fr"})
    assert seen == [ann]
    [o] = run(db, engine, EngineEvent("profile_updated", ann, T0, "p1"))
    assert o.campaign_id == "bonjour" and o.fired
    assert svc.update_profile(ann, attributes={"language": None})["attributes"] == {}


# ---------------------------------------------------------------- figures

def test_figures_per_arm_with_lift_and_maintenance_response(world):
    from gateway.engine.figures import figures
    from gateway.storage.models import Consent

    db, svc, _ = world
    exp = {"holdout": 0.5, "variants": [{"name": "a"}]}
    c = camp("exp", experiment=exp, trigger={"type": "enter", "zone": "z"})
    pids = [svc.create_profile(NewProfile(external_id=f"p{i}", consents={"offers": True}))["id"] for i in range(40)]
    engine = Engine(CampaignIndex([c]))
    outcomes = [run(db, engine, enter(p, T0, "s1"))[0] for p in pids]
    arm = [o for o in outcomes if o.fired]
    held = [o for o in outcomes if o.reason == "holdout"]
    assert arm and held and len(arm) + len(held) == 40
    with db.session() as s:  # everyone in the arm opens and buys; one holdout profile buys too
        for o in arm:
            s.add(Interaction(notification_id=o.notification_id, kind="opened", at=T0 + 60))
            s.add(Cart(id=f"k{o.profile_id}", profile_id=o.profile_id, status="checked_out", items=[],
                       updated_at=T0 + 600, checked_out_at=T0 + 600))
        s.add(Cart(id="kh", profile_id=held[0].profile_id, status="checked_out", items=[], updated_at=T0 + 600,
                   checked_out_at=T0 + 600))
        # A maintenance prompt answered 90 s after it went out.
        s.add(Consent(profile_id=pids[0], purpose="maintenance", granted=True, updated_at=T0))
    m = camp("svc", purpose="maintenance", trigger={"type": "enter", "zone": "m"})
    [p] = run(db, Engine(CampaignIndex([m])), enter(pids[0], T0, "m1", "m"))
    with db.session() as s:
        s.add(Interaction(notification_id=p.notification_id, kind="clicked", at=T0 + 90))
        day = dt.datetime.fromtimestamp(T0, ZoneInfo(TZ)).date().isoformat()
        f = figures(s, day, day, TZ)
    e = f["notifications"]["campaigns"]["exp"]["experiment"]
    hold_rate = round(100 / len(held), 2)
    assert e["holdout"] == {"profiles": len(held), "conversion_rate": hold_rate}
    a = e["variants"]["a"]
    assert a["notified"] == len(arm) and a["opened"] == len(arm) and a["converted_within_window"] == len(arm)
    assert a["lift_vs_holdout"] == round(100.0 - hold_rate, 2)
    assert f["maintenance"]["prompts"] == 1 and f["maintenance"]["avg_response_s"] == 90.0
    assert f["days"][0]["day"] == day
