"""Web Push against a local push service that checks what a real one checks.

The push service here (aiohttp on a free port of 127.0.0.1) verifies the VAPID JWT (ES256 over
``Authorization: vapid t=...,k=...``, ``aud`` = its origin, ``exp`` in the future and within 24 h,
``sub`` a mailto:), requires TTL, Urgency and Topic to be well formed, decrypts the aes128gcm body
with the subscription's private key and auth secret (which only the test, as the browser, holds),
and answers scripted statuses per subscription (201, or 404/410 to test pruning).
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import http_ece
import pytest
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from fastapi.testclient import TestClient
from sqlalchemy import delete, select

from api.app import create_app
from api.deps import ApiContext
from gateway.app.config import Settings
from gateway.app.vapid import main
from gateway.clock import SystemClock, VirtualClock
from gateway.delivery.hub import StreamHub
from gateway.delivery.outbox import message
from gateway.delivery.webpush import (
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    WebPushChannel,
    WebPushSettings,
    application_server_key,
    b64url,
    ensure_vapid_key,
    load_vapid,
    payload,
    push_options,
    save_subscription,
    topic_for,
    validate_subscription,
)
from gateway.profiles.service import NewProfile, ServiceOptions
from gateway.storage.db import Database
from gateway.storage.models import Notification, Profile, PushSubscription
from tests.fixtures import make_service

T0 = 1_767_261_600.0
SUBJECT = "mailto:ops@brand.example"


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Browser:
    """A browser's side of one subscription: the keys it keeps, the JSON it gives the page."""

    endpoint: str
    private_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    auth: bytes = field(default_factory=lambda: os.urandom(16))

    @property
    def p256dh(self) -> str:
        return b64url(self.private_key.public_key().public_bytes(serialization.Encoding.X962,
                                                                 serialization.PublicFormat.UncompressedPoint))

    def subscription(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "expirationTime": None,
                "keys": {"p256dh": self.p256dh, "auth": b64url(self.auth)}}


@dataclass
class Push:
    token: str
    headers: dict[str, str]  # lower-cased names
    claims: dict[str, Any]
    payload: dict[str, Any]


class PushService:
    """The push service: verifies, decrypts and records each push; answers the scripted status."""

    def __init__(self, vapid_key: str) -> None:
        self.vapid_key = vapid_key  # the applicationServerKey the subscriptions were made with
        self.browsers: dict[str, Browser] = {}
        self.status: dict[str, list[int]] = {}
        self.pushes: list[Push] = []
        self.refusals: list[str] = []
        self.origin = ""

    def browser(self, token: str) -> Browser:
        b = Browser(f"{self.origin}/push/{token}")
        self.browsers[token] = b
        return b

    def _refuse(self, status: int, why: str) -> web.Response:
        self.refusals.append(why)
        return web.Response(status=status, text=why)

    async def handle(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        browser = self.browsers.get(token)
        if browser is None:
            return self._refuse(404, "unknown subscription")
        try:
            claims = self._check_vapid(request.headers.get("Authorization", ""))
        except (ValueError, InvalidSignature, KeyError) as exc:
            return self._refuse(401, f"vapid: {exc!r}")
        if claims.pop("_k") != self.vapid_key:
            return self._refuse(403, "vapid key differs from the subscription's applicationServerKey")
        ttl, urgency, topic = (request.headers.get(h) for h in ("TTL", "Urgency", "Topic"))
        if ttl is None or not ttl.isdigit():
            return self._refuse(400, f"TTL {ttl!r}")
        if urgency not in (None, "very-low", "low", "normal", "high"):
            return self._refuse(400, f"Urgency {urgency!r}")
        if topic is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", topic):
            return self._refuse(400, f"Topic {topic!r}")
        if request.headers.get("Content-Encoding") != "aes128gcm":
            return self._refuse(415, "content encoding")
        body = await request.read()
        if len(body) > 4096:
            return self._refuse(413, "payload too large")
        plain = http_ece.decrypt(body, private_key=browser.private_key, auth_secret=browser.auth,
                                 version="aes128gcm")
        self.pushes.append(Push(token, {k.lower(): v for k, v in request.headers.items()}, claims,
                                json.loads(plain)))
        script = self.status.get(token)
        return web.Response(status=script.pop(0) if script else 201)

    def _check_vapid(self, header: str) -> dict[str, Any]:
        scheme, _, params = header.partition(" ")
        if scheme.lower() != "vapid":
            raise ValueError(f"scheme {scheme!r}")
        parts = dict(p.strip().split("=", 1) for p in params.split(","))
        jwt, k = parts["t"], parts["k"]
        head_b64, claims_b64, sig_b64 = jwt.split(".")
        if json.loads(_unb64(head_b64)).get("alg") != "ES256":
            raise ValueError("alg")
        sig = _unb64(sig_b64)
        if len(sig) != 64:
            raise ValueError("signature length")
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), _unb64(k))
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        public.verify(der, f"{head_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256()))
        claims: dict[str, Any] = json.loads(_unb64(claims_b64))
        now = time.time()
        if claims.get("aud") != self.origin:
            raise ValueError(f"aud {claims.get('aud')!r} is not {self.origin!r}")
        if not now < claims["exp"] <= now + 24 * 3600:
            raise ValueError("exp not within the next 24 h")
        if not str(claims.get("sub", "")).startswith("mailto:"):
            raise ValueError("sub")
        return {**claims, "_k": k}


@pytest.fixture
def vapid_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def push_service(vapid_dir: Path) -> AsyncIterator[PushService]:
    svc = PushService(application_server_key(ensure_vapid_key(vapid_dir)))
    app = web.Application()
    app.router.add_post("/push/{token}", svc.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    svc.origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield svc
    finally:
        await runner.cleanup()


SETTINGS = WebPushSettings(enabled=True, subject=SUBJECT, ttl_s=3600, urgency="normal", timeout=5.0)


def _channel(db: Database, vapid_dir: Path, **overrides: Any) -> WebPushChannel:
    settings = WebPushSettings(**{**SETTINGS.__dict__, **overrides})
    return WebPushChannel(settings, db, load_vapid(settings, vapid_dir), clock=SystemClock())


def _profile(db: Database, external_id: str) -> int:
    with db.session() as s:
        p = Profile(external_id=external_id, attributes={}, created_at=T0)
        s.add(p)
        s.flush()
        return p.id


def _subscribe(db: Database, profile_id: int, browser: Browser) -> None:
    keys = browser.subscription()["keys"]
    save_subscription(db, profile_id, validate_subscription(browser.endpoint, keys["p256dh"], keys["auth"],
                                                            allow_insecure=True), T0)


def _notify(db: Database, profile_id: int, data: dict[str, Any], campaign: str = "shoes-dwell-offer",
            key: str = "k1") -> dict[str, Any]:
    with db.session() as s:
        n = Notification(profile_id=profile_id, campaign_id=campaign, purpose="offers", dedup_key=key,
                         title="10% off trail shoes", body="Today only, aisle 4", data=data, created_at=T0,
                         status="pending")
        s.add(n)
        s.flush()
        return message(n)


def _endpoints(db: Database) -> set[str]:
    with db.session() as s:
        return set(s.scalars(select(PushSubscription.endpoint)))


# ------------------------------------------------------------------ sending


async def test_a_push_arrives_encrypted_vapid_signed_with_the_campaigns_headers(
        db: Database, vapid_dir: Path, push_service: PushService) -> None:
    alice, bob = _profile(db, "alice"), _profile(db, "bob")
    _subscribe(db, alice, push_service.browser("alice-laptop"))
    _subscribe(db, bob, push_service.browser("bob-phone"))
    msg = _notify(db, alice, {"zone": "shoes", "push": {"ttl_s": 600, "urgency": "high", "topic": "shoes"}})
    ch = _channel(db, vapid_dir)
    try:
        assert await ch.deliver(alice, msg) == "delivered"
    finally:
        await ch.aclose()
    assert push_service.refusals == []
    (push,) = push_service.pushes  # bob's browser got nothing
    assert push.token == "alice-laptop"
    assert push.payload["id"] == msg["id"]
    assert (push.payload["title"], push.payload["body"]) == ("10% off trail shoes", "Today only, aisle 4")
    assert push.payload["data"]["zone"] == "shoes"
    assert (push.headers["ttl"], push.headers["urgency"], push.headers["topic"]) == ("600", "high", "shoes")
    assert push.claims["aud"] == push_service.origin and push.claims["sub"] == SUBJECT
    with db.session() as s:
        row = s.scalar(select(PushSubscription).where(PushSubscription.profile_id == alice))
        assert row is not None and row.last_success_at is not None and row.failures == 0


async def test_without_push_data_the_configured_defaults_apply(
        db: Database, vapid_dir: Path, push_service: PushService) -> None:
    alice = _profile(db, "alice")
    _subscribe(db, alice, push_service.browser("alice-laptop"))
    ch = _channel(db, vapid_dir, ttl_s=900, urgency="low")
    try:
        assert await ch.deliver(alice, _notify(db, alice, {}, campaign="shoes-dwell-offer")) == "delivered"
        assert await ch.deliver(alice, _notify(db, alice, {}, campaign="cart.reminder/v2 (fr)", key="k2")) \
            == "delivered"
    finally:
        await ch.aclose()
    first, second = push_service.pushes
    assert (first.headers["ttl"], first.headers["urgency"], first.headers["topic"]) == ("900", "low",
                                                                                        "shoes-dwell-offer")
    assert second.headers["topic"] == topic_for("cart.reminder/v2 (fr)") and len(second.headers["topic"]) == 32


def test_bad_push_data_falls_back_to_the_defaults() -> None:
    msg = {"id": 1, "campaign": "c1", "data": {"push": {"ttl_s": -5, "urgency": "asap", "topic": "a b"}}}
    opts = push_options(msg, SETTINGS)
    assert (opts.ttl, opts.urgency) == (3600, "normal")
    assert opts.topic is not None and re.fullmatch(r"[A-Za-z0-9_-]{1,32}", opts.topic)
    assert push_options({"id": 1, "campaign": "c1", "data": {"push": {"topic": None}}}, SETTINGS).topic is None


def test_a_payload_too_big_for_one_record_drops_its_data_and_stays_json() -> None:
    big = {"id": 9, "campaign": "c" * 128, "title": "\u00e9" * 300, "body": "\U0001f45f" * 5000,
           "data": {"cart": ["x" * 100] * 100}}
    raw = payload(big)
    assert len(raw) <= 3000
    doc = json.loads(raw)
    assert doc["id"] == 9 and doc["truncated"] is True and doc["data"] == {}
    assert doc["body"].startswith("\U0001f45f")
    small = json.loads(payload({"id": 1, "campaign": "c", "title": "t", "body": "b", "data": {"k": 1}}))
    assert small == {"id": 1, "campaign": "c", "title": "t", "body": "b", "data": {"k": 1}}


async def test_404_and_410_prune_the_subscription_the_others_get_it_and_erasure_removes_all(
        any_db: Database, vapid_dir: Path, push_service: PushService) -> None:
    db = any_db
    alice = _profile(db, "alice")
    for token in ("laptop", "old-phone", "old-tablet"):
        _subscribe(db, alice, push_service.browser(token))
    push_service.status = {"old-phone": [410], "old-tablet": [404]}
    ch = _channel(db, vapid_dir)
    try:
        assert await ch.deliver(alice, _notify(db, alice, {})) == "delivered"
        assert _endpoints(db) == {f"{push_service.origin}/push/laptop"}
        push_service.status = {"laptop": [410]}
        assert await ch.deliver(alice, _notify(db, alice, {}, key="k2")) == "gone"
        assert _endpoints(db) == set()
        assert await ch.deliver(alice, _notify(db, alice, {}, key="k3")) == "no_listener"
    finally:
        await ch.aclose()
    assert sorted(p.token for p in push_service.pushes) == ["laptop", "laptop", "old-phone", "old-tablet"]

    _subscribe(db, alice, push_service.browser("new-laptop"))  # erasure takes the subscriptions along
    with db.session() as s:
        s.execute(delete(Profile).where(Profile.id == alice))
    assert _endpoints(db) == set()


async def test_a_5xx_is_retried_later_and_keeps_the_subscription(
        db: Database, vapid_dir: Path, push_service: PushService) -> None:
    alice = _profile(db, "alice")
    _subscribe(db, alice, push_service.browser("laptop"))
    push_service.status = {"laptop": [503]}
    ch = _channel(db, vapid_dir)
    try:
        assert await ch.deliver(alice, _notify(db, alice, {})) == "retry"
        with db.session() as s:
            assert s.scalar(select(PushSubscription.failures)) == 1
        assert await ch.deliver(alice, _notify(db, alice, {}, key="k2")) == "delivered"
        with db.session() as s:
            assert s.scalar(select(PushSubscription.failures)) == 0
    finally:
        await ch.aclose()


async def test_a_push_signed_with_another_vapid_key_is_refused_and_not_pruned(
        db: Database, tmp_path: Path, push_service: PushService) -> None:
    alice = _profile(db, "alice")
    _subscribe(db, alice, push_service.browser("laptop"))
    ch = _channel(db, tmp_path / "another-gateway")  # a different key pair than the subscription was made with
    try:
        assert await ch.deliver(alice, _notify(db, alice, {})) == "dead"
    finally:
        await ch.aclose()
    assert push_service.pushes == [] and len(push_service.refusals) == 1
    assert _endpoints(db) == {f"{push_service.origin}/push/laptop"}


# ------------------------------------------------------------------ keys


def test_the_vapid_key_is_generated_once_and_kept_private(tmp_path: Path) -> None:
    first = application_server_key(ensure_vapid_key(tmp_path / "d"))
    assert application_server_key(ensure_vapid_key(tmp_path / "d")) == first
    private = tmp_path / "d" / PRIVATE_KEY_FILE
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert (tmp_path / "d" / PUBLIC_KEY_FILE).read_text().strip() == first
    assert len(_unb64(first)) == 65 and _unb64(first)[0] == 4
    pem = private.read_text()
    assert application_server_key(load_vapid(WebPushSettings(vapid_private_key=pem), tmp_path / "x")) == first
    assert application_server_key(load_vapid(WebPushSettings(vapid_private_key=str(private)), tmp_path / "x")) \
        == first
    with pytest.raises(FileNotFoundError):
        load_vapid(WebPushSettings(vapid_private_key=str(tmp_path / "missing.pem")), tmp_path)


def test_the_key_helper_prints_the_application_server_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    assert main(["--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == application_server_key(ensure_vapid_key(tmp_path))


def test_channel_settings_are_checked(db: Database, tmp_path: Path) -> None:
    vapid = ensure_vapid_key(tmp_path)
    with pytest.raises(ValueError, match="subject"):
        WebPushChannel(WebPushSettings(enabled=True, subject="ops@brand.example"), db, vapid)
    with pytest.raises(ValueError, match="urgency"):
        WebPushChannel(WebPushSettings(enabled=True, subject=SUBJECT, urgency="urgent"), db, vapid)


def test_the_runtime_adds_web_push_when_enabled_and_makes_the_key(tmp_path: Path) -> None:
    from gateway.app.runtime import Runtime

    settings = Settings(data_dir=str(tmp_path / "data"))
    settings.database.url = f"sqlite:///{tmp_path}/rt.db"
    settings.campaigns.dir = str(tmp_path)
    settings.webpush.enabled, settings.webpush.subject = True, SUBJECT
    rt = Runtime(settings, serve_api=False)  # never started (not the fixture's): only its channels are read
    try:
        assert [c.name for c in rt.dispatcher.channels][:1] == ["sse"]
        assert "webpush" in [c.name for c in rt.dispatcher.channels]
        assert (tmp_path / "data" / PRIVATE_KEY_FILE).is_file()
    finally:
        rt.db.dispose()


# ------------------------------------------------------------------ the customer's API


ADMIN_KEY = "test-admin-key-0123456789abcdef"


@dataclass
class ApiWorld:
    client: TestClient
    db: Database
    alice: dict[str, str]
    bob: dict[str, str]
    alice_id: int


@pytest.fixture
def api(db: Database, clock: VirtualClock) -> Iterator[ApiWorld]:
    service = make_service(db, clock, options=ServiceOptions(token_ttl_s=3600))
    app = create_app(ApiContext(service=service, hub=StreamHub(), admin_key=ADMIN_KEY, health=dict))
    alice = service.create_profile(NewProfile(external_id="alice"))["id"]
    bob = service.create_profile(NewProfile(external_id="bob"))["id"]
    headers = [{"Authorization": f"Bearer {service.issue_token(p)[0]}"} for p in (alice, bob)]
    with TestClient(app) as client:
        yield ApiWorld(client, db, headers[0], headers[1], alice)


URL = "/v1/me/push-subscriptions"


def test_a_customer_subscribes_lists_and_unsubscribes(api: ApiWorld) -> None:
    browser = Browser("https://fcm.googleapis.com/fcm/send/abc123:APA91b")
    r = api.client.post(URL, json=browser.subscription(), headers=api.alice)
    assert r.status_code == 201, r.text
    assert r.json()["endpoint"] == browser.endpoint and "keys" not in r.json()
    assert api.client.post(URL, json=browser.subscription(), headers=api.alice).status_code == 200  # refreshed
    listed = api.client.get(URL, headers=api.alice).json()
    assert [s["endpoint"] for s in listed] == [browser.endpoint]
    assert api.client.get(URL, headers=api.bob).json() == []

    gone = api.client.delete(URL, params={"endpoint": browser.endpoint}, headers=api.bob)
    assert gone.status_code == 404  # not bob's: nothing happens
    assert _endpoints(api.db) == {browser.endpoint}
    assert api.client.delete(URL, params={"endpoint": browser.endpoint}, headers=api.alice).status_code == 204
    assert _endpoints(api.db) == set()
    assert api.client.delete(URL, params={"endpoint": browser.endpoint}, headers=api.alice).status_code == 404


def test_a_browser_that_logs_into_another_account_moves_its_subscription(api: ApiWorld) -> None:
    browser = Browser("https://updates.push.services.mozilla.com/wpush/v2/gAAAAABm")
    assert api.client.post(URL, json=browser.subscription(), headers=api.alice).status_code == 201
    # Someone who knows only the endpoint URL cannot take it over with keys of their own (409)...
    real_auth, browser.auth = browser.auth, os.urandom(16)
    assert api.client.post(URL, json=browser.subscription(), headers=api.bob).status_code == 409
    # ...but the same browser subscription (same keys), now logged in as Bob, moves to him.
    browser.auth = real_auth
    assert api.client.post(URL, json=browser.subscription(), headers=api.bob).status_code == 200
    assert api.client.get(URL, headers=api.alice).json() == []
    assert [s["endpoint"] for s in api.client.get(URL, headers=api.bob).json()] == [browser.endpoint]
    with api.db.session() as s:
        row = s.scalar(select(PushSubscription))
        assert row is not None and row.auth == b64url(browser.auth)
    # Its own keys refreshed by the owner are fine.
    browser.auth = os.urandom(16)
    assert api.client.post(URL, json=browser.subscription(), headers=api.bob).status_code == 200


@pytest.mark.parametrize(("change", "detail"), [
    ({"endpoint": "http://push.example.com/x"}, "https"),
    ({"endpoint": "https://127.0.0.1/x"}, "public"),
    ({"endpoint": "https://10.1.2.3/x"}, "public"),
    ({"endpoint": "https://localhost:8443/x"}, "public"),
    ({"endpoint": "https://[::1]/x"}, "public"),
    ({"endpoint": "https://[fe80::1/x"}, "valid URL"),
    ({"endpoint": "https://push.example.com:99999/x"}, "valid URL"),
    ({"keys": {"p256dh": b64url(b"\x04" + b"\x01" * 64), "auth": b64url(b"a" * 16)}}, "P-256"),
    ({"keys": {"p256dh": "not base64 at all!", "auth": b64url(b"a" * 16)}}, "base64url"),
    ({"keys": {"auth": b64url(b"a" * 16)}}, "p256dh"),
    ({"auth_only": True}, "auth"),
])
def test_a_bad_subscription_is_refused_and_stores_nothing(api: ApiWorld, change: dict[str, Any],
                                                          detail: str) -> None:
    sub = Browser("https://fcm.googleapis.com/fcm/send/abc").subscription()
    if change.pop("auth_only", False):
        sub["keys"]["auth"] = b64url(b"short")
    sub.update(change)
    r = api.client.post(URL, json=sub, headers=api.alice)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert detail in r.json()["detail"]
    assert _endpoints(api.db) == set()


def test_the_subscription_routes_need_a_customer_token(api: ApiWorld) -> None:
    sub = Browser("https://fcm.googleapis.com/fcm/send/abc").subscription()
    assert api.client.post(URL, json=sub).status_code == 401
    assert api.client.post(URL, json=sub, headers={"X-API-Key": ADMIN_KEY}).status_code == 401
    assert api.client.delete(f"{URL}?endpoint={quote(sub['endpoint'])}").status_code == 401
    assert _endpoints(api.db) == set()


def test_the_vapid_public_key_is_served_when_web_push_is_on(api: ApiWorld, tmp_path: Path) -> None:
    assert api.client.get(f"{URL}/vapid-public-key", headers=api.alice).status_code == 404
    key = application_server_key(ensure_vapid_key(tmp_path))
    api.client.app.state.vapid_public_key = key  # type: ignore[attr-defined]  # what the runtime sets
    assert api.client.get(f"{URL}/vapid-public-key", headers=api.alice).json() == {"public_key": key}
    assert api.client.get(f"{URL}/vapid-public-key").status_code == 401
