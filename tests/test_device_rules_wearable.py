"""The wearable health-regime example: behind the day's step pace in the afternoon -> one nudge, with consent.

The shipped rule (examples/device-rules/wearable.yaml) and campaign (examples/campaigns/activity-nudge.yaml)
run in a gateway whose store is in Paris, so "afternoon" is the store's, not UTC's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from gateway.app.runtime import Runtime
from gateway.clock import VirtualClock
from gateway.profiles.service import NewProfile
from gateway.storage.models import Alarm, Decision, Notification
from tests.fixtures import RuntimeFactory, runtime_settings
from tests.test_alarms import feed

ROOT = Path(__file__).resolve().parent.parent
MORNING = 1_780_300_800.0  # 2026-06-01 08:00 UTC = 10:00 in Paris
AFTERNOON = MORNING + 5 * 3600  # 15:00 in Paris: 7/12 of the 08:00-20:00 day gone, on pace = 4,667 steps


@pytest.fixture
async def gw(tmp_path: Path, runtime_factory: RuntimeFactory) -> Runtime:
    s = runtime_settings(tmp_path)
    s.store.timezone = "Europe/Paris"
    s.campaigns.dir = str(ROOT / "examples/campaigns")
    s.device_rules.dir = str(ROOT / "examples/device-rules")
    s.devices.profiles_dir = str(ROOT / "examples/device-profiles")
    return await runtime_factory(s, clock=VirtualClock(MORNING), serve_api=False)


def wearer(rt: Runtime, who: str, health: bool) -> int:
    pid: int = rt.service.create_profile(NewProfile(external_id=who, name=who.title(),
                                                    consents={"health": health}))["id"]
    rt.service.register_device(f"watch-{who}", "fitness_watch", pid)
    return pid


def nudges(rt: Runtime, pid: int) -> list[Notification]:
    with rt.db.session() as s:
        return list(s.scalars(select(Notification).where(Notification.profile_id == pid,
                                                         Notification.campaign_id == "activity-nudge")))


async def test_behind_pace_in_the_afternoon_gets_one_nudge(gw: Runtime) -> None:
    chloe = wearer(gw, "chloe", health=True)
    feed(gw, "watch-chloe", MORNING, steps=300, heart_rate=70)  # far behind, but it is the morning
    feed(gw, "watch-chloe", MORNING + 300, steps=350, heart_rate=70)
    assert nudges(gw, chloe) == []
    feed(gw, "watch-chloe", AFTERNOON, steps=3000, heart_rate=72)  # 64 % of pace: the first of two
    assert nudges(gw, chloe) == []
    feed(gw, "watch-chloe", AFTERNOON + 300, steps=3050, heart_rate=72)  # the second in a row: raised
    (n,) = nudges(gw, chloe)
    assert n.purpose == "health" and "3050 steps" in n.body and n.body.startswith("Chloe,")
    feed(gw, "watch-chloe", AFTERNOON + 600, steps=3100, heart_rate=72)  # still behind: the same alarm
    assert len(nudges(gw, chloe)) == 1
    with gw.db.session() as s:
        (a,) = s.scalars(select(Alarm).where(Alarm.device_id == "watch-chloe")).all()
        assert (a.rule_id, a.status, a.count) == ("activity-behind-schedule", "active", 2)
    feed(gw, "watch-chloe", AFTERNOON + 3600, steps=6000, heart_rate=95)  # 16:00, caught up (pace 5,333)
    with gw.db.session() as s:
        (a,) = s.scalars(select(Alarm).where(Alarm.device_id == "watch-chloe")).all()
        assert a.status == "cleared"


async def test_no_health_consent_no_nudge_and_on_pace_no_alarm(gw: Runtime) -> None:
    farid = wearer(gw, "farid", health=False)
    gina = wearer(gw, "gina", health=True)
    for t in (AFTERNOON, AFTERNOON + 300):
        feed(gw, "watch-farid", t, steps=1000, heart_rate=80)
        feed(gw, "watch-gina", t, steps=5200, heart_rate=80)  # ahead of the 4,667 pace
    assert nudges(gw, farid) == [] and nudges(gw, gina) == []
    with gw.db.session() as s:
        assert s.scalars(select(Decision.reason).where(Decision.profile_id == farid,
                                                       Decision.campaign_id == "activity-nudge")).all() == [
            "no_consent"]
        assert {a.device_id for a in s.scalars(select(Alarm))} == {"watch-farid"}
