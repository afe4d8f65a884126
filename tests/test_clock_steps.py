"""The wall clock steps an hour back or forward under a running gateway (NTP on a Pi that booted without a
clock, or with fake-hwclock's stale time), and what the customer sees stays right.

A real Runtime on SQLite with a SteppingClock: sightings at the clock's time go through presence, the
engine and the outbox; ticks run the timers. What must hold:

- a cooldown holds across a step back: the send made before it does not look an hour "in the future"
  and so out of reach (a customer who leaves and comes back is not sent the same offer twice), and so
  does a frequency cap when the step back is longer than its window;
- the interval timers (cart abandonment, device offline sweep, telemetry purge) keep running after a step
  back instead of waiting an hour for the clock to catch up with their last run;
- a step forward releases each delayed send once, never twice;
- a step either way is neither silence nor time: devices reporting over MQTT stay online, a device
  rule's ``for`` timer counts the time that really passed, an open cart is abandoned on time; a device
  that really stops goes offline after its allowance of real time, not an hour late.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from beacons.types import Sighting
from devices.mqtt import MqttIntake
from devices.mqtt import MqttSettings as IntakeSettings
from devices.topics import telemetry_topic
from gateway.app.config import CapSettings, Settings
from gateway.app.pipeline import Pipeline
from gateway.app.runtime import Runtime
from gateway.campaigns.model import CampaignIndex
from gateway.clock import SteppingClock
from gateway.presence.settings import ReceiverSettings, ZoneBand
from gateway.presence.tracker import PresenceEvent
from gateway.profiles.identity import IdentityIndex
from gateway.profiles.service import NewProfile
from gateway.storage.db import Database
from gateway.storage.models import Alarm, Cart, Decision, Device, Notification, Profile, RuleStateRecord, Visit
from tests.conftest import MosquittoServer, PahoTestClient
from tests.fixtures import RuntimeFactory, runtime_settings

T0 = 1_780_300_800.0  # 2026-06-01 08:00 UTC
KEY = "ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:1:1"
HOUR = 3600.0


@pytest.fixture
def clock() -> SteppingClock:
    return SteppingClock(T0)


def settings(tmp_path: Path, campaigns: dict[str, str]) -> Settings:
    s = runtime_settings(tmp_path)
    d = tmp_path / "campaigns"
    d.mkdir()
    for name, text in campaigns.items():
        (d / f"{name}.yaml").write_text(text)
    s.campaigns.dir = str(d)
    s.receivers = [ReceiverSettings("rx", [ZoneBand("a", 5.0)], measured_power=-59)]
    s.presence.enter_hold_s = 0.0
    s.presence.fade_time_s = 0.05
    s.presence.exit_after_s = 10.0
    s.presence.visit_end_after_s = 60.0
    s.engine.caps = []
    return s


def enrol(rt: Runtime, consent: str = "offers") -> int:
    return int(rt.service.create_profile(NewProfile(external_id="ann", identifiers=[("beacon", KEY)],
                                                    consents={consent: True}))["id"])


def walk(rt: Runtime, clock: SteppingClock, seconds: float, heard: bool) -> None:
    """``seconds`` of real time in 0.25 s steps: the tag heard (or not) at the clock's time, a tick a second."""
    for i in range(int(seconds * 4)):
        clock.advance(0.25)
        if heard:
            rt.pipeline.ingest_sightings([Sighting(KEY, "rx", -55, clock.now(), None)])
        if i % 4 == 3:
            rt.pipeline.tick(clock.now())


def decisions(rt: Runtime, campaign: str) -> list[str]:
    with rt.db.session() as s:
        return [d.reason for d in s.scalars(select(Decision).where(Decision.campaign_id == campaign)
                                            .order_by(Decision.id))]


async def test_a_cooldown_holds_when_the_clock_steps_back_between_two_visits(
        tmp_path: Path, clock: SteppingClock, runtime_factory: RuntimeFactory) -> None:
    rt = await runtime_factory(settings(tmp_path, {"hello": (
        "id: hello\npurpose: offers\ntrigger: {type: enter, zone: a}\naction: {title: t, body: b}\n"
        "limits: {cooldown_s: 1800}\n")}), serve_api=False)
    enrol(rt)
    walk(rt, clock, 5, heard=True)
    assert decisions(rt, "hello") == ["fired"]
    walk(rt, clock, 120, heard=False)  # she leaves: exit, then the visit ends; nobody is tracked
    assert not rt.pipeline.presence.tracks
    clock.step(-HOUR)  # NTP: the clock was an hour fast
    walk(rt, clock, 600, heard=False)
    walk(rt, clock, 5, heard=True)  # back after 12 minutes of real time: inside the 30 min cooldown
    assert decisions(rt, "hello") == ["fired", "cooldown"]
    # The send stays "ahead" on the stepped clock until the clock catches up: a step back can lengthen a
    # cooldown by up to the step, never shorten it.
    walk(rt, clock, 120, heard=False)
    walk(rt, clock, 1800, heard=False)
    walk(rt, clock, 5, heard=True)
    assert decisions(rt, "hello")[-1] == "cooldown"
    walk(rt, clock, 120, heard=False)
    walk(rt, clock, 1800 + 900, heard=False)  # the clock is now past the first send's time plus the cooldown
    walk(rt, clock, 5, heard=True)
    assert decisions(rt, "hello")[-1] == "fired"

async def test_a_frequency_cap_holds_when_the_clock_steps_back_further_than_its_window(
        tmp_path: Path, clock: SteppingClock, runtime_factory: RuntimeFactory) -> None:
    s = settings(tmp_path, {"hello": ("id: hello\npurpose: offers\ntrigger: {type: enter, zone: a}\n"
                                      "action: {title: t, body: b}\n")})  # no cooldown: only the cap
    s.engine.caps = [CapSettings(window_s=600.0, max=1)]
    rt = await runtime_factory(s, serve_api=False)
    enrol(rt)
    walk(rt, clock, 5, heard=True)
    assert decisions(rt, "hello") == ["fired"]
    walk(rt, clock, 120, heard=False)  # she leaves: the visit ends
    clock.step(-HOUR)  # further back than the cap's 10 minutes
    walk(rt, clock, 120, heard=False)
    walk(rt, clock, 5, heard=True)  # back 4 minutes of real time after her offer: inside the cap's window
    assert decisions(rt, "hello") == ["fired", "capped"]


async def test_cart_abandonment_runs_on_time_after_the_clock_steps_back(
        tmp_path: Path, clock: SteppingClock, runtime_factory: RuntimeFactory) -> None:
    s = settings(tmp_path, {"cart": ("id: cart\npurpose: cart_reminders\ntrigger: {type: cart_abandoned}\n"
                                     "action: {title: t, body: b}\n")})
    s.carts.abandon_after_s = 600.0
    rt = await runtime_factory(s, serve_api=False)
    pid = enrol(rt, "cart_reminders")
    walk(rt, clock, 10, heard=False)  # the scans have run at the old time
    clock.step(-HOUR)
    rt.service.upsert_cart("c1", profile_id=pid, external_id=None, items=[{"sku": "x", "qty": 1}], updated_at=None)
    walk(rt, clock, 600 + 30, heard=False)  # abandoned after 600 s; the scan runs every 5 s of clock time
    assert decisions(rt, "cart") == ["fired"]


async def test_a_step_forward_releases_each_delayed_send_once(
        tmp_path: Path, clock: SteppingClock, runtime_factory: RuntimeFactory) -> None:
    rt = await runtime_factory(settings(tmp_path, {"later": (
        "id: later\npurpose: offers\ntrigger: {type: enter, zone: a}\naction: {title: t, body: b, delay_s: 300}\n")}),
        serve_api=False)
    pid = enrol(rt)
    rt.pipeline.handle_presence([PresenceEvent("enter", KEY, T0, "a", T0, T0)])
    clock.step(HOUR)
    released = rt.pipeline.tick(clock.now()) + rt.pipeline.tick(clock.now() + 1)
    walk(rt, clock, 10, heard=False)
    with rt.db.session() as s:
        (n,) = s.scalars(select(Notification).where(Notification.profile_id == pid)).all()
        assert released == [n.id] and n.status == "pending"


async def live_walk(rt: Runtime, clock: SteppingClock, seconds: float, heard: bool) -> None:
    """As ``walk``, with the Runtime's own tick (which compares the wall clock with monotonic time)."""
    for i in range(int(seconds * 4)):
        clock.advance(0.25)
        if heard:
            rt.pipeline.ingest_sightings([Sighting(KEY, "rx", -55, clock.now(), None)])
        if i % 4 == 3:
            rt.tick()
            await rt.flush()


async def test_a_step_forward_while_she_shops_is_not_a_visit_ended_and_begun_again(
        tmp_path: Path, clock: SteppingClock, runtime_factory: RuntimeFactory) -> None:
    rt = await runtime_factory(settings(tmp_path, {"hi": (
        "id: hi\npurpose: offers\ntrigger: {type: visit_start}\naction: {title: t, body: b}\n")}), serve_api=False)
    enrol(rt)
    await live_walk(rt, clock, 20, heard=True)
    clock.step(HOUR)  # NTP: the clock was an hour slow; the next tick comes before her next advert
    rt.tick()
    await rt.flush()
    await live_walk(rt, clock, 20, heard=True)
    await live_walk(rt, clock, 120, heard=False)  # she leaves: one visit ends
    with rt.db.session() as s:
        visits = s.scalars(select(Visit)).all()
    assert len(visits) == 1 and decisions(rt, "hi") == ["fired"]
    assert rt.pipeline.presence.clock_steps == 1
    ended = visits[0].ended_at
    assert ended is not None and 35 <= ended - visits[0].started_at <= 45  # her 40 s in the shop, not an hour more


SENSOR = "id: sensor\nreporting_interval_s: 30\noffline_after_intervals: 3\nmetrics: {temp: {unit: C}}\n"  # 90 s
WARM = ("id: warm\nname: Freezer too warm\nmatch: {kind: sensor}\n"
        "create: {severity: warning, when: {metric: temp, op: gt, value: -12}, for_s: 300}\n"
        "clear: {when: {metric: temp, op: lt, value: -16}}\nactions: {prompt: true, staff: false}\n")
ALARM = ("id: warm\npurpose: maintenance\ntrigger: {type: alarm}\n"
         "action: {title: t, body: \"{device.id} is warm\"}\n")


@pytest.mark.parametrize("step", [HOUR, -HOUR], ids=["forward", "back"])
async def test_a_step_takes_no_device_offline_and_times_alarms_and_silence_in_real_time_over_mqtt(
        tmp_path: Path, clock: SteppingClock, runtime_factory: RuntimeFactory, mosquitto: MosquittoServer,
        mqtt_client: Callable[..., PahoTestClient], step: float) -> None:
    """Forward, before the fix: every device offline at the first tick after the step, the 300 s timer
    fired at once. Back: the device that stopped stayed online, and the timer waited, an hour more."""
    s = settings(tmp_path, {"warm": ALARM})
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "sensor.yaml").write_text(SENSOR)
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "warm.yaml").write_text(WARM)
    s.devices.profiles_dir, s.device_rules.dir = str(tmp_path / "profiles"), str(tmp_path / "rules")
    s.store.id = "s1"
    intake = MqttIntake(IntakeSettings(host=mosquitto.host, port=mosquitto.port, client_id=f"gw-{secrets.token_hex(4)}",
                                       store_id="s1", topic_prefix=f"t{secrets.token_hex(4)}", session_expiry=60),
                        clock=clock.now)  # readings without "ts" are stamped by the gateway's clock, as in a shop
    s.mqtt.topic_prefix = intake.settings.topic_prefix
    rt = await runtime_factory(s, mqtt=intake, serve_api=False)
    assert await intake.wait_connected(10), intake.last_error
    pid = int(rt.service.create_profile(NewProfile(external_id="ann", consents={"maintenance": True}))["id"])
    for d in ("steady", "warm", "dies"):
        rt.service.register_device(d, "sensor", pid)
    devices = mqtt_client(mosquitto.host, mosquitto.port)
    sent = 0

    async def run(until_s: float) -> None:
        """Real time to ``until_s`` since the start, a tick a second; each device still alive reports
        every 30 s (no "ts": the gateway stamps it), committed before time moves on."""
        nonlocal sent
        while clock.monotonic() - T0 < until_s:
            clock.advance(1.0)
            r = round(clock.monotonic() - T0)
            if r % 30 == 0:
                for d in ("steady", "warm") + (("dies",) if r <= 120 else ()):
                    temp = -10.0 if d == "warm" and r >= 90 else -20.0  # "warm" holds over -12 from 90 s on
                    devices.publish_wait(telemetry_topic("s1", d, intake.settings.topic_prefix),
                                         json.dumps({"metrics": {"temp": temp}}))
                    sent += 1
                for _ in range(500):
                    if rt.pipeline.telemetry.counts["accepted"] >= sent:
                        break
                    await asyncio.sleep(0.01)
                assert rt.pipeline.telemetry.counts["accepted"] == sent
            rt.tick()
            await rt.flush()

    def status() -> dict[str, str]:
        return {d["id"]: str(d["status"]) for d in rt.devices.list_devices()}

    def alarms() -> list[Alarm]:
        with rt.db.session() as s:
            return list(s.scalars(select(Alarm)))

    await run(150)
    assert status() == {"steady": "online", "warm": "online", "dies": "online"}
    clock.step(step)  # NTP: the Pi's clock was an hour slow (or fast)
    await run(151)  # the first tick after the step: an hour since every device's last reading, on the clock
    assert status() == {"steady": "online", "warm": "online", "dies": "online"}
    await run(200)  # "dies" last reported at 120 s: 80 s of its 90 s allowance have passed
    assert status() == {"steady": "online", "warm": "online", "dies": "online"}
    assert rt.pipeline.telemetry.counts["went_offline"] == 0  # none went offline and came back either
    assert alarms() == [] and decisions(rt, "warm") == []
    await run(215)  # 95 s of silence, measured in time that passed (the sweep runs every 5 s)
    assert status() == {"steady": "online", "warm": "online", "dies": "offline"}
    await run(385)  # "warm" has held over -12 for 295 s of real time (from 90 s): not yet its 300 s
    assert alarms() == [] and decisions(rt, "warm") == []
    await run(395)
    (a,) = alarms()
    assert (a.device_id, a.status) == ("warm", "active")
    assert a.created_at == pytest.approx(T0 + step + 390)  # the for timer fired at 90 s + 300 s, on the new clock
    assert decisions(rt, "warm") == ["fired"]
    with rt.db.session() as se:
        assert [n.profile_id for n in se.scalars(select(Notification))] == [pid]
    assert rt.pipeline.telemetry.counts["went_offline"] == 1
    assert status() == {"steady": "online", "warm": "online", "dies": "offline"}


@pytest.mark.parametrize("step", [HOUR, -HOUR], ids=["forward", "back"])
async def test_a_cart_touched_just_before_a_step_is_abandoned_on_time(
        tmp_path: Path, clock: SteppingClock, runtime_factory: RuntimeFactory, step: float) -> None:
    """Before the fix: abandoned at once after a step forward, an hour late after a step back."""
    s = settings(tmp_path, {"cart": ("id: cart\npurpose: cart_reminders\ntrigger: {type: cart_abandoned}\n"
                                     "action: {title: t, body: b}\n")})
    s.carts.abandon_after_s = 1800.0
    rt = await runtime_factory(s, serve_api=False)
    pid = enrol(rt, "cart_reminders")
    rt.service.upsert_cart("c1", profile_id=pid, external_id=None, items=[{"sku": "x", "qty": 1}], updated_at=None)
    await live_walk(rt, clock, 300, heard=False)  # touched 5 minutes before the step (stamped by the gateway)
    clock.step(step)
    await live_walk(rt, clock, 1490, heard=False)  # 1790 s since the touch, in time that passed
    assert decisions(rt, "cart") == []
    await live_walk(rt, clock, 20, heard=False)
    assert decisions(rt, "cart") == ["fired"]
    with rt.db.session() as se:
        cart = se.get(Cart, "c1")
        assert cart is not None and cart.abandoned_at is not None


@pytest.mark.parametrize("step", [HOUR, -HOUR], ids=["forward", "back"])
def test_a_step_moves_only_the_stamps_made_before_it_on_either_database(
        tmp_path: Path, db_url: str, step: float) -> None:
    """``Pipeline.wall_stepped`` on SQLite and PostgreSQL: the stamps before the step move by it; a fresh
    stamp of a clock of its own (already right), an offline device, an abandoned cart stay."""
    s = runtime_settings(tmp_path)
    s.database.url = db_url
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "warm.yaml").write_text(WARM)
    s.device_rules.dir = str(tmp_path / "rules")
    db = Database(db_url)
    try:
        db.upgrade()
        now = T0 + step + 100  # the step came 10 s after the last stamp of the old clock (T0 + 90)
        own = T0 + step + 50  # a device's own clock, right all along: 50 s ago
        with db.session() as se:
            ann = Profile(external_id="ann", created_at=T0)
            se.add(ann)
            se.flush()
            se.add_all([Device(id="gw-stamped", kind="sensor", state={}, online=True, last_seen=T0 + 90),
                        Device(id="own-clock", kind="sensor", state={}, online=True, last_seen=own),
                        Device(id="offline", kind="sensor", state={}, online=False, last_seen=T0 + 90)])
            se.flush()
            se.add_all([Cart(id="open", profile_id=ann.id, items=[], updated_at=T0 + 60),
                        Cart(id="done", profile_id=ann.id, items=[], updated_at=T0 + 60, abandoned_at=T0 + 80),
                        RuleStateRecord(device_id="gw-stamped", rule_id="warm", state={
                            "pending": {"warning": T0 + 30}, "streak": {"warning": 2}}, due_at=T0 + 330,
                            updated_at=T0 + 90)])
        pipeline = Pipeline(s, db, CampaignIndex([]), IdentityIndex())
        pipeline.wall_stepped(now, step)
        with db.session() as se:
            seen = {d.id: d.last_seen for d in se.scalars(select(Device))}
            carts_at = {c.id: c.updated_at for c in se.scalars(select(Cart))}
            (st,) = se.scalars(select(RuleStateRecord)).all()
        assert seen == {"gw-stamped": T0 + 90 + step, "own-clock": own, "offline": T0 + 90}
        assert carts_at == {"open": T0 + 60 + step, "done": T0 + 60}
        assert st.state["pending"] == {"warning": T0 + 30 + step} and st.due_at == T0 + 330 + step
    finally:
        db.dispose()


async def test_quiet_hours_follow_the_corrected_clock_and_a_held_send_goes_once(
        tmp_path: Path, clock: SteppingClock, runtime_factory: RuntimeFactory) -> None:
    """The Pi booted an hour slow (07:30 on its clock, 08:30 in the shop) under quiet hours until 08:00: an
    offer is held; NTP steps the clock forward and the held offer goes at the next tick, once; an offer after
    the step goes at once; a step back into the quiet hours holds the next one again."""
    rt = await runtime_factory(settings(tmp_path, {"quiet": (
        "id: quiet\npurpose: offers\ntrigger: {type: enter, zone: a}\naction: {title: t, body: b}\n"
        "limits: {quiet_hours: {start: '21:00', end: '08:00'}}\n")}), serve_api=False)
    people = {}
    for name in ("ann", "bea", "cat"):
        key = f"ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:2:{len(people) + 1}"
        people[name] = (key, int(rt.service.create_profile(NewProfile(
            external_id=name, identifiers=[("beacon", key)], consents={"offers": True}))["id"]))

    def enters(name: str) -> Notification:
        key, pid = people[name]
        t = clock.now()
        rt.pipeline.handle_presence([PresenceEvent("enter", key, t, "a", t, t)])
        with rt.db.session() as s:
            (n,) = s.scalars(select(Notification).where(Notification.profile_id == pid)).all()
            s.expunge(n)
            return n

    def status(n: Notification) -> str:
        with rt.db.session() as s:
            row = s.get(Notification, n.id)
            assert row is not None
            return row.status

    clock.step(-1800)  # 07:30 on the Pi's clock
    ann = enters("ann")
    assert ann.status == "scheduled" and ann.deliver_at == T0  # held until 08:00
    assert rt.pipeline.tick(clock.now()) == []
    clock.step(HOUR)  # NTP: 08:30
    released = rt.pipeline.tick(clock.now()) + rt.pipeline.tick(clock.now() + 1)
    walk(rt, clock, 10, heard=False)
    assert released == [ann.id] and status(ann) != "scheduled"
    bea = enters("bea")  # after the step: outside quiet hours, not held
    assert bea.status != "scheduled" and bea.deliver_at in (None, bea.created_at)
    clock.step(-HOUR)  # back to 07:30: quiet again
    cat = enters("cat")
    assert cat.status == "scheduled" and cat.deliver_at == T0
    walk(rt, clock, 10, heard=False)
    assert status(cat) == "scheduled" and status(ann) != "scheduled"  # nothing released twice or early


@pytest.mark.parametrize("step", [HOUR, -HOUR], ids=["forward", "back"])
async def test_the_days_figures_count_each_visit_once_across_a_step(
        tmp_path: Path, clock: SteppingClock, runtime_factory: RuntimeFactory, step: float) -> None:
    """Two visits of 40 s, the clock stepped between them: the day's figures (what ``/v1/figures`` serves)
    count two visits of about 40 s and one offer, as the rows say: no visit doubled, none an hour long."""
    from gateway.engine.figures import figures

    rt = await runtime_factory(settings(tmp_path, {"hi": (
        "id: hi\npurpose: offers\ntrigger: {type: visit_start}\naction: {title: t, body: b}\n"
        "limits: {cooldown_s: 7200}\n")}), serve_api=False)
    enrol(rt)
    await live_walk(rt, clock, 40, heard=True)
    await live_walk(rt, clock, 120, heard=False)  # she leaves: the visit ends
    clock.step(step)
    await live_walk(rt, clock, 300, heard=False)
    await live_walk(rt, clock, 40, heard=True)  # back five minutes later
    await live_walk(rt, clock, 120, heard=False)
    with rt.db.session() as s:
        f = figures(s, "2026-06-01", "2026-06-01", "UTC", bounce_s=rt.settings.figures.bounce_s,
                    store=rt.settings.store.id, conversion_window_s=3600)
        visits = s.scalars(select(Visit).order_by(Visit.id)).all()
    assert len(visits) == 2 and f["enrolled_visits"] == 2 and f["returning_visits"] == 1
    assert all(v.ended_at is not None and 35 <= v.ended_at - v.started_at <= 45 for v in visits)
    assert f["avg_visit_s"] is not None and 35 <= f["avg_visit_s"] <= 45
    assert f["notifications"]["total"]["notified"] == 1 and decisions(rt, "hi") == ["fired", "cooldown"]
