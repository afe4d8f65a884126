"""Who may call what: every route of the app against every kind of credential.

The routes come from the app itself (a new router is covered the day it is included); what each
route should accept is written down here, independently of the code: customer routes take the
customer's own app token and nothing else, admin routes take keys with the right scope
(GET: ``read``; changes: ``write``; campaigns: ``campaigns``; export and erasure: ``privacy``;
keys: ``admin``), and a refusal is problem+json that changes nothing in the database.
Plus: the WebSocket with each credential, and one customer never reaching another's data.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocketDisconnect

import gateway.security.auth as auth
from api.app import PROBLEM, create_app
from api.deps import ApiContext, guard_of
from api.routers import ws as ws_router
from gateway.clock import VirtualClock
from gateway.delivery.hub import StreamHub
from gateway.profiles.service import NewProfile, ServiceOptions
from gateway.storage.models import Base, Interaction, Notification, PushSubscription
from tests.fixtures import make_service, migrated_copy

T0 = 1_767_261_600.0
CONFIG_KEY = "matrix-config-admin-key-0123456789"
DOC_PATHS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
PUBLIC_PATHS = {"/health", "/health/live", "/health/ready", "/metrics"}
ALICE_ENDPOINT = "https://push.example.com/send/alice-subscription"
P256DH = "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-Ts1XbjhazAkj7I99e8QcYP7DkM"
AUTH_SECRET = "tBHItJI5svbpez7KI4CCXg"


def route_table(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) for every route but the docs; WebSocket routes get the method 'WEBSOCKET'."""
    from fastapi.routing import iter_route_contexts

    out: list[tuple[str, str]] = []
    for route in iter_route_contexts(app.routes):
        path = getattr(route, "path", None)
        assert path, f"a route without a path: {route!r}"
        if path in DOC_PATHS:
            continue
        if isinstance(getattr(route, "original_route", route), WebSocketRoute):
            out.append(("WEBSOCKET", path))
            continue
        for method in sorted((getattr(route, "methods", None) or {"GET"}) - {"HEAD", "OPTIONS"}):
            out.append((method, path))
    return out


ROUTES = route_table(create_app(ApiContext(service=None, hub=StreamHub(), admin_key="x",  # type: ignore[arg-type]
                                           health=dict)))
HTTP_ROUTES = [r for r in ROUTES if r[0] != "WEBSOCKET"]


def audience(path: str) -> str:
    if path in PUBLIC_PATHS:
        return "public"
    return "customer" if path.startswith("/v1/me/") else "admin"


def accepted_scopes(method: str, path: str) -> set[str]:
    """The scopes that open an admin route: the policy, written here as the spec (``admin`` opens all)."""
    if path.startswith("/v1/keys"):
        return {"admin"}
    if path.endswith("/export") or (method == "DELETE" and re.fullmatch(r"/v1/profiles/\{[^}/]+\}", path)) \
            or "retention" in path:
        return {"privacy", "admin"}
    if path.startswith("/v1/campaigns"):
        return {"campaigns", "read", "admin"} if method == "GET" else {"campaigns", "admin"}
    if path == "/v1/decisions/dry-run":  # nothing is stored: a read
        return {"read", "campaigns", "admin"}
    return {"read", "admin"} if method == "GET" else {"write", "admin"}


# ------------------------------------------------------------------ the world


class MatrixWorld:
    """Two customers with data, tokens of every kind, keys of every scope and state."""

    def __init__(self, tmp_path: Path, migrated: Path) -> None:
        self.clock = VirtualClock(T0)
        self.db = migrated_copy(migrated, tmp_path / "matrix.db")
        self.service = make_service(self.db, self.clock, options=ServiceOptions(token_ttl_s=3600))
        self.hub = StreamHub()
        self.ctx = ApiContext(service=self.service, hub=self.hub, admin_key=CONFIG_KEY, heartbeat_s=30,
                              health=lambda: {"status": "ok", "components": {"db": "ok"}})
        self.app = create_app(self.ctx)
        svc = self.service
        self.alice = svc.create_profile(NewProfile(external_id="alice", name="Alice", consents={"offers": True}))["id"]
        self.bob = svc.create_profile(NewProfile(external_id="bob", name="Bob"))["id"]
        dave = svc.create_profile(NewProfile(external_id="dave", name="Dave"))["id"]
        svc.upsert_cart("cart-alice", profile_id=self.alice, external_id=None,
                        items=[{"sku": "SH-100", "quantity": 1, "price": 89.9}], updated_at=None)
        self.tokens = {"alice": svc.issue_token(self.alice)[0], "bob": svc.issue_token(self.bob)[0]}
        self.tokens["expired_token"] = svc.signer.issue(self.alice, T0 - 7200, 3600)[0]
        logged_out = svc.issue_token(self.alice)[0]
        svc.revoke_token(svc.verify_token(logged_out))
        self.tokens["revoked_token"] = logged_out
        self.tokens["revoked_all_token"] = svc.issue_token(dave)[0]
        svc.revoke_tokens(dave)
        guard = guard_of(self.ctx)
        self.keys = {f"key_{scope}": guard.create_key(f"matrix {scope}", [scope])[0] for scope in auth.SCOPES}
        revoked, view = guard.create_key("matrix revoked", list(auth.SCOPES))
        guard.revoke_key(view["id"])
        self.keys["revoked_key"] = revoked
        with self.db.session() as s:
            self.keys["expired_key"] = auth.create_key(s, "matrix expired", list(auth.SCOPES), T0 - 100,
                                                       expires_at=T0 - 1)[0]
            rows = [self._notification(self.alice, "a1"), self._notification(self.bob, "b1"),
                    self._notification(self.alice, "a2")]
            s.add_all(rows)
            s.flush()
            self.alice_n1, self.bob_n1, self.alice_n2 = (n.id for n in rows)
            s.add(PushSubscription(profile_id=self.alice, endpoint=ALICE_ENDPOINT, p256dh=P256DH,
                                   auth=AUTH_SECRET, created_at=T0, failures=0))

    @staticmethod
    def _notification(profile_id: int, key: str) -> Notification:
        return Notification(profile_id=profile_id, campaign_id="shoes-dwell-offer", purpose="offers",
                            dedup_key=key, title=f"Offer {key}", body="10% off shoes", data={}, created_at=T0,
                            status="sent")

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table but the keys' last-use stamps, to show a refusal changed nothing."""
        with self.db.engine.connect() as conn:
            out = {name: sorted((tuple(row) for row in conn.execute(table.select())), key=repr)
                   for name, table in Base.metadata.tables.items() if name != "api_keys"}
            out["api_keys"] = sorted(conn.execute(select(Base.metadata.tables["api_keys"].c.id,
                                                         Base.metadata.tables["api_keys"].c.revoked_at)))
            return out

    def headers(self, cred: str) -> dict[str, str]:
        if cred == "none":
            return {}
        if cred == "garbage":
            return {"Authorization": "Bearer garbage"}
        if cred == "unknown_key":
            return {"X-API-Key": "gk_0123456789ab_" + "A" * 43}
        if cred == "config_key":
            return {"Authorization": f"Bearer {CONFIG_KEY}"}
        if cred in self.tokens:
            return {"Authorization": f"Bearer {self.tokens[cred]}"}
        return {"X-API-Key": self.keys[cred]}


CREDENTIALS = ["none", "garbage", "unknown_key", "expired_key", "revoked_key", "expired_token", "revoked_token",
               "revoked_all_token", "alice", "bob", "config_key", *(f"key_{s}" for s in auth.SCOPES)]
INVALID = {"none", "garbage", "unknown_key", "expired_key", "revoked_key", "expired_token", "revoked_token",
           "revoked_all_token"}


def expected(method: str, path: str, cred: str) -> int | None:
    """The status a caller must get, or None when the call is allowed."""
    who = audience(path)
    if who == "public":
        return None
    if who == "customer":
        return None if cred in ("alice", "bob") else 401
    if cred in INVALID:
        return 401
    if cred in ("alice", "bob"):
        return 403
    if cred == "config_key":
        return None
    return None if cred.removeprefix("key_") in accepted_scopes(method, path) else 403


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory,
           migrated_sqlite: Path) -> Iterator[tuple[MatrixWorld, TestClient]]:
    """For refusals and reads: each test checks it changed nothing, so they can share one world."""
    w = MatrixWorld(tmp_path_factory.mktemp("matrix-shared"), migrated_sqlite)
    try:
        with TestClient(w.app) as c:
            yield w, c
    finally:
        w.db.dispose()


@pytest.fixture
def fresh(tmp_path: Path, migrated_sqlite: Path) -> Iterator[tuple[MatrixWorld, TestClient]]:
    w = MatrixWorld(tmp_path, migrated_sqlite)
    try:
        with TestClient(w.app) as c:
            yield w, c
    finally:
        w.db.dispose()


def fill(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def sample(w: MatrixWorld, method: str, path: str) -> tuple[str, Any, bool]:
    """(url, json body, known): a call that succeeds for an allowed caller, or filler for other routes."""
    known: dict[tuple[str, str], tuple[str, Any]] = {
        ("POST", "/v1/profiles"): ("/v1/profiles", {"external_id": "carol"}),
        ("GET", "/v1/profiles/{profile_id}"): (f"/v1/profiles/{w.alice}", None),
        ("PUT", "/v1/profiles/{profile_id}/consents"): (f"/v1/profiles/{w.alice}/consents",
                                                        {"consents": {"maintenance": True}}),
        ("POST", "/v1/profiles/{profile_id}/tokens"): (f"/v1/profiles/{w.alice}/tokens", None),
        ("DELETE", "/v1/profiles/{profile_id}/tokens"): (f"/v1/profiles/{w.bob}/tokens", None),
        ("GET", "/v1/profiles/{profile_id}/export"): (f"/v1/profiles/{w.alice}/export", None),
        ("DELETE", "/v1/profiles/{profile_id}"): (f"/v1/profiles/{w.bob}", None),
        ("PUT", "/v1/carts/{cart_id}"): ("/v1/carts/cart-alice", {"profile_external_id": "alice", "items": []}),
        ("PUT", "/v1/catalogue"): ("/v1/catalogue", [{"sku": "SH-100", "name": "Trail runner shoes"}]),
        ("GET", "/v1/campaigns"): ("/v1/campaigns", None),
        ("GET", "/v1/keys"): ("/v1/keys", None),
        ("POST", "/v1/keys"): ("/v1/keys", {"name": "new", "scopes": ["read"]}),
        ("GET", "/v1/me/stream"): ("/v1/me/stream", None),
        ("GET", "/v1/me/notifications"): ("/v1/me/notifications", None),
        ("DELETE", "/v1/me/token"): ("/v1/me/token", None),
        ("GET", "/v1/me/push-subscriptions"): ("/v1/me/push-subscriptions", None),
        ("GET", "/health"): ("/health", None),
    }
    if (method, path) in known:
        return (*known[(method, path)], True)
    return fill(path), None, False


def call(client: TestClient, method: str, url: str, headers: dict[str, str], body: Any) -> httpx.Response:
    """One request; an event stream is read up to its first chunk and then closed."""
    with client.stream(method, url, headers=headers, json=body) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            next(r.iter_text())
        else:
            r.read()
        return r


ALLOWED = [(m, p, c) for m, p in HTTP_ROUTES for c in CREDENTIALS if expected(m, p, c) is None]
REFUSING = [(m, p) for m, p in HTTP_ROUTES if any(expected(m, p, c) is not None for c in CREDENTIALS)]


def test_the_route_table_covers_every_kind_of_route() -> None:
    # The discovery itself, so the matrix cannot silently cover nothing.
    assert {audience(p) for _, p in ROUTES} == {"public", "admin", "customer"}
    for route in [("POST", "/v1/profiles"), ("GET", "/v1/me/stream"), ("POST", "/v1/keys"),
                  ("DELETE", "/v1/keys/{key_id}"), ("DELETE", "/v1/me/token"),
                  ("DELETE", "/v1/profiles/{profile_id}/tokens"), ("WEBSOCKET", "/v1/me/ws")]:
        assert route in ROUTES
    for scope in auth.SCOPES:  # every scope opens something, and closes something
        opens = [r for r in HTTP_ROUTES if audience(r[1]) == "admin" and scope in accepted_scopes(*r)]
        assert opens
        assert scope == "admin" or len(opens) < len([r for r in HTTP_ROUTES if audience(r[1]) == "admin"])


@pytest.mark.parametrize(("method", "path"), REFUSING, ids=[f"{m} {p}" for m, p in REFUSING])
def test_authorization_matrix_refusals(shared: tuple[MatrixWorld, TestClient], method: str, path: str) -> None:
    """Every credential that must not pass gets its exact status as problem+json, and changes nothing."""
    w, client = shared
    url, body, _ = sample(w, method, path)
    before = w.snapshot()
    refused = [c for c in CREDENTIALS if expected(method, path, c) is not None]
    for cred in refused:
        want = expected(method, path, cred)
        r = call(client, method, url, w.headers(cred), body)
        assert r.status_code == want, f"{cred} on {method} {path}: {r.status_code} {r.text}"
        assert r.headers["content-type"].split(";")[0] == PROBLEM
        assert r.json()["status"] == want and r.json()["detail"]
        if want == 401:
            assert r.headers["www-authenticate"] == "Bearer"
    assert w.snapshot() == before, f"a refused {method} {path} changed the database (one of {refused})"


@pytest.mark.parametrize(("method", "path", "cred"), ALLOWED, ids=[f"{m} {p} {c}" for m, p, c in ALLOWED])
def test_authorization_matrix_allowed(request: pytest.FixtureRequest, method: str, path: str, cred: str) -> None:
    changes = method not in ("GET", "HEAD")
    w, client = request.getfixturevalue("fresh" if changes else "shared")
    url, body, known = sample(w, method, path)
    r = call(client, method, url, w.headers(cred), body)
    assert r.status_code not in (401, 403, 429), f"{cred} refused on {method} {path}: {r.text}"
    # 503: a part this bare world does not run (device registry, presence): it was let in all the same.
    assert r.status_code < 500 or (r.status_code == 503 and not known), r.text
    if known:  # a route we know how to call properly must succeed for an allowed caller
        assert 200 <= r.status_code < 300, r.text


@pytest.mark.parametrize("cred", CREDENTIALS)
def test_the_websocket_takes_only_a_valid_customer_token(shared: tuple[MatrixWorld, TestClient], cred: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Under the in-process TestClient the first message of a credential-less socket is not seen by the
    # server before its auth timeout (it is on a real server: tests/test_websocket.py, "no token"), so
    # the wait is shortened here; the close code is what this matrix checks.
    monkeypatch.setattr(ws_router, "AUTH_TIMEOUT_S", 0.5)
    w, client = shared
    headers = w.headers(cred)
    if cred in ("alice", "bob"):
        mine = {"alice": [w.alice_n1, w.alice_n2], "bob": [w.bob_n1]}[cred]
        with client.websocket_connect("/v1/me/ws?after=0", headers=headers) as ws:
            got = [ws.receive_json()["id"] for _ in mine]
            ws.send_json({"type": "ping"})
            assert ws.receive_json() == {"type": "pong"}  # nothing else was queued: only their own backlog
        assert got == mine
        return
    key = headers.get("X-API-Key")  # a key goes where a token would: the query, as browsers send it
    url = f"/v1/me/ws?{httpx.QueryParams(after=0, access_token=key)}" if key else "/v1/me/ws?after=0"
    with pytest.raises(WebSocketDisconnect) as closed, \
            client.websocket_connect(url, headers={} if key else headers) as ws:
        if not headers:  # no credential at all: the first message carries none either
            ws.send_json({"after": 0})
        ws.receive_json()
    assert closed.value.code == 4401


def test_a_customer_never_reaches_another_customers_data(fresh: tuple[MatrixWorld, TestClient]) -> None:
    w, client = fresh
    bob = w.headers("bob")
    before = w.snapshot()
    # Notifications: not listed, not acked, not interacted with; the same 404 as for an id that does not exist.
    assert [n["id"] for n in client.get("/v1/me/notifications", headers=bob).json()] == [w.bob_n1]
    for nid in (w.alice_n1, w.alice_n2):
        assert client.post(f"/v1/me/notifications/{nid}/ack", headers=bob).status_code == 404
        r = client.post(f"/v1/me/notifications/{nid}/interactions", headers=bob, json={"kind": "opened"})
        assert r.status_code == 404, r.text
    # Push subscriptions: not listed, not deleted, not taken over by posting the endpoint with other keys.
    assert client.get("/v1/me/push-subscriptions", headers=bob).json() == []
    r = client.delete("/v1/me/push-subscriptions", headers=bob, params={"endpoint": ALICE_ENDPOINT})
    assert r.status_code == 404
    other_keys = {"p256dh": P256DH, "auth": "AAAAAAAAAAAAAAAAAAAAAA"}
    r = client.post("/v1/me/push-subscriptions", headers=bob, json={"endpoint": ALICE_ENDPOINT, "keys": other_keys})
    assert r.status_code == 409, r.text
    assert w.snapshot() == before
    with w.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Interaction)) == 0
        assert s.scalar(select(PushSubscription.profile_id).where(PushSubscription.endpoint == ALICE_ENDPOINT)) \
            == w.alice
    # The stream: Bob's backlog only, though Alice's ids sit between his.
    with w.db.session() as s:
        later = MatrixWorld._notification(w.bob, "b2")
        s.add(later)
        s.flush()
        bob_n2 = later.id
    text = ""
    with client.stream("GET", "/v1/me/stream", headers=bob) as r:
        for chunk in r.iter_text():
            text += chunk
            if f"id: {bob_n2}\n" in text:
                break
    assert [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")] == [w.bob_n1, bob_n2]


def test_the_same_browser_may_move_its_subscription_to_another_account(fresh: tuple[MatrixWorld, TestClient]
                                                                       ) -> None:
    # The same PushSubscription (same auth secret) posted by the customer now logged in: it moves.
    w, client = fresh
    r = client.post("/v1/me/push-subscriptions", headers=w.headers("bob"),
                    json={"endpoint": ALICE_ENDPOINT, "keys": {"p256dh": P256DH, "auth": AUTH_SECRET}})
    assert r.status_code == 200, r.text
    assert [s["endpoint"] for s in client.get("/v1/me/push-subscriptions", headers=w.headers("bob")).json()] \
        == [ALICE_ENDPOINT]
    assert client.get("/v1/me/push-subscriptions", headers=w.headers("alice")).json() == []
