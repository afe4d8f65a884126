"""Zone occupancy out to Home Assistant over MQTT, with device-based discovery.

The pure part (gateway/app/homeassistant.py's OccupancyPublisher: counts in, retained messages out, the
per-zone rate limit on a virtual clock, ids fit for Home Assistant) is tested directly; the rest on a real
Mosquitto with a live gateway: a subscriber reads the retained discovery config and checks each
component's keys against what Home Assistant accepts for its platform, states follow simulated people in
and out, Home Assistant's birth message brings a fresh announcement, the last will and a clean stop turn
availability offline, and nothing names a person unless customers are tracked with their consent.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from devices.mqtt import MqttIntake
from devices.mqtt import MqttSettings as IntakeSettings
from gateway.app.config import ConfigError, Settings, load_settings
from gateway.app.homeassistant import Layout, OccupancyPublisher, fit_id, occupancy, zone_ids
from gateway.app.runtime import Runtime
from gateway.clock import VirtualClock
from gateway.presence.settings import ReceiverSettings, ZoneBand
from gateway.profiles.service import NewProfile
from tests.conftest import MosquittoServer, PahoTestClient
from tests.fixtures import RuntimeFactory
from tests.live_gateway import beacon, live_settings, walk_in

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- what Home Assistant accepts
# From Home Assistant's MQTT integration (home-assistant/core, homeassistant/components/mqtt/): config.py
# (MQTT_BASE_SCHEMA, MQTT_RO_SCHEMA), schemas.py (MQTT_AVAILABILITY_SCHEMA, MQTT_ENTITY_COMMON_SCHEMA,
# MQTT_ENTITY_DEVICE_INFO_SCHEMA, MQTT_ORIGIN_INFO_SCHEMA), binary_sensor.py, sensor.py and
# device_tracker.py (their PLATFORM_SCHEMA / DISCOVERY_SCHEMA), discovery.py (device-based discovery: the
# root's shared options, "p" per component) and the docs' "Device discovery payload"
# (home-assistant.io source/_integrations/mqtt.markdown). The discovery schemas drop unknown keys silently
# (vol.REMOVE_EXTRA), which is why a key outside these lists is a bug: Home Assistant would ignore it.
BASE = {"qos", "encoding"}
AVAILABILITY = {"availability_topic", "availability_template", "payload_available", "payload_not_available",
                "availability_mode", "availability"}
ENTITY_COMMON = AVAILABILITY | {"device", "origin", "enabled_by_default", "entity_category", "icon",
                                "json_attributes_topic", "json_attributes_template", "object_id", "unique_id",
                                "default_entity_id", "entity_picture"}
READ_ONLY = BASE | {"state_topic", "value_template"}
PLATFORM_KEYS: dict[str, set[str]] = {
    "binary_sensor": READ_ONLY | ENTITY_COMMON | {"name", "device_class", "expire_after", "force_update",
                                                  "off_delay", "payload_off", "payload_on"},
    "sensor": READ_ONLY | ENTITY_COMMON | {"name", "device_class", "expire_after", "force_update",
                                           "last_reset_value_template", "options", "suggested_display_precision",
                                           "state_class", "unit_of_measurement"},
    "device_tracker": READ_ONLY | ENTITY_COMMON | {"name", "payload_home", "payload_not_home", "payload_reset",
                                                   "source_type"},
}
REQUIRED: dict[str, set[str]] = {  # "p" and unique_id for every entity of a device config; a state topic
    "binary_sensor": {"p", "unique_id", "state_topic"},
    "sensor": {"p", "unique_id", "state_topic"},
    "device_tracker": {"p", "unique_id", "state_topic"},
}
DEVICE_ROOT = {"dev", "device", "o", "origin", "cmps", "components", "state_topic", "command_topic", "qos",
               "encoding"} | AVAILABILITY
DEVICE_INFO = {"identifiers", "connections", "manufacturer", "model", "model_id", "name", "hw_version",
               "serial_number", "sw_version", "via_device", "suggested_area", "configuration_url"}
ORIGIN_INFO = {"name", "sw_version", "support_url"}
BINARY_SENSOR_CLASSES = {"occupancy", "connectivity", "presence", "motion"}  # the ones this gateway may use
ID = re.compile(r"[a-zA-Z0-9_-]+")


def check_device_config(topic: str, config: dict[str, Any]) -> list[str]:
    """Every problem Home Assistant would have with this device config (empty: none)."""
    problems: list[str] = []
    if not re.fullmatch(r"[^/]+/device/[a-zA-Z0-9_-]+/config", topic):
        problems.append(f"discovery topic {topic!r} is not <prefix>/device/<id>/config with [a-zA-Z0-9_-]")
    problems += [f"root key {k!r} unknown" for k in set(config) - DEVICE_ROOT]
    dev, origin, cmps = config.get("dev"), config.get("o"), config.get("cmps")
    if not isinstance(dev, dict) or not dev.get("identifiers"):
        problems.append("dev with identifiers is required")
    else:
        problems += [f"dev key {k!r} unknown" for k in set(dev) - DEVICE_INFO]
    if not isinstance(origin, dict) or not origin.get("name"):
        problems.append("o with a name is required")
    else:
        problems += [f"o key {k!r} unknown" for k in set(origin) - ORIGIN_INFO]
    if not isinstance(cmps, dict) or not cmps:
        return [*problems, "cmps is required"]
    unique: set[str] = set()
    for cid, c in cmps.items():
        if not ID.fullmatch(cid):
            problems.append(f"component id {cid!r} has characters outside [a-zA-Z0-9_-]")
        platform = c.get("p")
        if platform not in PLATFORM_KEYS:
            problems.append(f"{cid}: platform {platform!r} is not one this gateway announces")
            continue
        if set(c) == {"p"}:
            continue  # a removal stub
        problems += [f"{cid}: key {k!r} is not a {platform} option" for k in set(c) - PLATFORM_KEYS[platform] - {"p"}]
        problems += [f"{cid}: required key {k!r} missing" for k in REQUIRED[platform] - set(c)]
        if c.get("unique_id") in unique:
            problems.append(f"{cid}: unique_id {c.get('unique_id')!r} used twice")
        unique.add(c.get("unique_id", ""))
        if platform == "binary_sensor" and c.get("device_class") not in BINARY_SENSOR_CLASSES:
            problems.append(f"{cid}: device_class {c.get('device_class')!r}")
        if platform == "sensor" and c.get("state_class") != "measurement":
            problems.append(f"{cid}: a count is a measurement")
    return problems


# ---------------------------------------------------------------- the pure part


LAYOUT = Layout("stores", "s1", "s1", "homeassistant", "stores/s1/gateways/gw-s1/status")


def by_topic(messages: list[tuple[str, bytes, bool]]) -> dict[str, bytes]:
    assert all(retain for _, _, retain in messages), "every state and config is retained"
    return {t: p for t, p, _ in messages}


def test_ids_are_fit_for_home_assistant_and_never_collide() -> None:
    names = ["shop", "Shoes:Kids", "café", "Shoes/Kids", "Shoes Kids", "SHOP", "", "🙂"]
    ids = zone_ids(names)
    assert ids["shop"] == "shop"  # already fit: unchanged, so a config kept from before keeps its entities
    assert all(ID.fullmatch(i) for i in ids.values()), ids
    assert len(set(ids.values())) == len(names), ids
    assert ids["café"].startswith("cafe_") and ids["Shoes:Kids"].startswith("Shoes_Kids_")
    assert zone_ids(names) == ids  # stable from run to run: Home Assistant keys its entities by them
    assert fit_id("store-001") == "store-001" and ID.fullmatch(fit_id("Grand'Place / Brussels"))


def test_states_follow_the_counts_at_most_once_a_second_per_zone() -> None:
    pub = OccupancyPublisher(LAYOUT, ["shop", "Shoes:Kids"], min_interval_s=1.0)
    first = by_topic(pub.announce(100.0))
    kids = zone_ids(["shop", "Shoes:Kids"])["Shoes:Kids"]
    assert first["stores/s1/presence/shop/count"] == b"0" and first["stores/s1/presence/shop/occupied"] == b"OFF"
    assert first[f"stores/s1/presence/{kids}/occupied"] == b"OFF"
    assert pub.update({"shop": 0}, {}, 101.0) == []  # nothing changed: nothing sent
    assert by_topic(pub.update({"shop": 1}, {}, 101.5)) == {"stores/s1/presence/shop/count": b"1",
                                                            "stores/s1/presence/shop/occupied": b"ON"}
    # A busy floor: within the second, changes coalesce and only the latest goes out once it has passed.
    assert pub.update({"shop": 2}, {}, 101.9) == [] and pub.update({"shop": 3, "Shoes:Kids": 1}, {}, 102.0) != []
    assert pub.pending()
    later = by_topic(pub.update({"shop": 3, "Shoes:Kids": 1}, {}, 102.5))
    assert later == {"stores/s1/presence/shop/count": b"3", "stores/s1/presence/shop/occupied": b"ON"}
    assert not pub.pending()
    gone = by_topic(pub.update({}, {}, 104.0))  # everyone left
    assert gone["stores/s1/presence/shop/occupied"] == gone[f"stores/s1/presence/{kids}/occupied"] == b"OFF"
    assert pub.update({"nowhere": 5}, {}, 106.0) == []  # a zone not in the config is ignored


def test_the_discovery_config_has_only_keys_home_assistant_knows() -> None:
    pub = OccupancyPublisher(LAYOUT, ["shop", "Shoes:Kids", "café"], store_name="Main St", support_url="https://x.test/")
    (topic, body, retain), *_ = pub.announce(0.0)
    config = json.loads(body)
    assert topic == "homeassistant/device/s1/config" and retain
    assert check_device_config(topic, config) == []
    assert config["o"] == {"name": "engagement-gateway", "sw_version": config["dev"]["sw_version"],
                           "support_url": "https://x.test/"}
    platforms = sorted(c["p"] for c in config["cmps"].values())
    assert platforms == ["binary_sensor"] * 4 + ["sensor"] * 3  # two per zone, and the gateway's connectivity
    gateway = config["cmps"]["s1_gateway"]
    assert gateway["device_class"] == "connectivity" and gateway["state_topic"] == LAYOUT.availability_topic
    assert "availability_topic" not in gateway  # offline shows as off, not as unavailable
    for cid, c in config["cmps"].items():
        if cid != "s1_gateway":
            assert c["availability_topic"] == LAYOUT.availability_topic, cid
    bad = dict(config, cmps={"x": {"p": "sensor", "unique_id": "x", "state_topic": "t", "state_class": "measurement",
                                   "unit": "people"}})
    assert check_device_config(topic, bad) == ["x: key 'unit' is not a sensor option"]  # the checker can fail


def test_a_zone_taken_out_of_the_config_is_removed_then_left_out() -> None:
    before = OccupancyPublisher(LAYOUT, ["shop", "till"]).announced()
    pub = OccupancyPublisher(LAYOUT, ["shop"], previous=before)
    messages = pub.announce(0.0)
    stub, cleared_count, cleared_occupied, final = messages[:4]
    assert json.loads(stub[1])["cmps"]["s1_till_count"] == {"p": "sensor"}  # Home Assistant removes it
    assert {cleared_count[0], cleared_occupied[0]} == {"stores/s1/presence/till/count",
                                                       "stores/s1/presence/till/occupied"}
    assert cleared_count[1] == cleared_occupied[1] == b""  # its retained states go from the broker
    assert final[0] == stub[0] and "s1_till_count" not in json.loads(final[1])["cmps"]
    assert check_device_config(final[0], json.loads(final[1])) == []
    assert all(t != "stores/s1/presence/till/count" for t, _, _ in pub.announce(1.0))  # once is enough


def test_occupancy_counts_people_not_tags() -> None:
    class Track:
        def __init__(self, zone: str | None) -> None:
            self.zone = zone

    tracks = [("tag:a", Track("shop")), ("app:1", Track("shop")), ("tag:b", Track("shop")), ("tag:c", Track(None)),
              ("tag:d", Track("till"))]
    owner = {"tag:a": 1, "app:1": 1, "tag:d": 2}
    totals, where = occupancy(tracks, owner.get)
    assert totals == {"shop": 2, "till": 1}  # her tag and her app are one person; the stranger is another
    assert where == {1: "shop", 2: "till"}


def test_the_settings_refuse_what_home_assistant_cannot_take(tmp_path: Path) -> None:
    toml = tmp_path / "gateway.toml"
    toml.write_text('[homeassistant]\nenabled = true\nnode_id = "main st"\n')
    with pytest.raises(ConfigError, match=r"line 3: homeassistant.node_id: only letters"):
        load_settings(toml, environ={})
    toml.write_text('[homeassistant]\ntrack_purpose = "spying"\n')
    with pytest.raises(ConfigError, match=r"line 2: homeassistant.track_purpose: expected one of"):
        load_settings(toml, environ={})
    toml.write_text('[homeassistant]\ndiscovery_prefix = "ha/#"\n')
    with pytest.raises(ConfigError, match=r"homeassistant\.discovery_prefix"):
        load_settings(toml, environ={})
    toml.write_text('[mqtt]\nenabled = false\n\n[homeassistant]\nenabled = true\n')  # it would publish nothing
    with pytest.raises(ConfigError, match=r"line 5: homeassistant\.enabled: needs \[mqtt\] enabled"):
        load_settings(toml, environ={})
    s = load_settings(None, environ={"GATEWAY_HOMEASSISTANT_ENABLED": "true"})
    assert s.homeassistant.enabled and not s.homeassistant.track_customers  # off unless asked for


def test_the_example_config_documents_the_section() -> None:
    text = (ROOT / "gateway/examples/gateway.toml").read_text()
    assert "[homeassistant]" in text and "track_customers = false" in text


# ---------------------------------------------------------------- on a real broker


class Watcher:
    """A subscriber to the discovery prefix and the gateway's topics, keeping the newest message per topic."""

    def __init__(self, client: PahoTestClient, *filters: str) -> None:
        self.client = client
        for f in filters:
            client.subscribe(f)

    def last(self, topic: str) -> bytes | None:
        for m in reversed(list(self.client.messages)):
            if m.topic == topic:
                return bytes(m.payload)
        return None

    def count(self, topic: str) -> int:
        return sum(1 for m in list(self.client.messages) if m.topic == topic)

    async def until(self, topic: str, payload: bytes | Callable[[bytes], bool], timeout: float = 10.0) -> bytes:
        def ok(_: list[mqtt.MQTTMessage]) -> bool:
            got = self.last(topic)
            return got is not None and (payload(got) if callable(payload) else got == payload)

        assert await asyncio.to_thread(self.client.wait_for, ok, timeout), (
            f"{topic}: waited for {payload!r}, last {self.last(topic)!r}")
        got = self.last(topic)
        assert got is not None
        return got

    async def seen(self, topic: str, predicate: Callable[[bytes], bool], after: int = -1,
                   timeout: float = 10.0) -> tuple[int, bytes]:
        """The first message on ``topic`` past index ``after`` that ``predicate`` holds for (not only the last:
        messages published back to back may both have arrived), with its index."""
        def match() -> tuple[int, bytes] | None:
            for i, m in enumerate(list(self.client.messages)):
                if i > after and m.topic == topic and predicate(bytes(m.payload)):
                    return i, bytes(m.payload)
            return None

        assert await asyncio.to_thread(self.client.wait_for, lambda _: match() is not None, timeout), topic
        found = match()
        assert found is not None
        return found

    def topics(self) -> list[str]:
        return [m.topic for m in list(self.client.messages)]


def ha_settings(tmp_path: Path, intake: MqttIntake, discovery: str) -> Settings:
    s = live_settings(tmp_path)
    s.store.id, s.store.name = "s1", "Main St"
    s.mqtt.topic_prefix = intake.settings.topic_prefix
    s.homeassistant.enabled = True
    s.homeassistant.discovery_prefix = discovery
    s.receivers = [ReceiverSettings(id="rx", zones=[ZoneBand("Shoes:Kids", 50.0)], measured_power=-59)]
    return s


def new_intake(broker: MosquittoServer, clock: VirtualClock, prefix: str | None = None) -> MqttIntake:
    return MqttIntake(IntakeSettings(host=broker.host, port=broker.port, client_id=f"gw-ha-{secrets.token_hex(4)}",
                                     store_id="s1", topic_prefix=prefix or f"t{secrets.token_hex(4)}",
                                     reconnect_min_delay=1,
                                     reconnect_max_delay=2, session_expiry=0), clock=clock.now)


@pytest.fixture
def discovery() -> Iterator[str]:
    yield f"ha{secrets.token_hex(4)}"  # a discovery prefix of the test's own on the session's broker


async def start(runtime_factory: RuntimeFactory, settings: Settings, intake: MqttIntake) -> Runtime:
    rt = await runtime_factory(settings, mqtt=intake, serve_api=False)
    assert await intake.wait_connected(10)
    return rt


async def test_home_assistant_sees_the_zone_fill_and_empty(
        tmp_path: Path, mosquitto: MosquittoServer, mqtt_client: Callable[..., PahoTestClient], clock: VirtualClock,
        runtime_factory: RuntimeFactory, discovery: str) -> None:
    intake = new_intake(mosquitto, clock)
    rt = await start(runtime_factory, ha_settings(tmp_path, intake, discovery), intake)
    prefix = intake.settings.topic_prefix
    ha = Watcher(mqtt_client(mosquitto.host, mosquitto.port), f"{discovery}/#", f"{prefix}/#")
    kids = zone_ids(["Shoes:Kids"])["Shoes:Kids"]
    config_topic = f"{discovery}/device/s1/config"
    config = json.loads(await ha.until(config_topic, lambda b: bool(b)))
    assert check_device_config(config_topic, config) == []
    assert config["dev"]["identifiers"] == ["s1"] and config["dev"]["name"] == "Main St presence"
    occupied = config["cmps"][f"s1_{kids}_occupied"]
    assert occupied["device_class"] == "occupancy" and occupied["name"] == "Shoes:Kids occupied"
    assert occupied["availability_topic"] == intake.status_topic  # the intake's last will says offline
    count_topic = config["cmps"][f"s1_{kids}_count"]["state_topic"]
    assert count_topic == f"{prefix}/s1/presence/{kids}/count"
    assert await ha.until(occupied["state_topic"], b"OFF") and await ha.until(count_topic, b"0")
    assert await ha.until(intake.status_topic, b"online")

    clock.advance(2)  # past the announcement's second: a zone's state goes out at most once a second
    rt.inject(walk_in(1, clock.now()))  # a stranger walks in
    await rt.flush()
    await ha.until(count_topic, b"1")
    assert await ha.until(occupied["state_topic"], b"ON")

    clock.advance(rt.settings.presence.exit_after_s + 5)  # silence: she has left
    rt.tick()
    await rt.flush()
    await ha.until(count_topic, b"0")
    assert await ha.until(occupied["state_topic"], b"OFF")

    # A subscriber that comes later (Home Assistant restarting) gets every retained state at once.
    late = Watcher(mqtt_client(mosquitto.host, mosquitto.port), f"{discovery}/#", f"{prefix}/#")
    assert await late.until(count_topic, b"0") and await late.until(config_topic, lambda b: bool(b))

    # Home Assistant's birth message: a fresh announcement, and the states again.
    before = ha.count(config_topic)
    mqtt_client(mosquitto.host, mosquitto.port).publish_wait(f"{discovery}/status", "online")
    assert await asyncio.to_thread(ha.client.wait_for, lambda _: ha.count(config_topic) > before, 10)
    assert await asyncio.to_thread(ha.client.wait_for, lambda _: ha.count(count_topic) >= 4, 10)
    mqtt_client(mosquitto.host, mosquitto.port).publish_wait(f"{discovery}/status", "offline")

    await runtime_factory.stop(rt)  # a clean stop says offline, retained
    assert await ha.until(intake.status_topic, b"offline")
    assert not any("ibeacon" in t or ":" in t for t in ha.topics())
    clear(mosquitto, config_topic, count_topic, occupied["state_topic"], intake.status_topic)


async def test_nothing_names_a_person_unless_tracked_with_consent(
        tmp_path: Path, mosquitto: MosquittoServer, mqtt_client: Callable[..., PahoTestClient], clock: VirtualClock,
        runtime_factory: RuntimeFactory, discovery: str) -> None:
    intake = new_intake(mosquitto, clock)
    settings = ha_settings(tmp_path, intake, discovery)
    rt = await start(runtime_factory, settings, intake)
    prefix = intake.settings.topic_prefix
    ha = Watcher(mqtt_client(mosquitto.host, mosquitto.port), f"{discovery}/#", f"{prefix}/#")
    alice = rt.service.create_profile(NewProfile(external_id="alice", name="Alice Liddell",
                                                 identifiers=[("beacon", beacon(7))],
                                                 consents={"offers": True, "presence_sharing": True}))["id"]
    clock.advance(2)
    rt.inject(walk_in(7, clock.now()))
    await rt.flush()
    kids = zone_ids(["Shoes:Kids"])["Shoes:Kids"]
    await ha.until(f"{prefix}/s1/presence/{kids}/count", b"1")
    await runtime_factory.stop(rt)
    seen = b" ".join([m.topic.encode() + b" " + bytes(m.payload) for m in list(ha.client.messages)])
    assert b"Alice" not in seen and b"customer_" not in seen and b"device_tracker" not in seen
    assert beacon(7).encode() not in seen and b"02:00:00:00:00:07" not in seen and b"/customers/" not in seen

    # Tracking on: only she who consented, by first name, her zone; never a beacon address.
    settings.homeassistant.track_customers = True
    intake2 = new_intake(mosquitto, clock)
    settings.mqtt.topic_prefix = prefix = intake2.settings.topic_prefix
    rt = await start(runtime_factory, settings, intake2)
    ha2 = Watcher(mqtt_client(mosquitto.host, mosquitto.port), f"{discovery}/#", f"{prefix}/#")
    bob = rt.service.create_profile(NewProfile(external_id="bob", name="Bob", identifiers=[("beacon", beacon(8))],
                                               consents={"offers": True, "analytics": True}))["id"]  # not this one
    clock.advance(2)
    rt.inject([*walk_in(7, clock.now()), *walk_in(8, clock.now())])
    await rt.flush()
    config_topic = f"{discovery}/device/s1/config"

    def trackers(body: bytes) -> list[dict[str, Any]]:
        return [c for c in json.loads(body)["cmps"].values() if c.get("p") == "device_tracker" and len(c) > 1]

    body = await ha2.until(config_topic, lambda b: bool(b) and len(trackers(b)) == 1)
    assert check_device_config(config_topic, json.loads(body)) == []
    (tracker,) = trackers(body)
    assert tracker["name"] == "Alice" and tracker["source_type"] == "bluetooth_le"
    assert await ha2.until(tracker["state_topic"], b"Shoes:Kids")
    assert "Bob" not in body.decode() and str(bob) not in tracker["unique_id"]
    seen = b" ".join([m.topic.encode() + b" " + bytes(m.payload) for m in list(ha2.client.messages)])
    assert beacon(7).encode() not in seen and b"02:00:00:00:00:07" not in seen and b"Bob" not in seen

    clock.advance(settings.presence.exit_after_s + 5)
    rt.tick()
    await rt.flush()
    assert await ha2.until(tracker["state_topic"], b"not_home")

    rt.service.set_consents(alice, {"presence_sharing": False})  # withdrawn: her entity and state go
    await ha2.until(tracker["state_topic"], b"")
    await ha2.until(config_topic, lambda b: bool(b) and not trackers(b) and tracker["unique_id"] not in b.decode())
    rt.service.set_consents(alice, {"presence_sharing": True})  # given again: back, under the same id
    await ha2.until(config_topic, lambda b: bool(b) and [t["unique_id"] for t in trackers(b)] == [tracker["unique_id"]])
    assert await ha2.until(tracker["state_topic"], b"not_home")

    rt.service.erase_profile(alice)  # erasure: her entity leaves Home Assistant and her state the broker
    await rt.flush()
    await ha2.until(tracker["state_topic"], b"")
    await ha2.until(config_topic, lambda b: bool(b) and not trackers(b) and tracker["unique_id"] not in b.decode())
    later = Watcher(mqtt_client(mosquitto.host, mosquitto.port), f"{prefix}/s1/presence/customers/#")
    assert not await asyncio.to_thread(later.client.wait_for, lambda m: len(m) > 0, 0.5)  # nothing retained
    await runtime_factory.stop(rt)
    clear(mosquitto, config_topic)


async def test_a_zone_removed_from_the_config_leaves_home_assistant(
        tmp_path: Path, mosquitto: MosquittoServer, mqtt_client: Callable[..., PahoTestClient], clock: VirtualClock,
        runtime_factory: RuntimeFactory, discovery: str) -> None:
    intake = new_intake(mosquitto, clock)
    settings = ha_settings(tmp_path, intake, discovery)
    settings.receivers = [ReceiverSettings(id="rx", zones=[ZoneBand("shop", 5.0), ZoneBand("till", 50.0)],
                                           measured_power=-59)]
    rt = await start(runtime_factory, settings, intake)
    prefix = intake.settings.topic_prefix
    ha = Watcher(mqtt_client(mosquitto.host, mosquitto.port), f"{discovery}/#", f"{prefix}/#")
    config_topic = f"{discovery}/device/s1/config"
    await ha.until(config_topic, lambda b: b"s1_till_count" in b)
    await runtime_factory.stop(rt)

    settings.receivers = [ReceiverSettings(id="rx", zones=[ZoneBand("shop", 50.0)], measured_power=-59)]
    intake = new_intake(mosquitto, clock, prefix)  # the same topics as before
    rt = await start(runtime_factory, settings, intake)
    at, stub = await ha.seen(config_topic, lambda b: json.loads(b)["cmps"].get("s1_till_count") == {"p": "sensor"})
    assert check_device_config(config_topic, json.loads(stub)) == []
    _, final = await ha.seen(config_topic, lambda b: b"s1_till" not in b, after=at)  # then left out
    assert ha.last(config_topic) == final
    assert "s1_shop_count" in json.loads(final)["cmps"]
    await ha.until(f"{prefix}/s1/presence/till/count", b"")  # its retained state is cleared
    await runtime_factory.stop(rt)
    clear(mosquitto, config_topic, f"{prefix}/s1/presence/shop/count", f"{prefix}/s1/presence/shop/occupied")


async def test_a_broker_that_forgot_everything_is_told_again(
        tmp_path: Path, mosquitto: MosquittoServer, mqtt_client: Callable[..., PahoTestClient], clock: VirtualClock,
        runtime_factory: RuntimeFactory, discovery: str) -> None:
    """A broker restarted without persistence has lost every retained message: the reconnection brings the
    discovery config and the states back, without waiting for Home Assistant to restart too."""
    (tmp_path / "broker").mkdir()
    broker = MosquittoServer(binary=mosquitto.binary, workdir=tmp_path / "broker")
    broker.start()
    try:
        intake = new_intake(broker, clock)
        rt = await start(runtime_factory, ha_settings(tmp_path, intake, discovery), intake)
        prefix = intake.settings.topic_prefix
        config_topic = f"{discovery}/device/s1/config"
        first = Watcher(mqtt_client(broker.host, broker.port), f"{discovery}/#", f"{prefix}/#")
        await first.until(config_topic, lambda b: bool(b))
        broker.restart()  # the same port, nothing retained
        for _ in range(150):  # a bounded wait: the intake reconnects within its reconnect delay (1 to 2 s)
            if intake.connects >= 2 and intake.connected:
                break
            await asyncio.sleep(0.1)
        assert intake.connects >= 2 and intake.connected, "the intake did not reconnect"
        again = Watcher(mqtt_client(broker.host, broker.port), f"{discovery}/#", f"{prefix}/#")
        config = json.loads(await again.until(config_topic, lambda b: bool(b), timeout=15))
        assert check_device_config(config_topic, config) == []
        kids = zone_ids(["Shoes:Kids"])["Shoes:Kids"]
        assert await again.until(f"{prefix}/s1/presence/{kids}/count", b"0")
        await runtime_factory.stop(rt)
    finally:
        broker.stop()


def clear(broker: MosquittoServer, *topics: str) -> None:
    """Retained messages of a test leave the session's broker with it."""
    c = PahoTestClient(broker.host, broker.port)
    try:
        assert c.wait_connected()
        for t in topics:
            c.publish_wait(t, b"", retain=True)
    finally:
        c.close()


# ---------------------------------------------------------------- the last will, when killed


def test_a_killed_gateway_turns_unavailable(tmp_path: Path, mosquitto: MosquittoServer,
                                            mqtt_client: Callable[..., PahoTestClient]) -> None:
    prefix, discovery = f"t{secrets.token_hex(4)}", f"ha{secrets.token_hex(4)}"
    status = f"{prefix}/s1/gateways/gw-kill/status"
    watcher = Watcher(mqtt_client(mosquitto.host, mosquitto.port), status, f"{discovery}/#")
    proc = subprocess.Popen([sys.executable, "-m", "tests.ha_gateway", "--port", str(mosquitto.port),
                             "--prefix", prefix, "--discovery", discovery, "--data-dir", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert watcher.client.wait_for(lambda _: watcher.last(status) == b"online", 30), "the gateway did not connect"
        assert watcher.client.wait_for(lambda _: bool(watcher.last(f"{discovery}/device/s1/config")), 10)
        config = json.loads(watcher.last(f"{discovery}/device/s1/config") or b"{}")
        assert all(c.get("availability_topic") == status for cid, c in config["cmps"].items() if cid != "s1_gateway")
        proc.send_signal(signal.SIGKILL)  # no goodbye: only the broker's last will can say it
        proc.wait(10)
        assert watcher.client.wait_for(lambda _: watcher.last(status) == b"offline", 10), "no last will"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        clear(mosquitto, status, f"{discovery}/device/s1/config")
