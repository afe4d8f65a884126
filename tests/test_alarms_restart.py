"""The proof: a gateway restarted while a ``for`` timer runs still raises the alarm, once, at the right time.

Home Assistant loses such timers on restart (core#56642). Here the timer's start is in the
database, so a new gateway on the same file, with the clock moved past the duration, fires it at
start + for_s, exactly once, and the owner's maintenance prompt exists exactly once.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from gateway.clock import VirtualClock
from gateway.storage.models import Alarm, Notification, RuleStateRecord
from tests.fixtures import RuntimeFactory
from tests.test_alarms import T0, feed, gateway_settings, owner

FOR_S = 900.0  # the freezer rule's warning: warmer than -12 C for 15 minutes


async def test_a_for_timer_survives_a_restart_and_fires_once_at_the_right_time(
        tmp_path: Path, clock: VirtualClock, runtime_factory: RuntimeFactory) -> None:
    rt = await runtime_factory(gateway_settings(tmp_path), serve_api=False)
    ann = owner(rt, "ann", "fz-1")
    feed(rt, "fz-1", T0, temp=-10.0)  # the timer starts
    clock.set(T0 + 300)
    feed(rt, "fz-1", T0 + 300, temp=-9.0)  # still warm: the timer keeps its start
    rt.pipeline.tick(clock.now())
    with rt.db.session() as s:
        assert s.scalars(select(Alarm)).all() == []
        (state,) = s.scalars(select(RuleStateRecord).where(RuleStateRecord.rule_id == "freezer-warm")).all()
        assert state.due_at == T0 + FOR_S
    await runtime_factory.stop(rt)  # the gateway goes away with the timer running

    clock.set(T0 + 2000)  # back long after the timer was due; no reading in between
    # The new gateway fires what came due while it was away, at its start, before any reading or tick.
    rt2 = await runtime_factory(gateway_settings(tmp_path), serve_api=False)
    with rt2.db.session() as s:
        (alarm,) = s.scalars(select(Alarm)).all()
        assert alarm.created_at == T0 + FOR_S
    rt2.pipeline.tick(clock.now())
    rt2.pipeline.tick(clock.now() + 1)  # and again: nothing more
    clock.advance(600)
    rt2.pipeline.tick(clock.now())
    with rt2.db.session() as s:
        (alarm,) = s.scalars(select(Alarm)).all()
        assert (alarm.rule_id, alarm.severity, alarm.status) == ("freezer-warm", "warning", "active")
        assert alarm.created_at == T0 + FOR_S  # the right time: when it had held for 900 s
        assert alarm.last_value == -9.0
        (prompt,) = s.scalars(select(Notification).where(Notification.profile_id == ann)).all()
        assert prompt.campaign_id == "freezer-alarm" and prompt.data["alarm"]["id"] == alarm.id
        assert alarm.prompted_at == prompt.created_at == T0 + FOR_S
        state = s.get(RuleStateRecord, ("fz-1", "freezer-warm"))
        assert state is not None and state.due_at is None  # nothing left to fire
    # A third gateway sees the same single alarm, and a reading updates it rather than raising another.
    await runtime_factory.stop(rt2)
    rt3 = await runtime_factory(gateway_settings(tmp_path), serve_api=False)
    rt3.pipeline.tick(clock.now())
    feed(rt3, "fz-1", clock.now(), temp=-8.0)
    with rt3.db.session() as s:
        (alarm,) = s.scalars(select(Alarm)).all()
        assert alarm.count == 2 and alarm.last_value == -8.0
        assert len(s.scalars(select(Notification).where(Notification.profile_id == ann)).all()) == 1


async def test_a_timer_cancelled_before_the_restart_stays_cancelled(
        tmp_path: Path, clock: VirtualClock, runtime_factory: RuntimeFactory) -> None:
    rt = await runtime_factory(gateway_settings(tmp_path), serve_api=False)
    owner(rt, "ann", "fz-1")
    feed(rt, "fz-1", T0, temp=-10.0)
    feed(rt, "fz-1", T0 + 600, temp=-20.0)  # cold again before the 900 s: the timer is off
    await runtime_factory.stop(rt)
    clock.set(T0 + 5000)
    rt2 = await runtime_factory(gateway_settings(tmp_path), serve_api=False)
    rt2.pipeline.tick(clock.now())
    with rt2.db.session() as s:
        assert s.scalars(select(Alarm)).all() == []
