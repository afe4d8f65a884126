"""Admin keys, app token revocation, rate limits, CORS, and no secret in the logs.

A real GatewayService on a migrated SQLite file behind the app, driven by TestClient; time is a
VirtualClock, so expiry and bucket refills happen by advancing it, never by sleeping.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from starlette.websockets import WebSocketDisconnect

import gateway.security.auth as auth
from api.app import PROBLEM, create_app
from api.deps import ApiContext, guard_of
from gateway.clock import VirtualClock
from gateway.delivery.hub import StreamHub
from gateway.profiles.service import NewProfile, ServiceOptions
from gateway.security.auth import AuthPolicy, TokenBucket
from gateway.storage.db import Database
from gateway.storage.models import ApiKey, Base, RevokedToken
from tests.fixtures import make_service, migrated_copy

T0 = 1_767_261_600.0
CONFIG_KEY = "auth-test-config-key-0123456789"
CONFIG = {"X-API-Key": CONFIG_KEY}
ORIGIN = "https://app.example"


class App:
    def __init__(self, db: Database, policy: AuthPolicy | None = None, cors: list[str] | None = None) -> None:
        self.clock = VirtualClock(T0)
        self.db = db
        self.service = make_service(self.db, self.clock, options=ServiceOptions(token_ttl_s=3600))
        self.ctx = ApiContext(service=self.service, hub=StreamHub(), admin_key=CONFIG_KEY, health=dict,
                              auth_policy=policy or AuthPolicy(), cors_origins=cors or [])
        self.app = create_app(self.ctx)
        self.alice = self.service.create_profile(NewProfile(external_id="alice"))["id"]
        self.bob = self.service.create_profile(NewProfile(external_id="bob"))["id"]

    def token(self, profile_id: int) -> str:
        return self.service.issue_token(profile_id)[0]

    def all_text(self) -> str:
        """Every value in every table, as text: to show a secret is stored nowhere."""
        with self.db.engine.connect() as conn:
            return repr([list(conn.execute(t.select())) for t in Base.metadata.tables.values()])


@pytest.fixture
def make(tmp_path: Path, migrated_sqlite: Path) -> Iterator[Callable[..., tuple[App, TestClient]]]:
    """Several apps in one test (a policy each), each on its own copy of the migrated database."""
    made: list[tuple[App, TestClient]] = []

    def build(**kwargs: Any) -> tuple[App, TestClient]:
        app = App(migrated_copy(migrated_sqlite, tmp_path / str(len(made)) / "auth.db"), **kwargs)
        client = TestClient(app.app).__enter__()
        made.append((app, client))
        return app, client

    (tmp_path / "0").mkdir()
    for i in range(1, 4):
        (tmp_path / str(i)).mkdir()
    yield build
    for app, client in made:
        client.__exit__(None, None, None)
        app.db.dispose()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def problem(r: Any, status: int, words: str = "") -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].split(";")[0] == PROBLEM
    body: dict[str, Any] = r.json()
    assert words in body["detail"], body
    return body


# ------------------------------------------------------------------ admin keys


def test_a_key_is_shown_once_stored_as_a_hash_listed_without_it_and_revoked_for_good(make: Any) -> None:
    app, client = make()
    r = client.post("/v1/keys", headers=CONFIG, json={"name": "till", "scopes": ["write", "read"]})
    assert r.status_code == 201, r.text
    created = r.json()
    raw = created["key"]
    assert raw.startswith(created["prefix"]) and created["scopes"] == ["read", "write"]
    assert len(raw) > 50
    # Stored as its SHA-256 only: the key is nowhere in the database.
    with app.db.session() as s:
        row = s.get(ApiKey, created["id"])
        assert row is not None and row.secret_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert raw not in app.all_text() and raw.split("_", 2)[2] not in app.all_text()
    # Listed and read back without the key; last use is recorded once it is used.
    listed = client.get("/v1/keys", headers=CONFIG)
    assert raw not in listed.text and "key" not in listed.json()[0] and "secret_hash" not in listed.text
    assert listed.json()[0]["last_used_at"] is None
    me = {"X-API-Key": raw}
    assert client.get(f"/v1/profiles/{app.alice}", headers=me).status_code == 200
    assert client.post("/v1/profiles", headers=me, json={"external_id": "carol"}).status_code == 201
    assert client.get(f"/v1/keys/{created['id']}", headers=CONFIG).json()["last_used_at"] == T0
    # Its scopes and no more: no export (privacy), no campaigns, no key management.
    problem(client.get(f"/v1/profiles/{app.alice}/export", headers=me), 403, "scope")
    problem(client.put("/v1/campaigns/x", headers=me, json={}), 403, "scope")
    problem(client.get("/v1/keys", headers=me), 403, "scope")
    # Revoked: refused at once, and still listed with when.
    assert client.delete(f"/v1/keys/{created['id']}", headers=CONFIG).status_code == 204
    problem(client.get(f"/v1/profiles/{app.alice}", headers=me), 401, "revoked")
    app.clock.advance(5)
    assert client.delete(f"/v1/keys/{created['id']}", headers=CONFIG).status_code == 204  # harmless twice
    assert client.get(f"/v1/keys/{created['id']}", headers=CONFIG).json()["revoked_at"] == T0
    problem(client.delete("/v1/keys/000000000000", headers=CONFIG), 404)
    problem(client.delete("/v1/keys/config", headers=CONFIG), 409, "admin_key")


def test_a_key_with_the_admin_scope_manages_keys_and_a_key_can_expire(make: Any) -> None:
    app, client = make()
    boss = client.post("/v1/keys", headers=CONFIG, json={"name": "boss", "scopes": ["admin"]}).json()["key"]
    r = client.post("/v1/keys", headers={"X-API-Key": boss},
                    json={"name": "temp", "scopes": ["read"], "expires_in_s": 600})
    assert r.status_code == 201 and r.json()["expires_at"] == T0 + 600
    temp = {"X-API-Key": r.json()["key"]}
    app.clock.advance(599)
    assert client.get(f"/v1/profiles/{app.alice}", headers=temp).status_code == 200
    app.clock.advance(1)
    problem(client.get(f"/v1/profiles/{app.alice}", headers=temp), 401, "expired")


@pytest.mark.parametrize("body", [{"name": "x", "scopes": []}, {"name": "x", "scopes": ["root"]},
                                  {"name": "", "scopes": ["read"]},
                                  {"name": "x", "scopes": ["read"], "expires_in_s": 1}])
def test_a_bad_key_request_is_refused_and_creates_nothing(make: Any, body: dict[str, Any]) -> None:
    _, client = make()
    problem(client.post("/v1/keys", headers=CONFIG, json=body), 422)
    assert client.get("/v1/keys", headers=CONFIG).json() == []


def test_scopes_parse_and_refuse_unknown_ones() -> None:
    assert auth.parse_scopes("write, read,read") == ["read", "write"]
    with pytest.raises(ValueError, match="unknown scope"):
        auth.parse_scopes("read,sudo")
    with pytest.raises(ValueError, match="at least one"):
        auth.parse_scopes(" , ")


def test_the_cli_creates_lists_and_revokes_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.app.cli import main

    url = f"sqlite:///{tmp_path}/cli.db"
    assert main(["keys", "create", "--url", url, "--scopes", "read,write", "--name", "pos"]) == 0
    out = capsys.readouterr().out
    raw = next(word for word in out.split() if word.startswith("gk_"))
    db = Database(url)
    try:
        with db.session() as s:
            principal = auth.authenticate_key(s, raw, T0)
        assert principal.scopes == {"read", "write"}
        assert main(["keys", "list", "--url", url]) == 0
        listing = capsys.readouterr().out
        key_id = auth.key_id_of(raw)
        assert key_id and key_id in listing and raw not in listing and "read,write" in listing
        assert main(["keys", "revoke", "--url", url, key_id]) == 0
        with db.session() as s, pytest.raises(auth.AuthError, match="revoked"):
            auth.authenticate_key(s, raw, T0)
        assert main(["keys", "create", "--url", url, "--scopes", "sudo"]) == 2
        assert main(["keys", "revoke", "--url", url, "000000000000"]) == 2
    finally:
        db.dispose()


# ------------------------------------------------------------------ app token revocation


def test_logout_revokes_this_token_only(make: Any) -> None:
    app, client = make()
    phone, tablet = app.token(app.alice), app.token(app.alice)
    assert client.delete("/v1/me/token", headers=bearer(phone)).status_code == 204
    problem(client.get("/v1/me/notifications", headers=bearer(phone)), 401, "revoked")
    assert client.get("/v1/me/notifications", headers=bearer(tablet)).status_code == 200
    # Nor does it open admin routes or the socket any more.
    problem(client.post("/v1/profiles", headers=bearer(phone), json={"external_id": "x"}), 401)
    with pytest.raises(WebSocketDisconnect) as closed, \
            client.websocket_connect("/v1/me/ws", headers=bearer(phone)) as ws:
        ws.receive_json()
    assert closed.value.code == 4401


def test_revoking_a_customers_tokens_stops_all_issued_so_far_and_new_ones_work(make: Any) -> None:
    app, client = make()
    old = [app.token(app.alice), app.token(app.alice)]
    bobs = app.token(app.bob)
    assert client.delete(f"/v1/profiles/{app.alice}/tokens", headers=CONFIG).status_code == 204
    for t in old:
        problem(client.get("/v1/me/notifications", headers=bearer(t)), 401, "revoked")
    assert client.get("/v1/me/notifications", headers=bearer(bobs)).status_code == 200
    fresh = client.post(f"/v1/profiles/{app.alice}/tokens", headers=CONFIG).json()["token"]
    assert client.get("/v1/me/notifications", headers=bearer(fresh)).status_code == 200
    problem(client.delete("/v1/profiles/999999/tokens", headers=CONFIG), 404)


def test_a_revoked_token_is_kept_until_it_would_have_expired_then_purged(make: Any) -> None:
    app, client = make()
    token = app.token(app.alice)
    client.delete("/v1/me/token", headers=bearer(token))
    with app.db.session() as s:
        assert auth.purge_expired(s, T0 + 3599)["revoked_tokens"] == 0
        assert auth.purge_expired(s, T0 + 3600)["revoked_tokens"] == 1
        assert s.scalars(select(RevokedToken)).all() == []
    app.clock.advance(3600)
    problem(client.get("/v1/me/notifications", headers=bearer(token)), 401, "expired")  # by then it has anyway


# ------------------------------------------------------------------ rate limits


def test_a_customer_token_is_limited_to_its_rate_and_burst_with_retry_after(make: Any) -> None:
    app, client = make(policy=AuthPolicy(customer_rate_per_s=0.5, customer_burst=3))
    alice, bob = bearer(app.token(app.alice)), bearer(app.token(app.bob))
    assert [client.get("/v1/me/notifications", headers=alice).status_code for _ in range(3)] == [200] * 3
    r = client.get("/v1/me/notifications", headers=alice)
    problem(r, 429, "rate limit")
    assert r.headers["retry-after"] == "2"  # one token every 2 s
    assert client.get("/v1/me/notifications", headers=bob).status_code == 200  # per token, not global
    other = bearer(app.token(app.alice))
    assert client.get("/v1/me/notifications", headers=other).status_code == 200  # per token, not per profile
    app.clock.advance(1.0)
    problem(client.get("/v1/me/notifications", headers=alice), 429)
    app.clock.advance(1.0)
    assert client.get("/v1/me/notifications", headers=alice).status_code == 200
    problem(client.get("/v1/me/notifications", headers=alice), 429)
    # The socket too: the bucket is empty, so the connection is closed with 4429.
    with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/v1/me/ws", headers=alice) as ws:
        ws.receive_json()
    assert closed.value.code == 4429


def test_admin_keys_have_their_own_buckets(make: Any) -> None:
    app, client = make(policy=AuthPolicy(admin_rate_per_s=10, admin_burst=2))
    key = {"X-API-Key": guard_of(app.ctx).create_key("k", ["read"])[0]}
    url = f"/v1/profiles/{app.alice}"
    assert [client.get(url, headers=key).status_code for _ in range(2)] == [200, 200]
    r = problem(client.get(url, headers=key), 429)
    assert r["status"] == 429
    assert client.get(url, headers=CONFIG).status_code == 200  # another key, another bucket
    app.clock.advance(0.2)  # 0.1 s is one token, but T0 + 0.1 - T0 is a hair under 0.1 in floats
    assert client.get(url, headers=key).status_code == 200


def test_the_token_bucket_refills_caps_at_burst_and_forgets_the_oldest() -> None:
    bucket = TokenBucket(rate_per_s=2, burst=2, max_keys=2)
    assert [bucket.take("a", 0.0) for _ in range(2)] == [0.0, 0.0]
    assert bucket.take("a", 0.0) == pytest.approx(0.5)
    assert bucket.take("a", 0.5) == 0.0
    assert bucket.take("a", 100.0) == 0.0 and bucket.take("a", 100.0) == 0.0  # capped at the burst
    assert bucket.take("a", 100.0) > 0
    assert bucket.take("a", 99.0) > 0  # a clock going back refills nothing
    bucket.take("b", 100.0)
    bucket.take("c", 100.0)  # "a" is the least recent: forgotten, and starts full again
    assert bucket.take("a", 100.0) == 0.0
    assert auth.retry_after(0.01) == "1" and auth.retry_after(2.2) == "3"


# ------------------------------------------------------------------ CORS


def test_cors_answers_an_allowed_origin_and_refuses_others(make: Any) -> None:
    app, client = make(cors=[ORIGIN])
    token = app.token(app.alice)
    pre = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
    r = client.options("/v1/me/notifications", headers={"Origin": ORIGIN, **pre})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "GET" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = client.options("/v1/me/notifications", headers={"Origin": "https://evil.example", **pre})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = client.options("/v1/me/notifications", headers={"Origin": ORIGIN, **pre,
                                                        "Access-Control-Request-Method": "PATCH"})
    assert r.status_code == 400  # a method the config does not list
    r = client.options("/v1/me/notifications", headers={"Origin": ORIGIN, **pre,
                                                        "Access-Control-Request-Headers": "x-secret-header"})
    assert r.status_code == 400  # nor a header it does not list
    # Simple requests: the allowed origin may read the answer (errors too), another origin may not.
    r = client.get("/v1/me/notifications", headers={"Origin": ORIGIN, **bearer(token)})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = client.get("/v1/me/notifications", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    r = client.get("/v1/me/notifications", headers={"Origin": "https://evil.example", **bearer(token)})
    assert "access-control-allow-origin" not in r.headers


def test_without_configured_origins_there_are_no_cors_headers(make: Any) -> None:
    app, client = make()
    r = client.get("/v1/me/notifications", headers={"Origin": ORIGIN, **bearer(app.token(app.alice))})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# ------------------------------------------------------------------ no secrets in the logs


def test_no_key_or_token_is_ever_logged(make: Any, caplog: pytest.LogCaptureFixture) -> None:
    app, client = make()
    caplog.set_level(logging.DEBUG)
    created = client.post("/v1/keys", headers=CONFIG, json={"name": "logged", "scopes": ["read"]}).json()
    raw = created["key"]
    token = client.post(f"/v1/profiles/{app.alice}/tokens", headers=CONFIG).json()["token"]
    forged = raw[:-4] + "AAAA"
    client.get("/v1/keys", headers={"X-API-Key": forged})
    client.get(f"/v1/profiles/{app.alice}", headers={"X-API-Key": CONFIG_KEY + "x"})
    client.get("/v1/me/notifications", headers=bearer(token[:-3] + "AAA"))
    client.get("/v1/me/notifications", params={"access_token": token})
    client.delete("/v1/me/token", headers=bearer(token))
    client.get("/v1/me/notifications", headers=bearer(token))
    client.delete(f"/v1/keys/{created['id']}", headers=CONFIG)
    client.get(f"/v1/profiles/{app.alice}", headers={"X-API-Key": raw})
    # What the gateway logs (the test's own HTTP client logs its URLs, a client-side matter).
    text = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))
    assert f"id={created['id']}" in text and "reason=revoked" in text and "reason=unknown" in text  # it did log
    for secret in (raw, forged, raw.split("_", 2)[2], token, token.split(".")[2], CONFIG_KEY):
        assert secret not in text


def test_the_servers_access_log_never_shows_a_token_from_the_query(caplog: pytest.LogCaptureFixture) -> None:
    # uvicorn's access log line, as uvicorn emits it: the query string would carry EventSource's token.
    auth.install_log_redaction()
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    token = "v1.eyJzdWIiOjF9.c2lnbmF0dXJl"
    logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET",
                                             f"/v1/me/stream?after=3&access_token={token}&x=1", "1.1", 200)
    (record,) = [r for r in caplog.records if r.name == "uvicorn.access"]
    assert token not in record.getMessage()
    assert "access_token=[redacted]&x=1" in record.getMessage() and "after=3" in record.getMessage()
