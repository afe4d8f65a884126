"""The upward events' schema and head office's handling of bad ones: a message that does not follow
schema version 1 is named by its field, dropped, counted and acknowledged (it never will parse), writes
nothing, and holds back none of the good events around it; a duplicate writes nothing."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import pytest
from sqlalchemy import func, select

from gateway.hq.consumer import HqConsumer
from gateway.hq.events import EventError, event, parse, topic
from gateway.storage.db import Database
from gateway.storage.models import Decision, HqEvent, Profile
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
