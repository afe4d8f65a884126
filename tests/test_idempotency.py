"""``Idempotency-Key`` on creating POSTs: a retry gets the first answer, never a second creation.

In process (TestClient) for the rules, on a real uvicorn server for two requests racing, and on
both databases for the claim itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import func, select

import gateway.security.auth as auth
from gateway.storage.db import Database
from gateway.storage.models import IdempotencyKey, Profile
from tests.conftest import free_port
from tests.test_auth import CONFIG, App, bearer
from tests.test_authz_matrix import HTTP_ROUTES, audience

REPLAYED = "idempotent-replayed"


@pytest.fixture
def app(db: Database) -> Iterator[tuple[App, TestClient]]:
    a = App(db)
    with TestClient(a.app) as c:
        yield a, c


def key(k: str) -> dict[str, str]:
    return {"Idempotency-Key": k}


def count(a: App, model: Any) -> int:
    with a.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_a_retry_gets_the_first_answer_and_nothing_is_created_twice(app: tuple[App, TestClient]) -> None:
    a, client = app
    first = client.post("/v1/profiles", headers={**CONFIG, **key("enrol-carol")}, json={"external_id": "carol"})
    again = client.post("/v1/profiles", headers={**CONFIG, **key("enrol-carol")}, json={"external_id": "carol"})
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers[REPLAYED] == "true" and REPLAYED not in first.headers
    assert count(a, Profile) == 3
    # A token: the same one comes back, and it is not readable in the database (the stored answer is sealed).
    url = f"/v1/profiles/{a.alice}/tokens"
    t1 = client.post(url, headers={**CONFIG, **key("tok-1")}).json()["token"]
    assert client.post(url, headers={**CONFIG, **key("tok-1")}).json()["token"] == t1
    assert client.post(url, headers={**CONFIG, **key("tok-2")}).json()["token"] != t1
    assert t1 not in a.all_text() and t1.split(".")[2] not in a.all_text()
    assert client.post(url, headers=CONFIG).json()["token"] != t1  # no key: no idempotency


def test_the_same_key_with_another_body_is_refused_and_keys_are_per_caller_and_path(app: tuple[App, TestClient]
                                                                                    ) -> None:
    a, client = app
    assert client.post("/v1/profiles", headers={**CONFIG, **key("k")}, json={"external_id": "carol"}).status_code \
        == 201
    r = client.post("/v1/profiles", headers={**CONFIG, **key("k")}, json={"external_id": "dave"})
    assert r.status_code == 422 and "different request" in r.json()["detail"]
    assert r.headers["content-type"].startswith("application/problem+json")
    assert count(a, Profile) == 3
    other = {"X-API-Key": a.ctx.guard.create_key("other", ["write"])[0]} if a.ctx.guard else {}
    assert client.post("/v1/profiles", headers={**other, **key("k")}, json={"external_id": "dave"}).status_code \
        == 201  # another caller's "k" is another key
    assert client.post(f"/v1/profiles/{a.alice}/tokens", headers={**CONFIG, **key("k")}).status_code == 201


def test_an_answer_that_changed_nothing_is_not_kept_so_a_retry_runs_again(app: tuple[App, TestClient]) -> None:
    a, client = app
    h = {**CONFIG, **key("fix-me")}
    assert client.post("/v1/profiles", headers=h, json={"external_id": 5}).status_code == 422
    r = client.post("/v1/profiles", headers=h, json={"external_id": "carol"})
    assert r.status_code == 201 and REPLAYED not in r.headers
    missing = client.post("/v1/profiles/999999/tokens", headers={**CONFIG, **key("t")})
    assert missing.status_code == 404
    assert REPLAYED not in client.post("/v1/profiles/999999/tokens", headers={**CONFIG, **key("t")}).headers
    assert count(a, IdempotencyKey) == 1


@pytest.mark.parametrize("bad", ["", "x" * 256, "caf\u00e9", "two words"])
def test_a_malformed_key_is_a_400_and_changes_nothing(app: tuple[App, TestClient], bad: str) -> None:
    a, client = app
    r = client.post("/v1/profiles", headers=[*CONFIG.items(), ("Idempotency-Key", bad.encode())],
                    json={"external_id": "carol"})
    assert r.status_code == 400 and "Idempotency-Key" in r.json()["detail"]
    assert count(a, Profile) == 2


POSTS = [p for m, p in HTTP_ROUTES if m == "POST"]


@pytest.mark.parametrize("path", POSTS)
def test_every_post_route_answers_a_retry_as_it_answered_the_first_time(app: tuple[App, TestClient],
                                                                        path: str) -> None:
    """Whatever the first answer was, a retry with the key gets the same; only a 2xx/3xx is a replay."""
    a, client = app
    who = bearer(a.token(a.alice)) if audience(path) == "customer" else CONFIG
    url = re.sub(r"\{[^}]+\}", "1", path)
    first = client.post(url, headers={**who, **key(f"k-{path}")}, json={})
    after_first = a.all_text()
    again = client.post(url, headers={**who, **key(f"k-{path}")}, json={})
    assert (again.status_code, again.content) == (first.status_code, first.content), path
    assert (REPLAYED in again.headers) == (200 <= first.status_code < 400), (path, first.status_code)
    if 200 <= first.status_code < 400:
        assert a.all_text() == after_first, f"a replayed POST {path} changed the database"


def test_after_a_day_a_key_is_forgotten_and_purged(app: tuple[App, TestClient]) -> None:
    a, client = app
    url = f"/v1/profiles/{a.alice}/tokens"
    t1 = client.post(url, headers={**CONFIG, **key("day")}).json()["token"]
    a.clock.advance(86399)
    assert client.post(url, headers={**CONFIG, **key("day")}).json()["token"] == t1
    a.clock.advance(1)
    assert client.post(url, headers={**CONFIG, **key("day")}).json()["token"] != t1  # runs afresh
    client.post(url, headers={**CONFIG, **key("another")})
    with a.db.session() as s:
        assert auth.purge_expired(s, a.clock.now() + 86400)["idempotency_keys"] == 2
    assert count(a, IdempotencyKey) == 0


def test_erasing_a_customer_removes_the_answers_kept_about_them(app: tuple[App, TestClient]) -> None:
    a, client = app
    client.post(f"/v1/profiles/{a.alice}/tokens", headers={**CONFIG, **key("a")})
    client.post("/v1/profiles", headers={**CONFIG, **key("b")}, json={"external_id": "carol"})
    bobs = bearer(a.token(a.bob))
    client.post("/v1/me/push-subscriptions", headers={**bobs, **key("c")}, json={
        "endpoint": "https://push.example.com/send/bob",
        "keys": {"p256dh": "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-Ts1XbjhazAkj7I99e8QcYP7DkM",
                 "auth": "tBHItJI5svbpez7KI4CCXg"}})
    with a.db.session() as s:
        owners = sorted(s.scalars(select(IdempotencyKey.profile_id)))
    carol = client.get("/v1/profiles", headers=CONFIG)
    assert len(owners) == 3 and a.alice in owners and a.bob in owners, (owners, carol.text)
    for pid in set(owners):
        assert client.delete(f"/v1/profiles/{pid}", headers=CONFIG).status_code == 204
    assert count(a, IdempotencyKey) == 0


def test_two_claims_at_once_let_exactly_one_run(db_url: str) -> None:
    db = Database(db_url)
    db.upgrade()
    store = auth.IdempotencyStore(db, auth.Sealer(b"k" * 32))
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def claim() -> None:
        barrier.wait(timeout=10)
        outcomes.append(store.claim("key:x", "POST", "/v1/profiles", "race", "h" * 64, 1000.0).outcome)

    threads = [threading.Thread(target=claim) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(outcomes) == ["claimed", "in_progress", "in_progress", "in_progress"]
    finally:
        db.dispose()


async def test_a_concurrent_duplicate_waits_with_409_and_then_gets_the_first_answer(db: Database) -> None:
    a = App(db)
    entered, release = threading.Event(), threading.Event()
    create = a.service.create_profile

    def slow_create(new: Any, **kwargs: Any) -> dict[str, Any]:
        entered.set()
        release.wait(timeout=10)  # held until the duplicate has been answered: no timing involved
        return create(new, **kwargs)

    a.service.create_profile = slow_create  # type: ignore[method-assign]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(a.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started
        h = {**CONFIG, **key("race")}
        body = {"external_id": "carol"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            first = asyncio.create_task(http.post("/v1/profiles", headers=h, json=body))
            assert await asyncio.to_thread(entered.wait, 10)
            dup = await http.post("/v1/profiles", headers=h, json=body)
            assert dup.status_code == 409 and dup.headers["retry-after"] == "1"
            release.set()
            won = await first
            assert won.status_code == 201
            retry = await http.post("/v1/profiles", headers=h, json=body)
            assert retry.status_code == 201 and retry.json() == won.json() and retry.headers[REPLAYED] == "true"
        with a.db.session() as s:
            assert s.scalar(select(func.count()).select_from(Profile).where(Profile.external_id == "carol")) == 1
    finally:
        release.set()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        a.db.dispose()
