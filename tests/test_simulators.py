"""The simulators: scenario loading, radio model, walkers, store adverts, telemetry, carts."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import queue
import shutil
import socket
import statistics
import subprocess
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from beacons.types import Advertisement, IBeacon
from gateway.clock import VirtualClock
from gateway.presence.model import distance_m
from simulators.carts import cart_upserts
from simulators.people import Population
from simulators.radio import Link, RadioModel, expected_rssi
from simulators.scenario import Receiver, Scenario, ScenarioError, load_scenario, parse_scenario
from simulators.store_sim import StoreSimulator
from simulators.wearables import (
    MqttPublisher,
    TelemetryModel,
    bad_payloads,
    payload,
    run_realtime,
    topic_for,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "store.yaml"
START = 1_767_261_600.0
HOUR = 3600.0


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return load_scenario(EXAMPLE)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def sim(scenario: Scenario) -> StoreSimulator:
    return StoreSimulator(scenario, start=START, seed=7, duration_s=HOUR)


@pytest.fixture(scope="module")
def hour_of_adverts(sim: StoreSimulator) -> list[Advertisement]:
    return sim.advertisements(START, START + HOUR)


def decode_ibeacon(payload_bytes: bytes) -> tuple[str, int, int, int]:
    """(uuid, major, minor, tx_power), via beacons.parse when present, else by hand."""
    try:
        from beacons import parse
    except ImportError:
        parse = None  # type: ignore[assignment]
    if parse is not None:
        frames = parse.parse_payload(payload_bytes)
        assert len(frames) == 1
        f = frames[0]
        assert isinstance(f, IBeacon) and f.tx_power is not None
        return f.uuid, f.major, f.minor, f.tx_power
    i = payload_bytes.index(b"\x4c\x00\x02\x15")
    body = payload_bytes[i + 4:i + 25]
    return (str(uuid.UUID(bytes=body[:16])), int.from_bytes(body[16:18], "big"),
            int.from_bytes(body[18:20], "big"), int.from_bytes(body[20:21], "big", signed=True))


# --- scenario ---------------------------------------------------------------------------


def test_example_scenario_loads(scenario: Scenario) -> None:
    assert len(scenario.people) == 12 and scenario.crowd.count == 12
    assert len(scenario.people) + scenario.crowd.count == 24
    assert [z.name for z in scenario.zones] == ["entrance", "shoes", "apparel", "checkout"]
    assert len(scenario.devices) == 6 and len(scenario.receivers) == 4 and len(scenario.carts) == 4
    apparel = next(r for r in scenario.receivers if r.id == "rx-apparel")
    assert apparel.measured_power == scenario.radio.tx_power == -59
    assert apparel.rssi_offset == 2 and apparel.zones[0] == ("apparel", 6.0)
    alice = scenario.person("alice")
    assert alice.visits[0].route[1] == ("shoes", 45.0)
    assert scenario.beacon_key(alice) == "ibeacon:8f3c0a52-6d1e-4b7a-9c2d-5e4f3a2b1c00:100:1"
    assert scenario.beacon_key("ivan").endswith(":200:1")
    mower = next(d for d in scenario.devices if d.id == "mower-alice")
    assert mower.metrics["blade_hours"].rate_per_min == 1.5 and mower.interval_s == 2


def test_beacon_key_is_lowercase(raw: dict[str, Any]) -> None:
    data = copy.deepcopy(raw)
    data["people"][0]["beacon"]["uuid"] = data["people"][0]["beacon"]["uuid"].upper()
    assert parse_scenario(data).beacon_key("alice") == "ibeacon:8f3c0a52-6d1e-4b7a-9c2d-5e4f3a2b1c00:100:1"


def _break_route(d: dict[str, Any]) -> None:
    d["people"][0]["visits"][0]["route"][1][0] = "shooes"


def _break_cart_sku(d: dict[str, Any]) -> None:
    d["carts"][1]["items"][0]["sku"] = "XX-999"


def _break_cart_owner(d: dict[str, Any]) -> None:
    d["carts"][0]["owner"] = "nobody"


def _break_device_owner(d: dict[str, Any]) -> None:
    d["devices"][2]["owner"] = "zoe"


@pytest.mark.parametrize(("breaker", "entry", "culprit"), [
    (_break_route, "people[alice].visits[0].route[1]", "'shooes'"),
    (_break_cart_sku, "carts[cart-hugo-1].items[0]", "'XX-999'"),
    (_break_cart_owner, "carts[cart-alice-1]", "'nobody'"),
    (_break_device_owner, "devices[watch-chloe]", "'zoe'"),
])
def test_broken_scenario_is_rejected_with_the_entry_named(
    raw: dict[str, Any], tmp_path: Path, breaker: Any, entry: str, culprit: str
) -> None:
    data = copy.deepcopy(raw)
    breaker(data)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    message = str(err.value)
    assert entry in message and culprit in message and str(path) in message


def test_unreadable_scenario_is_a_scenario_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("store: [unclosed", encoding="utf-8")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(tmp_path / "bad.yaml")


# --- radio ------------------------------------------------------------------------------


def _rx(offset: float = 0.0) -> Receiver:
    return Receiver("rx", (0.0, 0.0), (), measured_power=-59, path_loss_exponent=2.0, rssi_offset=offset)


def test_expected_rssi_and_its_inverse() -> None:
    assert expected_rssi(1.0, -59, 2.0) == -59
    assert expected_rssi(10.0, -59, 2.0) == pytest.approx(-79)
    assert expected_rssi(0.0, -59, 2.0) == expected_rssi(0.1, -59, 2.0)  # clamped, no log(0)
    for d in (0.5, 1.0, 4.2, 17.0):
        assert distance_m(expected_rssi(d, -59, 2.5), -59, 2.5) == pytest.approx(d)


def test_rssi_falls_with_distance_on_average() -> None:
    model = RadioModel(1, shadowing_sigma_db=3.0, loss=0.0)
    means = []
    for d in (1.0, 3.0, 10.0):
        samples = [model.rssi(d, _rx(offset=2)) for _ in range(2000)]
        assert all(isinstance(s, int) for s in samples)
        mean = statistics.fmean(s for s in samples if s is not None)
        assert mean == pytest.approx(expected_rssi(d, -59, 2.0) + 2, abs=0.4)
        means.append(mean)
    assert means[0] > means[1] > means[2]


def test_loss_rate_and_sensitivity() -> None:
    model = RadioModel(42, shadowing_sigma_db=3.0, loss=0.2)
    lost = sum(model.rssi(2.0, _rx()) is None for _ in range(10_000))
    assert 0.18 < lost / 10_000 < 0.22
    quiet = RadioModel(42, shadowing_sigma_db=0.0, loss=0.0)
    assert quiet.rssi(1000.0, _rx()) is None  # -119 dBm: below sensitivity
    assert quiet.rssi(2.0, _rx()) == round(expected_rssi(2.0, -59, 2.0))


def test_hear_matches_rssi_per_receiver() -> None:
    receivers = [Receiver(f"rx{i}", (i * 5.0, 1.0), (), -59, 2.0 + i / 10, i) for i in range(4)]
    links = [Link.of(rx) for rx in receivers]
    a, b = RadioModel("s", 3.0, 0.1), RadioModel("s", 3.0, 0.1)
    for x, y in [(0.0, 0.0), (3.0, 4.0), (20.0, 1.0)] * 50:
        expected = [(rx.id, r) for rx in receivers
                    if (r := a.rssi(math.hypot(x - rx.position[0], y - rx.position[1]), rx)) is not None]
        assert b.hear(x, y, links) == expected


# --- walkers ----------------------------------------------------------------------------


def test_population_has_everyone(scenario: Scenario) -> None:
    pop = Population(scenario, 8 * HOUR, seed=3)
    assert len(pop.walkers) == 24
    assert len({w.key for w in pop.walkers}) == 24
    assert sum(w.person is None for w in pop.walkers) == 12
    assert len(pop.walker(scenario.beacon_key("alice")).visits) == 2
    assert len(Population(scenario, HOUR, seed=3).walker(scenario.beacon_key("alice")).visits) == 1


def test_ground_truth_mid_stop_is_the_route_zone(scenario: Scenario) -> None:
    pop = Population(scenario, 8 * HOUR, seed=5)
    checked = 0
    for walker in pop.walkers:
        for visit in walker.visits:
            assert len(visit.stops) == len(visit.route)
            for stop, (t0, t1) in zip(visit.route, visit.stops, strict=True):
                assert t1 - t0 == pytest.approx(stop.seconds)
                mid = (t0 + t1) / 2
                assert walker.zone(mid) == stop.zone
                x, y = walker.position(mid) or (math.nan, math.nan)
                assert scenario.zone(stop.zone).contains(x, y)
                checked += 1
    assert checked > 50


def test_nobody_is_present_before_arriving_or_after_leaving(scenario: Scenario) -> None:
    pop = Population(scenario, 8 * HOUR, seed=5)
    alice = pop.walker(scenario.beacon_key("alice"))
    first, second = alice.visits
    assert first.start == 2.0 and second.start == 14400.0
    for t in (0.0, 1.99, first.end, first.end + 1, second.start - 1, second.end + 0.01):
        assert alice.position(t) is None and not alice.present(t) and alice.zone(t) is None
    assert alice.position(2.0) is not None and alice.zone(2.0) == "entrance"
    # Transit takes extra time on top of the route's seconds, never less.
    assert first.end - first.start >= sum(s.seconds for s in first.route)
    width, height = scenario.store.size_m
    for w in pop.walkers:
        for v in w.visits:
            for t in range(int(v.start), int(v.end)):
                x, y = v.position(t + 0.5) or (0.0, 0.0)
                assert 0 <= x <= width and 0 <= y <= height


def test_crowd_routes_and_arrivals(scenario: Scenario) -> None:
    pop = Population(scenario, 10 * HOUR, seed=11)
    crowd = [w for w in pop.walkers if w.person is None]
    visits = sorted((v for w in crowd for v in w.visits), key=lambda v: v.start)
    assert sum(v.start < 60 for v in visits) == scenario.crowd.first_wave
    assert 50 <= len(visits) <= 160  # 4 + Poisson(10/h over ~10 h), minus arrivals with no free tag
    lo, hi = scenario.crowd.dwell_s
    for v in visits:
        zones = [s.zone for s in v.route]
        assert 2 <= len(zones) <= 4 and zones[0] == "entrance" and zones[-1] == "checkout"
        assert len(set(zones)) == len(zones)
        assert all(lo <= s.seconds <= hi for s in v.route)
    for w in crowd:  # one tag is never in the store twice at once
        assert all(a.end <= b.start for a, b in zip(w.visits, w.visits[1:], strict=False))


# --- store simulator ---------------------------------------------------------------------


def test_adverts_are_time_ordered_and_inside_the_window(
    sim: StoreSimulator, hour_of_adverts: list[Advertisement]
) -> None:
    times = [a.time for a in hour_of_adverts]
    assert len(times) > 1000
    assert times == sorted(times)
    assert times[0] >= START and times[-1] < START + HOUR
    window = sim.advertisements(START + 100, START + 160)
    assert window and all(START + 100 <= a.time < START + 160 for a in window)
    assert sim.advertisements(START + 10, START + 10) == []


def test_adverts_decode_to_the_walkers_beacon(
    sim: StoreSimulator, hour_of_adverts: list[Advertisement]
) -> None:
    receivers = {rx.id for rx in sim.scenario.receivers}
    by_address: dict[str, set[str]] = defaultdict(set)
    for a in hour_of_adverts:
        uuid_, major, minor, tx = decode_ibeacon(a.payload)
        assert a.receiver in receivers and -100 <= a.rssi <= 0 and tx == -59
        key = f"ibeacon:{uuid_}:{major}:{minor}"
        walker = sim.population.walker(key)
        visit = walker.visit_at(a.time - START) or walker.visit_at(a.time - START - 0.01)
        assert visit is not None and a.address == visit.address
        assert int(a.address[:2], 16) >> 6 == 0b01  # resolvable private address
        by_address[a.address].add(key)
    assert all(len(keys) == 1 for keys in by_address.values())
    alice = sim.population.walker(sim.scenario.beacon_key("alice"))
    assert any(a.payload == sim.payload_for(alice) for a in hour_of_adverts)


def test_addresses_rotate_between_visits(scenario: Scenario) -> None:
    day = StoreSimulator(scenario, start=START, seed=7, duration_s=8 * HOUR)
    alice = day.population.walker(scenario.beacon_key("alice"))
    assert len({v.address for v in alice.visits}) == 2


def test_adverts_carry_the_receiver_that_hears_the_zone_best(
    sim: StoreSimulator, hour_of_adverts: list[Advertisement]
) -> None:
    """While a walker browses a stop, the receiver covering that zone hears it loudest."""
    zone_receiver = {band.name: rx.id for rx in sim.scenario.receivers for band in rx.zones}
    levels: dict[tuple[str, int, int], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    stop_of: dict[str, list[tuple[float, float, tuple[str, int, int]]]] = defaultdict(list)
    for w in sim.walkers:
        for v in w.visits:
            for i, (t0, t1) in enumerate(v.stops):
                if t1 - t0 >= 20:
                    stop_of[v.address].append((START + t0, START + t1, (v.address, v.number, i)))
    for a in hour_of_adverts:
        for t0, t1, sid in stop_of.get(a.address, ()):
            if t0 <= a.time < t1:
                levels[sid][a.receiver].append(a.rssi)
    assert len(levels) > 10
    for (address, _, i), per_rx in levels.items():
        visit = next(v for w in sim.walkers for v in w.visits if v.address == address)
        loudest = max(per_rx, key=lambda rx: statistics.fmean(per_rx[rx]))
        assert loudest == zone_receiver[visit.route[i].zone]


def test_same_seed_same_adverts_however_the_window_is_cut(
    scenario: Scenario, hour_of_adverts: list[Advertisement]
) -> None:
    again = StoreSimulator(scenario, start=START, seed=7, duration_s=HOUR)
    assert again.advertisements(START, START + HOUR) == hour_of_adverts
    chunked = StoreSimulator(scenario, start=START, seed=7, duration_s=HOUR)
    pieces: list[Advertisement] = []
    t = START
    while t < START + HOUR:
        pieces.extend(chunked.advertisements(t, t + 3.7))
        t += 3.7
    assert pieces[: len(hour_of_adverts)] == hour_of_adverts
    # Going back in time regenerates the same adverts.
    assert chunked.advertisements(START + 30, START + 40) == [
        a for a in hour_of_adverts if START + 30 <= a.time < START + 40
    ]
    other = StoreSimulator(scenario, start=START, seed=8, duration_s=HOUR)
    assert other.advertisements(START, START + 120) != [a for a in hour_of_adverts if a.time < START + 120]


def test_ground_truth_and_people_present(sim: StoreSimulator) -> None:
    assert sim.ground_truth(START - 10) == {} and sim.people_present(START - 10) == []
    alice_key = sim.scenario.beacon_key("alice")
    assert sim.ground_truth(START + 3)[alice_key] == "entrance"
    first = sim.population.walker(alice_key).visits[0]
    t0, t1 = first.stops[1]
    assert sim.ground_truth(START + (t0 + t1) / 2)[alice_key] == "shoes"
    present = sim.people_present(START + 20)
    assert {w.person_id for w in present if w.person} >= {"alice", "bruno", "chloe", "ivan"}
    assert set(sim.ground_truth(START + 20)) == {w.key for w in present}


# --- telemetry ---------------------------------------------------------------------------


def test_telemetry_moves_at_the_stated_rate(scenario: Scenario) -> None:
    model = TelemetryModel(scenario, START, seed=1)
    at_10_min = {r.device_id: r for r in model.readings(START + 600, START + 601)}
    mower = at_10_min["mower-alice"]
    assert mower.time == START + 600
    assert mower.metrics["blade_hours"] == pytest.approx(49.6 + 15.0)
    assert mower.metrics["battery_pct"] == pytest.approx(85 - 5.0)
    assert at_10_min["bike-bruno"].metrics["chain_km"] == pytest.approx(995.0 + 120.0)
    assert at_10_min["filter-hugo"].metrics["filter_litres"] == 1990 + 300
    steps = at_10_min["watch-chloe"].metrics["steps"]
    assert steps == 3200 + 400 and isinstance(steps, int)
    hour = model.readings(START, START + HOUR)
    hr = [r.metrics["heart_rate"] for r in hour if r.device_id == "watch-chloe"]
    assert statistics.fmean(hr) == pytest.approx(72, abs=1) and statistics.pstdev(hr) > 1
    assert all(isinstance(h, int) for h in hr)
    later = {r.device_id: r for r in model.readings(START + 4 * HOUR, START + 4 * HOUR + 5)}
    assert later["mower-alice"].metrics["battery_pct"] == 0  # a percentage never goes below 0


def test_telemetry_schedule_and_determinism(scenario: Scenario) -> None:
    model = TelemetryModel(scenario, START, seed=1)
    minute = model.readings(START, START + 60)
    per_device: dict[str, int] = defaultdict(int)
    for r in minute:
        per_device[r.device_id] += 1
    assert per_device == {d.id: int(60 / d.interval_s) for d in scenario.devices}
    assert [r.time for r in minute] == sorted(r.time for r in minute)
    pieces = [r for k in range(0, 60, 7) for r in model.readings(START + k, START + min(k + 7, 60))]
    assert pieces == minute
    assert TelemetryModel(scenario, START, seed=1).readings(START, START + 60) == minute
    assert model.readings(START - 60, START) == []


def test_topic_and_payload(scenario: Scenario) -> None:
    assert topic_for("store-001", "mower-alice") == "stores/store-001/devices/mower-alice/telemetry"
    body = payload(1767261600.0, {"blade_hours": 49.6})
    assert body == b'{"ts": 1767261600.0, "metrics": {"blade_hours": 49.6}}'
    topic, first = TelemetryModel(scenario, START).messages(START, START + 1)[0]
    assert topic == "stores/store-001/devices/mower-alice/telemetry"
    assert json.loads(first) == {"ts": START, "metrics": {"blade_hours": 49.6, "battery_pct": 85.0}}


def _valid_reading(body: bytes) -> bool:
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    metrics = doc.get("metrics") if isinstance(doc, dict) else None
    return isinstance(metrics, dict) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
    )


def test_bad_payloads_are_all_malformed() -> None:
    bad = list(bad_payloads())
    assert len(bad) >= 4 and all(isinstance(b, bytes) for b in bad)
    assert not any(_valid_reading(b) for b in bad)
    assert _valid_reading(payload(START, {"x": 1.5}))


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, int]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.sent.append((topic, payload, qos))


async def test_run_realtime_publishes_what_is_due(scenario: Scenario) -> None:
    clock = VirtualClock(START + 10)
    model = TelemetryModel(scenario, START, seed=1)
    stop = asyncio.Event()
    stop.set()  # one pass, then return: no waiting
    recorder = _Recorder()
    sent = await run_realtime(model, recorder, clock, stop)
    assert sent == len(recorder.sent) == len(model.readings(START, START + 10))
    assert [m[:2] for m in recorder.sent] == model.messages(START, START + 10)
    assert all(qos == 1 for *_, qos in recorder.sent)


# --- carts -------------------------------------------------------------------------------


def test_cart_upserts(scenario: Scenario) -> None:
    bodies = {b["cart_id"]: b for b in cart_upserts(scenario, START)}
    assert set(bodies) == {"cart-alice-1", "cart-hugo-1", "cart-julia-1", "cart-deniz-1"}
    alice = bodies["cart-alice-1"]
    assert alice["profile_external_id"] == "alice" and alice["updated_at"] == START - 5400
    assert alice["items"] == [
        {"sku": "SH-100", "name": "Trail runner shoes", "price": 89.90, "quantity": 1},
        {"sku": "AP-310", "name": "Merino base layer", "price": 59.0, "quantity": 2},
    ]
    json.dumps(alice)  # the body is plain JSON


# --- MQTT (a real broker) ----------------------------------------------------------------

MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sim_broker(tmp_path: Path) -> Iterator[int]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed")
    port = _free_port()
    conf = tmp_path / "mosquitto.conf"
    # stderr is unbuffered, so its "running" line tells us the listener is up without polling.
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest stderr\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if " running" in line:
                break
        else:
            pytest.fail("mosquitto exited before listening")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_mqtt_publisher_reaches_a_real_broker(sim_broker: int, protocol: str, scenario: Scenario) -> None:
    received: queue.Queue[tuple[str, bytes]] = queue.Queue()
    subscribed = queue.Queue[bool]()
    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"test-sub-{protocol}")
    sub.on_message = lambda c, u, msg: received.put((msg.topic, bytes(msg.payload)))
    sub.on_subscribe = lambda c, u, mid, rc, props: subscribed.put(True)
    sub.on_connect = lambda c, u, f, rc, props: c.subscribe("stores/+/devices/+/telemetry", qos=1)
    sub.connect("127.0.0.1", sim_broker)
    sub.loop_start()
    try:
        assert subscribed.get(timeout=5)
        model = TelemetryModel(scenario, START)
        messages = model.messages(START, START + 2)
        with MqttPublisher("127.0.0.1", sim_broker, protocol=protocol) as publisher:
            for topic, body in messages:
                publisher.publish(topic, body)
        got = [received.get(timeout=5) for _ in messages]
        assert sorted(got) == sorted(messages)
    finally:
        sub.disconnect()
        sub.loop_stop()


def test_mqtt_publisher_fails_clearly_without_a_broker() -> None:
    publisher = MqttPublisher("127.0.0.1", _free_port(), timeout_s=2)
    with pytest.raises(OSError):
        publisher.connect()
    with pytest.raises(ValueError, match="protocol"):
        MqttPublisher("127.0.0.1", 1, protocol="4")
