"""Device rules inside the gateway: durable alarms, prompts through the engine, staff alerts and commands.

A real Runtime on a migrated database (SQLite file, and PostgreSQL where the test says so) with a
VirtualClock; readings go in through ``Pipeline.ingest_readings``, as the MQTT consumer hands them,
or over a real Mosquitto where the wire is the point.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from devices.mqtt import MqttIntake
from devices.mqtt import MqttSettings as IntakeSettings
from devices.payloads import DeviceEvent, Reading, TelemetryBatch
from devices.rules import parse_rule
from devices.topics import command_topic, telemetry_topic
from gateway.app.config import Settings
from gateway.app.runtime import Runtime
from gateway.clock import VirtualClock
from gateway.profiles.service import NewProfile
from gateway.storage.db import Database
from gateway.storage.models import Alarm, Decision, Device, Notification, RuleStateRecord
from gateway.telemetry.alarms import DeviceRules, after_commit, alert_topic
from tests.conftest import MosquittoServer, PahoTestClient
from tests.fixtures import RuntimeFactory

T0 = 1_780_300_800.0  # 2026-06-01 08:00 UTC

RULES = {
    "freezer.yaml": """
id: freezer-warm
name: Freezer too warm
match: {kind: freezer}
create:
  - {severity: warning, when: {metric: temp, op: gt, value: -12}, for_s: 900}
  - {severity: critical, when: {metric: temp, op: gt, value: 0}}
clear: {when: {metric: temp, op: lt, value: -16}}
actions:
  prompt: true
  staff: true
  command: {action: defrost_check}
  clear_command: {action: resume}
""",
    "faults.yaml": """
id: motor-fault
name: Motor fault
match: {kind: freezer}
create: {severity: major, when: {code: [E7]}}
clear: {after_s: 600}
actions: {prompt: false, staff: true}
""",
}
CAMPAIGNS = {
    "freezer.yaml": """
id: freezer-alarm
purpose: maintenance
trigger: {type: alarm}
conditions: {all: [{fact: alarm.rule, op: eq, value: freezer-warm}]}
action:
  title: "{alarm.name}"
  body: "{profile.first_name}, your freezer {device.id} reads {alarm.value} C ({alarm.severity})."
""",
}


def write_dir(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        (path / name).write_text(body)
    return path


def gateway_settings(tmp_path: Path, db_url: str | None = None, rules: dict[str, str] = RULES,
                     campaigns: dict[str, str] = CAMPAIGNS) -> Settings:
    s = Settings()
    s.data_dir = str(tmp_path)
    s.database.url = db_url or f"sqlite:///{tmp_path / 'gw.db'}"
    s.mqtt.enabled = False
    s.campaigns.dir = str(write_dir(tmp_path / "campaigns", campaigns))
    s.device_rules.dir = str(write_dir(tmp_path / "rules", rules))
    s.devices.profiles_dir = str(tmp_path / "no-profiles")  # metrics unchecked: not what these tests are about
    return s


@pytest.fixture
async def gw(tmp_path: Path, clock: VirtualClock,
             runtime_factory: RuntimeFactory) -> tuple[Runtime, VirtualClock]:
    return await runtime_factory(gateway_settings(tmp_path), serve_api=False), clock


def owner(rt: Runtime, who: str, device: str, kind: str = "freezer", consent: bool = True) -> int:
    pid: int = rt.service.create_profile(NewProfile(external_id=who, name=who.title(),
                                                    consents={"maintenance": consent}))["id"]
    rt.service.register_device(device, kind, pid)
    return pid


def feed(rt: Runtime, device: str, t: float, **metrics: float) -> list[int]:
    return rt.pipeline.ingest_readings([Reading(device, "s1", t, dict(metrics))], now=t)


def alarms_of(db: Database, device: str) -> list[Alarm]:
    with db.session() as s:
        return list(s.scalars(select(Alarm).where(Alarm.device_id == device).order_by(Alarm.id)))


def notifications(db: Database, pid: int) -> list[Notification]:
    with db.session() as s:
        return list(s.scalars(select(Notification).where(Notification.profile_id == pid).order_by(Notification.id)))


async def test_an_active_alarm_is_updated_never_duplicated(gw: tuple[Runtime, VirtualClock]) -> None:
    rt, _ = gw
    owner(rt, "ann", "fz-1")
    for i, temp in enumerate([2.0, 3.0, 1.5, 4.0]):  # critical at once; four batches, one alarm
        feed(rt, "fz-1", T0 + 60 * i, temp=temp)
    (a,) = alarms_of(rt.db, "fz-1")
    assert (a.status, a.severity, a.count, a.last_value) == ("active", "critical", 4, 4.0)
    assert a.created_at == T0 and a.updated_at == T0 + 180
    assert "temp 4 gt 0" in (a.detail or "")


def test_the_database_refuses_a_second_active_alarm_for_a_device_and_rule(db_url: str) -> None:
    db = Database(db_url)
    try:
        db.upgrade()
        with db.session() as s:
            s.add(Device(id="d1", state={}))
        row = {"device_id": "d1", "rule_id": "r", "name": "r", "severity": "warning", "created_at": T0,
               "updated_at": T0, "count": 1}
        with db.session() as s:
            s.add(Alarm(**row, status="active"))
            s.add(Alarm(**row, status="cleared"))  # history is fine
            s.add(Alarm(**row, status="cleared"))
        with pytest.raises(IntegrityError), db.session() as s:
            s.add(Alarm(**row, status="active"))
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(Alarm)) == 3
    finally:
        db.dispose()


async def test_the_owner_is_prompted_once_through_the_engine(gw: tuple[Runtime, VirtualClock]) -> None:
    rt, _ = gw
    ann = owner(rt, "ann", "fz-1")
    feed(rt, "fz-1", T0, temp=2.0)
    feed(rt, "fz-1", T0 + 60, temp=3.0)  # an update: no second prompt
    (a,) = alarms_of(rt.db, "fz-1")
    (n,) = notifications(rt.db, ann)
    assert n.campaign_id == "freezer-alarm" and n.title == "Freezer too warm"
    assert n.body == "Ann, your freezer fz-1 reads 2 C (critical)."
    assert n.data["alarm"] == {"id": a.id, "rule": "freezer-warm", "severity": "critical"}
    assert a.prompted_at == T0 and a.notification_id == n.id
    # Replayed (the same batch again, e.g. redelivered after a crash): still one alarm, one prompt.
    feed(rt, "fz-1", T0 + 60, temp=3.0)
    assert len(alarms_of(rt.db, "fz-1")) == 1 and len(notifications(rt.db, ann)) == 1


async def test_no_consent_no_prompt_but_the_alarm_and_the_staff_list_still_have_it(
        gw: tuple[Runtime, VirtualClock]) -> None:
    rt, _ = gw
    bob = owner(rt, "bob", "fz-2", consent=False)
    feed(rt, "fz-2", T0, temp=2.0)
    (a,) = alarms_of(rt.db, "fz-2")
    assert a.prompted_at is None and notifications(rt.db, bob) == []
    with rt.db.session() as s:
        reasons = s.scalars(select(Decision.reason).where(Decision.profile_id == bob)).all()
    assert reasons == ["no_consent"]
    assert [x["id"] for x in rt.alarms.list_alarms(status="active")] == [a.id]


async def test_escalation_updates_the_same_alarm_and_prompts_once_more(gw: tuple[Runtime, VirtualClock]) -> None:
    rt, clock = gw
    ann = owner(rt, "ann", "fz-1")
    feed(rt, "fz-1", T0, temp=-10.0)  # warning starts its 900 s timer
    clock.set(T0 + 900)
    rt.pipeline.tick(clock.now())
    (a,) = alarms_of(rt.db, "fz-1")
    assert (a.severity, a.created_at) == ("warning", T0 + 900)
    feed(rt, "fz-1", T0 + 1000, temp=1.0)  # critical
    (a,) = alarms_of(rt.db, "fz-1")
    assert (a.severity, a.count, a.created_at) == ("critical", 2, T0 + 900)
    assert [n.data["alarm"]["severity"] for n in notifications(rt.db, ann)] == ["warning", "critical"]
    feed(rt, "fz-1", T0 + 1100, temp=-5.0)  # between the thresholds: still critical, no new prompt
    assert alarms_of(rt.db, "fz-1")[0].severity == "critical" and len(notifications(rt.db, ann)) == 2


async def test_a_cleared_alarm_is_history_and_a_new_occurrence_is_a_new_alarm(
        gw: tuple[Runtime, VirtualClock]) -> None:
    rt, _ = gw
    ann = owner(rt, "ann", "fz-1")
    feed(rt, "fz-1", T0, temp=1.0)
    feed(rt, "fz-1", T0 + 60, temp=-17.0)  # past the clear threshold
    feed(rt, "fz-1", T0 + 120, temp=2.0)
    first, second = alarms_of(rt.db, "fz-1")
    assert (first.status, first.cleared_at, first.clear_reason) == ("cleared", T0 + 60, "clear condition held")
    assert (second.status, second.created_at) == ("active", T0 + 120)
    assert len(notifications(rt.db, ann)) == 2  # one prompt per occurrence


async def test_error_code_events_raise_and_silence_clears(gw: tuple[Runtime, VirtualClock]) -> None:
    rt, clock = gw
    owner(rt, "ann", "fz-1")
    feed(rt, "fz-1", T0, temp=-20.0)  # the device is known and healthy
    event = DeviceEvent("fz-1", "s1", T0 + 10, "error", "E7")
    rt.pipeline.ingest_readings(batch=TelemetryBatch(events=[event]), now=T0 + 10)
    (a,) = [x for x in alarms_of(rt.db, "fz-1") if x.rule_id == "motor-fault"]
    assert (a.status, a.severity, a.created_at) == ("active", "major", T0 + 10)
    clock.set(T0 + 700)
    rt.pipeline.tick(clock.now())
    (a,) = [x for x in alarms_of(rt.db, "fz-1") if x.rule_id == "motor-fault"]
    assert (a.status, a.cleared_at) == ("cleared", T0 + 610)


async def test_erasing_the_owner_removes_their_alarms_and_rule_state(gw: tuple[Runtime, VirtualClock]) -> None:
    rt, _ = gw
    ann = owner(rt, "ann", "fz-1")
    owner(rt, "bob", "fz-2")
    for d in ("fz-1", "fz-2"):
        feed(rt, d, T0, temp=1.0)
    rt.service.erase_profile(ann)
    with rt.db.session() as s:
        assert {a.device_id for a in s.scalars(select(Alarm))} == {"fz-2"}
        assert {r.device_id for r in s.scalars(select(RuleStateRecord))} == {"fz-2"}
        assert s.get(Device, "fz-1") is not None  # the device stays, unowned


def test_actions_leave_only_after_the_commit(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'gw.db'}")
    db.upgrade()
    rules = DeviceRules([parse_rule({"id": "hot", "create": {"when": {"metric": "t", "op": "gt", "value": 5}},
                                     "actions": {"staff": True, "command": {"action": "cool"}}})])
    sent: list[tuple[str, Any]] = []
    rules.publish_alert = lambda view: sent.append(("alert", view["status"]))
    rules.publish_command = lambda device, payload, **kw: sent.append(("command", payload["action"]))
    with db.session() as s:
        s.add(Device(id="d1", kind="k", state={}))
    with pytest.raises(RuntimeError), db.session() as s:
        rules.on_batch(s, [Reading("d1", "s1", T0, {"t": 9.0})])
        raise RuntimeError("the batch fails after the rules ran")
    assert sent == []  # rolled back: nothing was announced, and nothing is stored
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Alarm)) == 0
        rules.on_batch(s, [Reading("d1", "s1", T0, {"t": 9.0})])
        assert sent == []  # not before the commit either
    assert sent == [("alert", "active"), ("command", "cool")]
    with db.session() as s:  # an update of the raised alarm is not news: no second alert, no second command
        rules.on_batch(s, [Reading("d1", "s1", T0 + 60, {"t": 10.0})])
    assert len(sent) == 2
    calls: list[int] = []
    with db.session() as s:  # after_commit is per transaction: a later one runs only its own effects
        after_commit(s, lambda: calls.append(1))
    assert calls == [1] and len(sent) == 2
    db.dispose()


# ------------------------------------------------------------------ over a real broker


def intake_for(mosquitto: MosquittoServer, clock: VirtualClock) -> MqttIntake:
    return MqttIntake(IntakeSettings(host=mosquitto.host, port=mosquitto.port,
                                     client_id=f"gw-alarms-{secrets.token_hex(4)}", store_id="s1",
                                     topic_prefix=f"t{secrets.token_hex(4)}", reconnect_min_delay=1,
                                     reconnect_max_delay=2, session_expiry=60), clock=clock.now)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


async def test_staff_alert_is_retained_and_the_command_reaches_the_device_over_mqtt(
        tmp_path: Path, mosquitto: MosquittoServer, mqtt_client: Callable[..., PahoTestClient], clock: VirtualClock,
        runtime_factory: RuntimeFactory) -> None:
    intake = intake_for(mosquitto, clock)
    settings = gateway_settings(tmp_path)
    settings.mqtt.topic_prefix = intake.settings.topic_prefix
    settings.store.id = "s1"
    rt = await runtime_factory(settings, mqtt=intake, serve_api=False)
    prefix = intake.settings.topic_prefix
    try:
        assert await intake.wait_connected(10)
        owner(rt, "ann", "fz-1")
        device = mqtt_client(mosquitto.host, mosquitto.port)  # the freezer, listening for commands
        device.subscribe(command_topic("s1", "fz-1", prefix))
        device.publish_wait(telemetry_topic("s1", "fz-1", prefix), json.dumps({"ts": T0, "metrics": {"temp": 2.5}}))
        assert await asyncio.to_thread(device.wait_for, lambda m: len(m) >= 1, 10), "no command reached the device"
        command = json.loads(device.messages[0].payload)
        (a,) = alarms_of(rt.db, "fz-1")
        assert command == {"action": "defrost_check", "alarm": a.id, "rule": "freezer-warm",
                           "severity": "critical", "status": "active"}

        staff = mqtt_client(mosquitto.host, mosquitto.port)  # a staff screen connecting later
        staff.subscribe(f"{prefix}/s1/alerts/#")
        assert await asyncio.to_thread(staff.wait_for, lambda m: len(m) >= 1, 10), "the alert was not retained"
        alert = staff.messages[0]
        assert alert.topic == alert_topic(prefix, "s1", "fz-1", "freezer-warm") and alert.retain
        assert json.loads(alert.payload)["id"] == a.id and json.loads(alert.payload)["severity"] == "critical"

        device.publish_wait(telemetry_topic("s1", "fz-1", prefix),
                            json.dumps({"ts": T0 + 60, "metrics": {"temp": -18.0}}))
        assert await asyncio.to_thread(device.wait_for, lambda m: len(m) >= 2, 10), "no clear command"
        assert json.loads(device.messages[1].payload)["action"] == "resume"
        assert await asyncio.to_thread(staff.wait_for, lambda m: len(m) >= 2 and m[-1].payload == b"", 10)  # withdrawn
        later = mqtt_client(mosquitto.host, mosquitto.port)
        later.subscribe(f"{prefix}/s1/alerts/#")
        # Nothing is retained once it cleared: a new screen gets no alert.
        assert not await asyncio.to_thread(later.wait_for, lambda m: len(m) >= 1, 0.5)
        assert await wait_until(lambda: rt.pipeline.rules.figures["commands_sent"] == 2)
    finally:
        await runtime_factory.stop(rt)  # before the retained alert is cleared, so nothing publishes it again
        cleanup = PahoTestClient(mosquitto.host, mosquitto.port)
        cleanup.publish_wait(alert_topic(prefix, "s1", "fz-1", "freezer-warm"), b"", retain=True)
        cleanup.close()


async def test_a_clear_is_an_event_too_it_can_send_and_it_cancels_a_held_prompt(
        tmp_path: Path, runtime_factory: RuntimeFactory) -> None:
    campaigns = {
        "held.yaml": """
id: freezer-alarm
purpose: maintenance
trigger: {type: alarm}
action: {title: "{alarm.name}", body: "check it", delay_s: 600}
cancel_on: [alarm_cleared]
""",
        "ok.yaml": """
id: freezer-ok
purpose: maintenance
trigger: {type: alarm_cleared}
conditions: {all: [{fact: alarm.rule, op: eq, value: freezer-warm}]}
action: {title: "All good again", body: "{device.id} is back to {reading.temp} C"}
""",
    }
    rt = await runtime_factory(gateway_settings(tmp_path, campaigns=campaigns), serve_api=False)
    ann = owner(rt, "ann", "fz-1")
    feed(rt, "fz-1", T0, temp=1.0)  # raised: the prompt waits 600 s
    feed(rt, "fz-1", T0 + 120, temp=-18.0)  # cleared before it went out
    by_campaign = {n.campaign_id: n for n in notifications(rt.db, ann)}
    assert by_campaign["freezer-alarm"].status == "cancelled"
    assert by_campaign["freezer-ok"].body == "fz-1 is back to -18 C"


def test_a_quarantined_device_raises_nothing(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'gw.db'}")
    db.upgrade()
    rules = DeviceRules([parse_rule({"id": "hot", "create": {"when": {"metric": "t", "op": "gt", "value": 5}}})])
    with db.session() as s:
        s.add(Device(id="new", kind="k", state={}, quarantined=True))
        s.add(Device(id="known", kind="k", state={}))
    with db.session() as s:
        rules.on_batch(s, [Reading("new", "s1", T0, {"t": 9.0}), Reading("known", "s1", T0, {"t": 9.0})])
    with db.session() as s:
        assert [a.device_id for a in s.scalars(select(Alarm))] == ["known"]
        assert s.get(RuleStateRecord, ("new", "hot")) is None
    db.dispose()
