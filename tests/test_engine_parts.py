"""The engine's parts on their own: the pure limit checks and facts (no database), and the store's promises
the engine relies on: history as of the event's time, points credited with their event, one path for one
event and many."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from gateway.campaigns.model import CampaignIndex, parse_campaign
from gateway.engine.engine import Engine, EngineEvent
from gateway.engine.facts import behaviour_facts, cart_facts
from gateway.engine.limits import FrequencyCap, capped, exhausted, nearest_within
from gateway.profiles.service import NewProfile
from gateway.storage.models import Decision, Profile, Visit, ZoneStay

TZ = "Europe/Paris"
T0 = dt.datetime(2026, 6, 1, 11, 0, tzinfo=ZoneInfo(TZ)).timestamp()
DAY = 86400.0


# ---------------------------------------------------------------- limits, pure

def row(cid: str, at: float, purpose: str = "offers", channels: list[str] | None = None,
        out: bool = False) -> tuple[Any, ...]:
    return (cid, at, purpose, {"channels": channels} if channels else {}, 1, out)


def test_a_cooldown_finds_the_nearest_send_of_its_campaign_on_either_side() -> None:
    history = [row("a", 100.0), row("a", 950.0), row("b", 999.0)]
    assert nearest_within(history, "a", 1000.0, 100.0) == 950.0
    assert nearest_within(history, "a", 1000.0, 50.0) is None  # 50 s away is not inside a 50 s cooldown
    assert nearest_within(history, "a", 40.0, 100.0) == 100.0  # a held send due later blocks too
    assert nearest_within(history, "c", 1000.0, 1e9) is None


def test_a_full_cap_stops_a_send_and_a_full_channel_cap_only_leaves_its_channel_out() -> None:
    everywhere = ("sse", "webpush")
    history = [row("x", 10.0), row("y", 20.0, channels=["webpush"])]
    overall = [FrequencyCap(window_s=60, max=2)]
    assert capped(overall, 30.0, everywhere, history, everywhere) == (everywhere, "2 sent within 60 s, cap 2")
    assert capped(overall, 100.0, everywhere, history, everywhere) == (everywhere, None)  # window passed
    push = [FrequencyCap(window_s=60, max=2, channel="webpush")]  # both sends went out on webpush
    assert capped(push, 30.0, everywhere, history, everywhere) == (("sse",), None)
    assert capped(push, 30.0, ("webpush",), history, everywhere) == ((), "2 sent on webpush within 60 s, cap 2")
    service = [FrequencyCap(window_s=60, max=1, purposes=("offers",))]
    assert capped(service, 30.0, everywhere, [row("m", 20.0, purpose="maintenance")], everywhere) == (
        everywhere, None)  # a purpose the cap does not count
    assert capped([], 0.0, (), [], everywhere) == ((), "none of its channels is configured")


def test_a_cap_counts_a_send_gone_out_later_than_now_as_now_and_a_scheduled_one_at_its_own_time() -> None:
    everywhere = ("sse",)
    cap = [FrequencyCap(window_s=3600, max=1)]
    # Gone out, two hours "ahead": sent before the clock stepped back two hours. It counts now.
    assert capped(cap, 1000.0, everywhere, [row("x", 1000.0 + 7200, out=True)], everywhere)[1] == (
        "1 sent within 3600 s, cap 1")
    # Scheduled for tomorrow morning (held for quiet hours): it does not use up today's cap.
    assert capped(cap, 1000.0, everywhere, [row("x", 1000.0 + 36000, out=False)], everywhere) == (everywhere, None)
    # Gone out before the window: the cap is free again.
    assert capped(cap, 1000.0, everywhere, [row("x", 1000.0 - 3600, out=True)], everywhere) == (everywhere, None)


def test_a_limit_of_zero_is_no_limit() -> None:
    assert not exhausted(10, 0) and exhausted(3, 3) and not exhausted(2, 3)


# ---------------------------------------------------------------- facts, pure

def test_behaviour_facts_count_what_the_history_holds() -> None:
    now = T0
    history = [("v", now - 2 * DAY, now - 2 * DAY + 600, None), ("v", now - 40 * DAY, None, None),
               ("v", now, None, None),  # the visit that just began: counted, but not "the last visit"
               ("z", now - DAY, now - DAY + 120, "shoes"), ("z", now - DAY, now - DAY + 60, "tents"),
               ("c", now - 3 * DAY, None, None)]
    f = behaviour_facts(history, now)
    assert (f["visits_7d"], f["visits_30d"], f["visits_90d"], f["visits_365d"]) == (2, 2, 3, 3)
    assert f["visits_in_days"]["45"] == 3 and "400" not in f["visits_in_days"]
    assert f["days_since_last_visit"] == 2.0 and f["avg_visit_s"] == 600.0
    assert f["avg_dwell_s"] == 90.0 and f["avg_dwell_s_by_zone"] == {"shoes": 120.0, "tents": 60.0}
    assert f["purchases_365d"] == 1 and f["days_since_last_purchase"] == 3.0


def test_cart_facts_say_where_each_item_is_and_whether_it_is_abandoned() -> None:
    cart = SimpleNamespace(id="c1", updated_at=T0 - 3600,
                           items=[{"sku": "S1", "quantity": 2, "price": 10}, {"sku": "S9", "name": "Mystery"}])
    where = {"S1": SimpleNamespace(name="Trail shoe", zone="shoes", aisle="4")}
    f = cart_facts(cart, where, False, T0, abandon_after_s=1800)
    assert f["abandoned"] and not f["reminded"] and f["item_count"] == 3 and f["zones"] == ["shoes"]
    assert f["items_where"] == "Trail shoe x2 (shoes, aisle 4); Mystery"
    assert not cart_facts(cart, where, True, T0 - 3000, abandon_after_s=1800)["abandoned"]
    assert cart_facts(None, {}, False, T0, 1800)["item_count"] == 0


# ---------------------------------------------------------------- the store's promises

@pytest.fixture
def world(service):
    db, svc = service.db, service
    ann = svc.create_profile(NewProfile(external_id="ann", name="Ann Lee", consents={"offers": True}))["id"]
    yield db, ann


def camp(cid: str, conditions: Any, trigger: str = "enter") -> Any:
    return parse_campaign({"id": cid, "purpose": "offers", "trigger": {"type": trigger, "zone": "z"},
                           "conditions": conditions, "action": {"title": "t", "body": "b"}})


def test_behaviour_is_read_as_of_the_event_so_later_rows_of_the_same_batch_do_not_count(world) -> None:
    db, ann = world
    # Written before judging (as the pipeline writes a drain's visits): a visit that ends, and a stay that
    # is exited, after the first event's time.
    with db.session() as s:
        s.add(Visit(profile_id=ann, started_at=T0 - 100, ended_at=T0 + 500, zones=["z"]))
        s.add(ZoneStay(profile_id=ann, zone="z", entered_at=T0 - 100, exited_at=T0 + 50))
    seen = camp("seen", {"any": [{"fact": "behaviour.avg_visit_s", "op": "gte", "value": 0},
                                 {"fact": "behaviour.avg_dwell_s", "op": "gte", "value": 0}]})
    engine = Engine(CampaignIndex([seen]), timezone=TZ)
    with db.session() as s:
        early, late = engine.handle_many(s, [EngineEvent("enter", ann, T0, "stay:1", "z"),
                                             EngineEvent("enter", ann, T0 + 600, "stay:2", "z")])
    assert [o.reason for o in early] == ["condition_false"]  # neither had ended at T0
    assert [o.fired for o in late] == [True]


def test_a_visits_points_are_credited_with_its_event_and_seen_by_it_and_later_ones(world) -> None:
    db, ann = world
    gold = camp("gold", {"fact": "loyalty.points", "op": "gte", "value": 10}, trigger="visit_start")
    after = camp("after", {"fact": "loyalty.points", "op": "gte", "value": 10})
    engine = Engine(CampaignIndex([gold, after]), timezone=TZ)
    with db.session() as s:
        before, start, inside = engine.handle_many(s, [
            EngineEvent("enter", ann, T0 - 5, "stay:0", "z"),
            EngineEvent("visit_start", ann, T0, "visit:1", "z", points=10),
            EngineEvent("enter", ann, T0 + 5, "stay:1", "z")])
    assert [o.reason for o in before] == ["condition_false"]  # judged before the visit earned them
    assert [o.fired for o in start] == [True] and [o.fired for o in inside] == [True]
    with db.session() as s:
        assert s.get(Profile, ann).points == 10  # credited once, durably


def test_a_restarted_engine_knows_an_occurrence_was_sent_from_the_outbox_alone(world) -> None:
    db, ann = world
    c = camp("c", None)
    with db.session() as s:
        [o] = Engine(CampaignIndex([c]), timezone=TZ).handle(s, EngineEvent("enter", ann, T0, "stay:1", "z"))
    assert o.fired and o.notification_id is not None  # the id is known when handle returns
    with db.session() as s:  # memory lost: the dedup key in the outbox is the guard
        [again] = Engine(CampaignIndex([c]), timezone=TZ).handle(s, EngineEvent("enter", ann, T0 + 1, "stay:1", "z"))
    assert (again.fired, again.reason) == (False, "duplicate")
    with db.session() as s:
        assert [d.reason for d in s.scalars(select(Decision).order_by(Decision.id))] == ["fired", "duplicate"]
