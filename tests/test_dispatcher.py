"""The dispatcher's retries: backoff with jitter, per-channel state in the database, dead letters.

Time is a VirtualClock and the jitter's randomness is injected, so every schedule is exact and
nothing sleeps. A flaky channel stands in for a webhook or a push service.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from sqlalchemy import select

from gateway.clock import VirtualClock
from gateway.delivery.backoff import Backoff
from gateway.delivery.hub import StreamHub
from gateway.delivery.outbox import Dispatcher, delivery_states, replay
from gateway.profiles.service import NewProfile
from gateway.storage.db import Database
from gateway.storage.models import Delivery, Interaction, Notification
from tests.fixtures import make_service

T0 = 1_767_261_600.0


class Scripted:
    """A channel answering from a script of outcomes (an exception instance is raised)."""

    def __init__(self, name: str, *script: str | Exception) -> None:
        self.name = name
        self.script = list(script)
        self.calls: list[int] = []

    async def deliver(self, profile_id: int, message: dict[str, Any]) -> str:
        self.calls.append(message["id"])
        step = self.script.pop(0) if self.script else "delivered"
        if isinstance(step, Exception):
            raise step
        return step


def _profile_with(db: Database, clock: VirtualClock, n: int = 1) -> tuple[int, list[int]]:
    """On ``db`` or ``any_db`` (SQLite and PostgreSQL: the bulk inserts and updates of the state run on both)."""
    svc = make_service(db, clock)
    pid = svc.create_profile(NewProfile(external_id=f"p{clock.now()}"))["id"]
    with db.session() as s:
        rows = [Notification(profile_id=pid, campaign_id="c", purpose="offers", dedup_key=f"c:{pid}:{i}",
                             title=f"t{i}", body="b", data={}, created_at=clock.now(), status="pending")
                for i in range(n)]
        s.add_all(rows)
        s.flush()
        return pid, [r.id for r in rows]


def _states(db: Database, nid: int) -> dict[str, dict[str, Any]]:
    with db.session() as s:
        return delivery_states(s, nid)


def _status(db: Database, nid: int) -> str:
    with db.session() as s:
        n = s.get(Notification, nid)
        assert n is not None
        return n.status


def test_backoff_doubles_up_to_the_cap_and_jitter_only_shortens() -> None:
    exact = Backoff(base_s=2, max_s=30, jitter=0.5, rng=lambda: 0.0)
    assert [exact.delay(n) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]
    most = Backoff(base_s=2, max_s=30, jitter=0.5, rng=lambda: 1.0)
    assert [most.delay(n) for n in range(1, 5)] == [1, 2, 4, 8]  # at most half is taken off
    with pytest.raises(ValueError, match="backoff needs"):
        Backoff(base_s=0)
    with pytest.raises(ValueError, match="backoff needs"):
        Backoff(jitter=1.5)


async def test_a_transient_failure_is_retried_after_the_backoff_and_then_marked_sent(
        any_db: Database, clock: VirtualClock) -> None:
    db = any_db
    _, (nid,) = _profile_with(db, clock)
    webhook = Scripted("webhook", ConnectionError("refused"), "retry", "delivered")
    d = Dispatcher(db, [webhook], Backoff(base_s=10, max_s=100, jitter=0.5, rng=lambda: 0.5))

    await d.dispatch([nid], clock.now())
    st = _states(db, nid)["webhook"]
    assert st == {"state": "pending", "attempts": 1, "next_attempt_at": T0 + 7.5,
                  "last_error": "ConnectionError: refused"}
    assert _status(db, nid) == "pending"

    clock.advance(7)  # not due yet: nothing is tried
    assert await d.retry_due(clock.now()) == 0 and webhook.calls == [nid]
    clock.advance(0.5)
    assert await d.retry_due(clock.now()) == 1
    st = _states(db, nid)["webhook"]
    assert st["attempts"] == 2 and st["next_attempt_at"] == T0 + 7.5 + 15 and st["last_error"] == "retry"

    clock.set(T0 + 22.5)
    assert await d.retry_due(clock.now()) == 1
    assert _states(db, nid)["webhook"] == {"state": "delivered", "attempts": 3, "next_attempt_at": None,
                                           "last_error": None}
    assert _status(db, nid) == "sent"
    clock.advance(3600)
    assert await d.retry_due(clock.now()) == 0 and webhook.calls == [nid, nid, nid]  # never sent again
    with db.session() as s:
        assert [x.outcome for x in s.scalars(select(Delivery).order_by(Delivery.id))] == ["error", "retry",
                                                                                          "delivered"]


async def test_after_the_limit_a_delivery_is_dead_lettered_and_never_tried_again(
        db: Database, clock: VirtualClock) -> None:
    _, (nid,) = _profile_with(db, clock)
    down = Scripted("webhook", *(["retry"] * 10))
    d = Dispatcher(db, [down], Backoff(base_s=1, max_s=4, jitter=0, max_attempts=3))
    await d.dispatch([nid], clock.now())
    for _ in range(5):
        clock.advance(10)
        await d.retry_due(clock.now())
    assert down.calls == [nid] * 3
    assert _states(db, nid)["webhook"] == {"state": "dead", "attempts": 3, "next_attempt_at": None,
                                           "last_error": "retry"}
    assert d.dead_lettered["webhook"] == 1
    assert _status(db, nid) == "pending"  # still in the app's replay: a dead channel loses nothing else


async def test_a_permanent_failure_is_dead_at_once_and_other_channels_are_unaffected(
        db: Database, clock: VirtualClock) -> None:
    _, (nid,) = _profile_with(db, clock)
    gone, ok = Scripted("webpush", "gone"), Scripted("webhook", "delivered")
    d = Dispatcher(db, [gone, ok], Backoff(max_attempts=5))
    await d.dispatch([nid], clock.now())
    states = _states(db, nid)
    assert states["webpush"]["state"] == "dead" and states["webpush"]["attempts"] == 1
    assert states["webhook"]["state"] == "delivered"
    clock.advance(10_000)
    assert await d.retry_due(clock.now()) == 0


async def test_no_listener_is_not_a_failure_the_stream_replays_on_connect(db: Database, clock: VirtualClock) -> None:
    _, (nid,) = _profile_with(db, clock)
    hub = StreamHub()
    d = Dispatcher(db, [hub])
    await d.dispatch([nid], clock.now())
    assert _states(db, nid)["sse"] == {"state": "pending", "attempts": 1, "next_attempt_at": None,
                                       "last_error": None}
    clock.advance(10_000)
    assert await d.retry_due(clock.now()) == 0  # nothing scheduled: no busy retries of an absent app
    assert d.dead_lettered["sse"] == 0 and _status(db, nid) == "pending"


async def test_retries_survive_a_restart_and_an_acked_or_withdrawn_one_is_not_pushed_again(
        db: Database, clock: VirtualClock) -> None:
    _, (a, b, c) = _profile_with(db, clock, 3)
    first = Dispatcher(db, [Scripted("webhook", "retry", "retry", "retry")], Backoff(base_s=5, jitter=0))
    await first.dispatch([a, b, c], clock.now())
    with db.session() as s:  # meanwhile the app acks b through its stream, and c is withdrawn
        for nid, status in ((b, "acked"), (c, "cancelled")):
            n = s.get(Notification, nid)
            assert n is not None
            n.status = status

    again = Scripted("webhook", "delivered")
    restarted = Dispatcher(db, [again], Backoff(base_s=5, jitter=0))  # a new process, same database
    clock.advance(5)
    assert await restarted.retry_due(clock.now()) == 3
    assert again.calls == [a]
    assert _states(db, a)["webhook"]["state"] == "delivered"
    assert _states(db, b)["webhook"] == {"state": "delivered", "attempts": 1, "next_attempt_at": None,
                                         "last_error": None}
    assert _states(db, c)["webhook"] == {"state": "dead", "attempts": 1, "next_attempt_at": None,
                                         "last_error": "notification cancelled"}
    clock.advance(3600)
    assert await restarted.retry_due(clock.now()) == 0


async def test_recover_dispatches_what_a_crash_left_undispatched_once(db: Database, clock: VirtualClock) -> None:
    _, (a, b, c) = _profile_with(db, clock, 3)
    ch = Scripted("webhook")
    d = Dispatcher(db, [ch])
    await d.dispatch([a], clock.now())  # a went out before the crash; b and c were committed only
    assert d.undispatched() == [b, c]
    assert await d.recover(clock.now()) == 2
    assert await d.recover(clock.now()) == 0
    assert ch.calls == [a, b, c]


# ------------------------------------------------------------------ over the real server


async def test_a_held_notification_released_while_the_client_was_away_is_replayed_on_reconnect(
        tmp_path: Any) -> None:
    """Quiet hours held #1; #2 went out live; the client left with Last-Event-ID 2; #1 was released
    meanwhile. Its id is older than 2, yet the resumed stream (SSE and WebSocket) must bring it."""
    import httpx
    import websockets

    from tests.live_gateway import base_url, enrol, insert_notifications, live_settings, running
    from tests.sse import SseReader

    async with running(live_settings(tmp_path, campaigns="")) as rt:
        pid, token = enrol(rt, "alice", 1)
        now = rt.clock.now()
        (held,) = insert_notifications(rt, pid, ["held"], status="scheduled", deliver_at=now + 3600)
        async with httpx.AsyncClient(base_url=base_url(rt), timeout=10) as client:
            auth = {"Authorization": f"Bearer {token}"}
            first = await SseReader(client, "/v1/me/stream", auth).start()
            (later,) = insert_notifications(rt, pid, ["later"])
            rt._dispatch([later])
            await rt.flush()
            assert await first.wait(lambda r: len(r.events) == 1)
            assert first.events[0].id == str(later) and later > held
            await first.close()

            rt.clock.advance(3600)  # quiet hours end while the app is closed
            rt.tick()
            await rt.flush()
            # Released: pending, or "sent" if the server had not yet noticed the closed stream (a dead queue).
            assert _status(rt.db, held) in ("pending", "sent")

            resumed = await SseReader(client, "/v1/me/stream", {**auth, "Last-Event-ID": str(later)}).start()
            try:
                assert await resumed.wait(lambda r: len(r.events) >= 1)
                assert [e.json()["id"] for e in resumed.events] == [held]
            finally:
                await resumed.close()
            polled = await client.get("/v1/me/notifications", params={"after": later}, headers=auth)
            assert [n["id"] for n in polled.json()] == [held]
        uri = f"ws://127.0.0.1:{rt.settings.api.port}/v1/me/ws?access_token={token}&after={later}"
        async with websockets.connect(uri) as ws:
            got = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert (got["type"], got["id"]) == ("notification", held)
            await ws.send(json.dumps({"ack": held}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "acked"
        # Acked: never replayed again, from any position.
        with rt.db.session() as s:
            assert [m["id"] for m in replay(s, pid, 0)] == [later]


async def test_a_blocked_webhook_does_not_hold_back_the_stream(tmp_path: Any) -> None:
    """The brand's receiver hangs on every request until we let it go; meanwhile the SSE client gets
    both notifications, and once it answers, the webhook delivers both and confirms them."""
    import httpx
    from aiohttp import web

    from tests.live_gateway import base_url, enrol, insert_notifications, live_settings, running
    from tests.sse import SseReader

    release = asyncio.Event()
    arrived: list[int] = []
    answered: list[int] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.json()
        arrived.append(body["id"])
        await release.wait()
        answered.append(body["id"])
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    settings = live_settings(tmp_path, campaigns="")
    settings.webhook.enabled = True
    settings.webhook.url = [f"http://127.0.0.1:{runner.addresses[0][1]}/hook"]
    settings.webhook.secret = "whsec-test-0123456789abcdef"
    settings.webhook.timeout = 60.0  # the receiver is slow, not failing: no timeout may end the test early
    try:
        async with running(settings) as rt, httpx.AsyncClient(base_url=base_url(rt), timeout=10) as client:
            pid, token = enrol(rt, "alice", 1)
            reader = await SseReader(client, "/v1/me/stream", {"Authorization": f"Bearer {token}"}).start()
            try:
                one, two = insert_notifications(rt, pid, ["one", "two"])
                rt._dispatch([one])
                await _until(lambda: arrived == [one])  # the webhook is now stuck on #1...
                rt._dispatch([two])
                # ...and the stream still gets #1 and #2, in order, while nothing was answered.
                assert await reader.wait(lambda r: len(r.events) == 2)
                assert [e.json()["id"] for e in reader.events] == [one, two]
                assert answered == []
                await _until(lambda: sorted(arrived) == [one, two])  # sent concurrently, not queued behind #1
                assert answered == []
                release.set()
                await rt.flush()
            finally:
                await reader.close()
            assert sorted(answered) == [one, two]
            for nid in (one, two):
                assert {ch: st["state"] for ch, st in _states(rt.db, nid).items()} == {
                    "sse": "delivered", "webhook": "delivered"}
            with rt.db.session() as s:  # the receiver's 2xx is a confirmed delivery, recorded once each
                kinds = s.execute(select(Interaction.notification_id, Interaction.kind)).all()
            assert sorted(kinds) == [(one, "delivered"), (two, "delivered")]
    finally:
        release.set()
        await runner.cleanup()


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)  # polling what the event loop's other tasks do, not waiting for time


async def test_remote_sends_are_concurrent_up_to_the_bound(db: Database, clock: VirtualClock) -> None:
    """Twenty notifications to a channel that holds each send until released: at most `concurrency` at once."""
    gate = asyncio.Event()
    peak = 0
    current = 0

    class Holding:
        name = "push"

        async def deliver(self, profile_id: int, message: dict[str, Any]) -> str:
            nonlocal peak, current
            current += 1
            peak = max(peak, current)
            await gate.wait()
            current -= 1
            return "delivered"

    _, ids = _profile_with(db, clock, 20)
    d = Dispatcher(db, [StreamHub(), Holding()], concurrency=4)
    task = asyncio.create_task(d.dispatch(ids, clock.now()))
    await _until(lambda: current == 4)
    for _ in range(5):
        await asyncio.sleep(0)
    assert peak == 4 and d.in_flight["push"] == 4
    gate.set()
    await task
    assert peak == 4
    assert all(_states(db, nid)["push"]["state"] == "delivered" for nid in ids)
