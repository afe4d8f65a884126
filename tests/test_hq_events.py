"""The upward events' schema and head office's handling of bad ones: a message that does not follow
schema version 1 is named by its field, dropped, counted and acknowledged (it never will parse), writes
nothing, and holds back none of the good events around it; a duplicate writes nothing. Head office's map
of store profiles stays within its bound."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from gateway.hq.consumer import Applier, HqConsumer, hq_key
from gateway.hq.events import EventError, alarm_version, cart_version, event, parse, topic
from gateway.storage.db import Database
from gateway.storage.models import Cart, Decision, Device, HqEvent, Profile, ReadingRollup
from tests.conftest import MosquittoServer, PahoTestClient
from tests.test_hq_bridge import hq_db  # noqa: F401  # the fixture: a fresh PostgreSQL for head office

DECISION = {"id": 3, "at": 1780300800.0, "profile_id": 7, "campaign_id": "shoes-offer", "event_kind": "enter",
            "event_key": "stay:shoes:1780300800.000", "fired": False, "reason": "cooldown", "detail": None,
            "variant": None}


def good(store: str = "s1", row: int = 3) -> tuple[str, bytes]:
    e = event(store, "decision", row, {**DECISION, "id": row})
    return topic("chain", store, "decision"), e.body()


@pytest.mark.parametrize("mangle, named", [
    (lambda b: b"{not json", "body: not JSON"),
    (lambda b: json.dumps({**json.loads(b), "v": 2}).encode(), "v: expected 1"),
    (lambda b: json.dumps({**json.loads(b), "kind": "parade"}).encode(), "kind: expected one of"),
    (lambda b: json.dumps({**json.loads(b), "id": "s2:decision:3"}).encode(), "id: expected to begin"),
    (lambda b: json.dumps({**json.loads(b), "data": {**DECISION, "fired": "yes"}}).encode(), "data.fired"),
    (lambda b: json.dumps({**json.loads(b), "data": {**DECISION, "profile_id": True}}).encode(), "data.profile_id"),
])
def test_a_bad_event_is_named_by_its_field(mangle: Callable[[bytes], bytes], named: str) -> None:
    t, body = good()
    assert parse(t, body).id == "s1:decision:3"
    with pytest.raises(EventError, match=named.replace(".", r"\.")):
        parse(t, mangle(body))


DEVICE: dict[str, Any] = {"id": "bike-1", "kind": "ebike", "device_profile": None, "profile_id": 7,
                          "firmware": "1.2", "registered_at": 1780300800.0}
HOUR: dict[str, Any] = {"device_id": "bike-1", "start": 1780300800.0, "metric": "chain_km", "count": 12,
                        "sum": 24000.0, "min": 1990.0, "max": 2010.0, "last": 2010.0, "last_ts": 1780304100.0,
                        "profile_id": 7}
ALARM: dict[str, Any] = {
    "id": 4, "device_id": "bike-1", "profile_id": 7, "rule_id": "ebike-chain-service", "name": "Chain due",
    "severity": "warning", "status": "active", "created_at": 1780300800.0, "updated_at": 1780300800.0,
    "count": 1, "last_value": None, "cleared_at": None, "prompted_at": 1780300800.0, "notification_id": 9,
    "acknowledged_at": None, "booked_at": None, "booked_for": None, "resolved_at": None}
CART: dict[str, Any] = {
    "id": "c-1", "profile_id": 7, "status": "open", "items": [{"sku": "run-42", "qty": 1, "price": 80.0}],
    "updated_at": 1780300800.0, "abandoned_at": None, "checked_out_at": None, "purchase_handled_at": None}


@pytest.mark.parametrize("kind, data, named", [
    ("device", {**DEVICE, "profile_id": "7"}, "data.profile_id"),
    ("device", {**DEVICE, "registered_at": "yesterday"}, "data.registered_at: expected float or int or NoneType"),
    ("reading_hour", {**HOUR, "count": 12.5}, "data.count"),
    ("reading_hour", {**HOUR, "metric": None}, "data.metric"),
    ("alarm", {**ALARM, "acknowledged_at": "soon"}, "data.acknowledged_at"),
    ("alarm", {**ALARM, "count": True}, "data.count"),
    ("cart", {**CART, "items": [{"sku": "run-42", "qty": "one", "price": 80.0}]}, "data.items[0].qty"),
    ("cart", {**CART, "items": ["run-42"]}, "data.items[0]: expected an object"),
    ("cart", {**CART, "items": [{"qty": 1, "price": None}]}, "data.items[0].sku"),
])
def test_the_new_kinds_name_the_field_that_is_wrong(kind: str, data: dict[str, Any], named: str) -> None:
    good_data = {"device": DEVICE, "reading_hour": HOUR, "alarm": ALARM, "cart": CART}[kind]
    assert parse(topic("chain", "s1", kind), event("s1", kind, "k", good_data).body()).data == good_data
    with pytest.raises(EventError, match=re.escape(named)):
        parse(topic("chain", "s1", kind), event("s1", kind, "k", data).body())


def test_versions_order_an_alarms_and_a_carts_lifecycle() -> None:
    steps = [ALARM, {**ALARM, "updated_at": 1780301000.0, "count": 2},
             {**ALARM, "updated_at": 1780301000.0, "count": 2, "acknowledged_at": 1780302000.0},
             {**ALARM, "updated_at": 1780301000.0, "count": 2, "acknowledged_at": 1780302000.0,
              "booked_at": 1780302100.0},
             {**ALARM, "status": "resolved", "updated_at": 1780300900.0, "count": 2, "resolved_at": 1780400000.0}]
    assert [alarm_version(a) for a in steps] == sorted(alarm_version(a) for a in steps)
    assert len({alarm_version(a) for a in steps}) == len(steps)
    carts = [CART, {**CART, "abandoned_at": 1780302600.0}, {**CART, "updated_at": 1780303000.0},
             {**CART, "status": "checked_out", "updated_at": 1780290000.0, "checked_out_at": 1780290000.0},
             {**CART, "status": "checked_out", "updated_at": 1780290000.0, "checked_out_at": 1780290000.0,
              "purchase_handled_at": 1780303005.0}]
    assert [cart_version(c) for c in carts] == sorted(cart_version(c) for c in carts)
    assert len({cart_version(c) for c in carts}) == len(carts)


def test_an_event_on_another_stores_topic_is_refused() -> None:
    _, body = good("s1")
    with pytest.raises(EventError, match="does not match store"):
        parse(topic("chain", "s2", "decision"), body)


def test_head_office_drops_bad_events_and_keeps_good_ones_once(
        mosquitto: MosquittoServer, hq_db: Database,  # noqa: F811
        mqtt_client: Callable[..., PahoTestClient]) -> None:
    hq = HqConsumer(hq_db, mosquitto.host, mosquitto.port, "chain", "hq-events-test")
    hq.start()
    try:
        assert hq.subscribed.wait(10)
        pub = mqtt_client(mosquitto.host, mosquitto.port)
        t1, b1 = good("s1", 1)
        t2, b2 = good("s1", 2)
        pub.publish_wait(t1, b1)
        pub.publish_wait(t1, b"{not json")
        pub.publish_wait(t1, json.dumps({**json.loads(b1), "v": 9}).encode())
        pub.publish_wait(t2, b2)
        pub.publish_wait(t1, b1)  # a duplicate
        pause = threading.Event()
        for _ in range(200):
            if hq.stats.received >= 5:
                break
            pause.wait(0.05)
        assert (hq.stats.received, hq.stats.applied, hq.stats.rejected, hq.stats.duplicates) == (5, 2, 2, 1)
        assert hq.stats.rejects == {"body": 1, "v": 1}
        with hq_db.session() as s:
            assert s.scalar(select(func.count()).select_from(Decision)) == 2
            assert s.scalar(select(func.count()).select_from(HqEvent)) == 2
            assert s.scalars(select(Profile.external_id)).all() == ["s1:7"]  # the store's profile 7, once
    finally:
        hq.stop()


def test_head_office_keeps_at_most_its_bound_of_store_profiles_in_memory_and_reads_a_miss_back(
        hq_db: Database) -> None:  # noqa: F811
    applier = Applier(max_profiles=3)
    for pid in range(1, 8):  # seven customers of store s1
        with hq_db.session() as s:
            applier.apply(s, [event("s1", "decision", pid, {**DECISION, "id": pid, "profile_id": pid})], 1780300800.0)
        assert len(applier._profiles) <= 3
    assert list(applier._profiles) == ["s1:5", "s1:6", "s1:7"]  # the most recently used
    with hq_db.session() as s:  # profile 1 was dropped from the map: read from the database, not made again
        applier.apply(s, [event("s1", "decision", 100, {**DECISION, "id": 100, "profile_id": 1})], 1780300900.0)
    with hq_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Profile)) == 7
        one = s.scalar(select(Profile.id).where(Profile.external_id == "s1:1"))
        owners = s.scalars(select(Decision.profile_id).order_by(Decision.id)).all()
        assert len(owners) == 8 and owners[0] == owners[-1] == one
    assert len(applier._profiles) == 3 and list(applier._profiles)[-1] == "s1:1"


def test_a_device_id_too_long_for_head_offices_column_gets_one_stable_digest_id(hq_db: Database) -> None:  # noqa: F811
    long_id = "bike-" + "x" * 123  # 128 characters: the store's limit, too long once "s1:" is put in front
    applier = Applier()
    with hq_db.session() as s:
        applier.apply(s, [event("s1", "reading_hour", "k", {**HOUR, "device_id": long_id}),
                          event("s1", "device", long_id, {**DEVICE, "id": long_id})], 1780300800.0)
    with hq_db.session() as s:
        (dev,) = s.scalars(select(Device)).all()
        assert dev.id == hq_key("s1", long_id) and dev.id.startswith("s1:#") and len(dev.id) <= 128
        assert (dev.kind, dev.firmware, dev.store_id) == ("ebike", "1.2", "s1")  # the bare row filled in
        assert s.scalars(select(ReadingRollup.device_id)).all() == [dev.id]
    assert hq_key("s1", "bike-1") == "s1:bike-1"


def test_a_merge_in_one_batch_brings_the_moved_cart_back_under_the_survivor(hq_db: Database) -> None:  # noqa: F811
    """The store merged profile 7 into 8: 7's erasure, then its cart under 8 (a profile head office has not
    seen yet), in the batch that also holds the cart's earlier event."""
    applier = Applier()
    with hq_db.session() as s:
        applier.apply(s, [event("s1", "cart", "c-1", CART), event("s1", "erasure", 7, {"profile_id": 7}),
                          event("s1", "cart", "c-1", {**CART, "profile_id": 8})], 1780300800.0)
    with hq_db.session() as s:
        owner = s.scalar(select(Profile.external_id).join(Cart, Cart.profile_id == Profile.id)
                         .where(Cart.id == "s1:c-1"))
        assert owner == "s1:8" and s.scalar(select(func.count()).select_from(Profile)) == 1
