"""The HTTP API in process: who may call what, what errors look like, and the main round trips.

A real GatewayService on a migrated SQLite file sits behind the app; TestClient drives it
without a socket (the wire is the end-to-end test's job). Time is a VirtualClock.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import PROBLEM, create_app
from api.deps import ApiContext
from gateway.clock import VirtualClock
from gateway.delivery.hub import StreamHub
from gateway.profiles.identity import hash_email
from gateway.profiles.service import NewProfile, ServiceOptions
from gateway.security.tokens import TokenSigner
from gateway.storage.db import Database
from gateway.storage.models import Base, Cart, CatalogItem, Interaction, Notification
from tests.conftest import free_port
from tests.fixtures import make_service, migrated_copy
from tests.test_authz_matrix import HTTP_ROUTES, PUBLIC_PATHS, ROUTES, audience

T0 = 1_767_261_600.0
ADMIN_KEY = "test-admin-key-0123456789abcdef"
ALICE_BEACON = "ibeacon:8f3c0a52-6d1e-4b7a-9c2d-5e4f3a2b1c00:100:1"


def _health_of(db: Database) -> Any:
    """What the runtime reports, reduced to the database (the API tests have no broker or radio)."""
    def health() -> dict[str, Any]:
        ok = db.probe() == "ok"
        return {"status": "ok" if ok else "degraded",
                "components": {"db": "ok" if ok else "down", "mqtt": "disabled", "scanner": "disabled"}}
    return health


# ------------------------------------------------------------------ fixtures


class World:
    """The app, its service and database, two enrolled customers and their tokens."""

    def __init__(self, tmp_path: Path, migrated: Path) -> None:
        self.clock = VirtualClock(T0)
        self.db = migrated_copy(migrated, tmp_path / "api.db")
        self.service = make_service(self.db, self.clock, options=ServiceOptions(token_ttl_s=3600))
        self.hub = StreamHub()
        self.app = create_app(ApiContext(service=self.service, hub=self.hub, admin_key=ADMIN_KEY,
                                         health=_health_of(self.db), heartbeat_s=30))
        self.alice = self.service.create_profile(NewProfile(
            external_id="alice", name="Alice", identifiers=[("beacon", ALICE_BEACON)],
            consents={"offers": True}))["id"]
        self.bob = self.service.create_profile(NewProfile(external_id="bob", name="Bob"))["id"]
        self.service.upsert_cart("cart-alice", profile_id=self.alice, external_id=None,
                                 items=[{"sku": "SH-100", "quantity": 1, "price": 89.9}], updated_at=None)
        self.alice_token = self.service.issue_token(self.alice)[0]
        self.bob_token = self.service.issue_token(self.bob)[0]
        with self.db.session() as s:
            rows = [self._notification(self.alice, "a1"), self._notification(self.bob, "b1"),
                    self._notification(self.alice, "a2")]
            s.add_all(rows)
            s.flush()
            self.alice_n1, self.bob_n1, self.alice_n2 = (n.id for n in rows)

    @staticmethod
    def _notification(profile_id: int, key: str) -> Notification:
        return Notification(profile_id=profile_id, campaign_id="shoes-dwell-offer", purpose="offers",
                            dedup_key=key, title=f"Offer {key}", body="10% off shoes", data={"zone": "shoes"},
                            created_at=T0, status="sent")

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table, to show a rejected request changed nothing."""
        with self.db.engine.connect() as conn:
            return {name: sorted((tuple(row) for row in conn.execute(table.select())), key=repr)
                    for name, table in Base.metadata.tables.items()}


@pytest.fixture
def world(tmp_path: Path, migrated_sqlite: Path) -> Iterator[World]:
    w = World(tmp_path, migrated_sqlite)
    try:
        yield w
    finally:
        w.db.dispose()


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with TestClient(world.app) as c:
        yield c


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, migrated_sqlite: Path) -> Iterator[tuple[World, TestClient]]:
    """One world for the tests of refusals: each checks that its request changed nothing, so they can share.

    Its clock never moves; a test that needs time to pass, or changes anything, takes ``world``.
    """
    w = World(tmp_path_factory.mktemp("api-shared"), migrated_sqlite)
    try:
        with TestClient(w.app) as c:
            yield w, c
    finally:
        w.db.dispose()


ADMIN = {"X-API-Key": ADMIN_KEY}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_problem(r: httpx.Response, status: int, detail: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].split(";")[0] == PROBLEM, r.headers["content-type"]
    body = r.json()
    assert body["status"] == status
    assert body["title"] == HTTPStatus(status).phrase
    assert isinstance(body["detail"], str) and body["detail"]
    if detail is not None:
        assert detail in body["detail"], body["detail"]
    return body


def _call(client: TestClient, method: str, url: str, headers: dict[str, str],
          body: Any = None) -> tuple[httpx.Response, str]:
    """One request; an event stream is read up to its first chunk and then closed."""
    with client.stream(method, url, headers=headers, json=body) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            return r, next(r.iter_text())
        r.read()
        return r, r.text


def _fill(path: str, value: str = "1") -> str:
    return re.sub(r"\{[^}]+\}", value, path)


def _sample(world: World, method: str, path: str) -> tuple[str, Any, bool]:
    """(url, body, known): a request that succeeds for the right caller, or filler for a route not listed."""
    samples: dict[tuple[str, str], tuple[str, Any]] = {
        ("POST", "/v1/profiles"): ("/v1/profiles", {"external_id": "carol"}),
        ("GET", "/v1/profiles/{profile_id}"): (f"/v1/profiles/{world.alice}", None),
        ("PUT", "/v1/profiles/{profile_id}/consents"): (f"/v1/profiles/{world.alice}/consents",
                                                        {"consents": {"maintenance": True}}),
        ("POST", "/v1/profiles/{profile_id}/tokens"): (f"/v1/profiles/{world.alice}/tokens", None),
        ("PUT", "/v1/carts/{cart_id}"): ("/v1/carts/cart-alice", {"profile_external_id": "alice", "items": []}),
        ("PUT", "/v1/catalogue"): ("/v1/catalogue", [{"sku": "SH-100", "name": "Trail runner shoes"}]),
        ("GET", "/v1/me/stream"): ("/v1/me/stream", None),
        ("GET", "/v1/me/notifications"): ("/v1/me/notifications", None),
        ("POST", "/v1/me/notifications/{notification_id}/ack"):
            (f"/v1/me/notifications/{world.alice_n1}/ack", None),
        ("GET", "/health"): ("/health", None),
    }
    if (method, path) in samples:
        return (*samples[(method, path)], True)
    return _fill(path), None, False


# ------------------------------------------------------------------ who may call what


def test_the_route_table_is_what_this_file_expects() -> None:
    # A check on the discovery itself, so the matrix below cannot silently cover nothing.
    assert ("GET", "/health") in ROUTES and ("GET", "/v1/me/stream") in ROUTES
    assert {audience(p) for _, p in ROUTES} == {"public", "admin", "customer"}
    assert len(ROUTES) >= 10


# The full matrix (every route against every kind of credential and scope, and the WebSocket) is
# tests/test_authz_matrix.py; here, every way an app token can be wrong, on every customer route.
CUSTOMER_ROUTES = [r for r in HTTP_ROUTES if audience(r[1]) == "customer"]


def _bad_token(world: World, kind: str) -> str:
    version, body, sig = world.alice_token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    as_bob = base64.urlsafe_b64encode(json.dumps({**claims, "sub": world.bob}).encode()).rstrip(b"=").decode()
    return {
        "expired": world.service.signer.issue(world.alice, T0 - 3600, 3600)[0],  # expired at T0 exactly
        "body_claims_bob": f"{version}.{as_bob}.{sig}",
        "signature_flipped": f"{version}.{body}.{sig[:-2]}{'AA' if sig[-2:] != 'AA' else 'BB'}",
        "signature_empty": f"{version}.{body}.",
        "signature_from_bob": f"{version}.{body}.{world.bob_token.split('.')[2]}",
        "other_secret": TokenSigner(b"some-other-gateway-secret-012345").issue(world.alice, T0, 3600)[0],
        "admin_key": ADMIN_KEY,
        "garbage": "garbage",
        "empty_claims": "v1.e30.AAAA",
        "empty_parts": "v1..",
        "other_version": "v2.abc.def",
        "non_ascii": "v1.abc.\u00e9\u00e9",
    }[kind]


BAD_TOKENS = ["expired", "body_claims_bob", "signature_flipped", "signature_empty", "signature_from_bob",
              "other_secret", "admin_key", "garbage", "empty_claims", "empty_parts", "other_version",
              "non_ascii"]


@pytest.mark.parametrize("kind", BAD_TOKENS)
def test_customer_routes_refuse_bad_tokens_with_401(shared: tuple[World, TestClient], kind: str) -> None:
    world, client = shared
    token = _bad_token(world, kind)
    assert CUSTOMER_ROUTES
    for method, path in CUSTOMER_ROUTES:
        url, body, _ = _sample(world, method, path)
        before = world.snapshot()
        attempts = [("query", {}, f"{url}?{httpx.QueryParams(access_token=token)}")]  # what EventSource sends
        if token.isascii():  # a header cannot carry anything else
            attempts.append(("header", bearer(token), url))
        for where, headers, target in attempts:
            r, _ = _call(client, method, target, headers, body)
            assert r.status_code == 401, f"{method} {path} with the token in the {where}: {r.status_code} {r.text}"
            assert_problem(r, 401)
        assert world.snapshot() == before, f"{method} {path} changed the database"


def test_a_token_works_until_its_expiry_and_a_new_one_after(client: TestClient, world: World) -> None:
    me = bearer(world.alice_token)
    world.clock.advance(3599)
    assert client.get("/v1/me/notifications", headers=me).status_code == 200
    world.clock.advance(1)
    assert_problem(client.get("/v1/me/notifications", headers=me), 401, "expired")
    fresh = client.post(f"/v1/profiles/{world.alice}/tokens", headers=ADMIN).json()["token"]
    assert client.get("/v1/me/notifications", headers=bearer(fresh)).status_code == 200


def test_one_customer_never_sees_or_acks_anothers_notifications(client: TestClient, world: World) -> None:
    bob = bearer(world.bob_token)
    assert [n["id"] for n in client.get("/v1/me/notifications", headers=bob).json()] == [world.bob_n1]
    assert [n["id"] for n in client.get("/v1/me/notifications?after=0", headers=bob).json()] == [world.bob_n1]
    before = world.snapshot()
    for nid in (world.alice_n1, world.alice_n2):
        refused = assert_problem(client.post(f"/v1/me/notifications/{nid}/ack", headers=bob), 404)
        # The same answer as for an id that does not exist: nothing tells Bob that Alice's exists.
        missing = assert_problem(client.post(f"/v1/me/notifications/{nid + 1000}/ack", headers=bob), 404)
        assert refused["detail"] == missing["detail"].replace(str(nid + 1000), str(nid))
    assert world.snapshot() == before
    # Bob's stream replays his backlog only: read up to his newest, which comes after all of Alice's.
    with world.db.session() as s:
        later = World._notification(world.bob, "b2")
        s.add(later)
        s.flush()
        bob_n2 = later.id
    assert bob_n2 > world.alice_n2
    text = ""
    with client.stream("GET", "/v1/me/stream", headers=bob) as r:
        for chunk in r.iter_text():
            text += chunk
            if f"id: {bob_n2}\n" in text:
                break
    assert [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")] == [world.bob_n1, bob_n2]


# ------------------------------------------------------------------ errors are problem+json and change nothing


_PROFILE = {"external_id": "carol"}
_CART = {"profile_external_id": "alice", "items": [{"sku": "X", "price": 1.0}]}

# (method, url, who, body, status, words in the detail); {alice} is her profile id, who names the caller.
REJECTIONS: list[tuple[str, str, str, Any, int, str]] = [
    ("POST", "/v1/profiles", "nobody", _PROFILE, 401, "admin API key"),
    ("POST", "/v1/profiles", "wrong_key", _PROFILE, 401, "unknown API key"),
    ("POST", "/v1/profiles", "alice", _PROFILE, 403, "customer app token cannot call admin"),
    ("GET", "/v1/profiles/999999", "admin", None, 404, "999999"),
    ("PUT", "/v1/profiles/999999/consents", "admin", {"consents": {"offers": True}}, 404, "999999"),
    ("POST", "/v1/profiles/999999/tokens", "admin", None, 404, "999999"),
    ("GET", "/v1/nothing-here", "admin", None, 404, "Not Found"),
    ("POST", "/v1/profiles", "admin", {"external_id": "alice", "identifiers": [
        {"kind": "app_install", "value": "new-install"}]}, 409, "external_id"),
    ("POST", "/v1/profiles", "admin", {"external_id": "carol", "identifiers": [
        {"kind": "app_install", "value": "carol-1"},
        {"kind": "beacon", "value": ALICE_BEACON.upper()}]}, 409, "already belongs"),
    ("POST", "/v1/profiles", "admin", {"external_id": "carol", "identifiers": [
        {"kind": "app_install", "value": "carol-1"}, {"kind": "app_install", "value": "carol-1"}]},
     409, "exists"),
    ("POST", "/v1/profiles", "admin", {"external_id": "carol", "consents": {"spam": True}}, 422, "consents"),
    ("PUT", "/v1/profiles/{alice}/consents", "admin", {"consents": {"offers": False, "spam": True}},
     422, "consents"),
    ("POST", "/v1/profiles", "admin", {"external_id": "carol", "identifiers": [
        {"kind": "phone", "value": "+33100000000"}]}, 422, "kind"),
    ("POST", "/v1/profiles", "admin", {"external_id": "carol", "is_admin": True}, 422, "is_admin"),
    ("POST", "/v1/profiles", "admin", {"external_id": "carol", "identifiers": [
        {"kind": "beacon", "value": ""}]}, 422, "value"),
    ("POST", "/v1/profiles", "admin", {"external_id": "carol", "identifiers": [
        {"kind": "beacon", "value": "   "}]}, 422, "empty"),
    ("PUT", "/v1/profiles/{alice}/consents", "admin", {"consents": {}, "extra": 1}, 422, "extra"),
    ("PUT", "/v1/carts/cart-new", "admin", {**_CART, "items": [{"sku": "X", "price": -1.0}]}, 422, "price"),
    ("PUT", "/v1/carts/cart-new", "admin", {**_CART, "coupon": "FREE"}, 422, "coupon"),
    ("PUT", "/v1/carts/cart-new", "admin", {**_CART, "items": [{"sku": "X", "quantity": 0}]}, 422, "quantity"),
    ("PUT", "/v1/carts/cart-new", "admin", {"profile_id": 999999, "items": []}, 404, "999999"),
    ("PUT", "/v1/carts/cart-new", "admin", {"profile_external_id": "nobody", "items": []}, 404, "nobody"),
    ("PUT", "/v1/carts/cart-new", "admin", {"items": []}, 422, "profile"),
    ("PUT", "/v1/carts/cart-new", "admin", {**_CART, "updated_at": T0 + 86400}, 422, "future"),
    ("PUT", "/v1/carts/cart-alice", "admin", {"profile_external_id": "bob", "items": []}, 409,
     "another profile"),
    ("PUT", "/v1/carts/bad%20id", "admin", _CART, 422, "cart_id"),
    ("PUT", "/v1/catalogue", "admin", [{"sku": "OK-1", "name": "fine"}, {"sku": "BAD", "name": "x", "price": -5}],
     422, "price"),
    ("PUT", "/v1/catalogue", "admin", [{"sku": "NO-NAME"}], 422, "name"),
    ("GET", "/v1/me/notifications", "admin", None, 401, "token"),
    ("POST", "/v1/me/notifications/999999/ack", "alice", None, 404, "999999"),
    ("GET", "/v1/me/notifications?after=-1", "alice", None, 422, "after"),
    # Ids beyond what the database stores (32-bit on PostgreSQL) once crashed the query: a 500.
    ("GET", f"/v1/profiles/{2**70}", "admin", None, 422, "profile_id"),
    ("PUT", f"/v1/profiles/{2**31}/consents", "admin", {"consents": {"offers": True}}, 422, "profile_id"),
    ("POST", f"/v1/profiles/{2**63}/tokens", "admin", None, 422, "profile_id"),
    ("PUT", "/v1/carts/cart-new", "admin", {"profile_id": 2**70, "items": []}, 422, "profile_id"),
    ("POST", f"/v1/me/notifications/{2**70}/ack", "alice", None, 422, "notification_id"),
    ("GET", f"/v1/me/notifications?after={2**70}", "alice", None, 422, "after"),
]


@pytest.mark.parametrize(("method", "url", "who", "body", "status", "words"), REJECTIONS,
                         ids=[f"{s} {m} {u} as {w}" for m, u, w, _, s, _ in REJECTIONS])
def test_a_rejected_request_is_problem_json_and_changes_nothing(
        shared: tuple[World, TestClient], method: str, url: str, who: str, body: Any, status: int,
        words: str) -> None:
    world, client = shared
    headers = {"nobody": {}, "wrong_key": {"X-API-Key": "nope"}, "admin": ADMIN,
               "alice": bearer(world.alice_token)}[who]
    before = world.snapshot()
    r = client.request(method, url.format(alice=world.alice), headers=headers, json=body)
    problem = assert_problem(r, status, words)
    if status == 422 and "errors" in problem:
        assert problem["errors"] and all({"loc", "msg"} <= set(e) for e in problem["errors"])
    assert world.snapshot() == before, f"{method} {url} was refused but changed the database"
    # The in-memory identity index learned nothing either.
    assert world.service.identities.lookup("app_install", "carol-1") is None
    assert world.service.identities.lookup("app_install", "new-install") is None


@pytest.mark.parametrize(("method", "url", "raw"), [
    # (A body that is not JSON at all is a 400: tests/test_conformance.py.)
    # Python's JSON parser takes NaN and Infinity; they once went into the database as they came.
    ("PUT", "/v1/carts/cart-new", '{"profile_external_id": "alice", "items": [], "updated_at": NaN}'),
    ("PUT", "/v1/carts/cart-new", '{"profile_external_id": "alice", "items": [], "updated_at": -Infinity}'),
    ("PUT", "/v1/carts/cart-new", '{"profile_external_id": "alice", "items": [{"sku": "X", "price": Infinity}]}'),
    ("PUT", "/v1/catalogue", '[{"sku": "X", "name": "x", "price": Infinity}]'),
    ("POST", "/v1/profiles", '{"external_id": "carol", "attributes": {"score": NaN}}'),
    ("POST", "/v1/profiles", '{"external_id": "carol", "attributes": {"a": [1, {"b": -Infinity}]}}'),
])
def test_a_body_json_cannot_represent_is_a_422_problem(shared: tuple[World, TestClient], method: str, url: str,
                                                       raw: str) -> None:
    world, client = shared
    before = world.snapshot()
    r = client.request(method, url, headers={**ADMIN, "Content-Type": "application/json"}, content=raw.encode())
    assert_problem(r, 422)
    assert world.snapshot() == before


# ------------------------------------------------------------------ round trips


def test_a_profile_round_trips(client: TestClient, world: World) -> None:
    world.clock.advance(60)
    body = {"external_id": "carol", "name": "Carol Diaz", "attributes": {"tier": "gold", "visits": 3},
            "identifiers": [{"kind": "beacon", "value": "IBEACON:ABC:1:2"},
                            {"kind": "email_sha256", "value": "Carol@Example.com"},
                            {"kind": "app_install", "value": "Install-XYZ"}],
            "consents": {"offers": True, "maintenance": False}}
    r = client.post("/v1/profiles", headers=ADMIN, json=body)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["external_id"] == "carol" and created["name"] == "Carol Diaz"
    assert created["attributes"] == {"tier": "gold", "visits": 3}
    assert created["created_at"] == T0 + 60
    assert created["identifiers"] == [{"kind": "beacon", "value": "ibeacon:abc:1:2"},
                                      {"kind": "email_sha256", "value": hash_email("carol@example.com")},
                                      {"kind": "app_install", "value": "Install-XYZ"}]
    assert created["consents"] == {"offers": {"granted": True, "updated_at": T0 + 60, "source": "api"},
                                   "maintenance": {"granted": False, "updated_at": T0 + 60, "source": "api"}}
    assert "Carol@Example.com" not in r.text  # only the hash is kept

    got = client.get(f"/v1/profiles/{created['id']}", headers=ADMIN)
    assert got.status_code == 200 and got.json() == created
    # The identity index knows her at once: a sighting of her beacon would resolve.
    assert world.service.identities.beacon("ibeacon:abc:1:2") == created["id"]


def test_consents_are_updated_per_purpose(client: TestClient, world: World) -> None:
    world.clock.advance(120)
    r = client.put(f"/v1/profiles/{world.alice}/consents", headers=ADMIN,
                   json={"consents": {"offers": False, "cart_reminders": True}})
    assert r.status_code == 200, r.text
    consents = r.json()["consents"]
    assert consents == {"offers": {"granted": False, "updated_at": T0 + 120, "source": "api"},
                        "cart_reminders": {"granted": True, "updated_at": T0 + 120, "source": "api"}}
    world.clock.advance(10)
    client.put(f"/v1/profiles/{world.alice}/consents", headers=ADMIN, json={"consents": {"maintenance": True}})
    after = client.get(f"/v1/profiles/{world.alice}", headers=ADMIN).json()["consents"]
    assert after["offers"] == consents["offers"]  # untouched purposes keep their state and time
    assert after["maintenance"] == {"granted": True, "updated_at": T0 + 130, "source": "api"}


def test_a_cart_is_created_then_replaced_and_never_moves(client: TestClient, world: World) -> None:
    url = "/v1/carts/web-123"
    first = client.put(url, headers=ADMIN, json={"profile_external_id": "bob", "items": [
        {"sku": "SH-100", "name": "Trail runner shoes", "price": 89.9, "quantity": 1},
        {"sku": "AP-7", "quantity": 2}], "updated_at": T0 - 3600})
    assert first.status_code == 200, first.text
    assert first.json() == {"id": "web-123", "profile_id": world.bob, "status": "open", "updated_at": T0 - 3600,
                            "items": [{"sku": "SH-100", "name": "Trail runner shoes", "price": 89.9,
                                       "quantity": 1},
                                      {"sku": "AP-7", "name": None, "price": None, "quantity": 2}]}
    world.clock.advance(30)
    second = client.put(url, headers=ADMIN, json={"profile_id": world.bob, "status": "checked_out",
                                                  "items": [{"sku": "AP-7", "quantity": 1}]})
    assert second.status_code == 200, second.text
    assert second.json()["items"] == [{"sku": "AP-7", "name": None, "price": None, "quantity": 1}]
    assert second.json()["updated_at"] == T0 + 30 and second.json()["status"] == "checked_out"

    moved = client.put(url, headers=ADMIN, json={"profile_id": world.alice, "items": []})
    assert_problem(moved, 409, "another profile")
    with world.db.session() as s:
        carts = {c.id: (c.profile_id, c.status, len(c.items)) for c in s.scalars(select(Cart))}
    assert carts == {"cart-alice": (world.alice, "open", 1), "web-123": (world.bob, "checked_out", 1)}


def test_the_catalogue_is_upserted(client: TestClient, world: World) -> None:
    r = client.put("/v1/catalogue", headers=ADMIN, json=[
        {"sku": "SH-100", "name": "Trail runner shoes", "price": 89.9, "zone": "shoes", "aisle": "S2"},
        {"sku": "AP-7", "name": "Merino base layer", "zone": "apparel"}])
    assert r.status_code == 200 and r.json() == {"upserted": 2}
    r = client.put("/v1/catalogue", headers=ADMIN, json=[{"sku": "SH-100", "name": "Trail runner shoes v2",
                                                          "price": 79.9, "zone": "shoes", "aisle": "S3"}])
    assert r.json() == {"upserted": 1}
    assert client.put("/v1/catalogue", headers=ADMIN, json=[]).json() == {"upserted": 0}
    with world.db.session() as s:
        items = {c.sku: (c.name, c.price, c.zone, c.aisle) for c in s.scalars(select(CatalogItem))}
    assert items == {"SH-100": ("Trail runner shoes v2", 79.9, "shoes", "S3"),
                     "AP-7": ("Merino base layer", None, "apparel", None)}


def test_a_customer_lists_and_acks_their_notifications(client: TestClient, world: World) -> None:
    r = client.post(f"/v1/profiles/{world.alice}/tokens", headers=ADMIN)
    assert r.status_code == 201
    issued = r.json()
    assert issued["profile_id"] == world.alice and issued["expires_at"] == T0 + 3600
    me = bearer(issued["token"])

    listed = client.get("/v1/me/notifications", headers=me)
    assert listed.status_code == 200
    assert [n["id"] for n in listed.json()] == [world.alice_n1, world.alice_n2]
    assert listed.json()[0] == {"id": world.alice_n1, "campaign": "shoes-dwell-offer", "purpose": "offers",
                                "title": "Offer a1", "body": "10% off shoes", "data": {"zone": "shoes"},
                                "created_at": T0, "status": "sent"}
    assert [n["id"] for n in client.get(f"/v1/me/notifications?after={world.alice_n1}",
                                        headers=me).json()] == [world.alice_n2]
    # The token also works in the query string, for EventSource.
    assert client.get(f"/v1/me/notifications?access_token={issued['token']}").status_code == 200

    world.clock.advance(5)
    acked = client.post(f"/v1/me/notifications/{world.alice_n1}/ack", headers=me)
    assert acked.status_code == 200 and acked.json()["status"] == "acked"
    world.clock.advance(5)
    again = client.post(f"/v1/me/notifications/{world.alice_n1}/ack", headers=me)
    assert again.status_code == 200 and again.json() == acked.json()  # idempotent
    assert [n["id"] for n in client.get("/v1/me/notifications", headers=me).json()] == [world.alice_n2]
    with world.db.session() as s:
        n = s.get(Notification, world.alice_n1)
        assert n is not None and (n.status, n.acked_at) == ("acked", T0 + 5)
        assert [(i.notification_id, i.kind) for i in s.scalars(select(Interaction))] == \
            [(world.alice_n1, "delivered")]


def test_the_stream_replays_unacked_notifications_after_last_event_id(client: TestClient, world: World) -> None:
    def read_until(headers: dict[str, str], url: str, want: int) -> str:
        text = ""
        with client.stream("GET", url, headers=headers) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for chunk in r.iter_text():
                text += chunk
                if text.count("event: notification") >= want:
                    break
        return text

    me = bearer(world.alice_token)
    text = read_until(me, "/v1/me/stream", 2)
    assert f"id: {world.alice_n1}\n" in text and f"id: {world.alice_n2}\n" in text
    resumed = read_until({**me, "Last-Event-ID": str(world.alice_n1)}, "/v1/me/stream", 1)
    assert f"id: {world.alice_n2}\n" in resumed and f"id: {world.alice_n1}\n" not in resumed
    for bad in ("yesterday", "-1", str(2**70)):
        assert_problem(client.get("/v1/me/stream", headers={**me, "Last-Event-ID": bad}), 400)
    assert world.hub.listeners(world.alice) == 0  # closed streams let go of their queue


def test_health_reports_components(client: TestClient) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "components": {"db": "ok", "mqtt": "disabled", "scanner": "disabled"}}


def test_health_is_503_when_the_database_is_unreachable(world: World) -> None:
    broken = Database(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing?connect_timeout=2")
    app = create_app(ApiContext(service=world.service, hub=world.hub, admin_key=ADMIN_KEY,
                                health=_health_of(broken)))
    try:
        with TestClient(app) as c:
            r = c.get("/health")
    finally:
        broken.dispose()
    assert r.status_code == 503
    assert r.json()["status"] == "degraded" and r.json()["components"]["db"] == "down"


# ------------------------------------------------------------------ the published contract


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"external $ref {ref}"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"$ref {ref} does not resolve"
        node = node[part]
    return node


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_the_openapi_document_is_valid(client: TestClient) -> None:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    try:
        from openapi_spec_validator import validate
    except ImportError:  # not a dependency: the checks below are the floor
        pass
    else:
        validate(doc)

    assert doc["openapi"].startswith("3.") and doc["info"]["title"] and doc["info"]["version"]
    assert doc["components"]["schemas"] and doc["components"]["securitySchemes"]
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert documented == {(m, p) for m, p in ROUTES if m != "WEBSOCKET"}
    operation_ids = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert op.get("responses"), f"{method} {path} documents no responses"
            operation_ids.append(op["operationId"])
            secured = bool(op.get("security"))
            assert secured == (path not in PUBLIC_PATHS), f"{method} {path}: security is {op.get('security')}"
            for requirement in op.get("security", []):
                for scheme in requirement:
                    assert scheme in doc["components"]["securitySchemes"]
    assert len(operation_ids) == len(set(operation_ids))
    refs = set(_refs(doc))
    assert refs, "no $ref at all: the schemas are not where they should be"
    for ref in refs:
        _resolve(doc, ref)
