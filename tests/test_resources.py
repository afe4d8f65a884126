"""The admin resources: profiles with pages and filters, identifiers as a sub-resource, carts and the
catalogue read back, notifications with their deliveries, dead letters replayed; interactions and
conversions (last touch, within the configured window, each purchase once).

In process (TestClient) over a migrated SQLite file and the real service; time is a VirtualClock.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import PROBLEM, create_app
from api.deps import ApiContext
from gateway.delivery.hub import StreamHub
from gateway.delivery.outbox import Dispatcher
from gateway.profiles.service import GatewayService, NewProfile
from gateway.storage.models import Notification

T0 = 1_780_300_800.0  # 2026-06-01 08:00 UTC
KEY = "resources-admin-key-0123456789"
ADMIN = {"X-API-Key": KEY}


class Flaky:
    """A remote channel that fails permanently until fixed."""

    name = "webhook"

    def __init__(self) -> None:
        self.fixed = False
        self.got: list[int] = []

    async def deliver(self, profile_id: int, message: dict[str, Any]) -> str:
        if not self.fixed:
            return "dead"
        self.got.append(message["id"])
        return "delivered"


@pytest.fixture
def world(service: GatewayService) -> Iterator[Any]:
    svc, db, clock = service, service.db, service.clock
    hub = StreamHub()
    app = create_app(ApiContext(service=svc, hub=hub, admin_key=KEY, health=dict))  # type: ignore[arg-type]

    class W:
        pass

    w = W()
    w.db, w.clock, w.svc, w.hub, w.client = db, clock, svc, hub, TestClient(app)  # type: ignore[attr-defined]
    yield w


def _notify(w: Any, pid: int, key: str, at: float, campaign: str = "c1", status: str = "sent") -> int:
    with w.db.session() as s:
        n = Notification(profile_id=pid, campaign_id=campaign, purpose="offers", dedup_key=key, title=key, body="b",
                         data={}, created_at=at, status=status)
        s.add(n)
        s.flush()
        return n.id


def test_profiles_page_and_filter(world: Any) -> None:
    c = world.client
    ids = [world.svc.create_profile(NewProfile(external_id=f"p{i}", name=f"Person {i}",
                                               consents={"offers": i % 2 == 0}))["id"] for i in range(5)]
    first = c.get("/v1/profiles", params={"limit": 2}, headers=ADMIN).json()
    assert [p["id"] for p in first["items"]] == ids[::-1][:2]
    assert (first["total"], first["next_offset"]) == (5, 2)
    last = c.get("/v1/profiles", params={"limit": 2, "offset": 4}, headers=ADMIN).json()
    assert [p["id"] for p in last["items"]] == [ids[0]] and last["next_offset"] is None
    offers = c.get("/v1/profiles", params={"consent": "offers"}, headers=ADMIN).json()
    assert sorted(p["id"] for p in offers["items"]) == [ids[0], ids[2], ids[4]]
    assert c.get("/v1/profiles", params={"q": "person 3"}, headers=ADMIN).json()["total"] == 1
    r = c.get("/v1/profiles", params={"limit": 501}, headers=ADMIN)
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM and r.json()["errors"]


def test_identifiers_are_added_listed_and_removed_and_the_index_follows(world: Any) -> None:
    c = world.client
    alice = world.svc.create_profile(NewProfile(external_id="alice"))["id"]
    bob = world.svc.create_profile(NewProfile(external_id="bob"))["id"]
    key = "ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:1:7"
    url = f"/v1/profiles/{alice}/identifiers"
    r = c.post(url, json={"kind": "beacon", "value": key.upper()}, headers=ADMIN)
    assert r.status_code == 201 and r.json()["value"] == key  # normalised as at enrolment
    assert world.svc.identities.beacon(key) == alice
    assert c.post(url, json={"kind": "beacon", "value": key}, headers=ADMIN).status_code == 200
    taken = c.post(f"/v1/profiles/{bob}/identifiers", json={"kind": "beacon", "value": key}, headers=ADMIN)
    assert taken.status_code == 409 and taken.headers["content-type"] == PROBLEM
    assert [i["kind"] for i in c.get(url, headers=ADMIN).json()] == ["beacon"]
    assert c.post(url, json={"kind": "passport", "value": "x"}, headers=ADMIN).status_code == 422
    assert c.delete(f"{url}/beacon/{key}", headers=ADMIN).status_code == 204
    assert world.svc.identities.beacon(key) is None  # anonymous again from the next advert
    assert c.delete(f"{url}/beacon/{key}", headers=ADMIN).status_code == 404
    assert c.get("/v1/profiles/999/identifiers", headers=ADMIN).status_code == 404


def test_carts_and_catalogue_read_back_with_filters(world: Any) -> None:
    c = world.client
    alice = world.svc.create_profile(NewProfile(external_id="alice"))["id"]
    bob = world.svc.create_profile(NewProfile(external_id="bob"))["id"]
    world.svc.upsert_cart("a1", profile_id=alice, external_id=None, items=[{"sku": "SH-1"}], updated_at=T0 - 60)
    world.svc.upsert_cart("b1", profile_id=bob, external_id=None, items=[], updated_at=T0, status="checked_out")
    assert c.get("/v1/carts/a1", headers=ADMIN).json()["items"] == [{"sku": "SH-1"}]
    assert c.get("/v1/carts/nope", headers=ADMIN).status_code == 404
    assert [x["id"] for x in c.get("/v1/carts", headers=ADMIN).json()["items"]] == ["b1", "a1"]
    assert [x["id"] for x in c.get("/v1/carts", params={"profile": alice}, headers=ADMIN).json()["items"]] == ["a1"]
    done = c.get("/v1/carts", params={"status": "checked_out"}, headers=ADMIN).json()["items"]
    assert [(x["id"], x["checked_out_at"]) for x in done] == [("b1", T0)]
    items = [{"sku": "SH-1", "name": "Trail shoes", "zone": "shoes"}, {"sku": "HT-1", "name": "Hat", "zone": "hats"}]
    assert c.put("/v1/catalogue", json=items, headers=ADMIN).status_code == 200
    assert c.get("/v1/catalogue/SH-1", headers=ADMIN).json()["zone"] == "shoes"
    assert c.get("/v1/catalogue/XX", headers=ADMIN).status_code == 404
    assert [i["sku"] for i in c.get("/v1/catalogue", params={"zone": "hats"}, headers=ADMIN).json()["items"]] == [
        "HT-1"]
    assert c.get("/v1/catalogue", params={"q": "trail"}, headers=ADMIN).json()["total"] == 1


async def test_notifications_with_their_deliveries_and_dead_letters_replayed(world: Any) -> None:
    c = world.client
    alice = world.svc.create_profile(NewProfile(external_id="alice"))["id"]
    bob = world.svc.create_profile(NewProfile(external_id="bob"))["id"]
    n1 = _notify(world, alice, "k1", T0, status="pending")
    n2 = _notify(world, bob, "k2", T0, campaign="c2", status="pending")
    hook = Flaky()
    d = Dispatcher(world.db, [world.hub, hook])
    await d.dispatch([n1, n2], T0)

    page = c.get("/v1/notifications", params={"campaign": "c2"}, headers=ADMIN).json()
    assert [n["id"] for n in page["items"]] == [n2] and page["items"][0]["profile_id"] == bob
    assert c.get("/v1/notifications", params={"profile": alice, "status": "pending"}, headers=ADMIN).json()[
        "total"] == 1
    one = c.get(f"/v1/notifications/{n1}", headers=ADMIN).json()
    assert {ch["channel"]: ch["state"] for ch in one["channels"]} == {"sse": "pending", "webhook": "dead"}
    assert [a["outcome"] for a in one["attempts"]] == ["no_listener", "dead"]
    assert c.get("/v1/notifications/999999", headers=ADMIN).status_code == 404

    dead = c.get("/v1/deliveries", params={"state": "dead"}, headers=ADMIN).json()
    assert sorted(x["notification_id"] for x in dead["items"]) == [n1, n2] and dead["total"] == 2
    assert c.post("/v1/deliveries/replay", json={"channel": "sse", "notification_id": n1},
                  headers=ADMIN).status_code == 409  # not dead: nothing to replay
    assert c.post("/v1/deliveries/replay", json={"channel": "webhook", "notification_id": 424242},
                  headers=ADMIN).status_code == 404
    world.svc.ack(bob, n2)  # the app got #2 meanwhile: only #1 still needs the webhook
    r = c.post("/v1/deliveries/replay", json={"channel": "webhook"}, headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"channel": "webhook", "requeued": [n1]}
    hook.fixed = True
    assert await d.retry_due(world.clock.now()) == 1
    assert hook.got == [n1]
    after = c.get(f"/v1/notifications/{n1}", headers=ADMIN).json()
    assert {ch["channel"]: ch["state"] for ch in after["channels"]}["webhook"] == "delivered"
    assert [i["kind"] for i in after["interactions"]] == ["delivered"]  # the channel confirmed it


def test_conversions_are_last_touch_within_the_window_and_each_purchase_counts_once(world: Any) -> None:
    c = world.client
    world.svc.conversion_window_s = 3600.0
    alice = world.svc.create_profile(NewProfile(external_id="alice"))["id"]
    bob = world.svc.create_profile(NewProfile(external_id="bob"))["id"]
    carol = world.svc.create_profile(NewProfile(external_id="carol"))["id"]
    early = _notify(world, alice, "a1", T0, campaign="welcome")
    last = _notify(world, alice, "a2", T0 + 600, campaign="shoes")
    _notify(world, bob, "b1", T0, campaign="shoes")
    _notify(world, carol, "c1", T0, campaign="welcome")
    world.clock.set(T0 + 1200)
    # Alice buys 20 min after her first and 10 after her last: the last one gets it, once.
    world.svc.upsert_cart("ca", profile_id=alice, external_id=None, items=[], updated_at=None, status="checked_out")
    # Bob buys two hours later: outside the one-hour window. Carol never buys.
    world.clock.set(T0 + 7200)
    world.svc.upsert_cart("cb", profile_id=bob, external_id=None, items=[], updated_at=None, status="checked_out")
    figs = c.get("/v1/figures", params={"from": "2026-06-01"}, headers=ADMIN).json()["notifications"]
    assert figs["campaigns"]["shoes"]["conversions"] == 1  # alice's last touch; bob's purchase came too late
    assert figs["campaigns"]["shoes"]["conversion_rate"] == 50.0
    assert figs["campaigns"]["welcome"]["conversions"] == 0  # alice's earlier one is not credited as well
    assert figs["total"]["purchases_credited"] == 1
    assert (early, last) and early < last
    world.svc.conversion_window_s = 3 * 3600.0  # a wider window: bob's purchase converts his notification
    wider = c.get("/v1/figures", params={"from": "2026-06-01"}, headers=ADMIN).json()["notifications"]
    assert wider["campaigns"]["shoes"]["conversions"] == 2


def test_a_dismissal_is_recorded_once_and_counted(world: Any) -> None:
    c = world.client
    alice = world.svc.create_profile(NewProfile(external_id="alice"))["id"]
    bob = world.svc.create_profile(NewProfile(external_id="bob"))["id"]
    n = _notify(world, alice, "a1", T0)
    token = world.svc.issue_token(alice)[0]
    auth = {"Authorization": f"Bearer {token}"}
    url = f"/v1/me/notifications/{n}/interactions"
    assert c.post(url, json={"kind": "dismissed"}, headers=auth).json() == {"notification_id": n,
                                                                           "kind": "dismissed", "recorded": True}
    assert c.post(url, json={"kind": "dismissed"}, headers=auth).json()["recorded"] is False
    bobs = {"Authorization": f"Bearer {world.svc.issue_token(bob)[0]}"}
    assert c.post(url, json={"kind": "dismissed"}, headers=bobs).status_code == 404  # not his
    figs = c.get("/v1/figures", params={"from": "2026-06-01"}, headers=ADMIN).json()["notifications"]["total"]
    assert (figs["dismissed"], figs["opened"]) == (1, 0)


def _bodies(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            media = op.get("requestBody", {}).get("content", {}).get("application/json")
            if media is not None:
                yield f"{method.upper()} {path} request", media
            for code, response in op["responses"].items():
                for ctype, media in response.get("content", {}).items():
                    if (code.startswith("2") and ctype == "application/json") or ctype == PROBLEM:
                        yield f"{method.upper()} {path} {code} {ctype}", media


def test_the_openapi_document_shows_a_valid_example_for_every_body_and_errors_as_problem_json(world: Any) -> None:
    import jsonschema_rs

    doc = world.client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    checked = 0
    for where, media in _bodies(doc):
        schema = media["schema"]
        target = schemas[schema["$ref"].rsplit("/", 1)[-1]] if "$ref" in schema else schema
        examples = [media["example"]] if "example" in media else list(target.get("examples", []))
        assert examples, f"{where}: no example"
        validator = jsonschema_rs.Draft202012Validator({**schema, "components": doc["components"]})
        for example in examples:
            errors = [e.message for e in validator.iter_errors(example)]
            assert not errors, f"{where}: the example does not match its schema: {errors[:3]}"
            checked += 1
    assert checked > 60
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for code in ("401", "403", "404", "409", "422", "500"):
                content = op["responses"].get(code, {}).get("content")
                if content is not None:
                    assert list(content) == [PROBLEM], f"{method} {path} {code}: {list(content)}"
            if path.startswith("/v1/"):
                assert {"401", "403", "422", "500"} <= set(op["responses"]) or (method == "get" and not op.get(
                    "parameters")), f"{method} {path}: {sorted(op['responses'])}"
    # The 422 schema is the one the handler fills: check a real 422 against it.
    bad = world.client.get("/v1/notifications", params={"limit": 0}, headers=ADMIN)
    assert bad.status_code == 422
    validator = jsonschema_rs.Draft202012Validator({"$ref": "#/components/schemas/ValidationProblem",
                                                    "components": doc["components"]})
    assert validator.is_valid(bad.json()) and bad.json()["errors"][0]["loc"] == ["query", "limit"]
