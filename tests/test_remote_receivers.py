"""Receivers other than our adapter: ESPresense nodes over MQTT and the shop's app over HTTP.

Payload format (the source for every vector below): ESPresense publishes
``espresense/devices/<id>/<room>`` (espresense.com/configuration/mqtt, ``reportDevice`` in
ESPresense ``src/main.cpp``) with the JSON that ``BleFingerprint::fill`` writes
(``lib/BleFingerprint/BleFingerprint.cpp``): mac, id, idType, rssi@1m, rssi, raw, channel,
distance, mean, var, ci, int; ids ``iBeacon:%s-%u-%u``, ``altBeacon:%s-%u-%u`` and
``eddy:<namespace with byte 4 printed twice>-<instance>``; fingerprints such as ``apple:1005:9``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from beacons.remote import (
    BAD_BEACON,
    BAD_RSSI,
    BAD_TOPIC,
    ID_MISMATCH,
    NOT_JSON,
    NOT_OBJECT,
    TOO_LARGE,
    UNMAPPED_ID,
    AppReport,
    RemoteError,
    UnmappedId,
    app_sightings,
    beacon_key,
    parse_espresense,
)
from beacons.types import AltBeacon, EddystoneUID, IBeacon, Sighting
from devices.mqtt import ExtraSubscription, MqttIntake
from devices.mqtt import MqttSettings as IntakeSettings
from gateway.app.config import Settings
from gateway.app.runtime import Runtime
from gateway.clock import VirtualClock
from gateway.presence.settings import ReceiverSettings, ZoneBand
from gateway.profiles.service import NewProfile
from gateway.storage.models import Notification, Visit
from tests.conftest import MosquittoServer, free_port
from tests.fixtures import RuntimeFactory

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_780_300_800.0  # 2026-06-01 08:00 UTC
UUID = "e2c56db5-dffb-48d2-b060-d0f5a71096e0"
ESP_ID = f"iBeacon:{UUID}-100-1"
KEY = f"ibeacon:{UUID}:100:1"
STORE_BEACON = "ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:1:7"


def report(device_id: str | None = ESP_ID, /, **fields: Any) -> bytes:
    """A device report as ESPresense 4.x fills it (values from a node 1.5 m from an iBeacon)."""
    body: dict[str, Any] = {"mac": "d7a1c3e4f501", "id": device_id, "idType": 50, "rssi@1m": -59, "rssi": -63,
                            "raw": 1.58, "channel": 38, "distance": 1.49, "mean": 1.52, "var": 0.05, "ci": 0.13,
                            "int": 1024}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def reason_of(topic: str, payload: bytes) -> str:
    with pytest.raises(RemoteError) as info:
        parse_espresense(topic, payload, T0)
    return info.value.reason_code


# ------------------------------------------------------------------ parsing


def test_ibeacon_report_becomes_a_sighting_with_our_key() -> None:
    s = parse_espresense(f"espresense/devices/{ESP_ID}/shoes", report(), T0)
    assert s == Sighting(KEY, "espresense:shoes", -63, T0, -59)
    # The key is the one our own parser gives for the same beacon, so enrolled profiles match.
    assert s.key == IBeacon(UUID, 100, 1, -59).key


def test_rooms_map_to_configured_receivers_and_prefix_is_configurable() -> None:
    s = parse_espresense(f"shop/devices/{ESP_ID}/back-office", report(), T0, prefix="shop",
                         rooms={"back-office": "rx-office"})
    assert s.receiver == "rx-office"
    assert reason_of(f"shop/devices/{ESP_ID}/x", report()) == BAD_TOPIC  # default prefix is espresense


def test_altbeacon_and_eddystone_ids_map_to_the_parsers_keys() -> None:
    alt = parse_espresense("espresense/devices/altBeacon:" + UUID + "-258-772/hall", report(None), T0)
    beacon_id = UUID.replace("-", "") + "0102" + "0304"
    assert alt.key == AltBeacon(beacon_id, -59, 0, 0x0118).key
    # The firmware prints namespace byte 4 twice (d[6], d[6]): 22 hex digits; a fixed 20 also maps.
    ns, inst = "edd1ebeac04e5defa017", "0123456789ab"
    doubled = ns[:10] + ns[8:10] + ns[10:]
    expected = EddystoneUID(ns, inst, -20).key
    assert beacon_key(f"eddy:{doubled}-{inst}") == expected
    assert beacon_key(f"eddy:{ns}-{inst}") == expected


def test_unusable_rssi_at_1m_falls_back_to_calibration() -> None:
    # ESPresense 3.3.1 reported some tags' power at 1 m as positive (ESPresense issue #1286).
    s = parse_espresense(f"espresense/devices/{ESP_ID}/shoes", report(**{"rssi@1m": 58}), T0)
    assert s.tx_power is None and s.rssi == -63
    assert parse_espresense(f"espresense/devices/{ESP_ID}/shoes", report(**{"rssi@1m": None}), T0).tx_power is None


@pytest.mark.parametrize("device_id", ["apple:1005:9-26", "d7a1c3e4f501", "name:alices-watch", "md:0075:24",
                                       "irk:00112233445566778899aabbccddeeff", "known:d7a1c3e4f501",
                                       "msft:cdp:0102", "alice-phone"])
def test_fingerprints_are_unmapped_not_stored(device_id: str) -> None:
    with pytest.raises(UnmappedId) as info:
        parse_espresense(f"espresense/devices/{device_id}/shoes", report(device_id), T0)
    assert info.value.reason_code == UNMAPPED_ID and info.value.quiet


@pytest.mark.parametrize("topic, payload, reason", [
    ("espresense/devices/" + ESP_ID, report(), BAD_TOPIC),
    ("espresense/devices/" + ESP_ID + "/shoes/extra", report(), BAD_TOPIC),
    ("espresense/rooms/shoes/telemetry", b"{}", BAD_TOPIC),
    ("espresense/devices/" + ESP_ID + "/shoes", b"\xff\xfe", NOT_JSON),
    ("espresense/devices/" + ESP_ID + "/shoes", b'{"rssi": -60', NOT_JSON),
    ("espresense/devices/" + ESP_ID + "/shoes", b"[-60]", NOT_OBJECT),
    ("espresense/devices/" + ESP_ID + "/shoes", report(rssi=None), BAD_RSSI),
    ("espresense/devices/" + ESP_ID + "/shoes", report(rssi=0), BAD_RSSI),
    ("espresense/devices/" + ESP_ID + "/shoes", report(rssi=127), BAD_RSSI),
    ("espresense/devices/" + ESP_ID + "/shoes", report(rssi=True), BAD_RSSI),
    ("espresense/devices/" + ESP_ID + "/shoes", report(rssi="-60"), BAD_RSSI),
    ("espresense/devices/" + ESP_ID + "/shoes", report(rssi=-60.5), BAD_RSSI),
    ("espresense/devices/" + ESP_ID + "/shoes", report(id="iBeacon:other"), ID_MISMATCH),
    ("espresense/devices/iBeacon:not-a-uuid-1-2/shoes", report("iBeacon:not-a-uuid-1-2"), BAD_BEACON),
    (f"espresense/devices/iBeacon:{UUID}-65536-1/shoes", report(f"iBeacon:{UUID}-65536-1"), BAD_BEACON),
    ("espresense/devices/eddy:00-11/shoes", report("eddy:00-11"), BAD_BEACON),
    ("espresense/devices/" + ESP_ID + "/shoes", b" " * 5000, TOO_LARGE),
])
def test_malformed_reports_are_rejected_with_a_reason(topic: str, payload: bytes, reason: str) -> None:
    assert reason_of(topic, payload) == reason


@settings(max_examples=250, deadline=None)
@given(topic=st.one_of(st.text(max_size=80), st.builds(lambda i, r: f"espresense/devices/{i}/{r}",
                                                         st.text(max_size=60), st.text(max_size=20))),
       payload=st.one_of(st.binary(max_size=300), st.builds(
           lambda d: json.dumps(d).encode(),
           st.dictionaries(st.sampled_from(["id", "rssi", "rssi@1m", "distance", "mac"]),
                           st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                                     st.floats(allow_nan=False), st.text(max_size=10)), max_size=5))))
def test_fuzz_any_input_gives_a_sighting_or_a_counted_reason(topic: str, payload: bytes) -> None:
    try:
        s = parse_espresense(topic, payload, T0)
    except RemoteError as exc:
        assert exc.reason_code  # every reject has a reason the intake counts
    else:
        assert -127 < s.rssi < 0 and s.receiver.startswith("espresense:")
        assert s.key.split(":")[0] in ("ibeacon", "altbeacon", "eddystone_uid")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_fuzz_ids_map_or_are_rejected(device_id: str) -> None:
    try:
        key = beacon_key(device_id)
    except RemoteError:
        return
    assert key == key.lower() and key.split(":")[0] in ("ibeacon", "altbeacon", "eddystone_uid")


def test_app_reports_window_and_keys() -> None:
    got = app_sightings(5, [AppReport(STORE_BEACON, -60, -59, T0 - 1), AppReport(STORE_BEACON, -61)], T0,
                        max_age_s=30, max_ahead_s=5)
    assert got == [Sighting("app:5", f"beacon:{STORE_BEACON}", -60, T0 - 1, -59),
                   Sighting("app:5", f"beacon:{STORE_BEACON}", -61, T0, None)]
    for bad in (T0 + 6, T0 - 31, float("nan")):
        with pytest.raises(RemoteError, match=r"future|old|finite"):
            app_sightings(5, [AppReport(STORE_BEACON, -60, None, bad)], T0, max_age_s=30, max_ahead_s=5)


# ------------------------------------------------------------------ MQTT intake, real broker


async def test_intake_routes_espresense_and_counts_rejects(mosquitto: MosquittoServer, mqtt_client: Any) -> None:
    prefix = f"esp{secrets.token_hex(3)}"
    sightings: asyncio.Queue[Sighting] = asyncio.Queue()
    intake = MqttIntake(IntakeSettings(host=mosquitto.host, port=mosquitto.port,
                                       client_id=f"gw-remote-{secrets.token_hex(4)}",
                                       topic_prefix=f"t{secrets.token_hex(3)}"), clock=lambda: T0)
    intake.add_subscription(ExtraSubscription(
        "espresense", f"{prefix}/devices/#",
        lambda topic, payload, at: parse_espresense(topic, payload, at, prefix=prefix), sightings, (RemoteError,)))
    await intake.start()
    try:
        assert await intake.wait_connected(10), intake.last_error
        pub = mqtt_client(mosquitto.host, mosquitto.port)
        assert pub.wait_connected()
        pub.publish_wait(f"{prefix}/devices/{ESP_ID}/shoes", report())
        pub.publish_wait(f"{prefix}/devices/{ESP_ID}/shoes", b"not json")
        pub.publish_wait(f"{prefix}/devices/apple:1005:9-26/shoes", report("apple:1005:9-26"))
        pub.publish_wait(f"{prefix}/devices/{ESP_ID}/shoes", report(rssi=-70))
        first = await asyncio.wait_for(sightings.get(), 10)
        second = await asyncio.wait_for(sightings.get(), 10)
        assert (first.key, first.rssi, second.rssi) == (KEY, -63, -70)
        assert first.receiver == "espresense:shoes" and first.time == T0
        assert intake.rejected["espresense:not_json"] == 1
        assert intake.rejected["espresense:unmapped_id"] == 1  # counted, nothing about it queued
        assert intake.extra_accepted["espresense"] == 2 and sightings.empty()
        assert intake.batches.empty()
    finally:
        await intake.stop()


# ------------------------------------------------------------------ the gateway, end to end


async def until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)  # polling what the MQTT thread / server does, not waiting for time
    return True


@pytest.fixture
async def gateway(mosquitto: MosquittoServer, tmp_path: Path, clock: VirtualClock,
                  runtime_factory: RuntimeFactory) -> tuple[Runtime, VirtualClock, str]:
    prefix = f"esp{secrets.token_hex(3)}"
    settings = Settings()
    settings.data_dir = str(tmp_path)
    settings.database.url = f"sqlite:///{tmp_path / 'gw.db'}"
    settings.api.port = free_port()
    settings.api.admin_key = "test-admin-key-0123456789"
    settings.campaigns.dir = str(ROOT / "examples/campaigns")
    settings.presence.dwell_every_s = 5.0
    settings.remote.espresense_prefix = prefix
    settings.remote.rooms = {"shoe-corner": "rx-shoes"}
    settings.receivers = [
        ReceiverSettings("rx-shoes", [ZoneBand("shoes", 3.0)], measured_power=-59),
        ReceiverSettings(f"beacon:{STORE_BEACON}", [ZoneBand("checkout", 2.0), ZoneBand("shop", 10.0)]),
    ]
    intake = MqttIntake(IntakeSettings(host=mosquitto.host, port=mosquitto.port,
                                       client_id=f"gw-remote-{secrets.token_hex(4)}",
                                       topic_prefix=f"t{secrets.token_hex(3)}"), clock=clock.now)
    rt = await runtime_factory(settings, mqtt=intake)
    assert await intake.wait_connected(10), intake.last_error
    return rt, clock, prefix


def enrol_alice(rt: Runtime) -> int:
    view = rt.service.create_profile(NewProfile(
        external_id="alice", name="Alice Martin", attributes={"tier": "gold"}, identifiers=[("beacon", KEY)],
        consents={"offers": True}))
    return int(view["id"])


async def test_espresense_node_puts_the_customer_in_its_zone_and_fires_the_dwell_offer(
        gateway: tuple[Runtime, VirtualClock, str], mqtt_client: Any, mosquitto: MosquittoServer) -> None:
    rt, clock, prefix = gateway
    pid = enrol_alice(rt)
    pub = mqtt_client(mosquitto.host, mosquitto.port)
    assert pub.wait_connected()
    topic = f"{prefix}/devices/{ESP_ID}/shoe-corner"
    pub.publish_wait(f"{prefix}/devices/apple:1005:9-26/shoe-corner", report("apple:1005:9-26"))  # a phone
    for step in range(30):  # one report a second, 1.5 m from the shoe-corner node
        clock.set(T0 + step)
        pub.publish_wait(topic, report(rssi=-63))
        assert await until(lambda n=step + 1: rt.pipeline.figures["remote_sightings"] >= n)
    await rt.flush()
    track = rt.pipeline.presence.tracks[KEY]
    assert track.zone == "shoes"
    assert rt.mqtt.rejected["espresense:unmapped_id"] == 1
    assert "apple:1005:9-26" not in rt.pipeline.presence.tracks
    with rt.db.session() as s:
        visit = s.scalars(select(Visit).where(Visit.profile_id == pid)).one()
        assert visit.zones == ["shoes"]
        offers = s.scalars(select(Notification).where(Notification.profile_id == pid)).all()
        assert [n.campaign_id for n in offers] == ["shoes-dwell-offer"]


async def test_app_reported_store_beacon_places_the_customer(gateway: tuple[Runtime, VirtualClock, str]) -> None:
    rt, clock, _ = gateway
    pid = enrol_alice(rt)
    token, _ = rt.service.issue_token(pid)
    auth = {"Authorization": f"Bearer {token}"}
    beacon = {"uuid": "F7826DA6-4FA2-4E98-8024-BC5B71E0893E", "major": 1, "minor": 7}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{rt.settings.api.port}", timeout=10) as client:
        url = "/v1/me/sightings"
        bad_requests = [
            ({}, [{"beacon": beacon, "rssi": -60}], 401),
            ({"Authorization": "Bearer not-a-token"}, [{"beacon": beacon, "rssi": -60}], 401),
            (auth, [], 422),
            (auth, [{"beacon": beacon, "rssi": -60}] * 101, 422),
            (auth, [{"beacon": beacon, "rssi": 0}], 422),
            (auth, [{"beacon": beacon, "rssi": -60, "extra": 1}], 422),
            (auth, [{"beacon": {"uuid": "nope", "major": 1, "minor": 7}, "rssi": -60}], 422),
            (auth, [{"beacon": "not a key", "rssi": -60}], 422),
            (auth, [{"beacon": beacon, "rssi": -60}, {"beacon": beacon, "rssi": -60, "time": T0 + 60}], 422),
            (auth, [{"beacon": beacon, "rssi": -60, "time": T0 - 3600}], 422),
        ]
        for headers, body, status in bad_requests:
            r = await client.post(url, json=body, headers=headers)
            assert r.status_code == status, (body, r.text)
            assert r.headers["content-type"] == "application/problem+json" and r.json()["detail"]
        r = await client.post(url, json=[{"beacon": beacon, "rssi": -60, "time": T0 + 60}], headers=auth)
        assert "future" in r.json()["detail"]
        await rt.flush()
        assert rt.pipeline.figures["remote_sightings"] == 0 and f"app:{pid}" not in rt.pipeline.presence.tracks

        # An unknown store beacon is counted, not used; the configured one places Alice at the checkout.
        r = await client.post(url, json=[{"beacon": "ibeacon:00000000-0000-0000-0000-000000000000:9:9",
                                          "rssi": -60}], headers=auth)
        assert r.status_code == 202 and r.json() == {"received": 1, "accepted": 0, "unknown_beacon": 1}
        for step in range(3):
            clock.set(T0 + step)
            r = await client.post(url, json=[{"beacon": beacon, "rssi": -55, "tx_power": -59}], headers=auth)
            assert r.status_code == 202 and r.json() == {"received": 1, "accepted": 1, "unknown_beacon": 0}
        assert await until(lambda: rt.pipeline.figures["remote_sightings"] >= 3)
        await rt.flush()
    assert rt.pipeline.presence.tracks[f"app:{pid}"].zone == "checkout"
    with rt.db.session() as s:
        visit = s.scalars(select(Visit).where(Visit.profile_id == pid)).one()
        assert visit.zones == ["checkout"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([f"espresense/devices/{ESP_ID}/shoes", "espresense/devices/x/y",
                                           "espresense/devices/apple:1005:9-26/shoes", "espresense/devices//"]),
                          st.one_of(st.binary(max_size=64), st.just(report()), st.just(report(rssi=0)))),
                max_size=20))
def test_fuzz_intake_counts_every_message(messages: list[tuple[str, bytes]]) -> None:
    """Whatever arrives on the extra subscription is either queued or counted under a reason."""
    intake = MqttIntake(IntakeSettings())
    extra = ExtraSubscription("espresense", "espresense/devices/#", parse_espresense, asyncio.Queue(), (RemoteError,))
    for topic, payload in messages:
        intake._on_extra(extra, topic, payload)
    counted = sum(n for reason, n in intake.rejected.items() if reason.startswith("espresense:"))
    assert counted + intake.extra_accepted["espresense"] == len(messages)
    assert len(intake._pending_extra) == intake.extra_accepted["espresense"]


def test_remote_settings_from_file_and_environment(tmp_path: Path) -> None:
    from gateway.app.config import ConfigError, load_settings

    path = tmp_path / "gw.toml"
    path.write_text('[remote]\nrooms = { shoe-corner = "rx-shoes" }\nespresense_prefix = "shop"\n')
    s = load_settings(path, environ={"GATEWAY_REMOTE_APP_MAX_AGE_S": "12"})
    assert s.remote.rooms == {"shoe-corner": "rx-shoes"} and s.remote.espresense_prefix == "shop"
    assert s.remote.app_max_age_s == 12.0
    s = load_settings(path, environ={"GATEWAY_REMOTE_ROOMS": "hall=rx-hall, till = rx-till"})
    assert s.remote.rooms == {"hall": "rx-hall", "till": "rx-till"}
    with pytest.raises(ConfigError, match="GATEWAY_REMOTE_ROOMS: expected key=value"):
        load_settings(path, environ={"GATEWAY_REMOTE_ROOMS": "hall"})
    path.write_text("[remote]\nrooms = 3\n")
    with pytest.raises(ConfigError, match=r"remote\.rooms: expected a table"):
        load_settings(path, environ={})
