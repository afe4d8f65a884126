"""The dispatcher's retries: backoff with jitter, per-channel state in the database, dead letters.

Time is a VirtualClock and the jitter's randomness is injected, so every schedule is exact and
nothing sleeps. A flaky channel stands in for a webhook or a push service.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from gateway.channels import StreamHub
from gateway.clock import VirtualClock
from gateway.identity import IdentityIndex
from gateway.outbox import Backoff, Dispatcher, delivery_states
from gateway.service import GatewayService, NewProfile
from gateway.storage.db import Database
from gateway.storage.models import Delivery, Notification
from gateway.tokens import TokenSigner

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


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(T0)


def _db(url: str) -> Iterator[Database]:
    database = Database(url)
    database.upgrade()
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def db(tmp_path: Any) -> Iterator[Database]:
    yield from _db(f"sqlite:///{tmp_path}/gw.db")


@pytest.fixture
def any_db(db_url: str) -> Iterator[Database]:
    """SQLite and PostgreSQL: the bulk inserts and updates of the state run on both."""
    yield from _db(db_url)


def _profile_with(db: Database, clock: VirtualClock, n: int = 1) -> tuple[int, list[int]]:
    svc = GatewayService(db, IdentityIndex(), clock, TokenSigner(b"dispatch-test-secret-0123456789ab"))
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
