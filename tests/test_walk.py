"""The simulated staff calibration walk: every zone visited, labels where the tag really was, seeded."""

from __future__ import annotations

import io
import itertools
from collections import Counter
from pathlib import Path

import pytest

from gateway.presence.floor import rectangle, zone_at
from gateway.presence.settings import FloorZone
from gateway.presence.traces import TraceReader, TraceWriter, read_labels, write_labels
from simulators.scenario import Scenario, load_scenario
from simulators.walk import STAFF_BEACON, calibration_walk

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store() -> Scenario:
    return load_scenario(ROOT / "examples" / "store.yaml")


def floor_of(sc: Scenario) -> list[FloorZone]:
    return [FloorZone(z.name, rectangle(*z.rect)) for z in sc.zones]


def test_the_walk_visits_every_zone_in_order_and_labels_only_where_the_tag_is(store: Scenario) -> None:
    walk = calibration_walk(store, seed=3, start=500.0)
    assert [lb.zone for lb in walk.labels] == [z.name for z in store.zones]
    assert all(lb.beacon == walk.beacon == STAFF_BEACON.key for lb in walk.labels)
    floor = floor_of(store)
    for lb in walk.labels:
        entered = walk.path.segment_at(lb.start - 500.0 - 2.0)  # 2 s before the tap: already inside, or walking
        assert 18.0 <= lb.end - lb.start <= 40.0 + 15.0  # 20-40 s standing, less the tap's delay, and the walk in
        assert entered is None or entered.zone in (lb.zone, None)
        t = lb.start
        while t < lb.end:  # every 0.25 s of the label, the true position is in the labelled zone
            pos = walk.path.position(t - 500.0)
            assert pos is not None and zone_at(floor, pos) == lb.zone, (lb, t, pos)
            t += 0.25
    for a, b in itertools.pairwise(walk.labels):
        assert a.end < b.start  # the walk between zones stays unlabelled


def test_the_tag_moves_inside_each_zone(store: Scenario) -> None:
    walk = calibration_walk(store, seed=3)
    for lb in walk.labels:
        spots = {walk.path.position(lb.start + k * 0.5) for k in range(int((lb.end - lb.start) * 2))}
        xs = [p[0] for p in spots if p is not None]
        assert max(xs) - min(xs) > 0.5, lb.zone  # browsing from shelf to shelf, not standing on one spot


def test_the_trace_is_the_staff_tag_as_the_receivers_hear_it(store: Scenario) -> None:
    walk = calibration_walk(store, seed=3, start=1000.0)
    assert {s.key for s in walk.sightings} == {walk.beacon}
    assert {s.receiver for s in walk.sightings} == {r.id for r in store.receivers}
    assert all(a.time <= b.time for a, b in itertools.pairwise(walk.sightings))
    assert walk.sightings[0].time >= 1000.0 and walk.sightings[-1].time <= 1000.0 + walk.path.end + 0.1
    assert all(s.tx_power == store.radio.tx_power for s in walk.sightings)
    # While the staff stands in a zone, its own receiver is the loudest most of the time.
    own = {b.name: r.id for r in store.receivers for b in r.zones}
    for lb in walk.labels:
        times = sorted({s.time for s in walk.sightings if lb.start <= s.time < lb.end})
        loudest = Counter(max((s for s in walk.sightings if s.time == t), key=lambda s: s.rssi).receiver
                          for t in times)
        assert loudest.most_common(1)[0][0] == own[lb.zone], (lb.zone, loudest)


def test_same_seed_same_walk_other_seed_other_walk(store: Scenario) -> None:
    a, b = calibration_walk(store, seed=5), calibration_walk(store, seed=5)
    assert a.sightings == b.sightings and a.labels == b.labels
    c = calibration_walk(store, seed=6)
    assert c.labels != a.labels and c.sightings != a.sightings


def test_the_walk_writes_the_files_gateway_calibrate_reads(store: Scenario) -> None:
    walk = calibration_walk(store, seed=3)
    trace, labels = io.StringIO(), io.StringIO()
    TraceWriter(trace, tx_power=True).write_many(walk.sightings)
    write_labels(labels, walk.labels)
    reader = TraceReader(io.StringIO(trace.getvalue()), "walk.csv", receivers=[r.id for r in store.receivers])
    assert list(reader) == walk.sightings and reader.errors.count == 0
    back, errors = read_labels(io.StringIO(labels.getvalue()), "walk.labels.csv")
    assert back == walk.labels and errors.count == 0


def test_a_chosen_tour_and_its_mistakes(store: Scenario) -> None:
    walk = calibration_walk(store, seed=3, zones=["checkout", "shoes", "checkout"], stand_s=(10.0, 10.0))
    assert [lb.zone for lb in walk.labels] == ["checkout", "shoes", "checkout"]
    with pytest.raises(KeyError, match="stockroom"):
        calibration_walk(store, seed=3, zones=["entrance", "stockroom"])
    with pytest.raises(ValueError, match="stand_s"):
        calibration_walk(store, seed=3, stand_s=(30.0, 10.0))


def test_walking_labels_fill_the_walks_between_zones_with_no_zone(store: Scenario) -> None:
    plain = calibration_walk(store, seed=3)
    walk = calibration_walk(store, seed=3, walking_labels=True)
    assert walk.sightings == plain.sightings
    assert [lb for lb in walk.labels if lb.zone is not None] == plain.labels
    assert [lb.zone for lb in walk.labels] == ["entrance", None, "shoes", None, "apparel", None, "checkout"]
    assert all(a.end == b.start for a, b in itertools.pairwise(walk.labels))  # one tap ends one, starts the next
    floor = floor_of(store)
    for lb in walk.labels[1::2]:  # mostly in the aisles: the walk leaves one zone and enters the next
        samples = [walk.path.position(lb.start + k * 0.1) for k in range(int((lb.end - lb.start) * 10))]
        outside = sum(zone_at(floor, p) is None for p in samples if p is not None)
        assert outside >= 0.2 * len(samples), lb  # seed 3: 23-33 % of each walk; the rest inside zones


def test_aisle_stops_stand_outside_every_zone_and_are_labelled_no_zone(store: Scenario) -> None:
    walk = calibration_walk(store, seed=3, aisles=True, zones=["entrance", "shoes", "apparel", "checkout", "entrance"])
    assert [lb.zone for lb in walk.labels] == ["entrance", None, "shoes", None, "apparel", None, "checkout", None,
                                               "entrance"]
    floor = floor_of(store)
    for lb in walk.labels:
        t = lb.start
        while t < lb.end:
            pos = walk.path.position(t)
            assert pos is not None and zone_at(floor, pos) == lb.zone, (lb, t, pos)
            assert walk.path.zone(t) == lb.zone  # the path's own ground truth says the same
            t += 0.25
    # The checkout -> entrance aisle is the store's central one, between shoes and apparel (y 8 to 12).
    last_aisle = walk.labels[-2]
    mid = walk.path.position((last_aisle.start + last_aisle.end) / 2)
    assert mid is not None and 8.0 < mid[1] < 12.0 and 5.0 < mid[0] < 24.0


def test_no_aisle_between_touching_zones() -> None:
    from simulators.scenario import parse_scenario
    from simulators.walk import aisle_spot

    sc = parse_scenario({"store": {"id": "s", "size_m": [10, 4]},
                         "zones": [{"name": "a", "rect": [0, 0, 4, 4]}, {"name": "b", "rect": [4, 0, 8, 4]},
                                   {"name": "c", "rect": [9.5, 0, 10, 4]}]})
    a, b, c = sc.zones
    assert aisle_spot(sc, a, b) is None  # they share a wall
    assert aisle_spot(sc, b, c) is not None  # 1.5 m between
    x0, _, x1, _ = aisle_spot(sc, b, c) or (0.0, 0.0, 0.0, 0.0)
    assert 8.0 < x0 < x1 < 9.5


def store_config(sc: Scenario) -> str:
    """The example store's receivers and floor plan as gateway.toml (what `gateway demo` configures)."""
    lines = []
    for r in sc.receivers:
        bands = ", ".join(f'{{ name = "{b.name}", max_m = {b.max_m} }}' for b in r.zones)
        lines += ["[[receivers]]", f'id = "{r.id}"', f"position = [{r.position[0]}, {r.position[1]}]",
                  f"zones = [{bands}]", f"measured_power = {round(r.measured_power + r.rssi_offset)}", ""]
    for z in sc.zones:
        x0, y0, x1, y1 = z.rect
        corners = f"[[{x0}, {y0}], [{x1}, {y0}], [{x1}, {y1}], [{x0}, {y1}]]"
        lines += ["[[zones]]", f'name = "{z.name}"', f"polygon = {corners}", ""]
    return "\n".join(lines)


def test_gateway_calibrate_learns_every_zone_from_the_walk_files(store: Scenario, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.app.cli import main as gateway
    from gateway.presence.calibration import load
    from simulators.walk import main as walk_main

    assert walk_main([str(ROOT / "examples" / "store.yaml"), "--out", str(tmp_path), "--seed", "1",
                      "--rounds", "2"]) == 0
    config = tmp_path / "gateway.toml"
    config.write_text(store_config(store))
    out = tmp_path / "calibration.toml"
    assert gateway(["calibrate", str(tmp_path / "walk.trace.csv"), "--labels", str(tmp_path / "walk.labels.csv"),
                    "--config", str(config), "--out", str(out)]) == 0
    cal = load(out)
    assert {z.name for z in cal.zones} == {z.name for z in store.zones}
    own = {b.name: r.id for r in store.receivers for b in r.zones}
    for zc in cal.zones:  # standing in a zone, its own receiver is the one heard loudest
        means = {sg.receiver: sg.mean for sg in zc.signature if sg.mean is not None}
        assert max(means, key=means.__getitem__) == own[zc.name], zc
    assert "bad" not in capsys.readouterr().err


def test_the_walk_command_refuses_what_it_cannot_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulators.walk import main as walk_main

    assert walk_main([str(tmp_path / "missing.yaml"), "--out", str(tmp_path)]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert walk_main([str(ROOT / "examples" / "store.yaml"), "--out", str(tmp_path), "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err
    assert not (tmp_path / "walk.trace.csv").exists()


def test_the_arrival_tap_comes_as_the_staff_steps_in_or_once_they_stop(store: Scenario) -> None:
    edge = calibration_walk(store, seed=4)
    spot = calibration_walk(store, seed=4, tap_at="spot")
    floor = floor_of(store)
    for a, b in zip(edge.labels[1:], spot.labels[1:], strict=True):
        assert a.zone == b.zone and a.end == b.end
        assert a.start < b.start  # stepping in comes before reaching the first spot
        before = edge.path.position(a.start - 2.5)  # the tap delay is 0.5-2 s: 2.5 s earlier, still outside
        assert before is not None and zone_at(floor, before) != a.zone
    with pytest.raises(ValueError, match="tap_at"):
        calibration_walk(store, seed=4, tap_at="door")


def test_tap_and_wait_stands_just_inside_each_zone_then_browses_it_under_one_label(store: Scenario) -> None:
    walk = calibration_walk(store, seed=3, wait_s=(20.0, 30.0))
    assert [lb.zone for lb in walk.labels] == [z.name for z in store.zones]  # one tap per zone, the wait in it
    plain = calibration_walk(store, seed=3)
    floor = floor_of(store)
    for lb, before in zip(walk.labels, plain.labels, strict=True):
        assert lb.end - lb.start >= (before.end - before.start) + 20.0 - 5.0  # the wait comes on top of the browse
        t = lb.start
        while t < lb.end:
            pos = walk.path.position(t)
            assert pos is not None and zone_at(floor, pos) == lb.zone, (lb, t, pos)
            t += 0.25
        # The wait: from the tap, 20 s or more within a step of one spot, about 1 m inside the zone's edge.
        spots = [walk.path.position(lb.start + 2.0 + k * 0.5) for k in range(36)]
        xs, ys = [p[0] for p in spots if p], [p[1] for p in spots if p]
        assert max(xs) - min(xs) < 0.3 and max(ys) - min(ys) < 0.3, lb.zone
        assert lb.zone is not None
        x0, y0, x1, y1 = store.zone(lb.zone).rect
        inside = min(xs[0] - x0, x1 - xs[0], ys[0] - y0, y1 - ys[0])
        assert 0.5 < inside < 1.6, (lb.zone, inside)
