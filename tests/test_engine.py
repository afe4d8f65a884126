"""The campaign engine's controls: each test fails if its control is removed."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from gateway.campaigns.model import CampaignError, CampaignIndex, parse_campaign, render
from gateway.engine.engine import Engine, EngineEvent
from gateway.profiles.service import NewProfile
from gateway.storage.db import Database
from gateway.storage.models import Decision, Notification

T0 = 1_780_300_800.0


def campaign(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "offer", "purpose": "offers", "trigger": {"type": "dwell", "zone": "shoes", "min_dwell_s": 20},
        "action": {"title": "Hi {profile.first_name}", "body": "Code {offer.code} in {event.zone}",
                   "data": {"offer": {"code": "X1"}}},
        "limits": {"cooldown_s": 3600}, "priority": 1,
    }
    base.update(over)
    return base


@pytest.fixture
def world(service):
    db, svc = service.db, service
    ids = {
        "ann": svc.create_profile(NewProfile(external_id="ann", name="Ann Lee", attributes={"tier": "gold"},
                                             consents={"offers": True, "cart_reminders": True}))["id"],
        "bob": svc.create_profile(NewProfile(external_id="bob", name="Bob", attributes={"tier": "bronze"},
                                             consents={"offers": False}))["id"],
    }
    yield db, svc, ids


def run(db: Database, engine: Engine, ev: EngineEvent):
    with db.session() as s:
        return engine.handle(s, ev)


def dwell(pid: int, t: float, stay: str = "s1", dwell_s: float = 25.0) -> EngineEvent:
    return EngineEvent("dwell", pid, t, f"stay:shoes:{stay}", "shoes", dwell_s)


def test_fires_with_consent_and_renders_the_template(world):
    db, _, ids = world
    engine = Engine(CampaignIndex([parse_campaign(campaign())]))
    [o] = run(db, engine, dwell(ids["ann"], T0))
    assert o.fired and o.reason == "fired"
    with db.session() as s:
        n = s.get(Notification, o.notification_id)
        assert n is not None and n.title == "Hi Ann" and n.body == "Code X1 in shoes"


def test_no_consent_never_sends(world):
    db, _, ids = world
    engine = Engine(CampaignIndex([parse_campaign(campaign())]))
    [o] = run(db, engine, dwell(ids["bob"], T0))
    assert not o.fired and o.reason == "no_consent"
    with db.session() as s:
        assert s.scalars(select(Notification)).all() == []


def test_condition_false_names_the_failing_condition(world):
    db, _, ids = world
    c = campaign(conditions={"all": [{"fact": "profile.attributes.tier", "op": "eq", "value": "platinum"}]})
    [o] = run(db, Engine(CampaignIndex([parse_campaign(c)])), dwell(ids["ann"], T0))
    assert o.reason == "condition_false" and "profile.attributes.tier" in (o.detail or "")
    assert "gold" in (o.detail or "")


def test_min_dwell_and_zone_gate_the_trigger(world):
    db, _, ids = world
    engine = Engine(CampaignIndex([parse_campaign(campaign())]))
    assert run(db, engine, dwell(ids["ann"], T0, dwell_s=10)) == []
    assert run(db, engine, EngineEvent("dwell", ids["ann"], T0, "stay:x", "apparel", 60)) == []


def test_cooldown_blocks_a_second_stay_and_expires(world):
    db, _, ids = world
    engine = Engine(CampaignIndex([parse_campaign(campaign())]))
    assert run(db, engine, dwell(ids["ann"], T0, "s1"))[0].fired
    [o] = run(db, engine, dwell(ids["ann"], T0 + 600, "s2"))
    assert o.reason == "cooldown"
    assert run(db, engine, dwell(ids["ann"], T0 + 3601, "s3"))[0].fired


def test_one_verdict_per_occurrence_and_no_resend_after_restart(world):
    db, _, ids = world
    engine = Engine(CampaignIndex([parse_campaign(campaign(limits={}))]))
    assert run(db, engine, dwell(ids["ann"], T0, "s1"))[0].fired
    assert run(db, engine, dwell(ids["ann"], T0 + 5, "s1", 30)) == []  # same stay: already judged
    restarted = Engine(CampaignIndex([parse_campaign(campaign(limits={}))]))  # memory lost
    [o] = run(db, restarted, dwell(ids["ann"], T0 + 10, "s1", 35))
    assert o.reason == "duplicate" and not o.fired  # the outbox's dedup key still guards
    with db.session() as s:
        assert len(s.scalars(select(Notification)).all()) == 1


def test_only_the_highest_priority_campaign_sends(world):
    db, _, ids = world
    hi = parse_campaign(campaign(id="hi", priority=10))
    lo = parse_campaign(campaign(id="lo", priority=1))
    outcomes = {o.campaign_id: o for o in run(db, Engine(CampaignIndex([lo, hi])), dwell(ids["ann"], T0))}
    assert outcomes["hi"].fired
    assert outcomes["lo"].reason == "lost_arbitration" and "hi" in (outcomes["lo"].detail or "")


def test_every_evaluation_leaves_a_decision(world):
    db, _, ids = world
    engine = Engine(CampaignIndex([parse_campaign(campaign())]))
    run(db, engine, dwell(ids["ann"], T0))
    run(db, engine, dwell(ids["bob"], T0))
    with db.session() as s:
        rows = {(d.profile_id, d.reason) for d in s.scalars(select(Decision))}
    assert rows == {(ids["ann"], "fired"), (ids["bob"], "no_consent")}


def test_telemetry_threshold_fires_on_the_crossing_only(world):
    db, svc, ids = world
    svc.set_consents(ids["ann"], {"maintenance": True})
    c = parse_campaign({"id": "svc", "purpose": "maintenance",
                        "trigger": {"type": "telemetry", "metric": "hours", "above": 50},
                        "action": {"title": "t", "body": "{reading.hours} h"}})
    engine = Engine(CampaignIndex([c]))

    def reading(t: float, v: float) -> EngineEvent:
        facts = {"device": {"id": "m1"}, "reading": {"hours": v}}
        return EngineEvent("telemetry", ids["ann"], t, f"r:{t}", facts=facts)

    assert run(db, engine, reading(T0, 49.0)) == []
    [o] = run(db, engine, reading(T0 + 1, 50.5))
    assert o.fired
    assert run(db, engine, reading(T0 + 2, 51.0)) == []  # still above: no new occurrence
    assert run(db, engine, reading(T0 + 3, 10.0)) == []  # serviced, back below
    [again] = run(db, engine, reading(T0 + 4, 50.0))  # crosses again
    assert again.fired


def test_cart_reminder_names_items_and_where_they_are(world):
    db, svc, ids = world
    svc.upsert_catalogue([{"sku": "A", "name": "Boots", "zone": "shoes", "aisle": "S4"}])
    svc.upsert_cart("c1", profile_id=ids["ann"], external_id=None,
                    items=[{"sku": "A", "quantity": 2}], updated_at=T0 - 7200)
    c = parse_campaign({"id": "cart", "purpose": "cart_reminders", "trigger": {"type": "visit_start"},
                        "conditions": {"all": [{"fact": "cart.abandoned", "op": "eq", "value": True}]},
                        "action": {"title": "t", "body": "{cart.items_where}"}})
    engine = Engine(CampaignIndex([c]), abandon_after_s=1800)
    [o] = run(db, engine, EngineEvent("visit_start", ids["ann"], T0, "visit:1", "entrance"))
    with db.session() as s:
        n = s.get(Notification, o.notification_id)
        assert n is not None and n.body == "Boots x2 (shoes, aisle S4)"
        assert n.data["cart"]["items"][0]["aisle"] == "S4"
    svc.upsert_cart("c1", profile_id=ids["ann"], external_id=None, items=[{"sku": "A"}], updated_at=T0)
    [fresh] = run(db, engine, EngineEvent("visit_start", ids["ann"], T0 + 1, "visit:2", "entrance"))
    assert fresh.reason == "condition_false"  # recently touched: not abandoned


def test_templates_run_no_code():
    facts = {"profile": {"name": "Ann"}}
    assert render("{profile.name} {__class__} {profile.__dict__} {0}", facts) == "Ann   {0}"
    assert render("{profile.name.upper}", facts) == ""


@pytest.mark.parametrize("bad, message", [
    ({"id": "x y"}, "'id'"),
    ({"purpose": "spam"}, "purpose"),
    ({"trigger": {"type": "teleport"}}, "trigger.type"),
    ({"trigger": {"type": "dwell", "when": 1}}, "unknown trigger field"),
    ({"trigger": {"type": "telemetry", "above": 3}}, "needs a 'metric'"),
    ({"action": {"title": "t"}}, "'action' needs"),
    ({"conditions": {"all": [{"fact": "a", "op": "approximately", "value": 1}]}}, "'op' must be one of"),
    ({"conditions": {"all": []}}, "non-empty list"),
    ({"conditions": {"all": [{"fact": "a", "op": "in", "value": 3}]}}, "needs a list"),
])
def test_invalid_campaigns_are_rejected_with_the_reason(bad, message):
    with pytest.raises(CampaignError, match=message):
        parse_campaign(campaign(**bad))


def test_example_campaigns_load():
    from pathlib import Path

    from gateway.campaigns.model import load_campaigns

    cs = load_campaigns(Path(__file__).resolve().parents[1] / "examples/campaigns")
    assert {c.purpose for c in cs} >= {"offers", "cart_reminders", "maintenance"}


# ---------------------------------------------------------------- issue 5 controls

from gateway.campaigns.model import assign_variant  # noqa: E402
from gateway.engine.engine import FrequencyCap  # noqa: E402


def test_frequency_cap_across_campaigns(world):
    db, _, ids = world
    cs = [parse_campaign(campaign(id=f"c{i}", trigger={"type": "enter", "zone": f"z{i}"}, limits={}))
          for i in range(3)]
    engine = Engine(CampaignIndex(cs), caps=[FrequencyCap(3600, 2)])
    got = [run(db, engine, EngineEvent("enter", ids["ann"], T0 + i, f"s{i}", f"z{i}"))[0] for i in range(3)]
    assert [o.reason for o in got] == ["fired", "fired", "capped"]
    later = run(db, engine, EngineEvent("enter", ids["ann"], T0 + 3700, "s9", "z2"))[0]
    assert later.fired  # the window rolled


def test_caps_leave_service_messages_alone(world):
    db, svc, ids = world
    svc.set_consents(ids["ann"], {"maintenance": True})
    c = parse_campaign(campaign(purpose="maintenance", trigger={"type": "enter", "zone": "z"}, limits={}))
    engine = Engine(CampaignIndex([c]), caps=[FrequencyCap(3600, 0)])
    assert run(db, engine, EngineEvent("enter", ids["ann"], T0, "s1", "z"))[0].fired


def test_re_eligibility_and_budget(world):
    db, svc, ids = world
    c = parse_campaign(campaign(trigger={"type": "enter", "zone": "z"}, limits={"max_per_profile": 1}))
    engine = Engine(CampaignIndex([c]))
    assert run(db, engine, EngineEvent("enter", ids["ann"], T0, "s1", "z"))[0].fired
    assert run(db, engine, EngineEvent("enter", ids["ann"], T0 + 9e5, "s2", "z"))[0].reason == "not_reeligible"

    other = svc.create_profile(NewProfile(external_id="cy", name="Cy", consents={"offers": True}))["id"]
    b = parse_campaign(campaign(id="b", trigger={"type": "enter", "zone": "y"}, limits={"budget": {"max_sends": 1}}))
    engine = Engine(CampaignIndex([b]))
    assert run(db, engine, EngineEvent("enter", ids["ann"], T0, "s1", "y"))[0].fired
    assert run(db, engine, EngineEvent("enter", other, T0, "s1", "y"))[0].reason == "budget_exhausted"


def _local(hhmm: str, tz: str = "Europe/Paris") -> float:
    import datetime as dt
    from zoneinfo import ZoneInfo

    hh, mm = map(int, hhmm.split(":"))
    return dt.datetime(2026, 6, 1, hh, mm, tzinfo=ZoneInfo(tz)).timestamp()


def test_quiet_hours_drop_uses_the_store_timezone(world):
    db, _, ids = world
    c = parse_campaign(campaign(trigger={"type": "enter", "zone": "z"},
                                limits={"quiet_hours": {"start": "21:00", "end": "08:00", "mode": "drop"}}))
    engine = Engine(CampaignIndex([c]), timezone="Europe/Paris")
    # 06:30 UTC is 08:30 in Paris (summer): outside quiet hours there, inside them in UTC.
    assert run(db, engine, EngineEvent("enter", ids["ann"], _local("08:30"), "s1", "z"))[0].fired
    night = run(db, engine, EngineEvent("enter", ids["ann"], _local("22:15") + 86400, "s2", "z"))[0]
    assert night.reason == "quiet_hours"


def test_quiet_hours_hold_then_release_at_the_end(world):
    db, _, ids = world
    c = parse_campaign(campaign(trigger={"type": "enter", "zone": "z"},
                                limits={"quiet_hours": {"start": "21:00", "end": "08:00"}}))
    engine = Engine(CampaignIndex([c]), timezone="Europe/Paris")
    [o] = run(db, engine, EngineEvent("enter", ids["ann"], _local("23:00"), "s1", "z"))
    assert o.fired and "held for quiet hours until 08:00" in (o.detail or "")
    with db.session() as s:
        assert engine.release_due(s, _local("07:59") + 86400) == []
        n = s.get(Notification, o.notification_id)
        assert n is not None and n.status == "scheduled"
    with db.session() as s:
        assert engine.release_due(s, _local("08:00") + 86400) == [o.notification_id]
        assert s.get(Notification, o.notification_id).status == "pending"


def test_delay_cancelled_by_a_purchase(world):
    db, _, ids = world
    c = parse_campaign({**campaign(trigger={"type": "visit_start"}, limits={}), "cancel_on": ["purchase"],
                        "action": {"title": "t", "body": "b", "delay_s": 600}})
    engine = Engine(CampaignIndex([c]))
    [o] = run(db, engine, EngineEvent("visit_start", ids["ann"], T0, "v1"))
    assert o.fired and o.detail == "delayed 600 s"
    [cancel] = run(db, engine, EngineEvent("purchase", ids["ann"], T0 + 60, "p1"))
    assert cancel.reason == "cancelled"
    with db.session() as s:
        assert engine.release_due(s, T0 + 601) == []
        assert s.get(Notification, o.notification_id).status == "cancelled"


def test_a_held_send_expires_after_its_ttl_and_consent_is_rechecked(world):
    db, svc, ids = world
    c = parse_campaign({**campaign(trigger={"type": "visit_start"}, limits={"ttl_s": 300}),
                        "action": {"title": "t", "body": "b", "delay_s": 600}})
    engine = Engine(CampaignIndex([c]))
    [late] = run(db, engine, EngineEvent("visit_start", ids["ann"], T0, "v1"))
    c2 = parse_campaign({**campaign(id="c2", trigger={"type": "visit_start"}, limits={}),
                         "action": {"title": "t", "body": "b", "delay_s": 60}})
    engine2 = Engine(CampaignIndex([c2]))
    [withdrawn] = run(db, engine2, EngineEvent("visit_start", ids["ann"], T0, "v1"))
    svc.set_consents(ids["ann"], {"offers": False})
    with db.session() as s:
        assert engine.release_due(s, T0 + 700) == []
        assert s.get(Notification, late.notification_id).status == "expired"
        assert s.get(Notification, withdrawn.notification_id).status == "cancelled"
        reasons = {d.reason for d in s.scalars(select(Decision).where(Decision.event_kind == "release"))}
    assert reasons == {"expired", "no_consent"}


def test_experiment_arms_are_sticky_weighted_and_hold_out_a_share():
    from gateway.campaigns.model import Experiment, Variant

    exp = Experiment((Variant("a", 3), Variant("b", 1)), holdout=0.2)
    arms = [assign_variant(exp, "camp", pid) for pid in range(4000)]
    assert arms == [assign_variant(exp, "camp", pid) for pid in range(4000)]  # deterministic
    holdout = sum(a is None for a in arms) / 4000
    a_share = sum(a is not None and a.name == "a" for a in arms) / sum(a is not None for a in arms)
    assert 0.17 < holdout < 0.23 and 0.71 < a_share < 0.79


def test_holdout_profiles_get_nothing_and_block_lower_priority(world):
    db, _, ids = world
    exp = {"holdout": 0.999999, "variants": [{"name": "a"}]}
    hi = parse_campaign({**campaign(id="hi", priority=9, limits={}), "experiment": exp})
    lo = parse_campaign(campaign(id="lo", priority=1, limits={}))
    outcomes = {o.campaign_id: o for o in run(db, Engine(CampaignIndex([hi, lo])), dwell(ids["ann"], T0))}
    assert outcomes["hi"].reason == "holdout" and outcomes["hi"].variant == "holdout"
    assert outcomes["lo"].reason == "lost_arbitration"


def test_variant_action_is_sent_and_recorded(world):
    db, _, ids = world
    exp = {"holdout": 0, "variants": [{"name": "b", "action": {"title": "B {profile.first_name}", "body": "b"}}]}
    [o] = run(db, Engine(CampaignIndex([parse_campaign({**campaign(limits={}), "experiment": exp})])),
              dwell(ids["ann"], T0))
    assert o.fired and o.variant == "b"
    with db.session() as s:
        n = s.get(Notification, o.notification_id)
        assert n.title == "B Ann" and n.variant == "b" and n.data["variant"] == "b"


def test_segments_from_behaviour_and_loyalty_tiers(world):
    from gateway.campaigns.model import Segment
    from gateway.storage.models import Profile, Visit

    db, svc, ids = world
    with db.session() as s:
        for day in range(1, 6):  # Ann came five times this month
            s.add(Visit(profile_id=ids["ann"], started_at=T0 - day * 86400, ended_at=T0 - day * 86400 + 900, zones=[]))
        s.get(Profile, ids["ann"]).points = 60
    frequent = Segment("frequent", {"all": [{"fact": "behaviour.visits_30d", "op": "gte", "value": 4}]})
    c = parse_campaign(campaign(conditions={"all": [
        {"fact": "segments", "op": "contains", "value": "frequent"},
        {"fact": "loyalty.tier", "op": "eq", "value": "silver"}]}, limits={}))
    engine = Engine(CampaignIndex([c]), segments=[frequent], tiers=[("bronze", 0), ("silver", 50), ("gold", 150)])
    assert run(db, engine, dwell(ids["ann"], T0))[0].fired
    cy = svc.create_profile(NewProfile(external_id="cy", name="Cy", consents={"offers": True}))["id"]
    with db.session() as s:  # as many points, but no visit history: not frequent
        s.get(Profile, cy).points = 60
    [o] = run(db, engine, dwell(cy, T0))
    assert o.reason == "condition_false" and "segments" in (o.detail or "")


def test_a_condition_can_compare_two_facts(world):
    db, svc, ids = world
    svc.upsert_catalogue([{"sku": "A", "name": "Boots", "zone": "shoes", "aisle": "S4"}])
    svc.upsert_cart("c1", profile_id=ids["ann"], external_id=None, items=[{"sku": "A"}], updated_at=T0 - 7200)
    c = parse_campaign({"id": "here", "purpose": "cart_reminders", "trigger": {"type": "enter"},
                        "conditions": {"all": [{"fact": "cart.zones", "op": "contains", "value_fact": "event.zone"}]},
                        "action": {"title": "t", "body": "b"}})
    engine = Engine(CampaignIndex([c]))
    assert run(db, engine, EngineEvent("enter", ids["ann"], T0, "s1", "apparel"))[0].reason == "condition_false"
    assert run(db, engine, EngineEvent("enter", ids["ann"], T0, "s2", "shoes"))[0].fired
