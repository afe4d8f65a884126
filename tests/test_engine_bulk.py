"""Engine.handle_many (a campaign judged for many profiles at once, as a schedule's audience is) must decide
exactly what handle decides event by event: consent, dedup, cooldown, caps, quiet hours, budgets and
arbitration all still apply per profile, including sends fired earlier in the same batch."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway.campaigns.model import CampaignIndex, parse_campaign
from gateway.clock import VirtualClock
from gateway.engine.engine import Engine, EngineEvent, FrequencyCap, Outcome
from gateway.profiles.service import NewProfile
from gateway.storage.db import Database
from gateway.storage.models import Decision, Notification
from tests.fixtures import make_service, migrated_copy

TZ = "Europe/Paris"


def run_schedules(engine: Engine, s: Session, now: float) -> list[Outcome]:
    """Each due schedule's audience judged as one batch, as the pipeline's tick does."""
    return [o for c, evs in engine.schedule_audiences(s, now) for outs in engine.handle_many(s, evs, [c]) for o in outs]


def local(hhmm: str) -> float:
    hh, mm = map(int, hhmm.split(":"))
    return dt.datetime(2026, 6, 1, hh, mm, tzinfo=ZoneInfo(TZ)).timestamp()


def camp(cid: str, **over: Any):
    base: dict[str, Any] = {"id": cid, "purpose": "offers", "trigger": {"type": "enter", "zone": "z"},
                            "action": {"title": "Hello {profile.first_name}", "body": "b"}}
    base.update(over)
    return parse_campaign(base)


def campaigns():
    return [camp("vip", priority=10, conditions={"fact": "profile.attributes.tier", "op": "eq", "value": "gold"}),
            camp("cool", priority=5, limits={"cooldown_s": 3600}),
            camp("night", limits={"quiet_hours": {"start": "21:00", "end": "08:00", "mode": "drop"}}),
            camp("care", purpose="maintenance")]


@pytest.fixture
def dbs(tmp_path, migrated_sqlite):
    out = []
    for name in ("one", "many"):  # two databases, one per way of judging, so the test compares them
        db = migrated_copy(migrated_sqlite, tmp_path / f"{name}.db")
        svc = make_service(db, VirtualClock(local("10:00")))
        pids = [svc.create_profile(NewProfile(external_id=f"p{i}", name=f"P{i} X",
                                              attributes={"tier": "gold" if i % 3 == 0 else "basic"},
                                              consents={"offers": i % 4 != 1, "maintenance": True}))["id"]
                for i in range(12)]
        out.append((db, pids))
    yield out
    for db, _ in out:
        db.dispose()


def events(pids: list[int]) -> list[EngineEvent]:
    """Two rounds for everyone (the second inside the cooldown and the cap), a night event, and a replay."""
    evs = [EngineEvent("enter", pid, local("10:00"), f"a:{pid}", "z") for pid in pids]
    evs += [EngineEvent("enter", pid, local("10:10"), f"b:{pid}", "z") for pid in pids]
    evs += [EngineEvent("enter", pids[2], local("22:00"), "night", "z"),
            EngineEvent("enter", pids[0], local("10:00"), f"a:{pids[0]}", "z")]  # a replay: dedup
    return evs


def summary(db: Database) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    with db.session() as s:
        notes = s.execute(select(Notification.profile_id, Notification.campaign_id, Notification.dedup_key,
                                 Notification.title, Notification.status).order_by(Notification.id)).all()
        decisions = s.execute(select(Decision.profile_id, Decision.campaign_id, Decision.event_key,
                                     Decision.fired, Decision.reason).order_by(Decision.id)).all()
    return [tuple(n) for n in notes], sorted(tuple(d) for d in decisions)


def test_bulk_judging_decides_what_one_by_one_judging_decides(dbs):
    (one_db, one_pids), (many_db, many_pids) = dbs
    assert one_pids == many_pids
    caps = [FrequencyCap(3600, 2, ("offers",))]
    one = Engine(CampaignIndex(campaigns()), timezone=TZ, caps=caps)
    many = Engine(CampaignIndex(campaigns()), timezone=TZ, caps=caps)
    evs = events(one_pids)
    with one_db.session() as s:
        singly = [one.handle(s, ev) for ev in evs]
    with many_db.session() as s:
        bulk = many.handle_many(s, evs)

    def strip(outs):
        return [[(o.campaign_id, o.profile_id, o.fired, o.reason, o.detail) for o in per] for per in outs]

    assert strip(bulk) == strip(singly)
    assert summary(many_db) == summary(one_db)
    reasons = {o.reason for per in bulk for o in per}
    # Every control had a say: consent, conditions, cooldown, the cap, quiet hours, arbitration, dedup.
    assert {"fired", "no_consent", "condition_false", "cooldown", "capped", "quiet_hours",
            "lost_arbitration"} <= reasons
    assert bulk[-1] == [] or all(o.reason != "fired" for o in bulk[-1])  # the replay sends nothing
    # Ids are filled in after the batch's one flush: every fired outcome names its own notification.
    fired = [o for per in bulk for o in per if o.fired]
    with many_db.session() as s:
        stored = dict(s.execute(select(Notification.id, Notification.campaign_id)).all())
    assert len({o.notification_id for o in fired}) == len(fired)
    assert all(stored[o.notification_id] == o.campaign_id for o in fired)


def test_a_schedule_audience_is_judged_in_bulk_once(dbs):
    (db, pids), _ = dbs
    sched = camp("morning", trigger={"type": "schedule", "at": "10:00"}, limits={"cooldown_s": 600})
    engine = Engine(CampaignIndex([sched]), timezone=TZ)
    with db.session() as s:
        outs = run_schedules(engine, s, local("10:05"))
    fired = [o for o in outs if o.fired]
    consenting = [pid for i, pid in enumerate(pids) if i % 4 != 1]
    assert sorted(o.profile_id for o in fired) == consenting  # only those who consented to offers
    with db.session() as s:
        again = run_schedules(engine, s, local("10:06"))  # the same occurrence: never twice
        assert again == []
        assert s.scalar(select(func.count()).select_from(Notification)) == len(consenting)
