"""Rule states survive from batch to batch in the database, on SQLite and PostgreSQL alike: on PostgreSQL a
batch's changed states go out as one UPDATE (its rows one JSON parameter), so a ``for`` timer that only a
stored state remembers must still fire, and the stored state must say what the last batch left."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from gateway.clock import VirtualClock
from gateway.storage.models import RuleStateRecord
from tests.fixtures import RuntimeFactory
from tests.test_alarms import T0, alarms_of, feed, gateway_settings, owner


async def test_a_for_timer_held_only_in_stored_rule_state_fires_on_both_databases(
        tmp_path: Path, db_url: str, clock: VirtualClock, runtime_factory: RuntimeFactory) -> None:
    rt = await runtime_factory(gateway_settings(tmp_path, db_url), serve_api=False)
    owner(rt, "ann", "fz-1")
    owner(rt, "bob", "fz-2")
    feed(rt, "fz-1", T0, temp=-5.0)  # warm (> -12) but under 900 s: a timer starts, no alarm yet
    feed(rt, "fz-2", T0, temp=-20.0)
    with rt.db.session() as s:
        first = {r.device_id: (r.due_at, r.updated_at) for r in s.scalars(
            select(RuleStateRecord).where(RuleStateRecord.rule_id == "freezer-warm"))}
    assert first["fz-1"][0] is not None and first["fz-2"][0] is None
    feed(rt, "fz-1", T0 + 600, temp=-6.0)  # still warm: the stored state (updated in place) keeps the start
    feed(rt, "fz-2", T0 + 600, temp=-21.0)
    assert alarms_of(rt.db, "fz-1") == []
    feed(rt, "fz-1", T0 + 960, temp=-7.0)  # 960 s warm since T0: the warning
    (alarm,) = alarms_of(rt.db, "fz-1")
    assert (alarm.severity, alarm.status, alarm.created_at) == ("warning", "active", T0 + 900)  # when 900 s ran out
    assert alarms_of(rt.db, "fz-2") == []
    with rt.db.session() as s:
        last = {r.device_id: r.updated_at for r in s.scalars(
            select(RuleStateRecord).where(RuleStateRecord.rule_id == "freezer-warm"))}
    assert last == {"fz-1": T0 + 960, "fz-2": first["fz-2"][1]}  # fz-2's state did not change: no write
