"""The webhook channel against a real HTTP receiver on loopback, as the brand's backend would run it.

The receiver (aiohttp, a free port of 127.0.0.1) checks every request with ``verify_signature``,
answers a scripted list of status codes and records what it got. Backoff waits go through an
injected sleep that only records them, so no test waits for real time to pass.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web
from sqlalchemy import select

from gateway.app.config import Settings
from gateway.clock import VirtualClock
from gateway.delivery.outbox import Dispatcher
from gateway.delivery.webhook import (
    SignatureError,
    WebhookChannel,
    WebhookSettings,
    enable_endpoint,
    endpoint_states,
    sign,
    verify_signature,
)
from gateway.storage.db import Database
from gateway.storage.models import Delivery, Notification, Profile
from tests.conftest import free_port

T0 = 1_767_261_600.0
SECRET = "whsec-test-0123456789abcdef"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    signature_ok: bool
    error: str | None


@dataclass
class Receiver:
    """The brand's backend: verifies, answers the next scripted status (200 once the script is spent)."""

    clock: VirtualClock
    script: list[int] = field(default_factory=list)
    got: list[Received] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify_signature(SECRET, request.headers.get("X-Gateway-Signature"), body, now=self.clock.now(),
                             tolerance_s=300)
            ok, error = True, None
        except SignatureError as exc:
            ok, error = False, str(exc)
        self.got.append(Received(dict(request.headers), body, ok, error))
        if not ok:
            return web.Response(status=400, text=error or "")
        status = self.script.pop(0) if self.script else 200
        return web.Response(status=status)


@pytest.fixture
async def receiver(clock: VirtualClock) -> AsyncIterator[Receiver]:
    rec = Receiver(clock)
    app = web.Application()
    app.router.add_post("/hooks/gateway", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}/hooks/gateway"
    try:
        yield rec
    finally:
        await runner.cleanup()


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def _channel(db: Database, clock: VirtualClock, urls: list[str], sleeps: Sleeps | None = None,
             **overrides: Any) -> WebhookChannel:
    transport = overrides.pop("transport", None)
    settings = WebhookSettings(enabled=True, url=urls, secret=SECRET, timeout=2.0, max_attempts=3,
                               backoff_base_s=0.5, backoff_max_s=8.0, disable_after_gone=3)
    for k, v in overrides.items():
        setattr(settings, k, v)
    return WebhookChannel(settings, db, store_id="store-042", clock=clock, sleep=sleeps or Sleeps(),
                          rng=random.Random(7), transport=transport)


def _notify(db: Database, external_id: str = "alice", key: str = "k1") -> tuple[int, dict[str, Any]]:
    from gateway.delivery.outbox import message

    with db.session() as s:
        p = s.scalar(select(Profile).where(Profile.external_id == external_id))
        if p is None:
            p = Profile(external_id=external_id, name=external_id.title(), attributes={}, created_at=T0)
            s.add(p)
            s.flush()
        n = Notification(profile_id=p.id, campaign_id="shoes-dwell-offer", purpose="offers", dedup_key=key,
                         title="10% off trail shoes", body="Today only, in aisle 4", data={"zone": "shoes"},
                         created_at=T0, status="pending")
        s.add(n)
        s.flush()
        return p.id, message(n)


# ------------------------------------------------------------------ signatures


def test_a_signature_verifies_and_any_change_is_refused() -> None:
    body = b'{"id":1}'
    header = sign(SECRET, body, int(T0))
    assert verify_signature(SECRET, header, body, now=T0 + 10, tolerance_s=300) == int(T0)
    refused = {
        "body changed": (SECRET, header, b'{"id":2}', T0),
        "other secret": ("another-secret", header, body, T0),
        "replayed late": (SECRET, header, body, T0 + 301),
        "from the future": (SECRET, header, body, T0 - 301),
        "timestamp moved": (SECRET, header.replace(f"t={int(T0)}", f"t={int(T0) + 1}"), body, T0),
        "no header": (SECRET, None, body, T0),
        "no v1": (SECRET, f"t={int(T0)}", body, T0),
        "no timestamp": (SECRET, header.split(",", 1)[1], body, T0),
        "garbage": (SECRET, "t=abc,v1=00", body, T0),
    }
    for why, (secret, hdr, b, now) in refused.items():
        with pytest.raises(SignatureError):
            verify_signature(secret, hdr, b, now=now, tolerance_s=300)
            pytest.fail(f"accepted: {why}")


def test_two_v1_signatures_let_a_receiver_rotate_its_secret() -> None:
    body = b"{}"
    new = sign("new-secret", body, int(T0)).split(",")[1]
    old = sign(SECRET, body, int(T0))
    assert verify_signature("new-secret", f"{old},{new}", body, now=T0) == int(T0)
    assert verify_signature(SECRET, f"{old},{new}", body, now=T0) == int(T0)


# ------------------------------------------------------------------ against the receiver


async def test_a_500_is_retried_and_the_receiver_gets_the_same_signed_body_and_key(
        db: Database, clock: VirtualClock, receiver: Receiver) -> None:
    receiver.script = [500, 200]
    sleeps = Sleeps()
    ch = _channel(db, clock, [receiver.url], sleeps)
    pid, msg = _notify(db)
    try:
        assert await ch.deliver(pid, msg) == "delivered"
    finally:
        await ch.aclose()
    assert [r.signature_ok for r in receiver.got] == [True, True]
    first, second = receiver.got
    assert first.body == second.body  # byte-identical, so the receiver may hash it to dedup
    keys = {r.headers["Idempotency-Key"] for r in receiver.got}
    assert keys == {f"store-042:notification:{msg['id']}"}
    assert {r.headers["X-Gateway-Notification-Id"] for r in receiver.got} == {str(msg["id"])}
    assert [r.headers["X-Gateway-Delivery-Attempt"] for r in receiver.got] == ["1", "2"]
    doc = json.loads(first.body)
    assert doc["profile"] == {"id": pid, "external_id": "alice"}
    assert (doc["title"], doc["campaign"], doc["data"]) == ("10% off trail shoes", "shoes-dwell-offer",
                                                            {"zone": "shoes"})
    assert len(sleeps.delays) == 1 and 0.25 <= sleeps.delays[0] <= 0.5  # base 0.5 s, equal jitter
    assert endpoint_states(db)[receiver.url]["last_status"] == 200


async def test_a_4xx_is_not_retried(db: Database, clock: VirtualClock, receiver: Receiver) -> None:
    receiver.script = [422]
    sleeps = Sleeps()
    ch = _channel(db, clock, [receiver.url], sleeps)
    pid, msg = _notify(db)
    try:
        assert await ch.deliver(pid, msg) == "dead"
    finally:
        await ch.aclose()
    assert len(receiver.got) == 1 and sleeps.delays == []


async def test_persistent_5xx_backs_off_exponentially_then_hands_over_to_the_outbox(
        db: Database, clock: VirtualClock, receiver: Receiver) -> None:
    receiver.script = [503, 502, 500, 500]
    sleeps = Sleeps()
    ch = _channel(db, clock, [receiver.url], sleeps, max_attempts=4)
    pid, msg = _notify(db)
    try:
        assert await ch.deliver(pid, msg) == "retry"  # the dispatcher schedules a durable retry
    finally:
        await ch.aclose()
    assert len(receiver.got) == 4
    assert len(sleeps.delays) == 3
    for i, delay in enumerate(sleeps.delays):
        step = 0.5 * 2 ** i
        assert step / 2 <= delay <= step, (i, delay)


async def test_a_timestamp_is_fresh_on_each_attempt(db: Database, clock: VirtualClock, receiver: Receiver) -> None:
    """Retries are re-signed at send time, so a retry after a long backoff still passes the tolerance."""
    receiver.script = [500]

    class AdvancingSleep(Sleeps):
        async def __call__(self, seconds: float) -> None:
            await super().__call__(seconds)
            clock.advance(400)  # longer than the receiver's tolerance

    ch = _channel(db, clock, [receiver.url], AdvancingSleep())
    pid, msg = _notify(db)
    try:
        assert await ch.deliver(pid, msg) == "delivered"
    finally:
        await ch.aclose()
    stamps = [r.headers["X-Gateway-Signature"].split(",")[0] for r in receiver.got]
    assert stamps == [f"t={int(T0)}", f"t={int(T0) + 400}"]


async def test_connection_refused_and_timeouts_are_retried(db: Database, clock: VirtualClock) -> None:
    pid, msg = _notify(db)
    sleeps = Sleeps()
    closed = f"http://127.0.0.1:{free_port()}/nobody-listens"
    ch = _channel(db, clock, [closed], sleeps)
    try:
        assert await ch.deliver(pid, msg) == "retry"
    finally:
        await ch.aclose()
    assert len(sleeps.delays) == 2

    calls: list[httpx.Request] = []

    def timeout_then_ok(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ReadTimeout("no answer", request=request)
        return httpx.Response(204)

    ch = _channel(db, clock, ["https://push.brand.example/hook"], Sleeps(),
                  transport=httpx.MockTransport(timeout_then_ok))
    try:
        assert await ch.deliver(pid, msg) == "delivered"
    finally:
        await ch.aclose()
    assert len(calls) == 2


async def test_repeated_410_disables_the_url_and_a_restart_remembers(
        any_db: Database, clock: VirtualClock, receiver: Receiver) -> None:
    db = any_db
    receiver.script = [410, 200, 410, 410, 410]
    pid, msg = _notify(db)
    ch = _channel(db, clock, [receiver.url], disable_after_gone=3)
    try:
        assert await ch.deliver(pid, msg) == "gone"
        assert await ch.deliver(pid, msg) == "delivered"  # a success resets the count
        assert [await ch.deliver(pid, msg) for _ in range(3)] == ["gone", "gone", "gone"]
    finally:
        await ch.aclose()
    assert len(receiver.got) == 5
    state = endpoint_states(db)[receiver.url]
    assert state["disabled"] and state["consecutive_gone"] == 3 and state["last_status"] == 410

    restarted = _channel(db, clock, [receiver.url], disable_after_gone=3)  # a new process, same db
    try:
        assert await restarted.deliver(pid, msg) == "dead"
        assert len(receiver.got) == 5  # nothing was sent to the disabled URL
        assert enable_endpoint(db, receiver.url) is True
        assert await restarted.deliver(pid, msg) == "delivered"
    finally:
        await restarted.aclose()
    assert len(receiver.got) == 6


async def test_the_dispatcher_records_webhook_deliveries_and_marks_the_notification_sent(
        db: Database, clock: VirtualClock, receiver: Receiver) -> None:
    ch = _channel(db, clock, [receiver.url])
    _, msg = _notify(db)
    try:
        await Dispatcher(db, [ch]).dispatch([msg["id"]], clock.now())
    finally:
        await ch.aclose()
    with db.session() as s:
        rows = s.execute(select(Delivery.channel, Delivery.outcome)
                         .where(Delivery.notification_id == msg["id"])).all()
        status = s.get(Notification, msg["id"]).status  # type: ignore[union-attr]
    assert [tuple(r) for r in rows] == [("webhook", "delivered")]
    assert status == "sent"
    assert len(receiver.got) == 1 and receiver.got[0].signature_ok


def test_settings_are_checked_when_the_channel_is_built(db: Database) -> None:
    ok = {"enabled": True, "url": ["https://push.brand.example/hook"], "secret": SECRET}
    for bad, message in [({"secret": ""}, "secret"), ({"url": []}, "url"), ({"url": ["ftp://x/y"]}, "http"),
                         ({"max_attempts": 0}, "max_attempts")]:
        with pytest.raises(ValueError, match=message):
            WebhookChannel(WebhookSettings(**{**ok, **bad}), db)


def test_the_runtime_adds_the_webhook_channel_when_enabled(tmp_path: Any) -> None:
    from gateway.app.runtime import Runtime

    settings = Settings(data_dir=str(tmp_path))
    settings.database.url = f"sqlite:///{tmp_path}/rt.db"
    settings.campaigns.dir = str(tmp_path)
    rt = Runtime(settings, serve_api=False)  # never started (not the fixture's): only its channels are read
    assert "webhook" not in [c.name for c in rt.dispatcher.channels]
    rt.db.dispose()
    settings.webhook.enabled, settings.webhook.url, settings.webhook.secret = True, ["https://h.example/x"], SECRET
    rt = Runtime(settings, serve_api=False)
    names = [c.name for c in rt.dispatcher.channels]
    rt.db.dispose()
    assert names[0] == "sse" and "webhook" in names


async def test_a_disabled_url_is_re_enabled_over_the_api_and_its_dead_letters_are_delivered(
        any_db: Database, clock: VirtualClock, receiver: Receiver) -> None:
    """Three 410s disable the URL and a fourth notification dies unsent; the brand fixes its endpoint,
    staff re-enable it over the API, and the retry loop delivers all four, each once."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.deps import ApiContext
    from gateway.delivery.hub import StreamHub
    from tests.fixtures import make_service

    db = any_db
    ch = _channel(db, clock, [receiver.url], disable_after_gone=3, max_attempts=1)
    try:
        receiver.script = [410, 410, 410]
        dispatcher = Dispatcher(db, [ch])
        ids = []
        for key in ("k1", "k2", "k3", "k4"):
            _, msg = _notify(db, key=key)
            ids.append(msg["id"])
            await dispatcher.dispatch([msg["id"]], clock.now())
        assert len(receiver.got) == 3 and endpoint_states(db)[receiver.url]["disabled"]
        svc = make_service(db, clock)
        api = TestClient(create_app(ApiContext(service=svc, hub=StreamHub(), admin_key="wh-admin-key-0123456789",
                                               health=dict)))  # type: ignore[arg-type]
        admin = {"X-API-Key": "wh-admin-key-0123456789"}
        listed = api.get("/v1/webhook-endpoints", headers=admin).json()
        assert [(e["url"], e["disabled_at"] is not None) for e in listed] == [(receiver.url, True)]
        assert api.get("/v1/deliveries", params={"state": "dead", "channel": "webhook"},
                       headers=admin).json()["total"] == 4
        r = api.post("/v1/webhook-endpoints/enable", json={"url": receiver.url}, headers=admin)
        assert r.status_code == 200, r.text
        assert r.json() == {"url": receiver.url, "was_disabled": True, "requeued": ids}
        assert api.post("/v1/webhook-endpoints/enable", json={"url": "https://elsewhere.example/x"},
                        headers=admin).status_code == 404
        assert await dispatcher.retry_due(clock.now()) == 4
        delivered = [json.loads(g.body)["id"] for g in receiver.got[3:]]
        assert delivered == ids and all(g.signature_ok for g in receiver.got)
        assert api.get("/v1/deliveries", params={"state": "dead"}, headers=admin).json()["total"] == 0
        assert await dispatcher.retry_due(clock.now() + 3600) == 0  # nothing left: nothing sent twice
    finally:
        await ch.aclose()
        db.dispose()
