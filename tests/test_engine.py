"""The campaign engine's controls: each test fails if its control is removed."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from gateway.campaigns import CampaignError, CampaignIndex, parse_campaign, render
from gateway.clock import VirtualClock
from gateway.engine import Engine, EngineEvent
from gateway.identity import IdentityIndex
from gateway.service import GatewayService, NewProfile
from gateway.storage.db import Database
from gateway.storage.models import Decision, Notification
from gateway.tokens import TokenSigner

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
def world(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'e.db'}")
    db.upgrade()
    clock = VirtualClock(T0)
    svc = GatewayService(db, IdentityIndex(), clock, TokenSigner(b"0123456789abcdef0123"))
    ids = {
        "ann": svc.create_profile(NewProfile(external_id="ann", name="Ann Lee", attributes={"tier": "gold"},
                                             consents={"offers": True, "cart_reminders": True}))["id"],
        "bob": svc.create_profile(NewProfile(external_id="bob", name="Bob", attributes={"tier": "bronze"},
                                             consents={"offers": False}))["id"],
    }
    yield db, svc, ids
    db.dispose()


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

    from gateway.campaigns import load_campaigns

    cs = load_campaigns(Path(__file__).resolve().parents[1] / "examples/campaigns")
    assert {c.purpose for c in cs} == {"offers", "cart_reminders", "maintenance"}
