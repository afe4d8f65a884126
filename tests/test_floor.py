"""The floor plan: point in polygon, area and centre, which zones adjoin, and [[zones]] config errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gateway.app.config import Settings, load_settings
from gateway.errors import ConfigError
from gateway.presence.floor import adjacency, area, centroid, contains, distance, rectangle, zone_at
from gateway.presence.settings import FloorZone, ReceiverSettings, ZoneBand


def rect_zone(name: str, x0: float, y0: float, x1: float, y1: float, adjacent: list[str] | None = None) -> FloorZone:
    return FloorZone(name, rectangle(x0, y0, x1, y1), adjacent or [])


# An L-shaped room (concave): the notch at the top right is outside it.
L_ROOM = [[0.0, 0.0], [4.0, 0.0], [4.0, 2.0], [2.0, 2.0], [2.0, 4.0], [0.0, 4.0]]


def test_point_in_polygon_follows_a_concave_outline_and_counts_its_edges() -> None:
    assert contains(L_ROOM, (1.0, 1.0))
    assert contains(L_ROOM, (3.0, 1.0))
    assert contains(L_ROOM, (1.0, 3.0))
    assert not contains(L_ROOM, (3.0, 3.0))  # the notch
    assert not contains(L_ROOM, (-0.1, 1.0))
    assert contains(L_ROOM, (4.0, 1.0))  # on the outline
    assert contains(L_ROOM, (2.0, 2.0))  # the inner corner
    assert contains(list(reversed(L_ROOM)), (1.0, 3.0))  # either winding


def test_area_and_centroid_of_an_l_shaped_room() -> None:
    assert area(L_ROOM) == pytest.approx(12.0)
    assert area(list(reversed(L_ROOM))) == pytest.approx(12.0)
    # Two 4 x 2 and 2 x 2 parts: (8 * (2, 1) + 4 * (1, 3)) / 12
    cx, cy = centroid(L_ROOM)
    assert (cx, cy) == (pytest.approx(20 / 12), pytest.approx(20 / 12))
    assert centroid(rectangle(8.0, 0.0, 18.0, 8.0)) == (pytest.approx(13.0), pytest.approx(4.0))


def test_rectangles_sharing_an_edge_adjoin() -> None:
    zones = [rect_zone("south", 0, 0, 4, 2), rect_zone("north", 0, 2, 4, 5), rect_zone("far", 10, 0, 12, 2)]
    adj = adjacency(zones)
    assert adj == {"south": frozenset({"north"}), "north": frozenset({"south"}), "far": frozenset()}


def test_a_partly_shared_wall_is_enough() -> None:
    # The flat's east room touches the centre room along x = 6.32 for y 4.19 .. 7.1 only.
    zones = [rect_zone("centre", 2.64, 2.12, 6.32, 7.1), rect_zone("east", 6.32, 4.19, 9.07, 7.1),
             rect_zone("south-east", 3.96, 0.0, 6.22, 2.12)]
    adj = adjacency(zones)
    assert adj is not None
    assert adj["east"] == {"centre"}
    assert adj["centre"] == {"east", "south-east"}
    assert "east" not in adj["south-east"]  # 2.07 m apart


def test_corners_closer_than_touch_m_adjoin_and_farther_do_not() -> None:
    a = rect_zone("a", 0, 0, 2, 2)
    diagonal = rect_zone("b", 2.3, 2.3, 4, 4)  # corner to corner: 0.42 m
    assert distance(a.polygon, diagonal.polygon) == pytest.approx(math.hypot(0.3, 0.3))
    assert adjacency([a, diagonal]) == {"a": {"b"}, "b": {"a"}}
    assert adjacency([a, diagonal], touch_m=0.4) == {"a": frozenset(), "b": frozenset()}
    apart = rect_zone("c", 3.0, 0.0, 5.0, 2.0)  # 1 m of aisle between
    assert adjacency([a, apart]) == {"a": frozenset(), "c": frozenset()}
    assert adjacency([a, apart], touch_m=1.0) == {"a": {"c"}, "c": {"a"}}


def test_overlapping_and_nested_polygons_adjoin() -> None:
    outer = rect_zone("hall", 0, 0, 10, 10)
    inner = rect_zone("stand", 4, 4, 5, 5)
    crossing = rect_zone("aisle", 8, -1, 9, 11)
    adj = adjacency([outer, inner, crossing])
    assert adj is not None
    assert adj["hall"] == {"stand", "aisle"}
    assert adj["stand"] == {"hall"}


def test_explicit_adjacent_is_symmetric_and_works_without_polygons() -> None:
    zones = [rect_zone("entrance", 0, 6, 5, 14, adjacent=["shoes"]), rect_zone("shoes", 8, 0, 18, 8),
             FloorZone("stockroom", [], ["shoes"]), rect_zone("checkout", 24, 6, 30, 14)]
    adj = adjacency(zones)
    assert adj == {"entrance": {"shoes"}, "shoes": {"entrance", "stockroom"}, "stockroom": {"shoes"},
                   "checkout": frozenset()}


def test_no_floor_plan_allows_any_move() -> None:
    assert adjacency([]) is None


def test_zone_at_names_the_first_zone_holding_the_point() -> None:
    zones = [rect_zone("south", 0, 0, 4, 2), rect_zone("north", 0, 2, 4, 5), FloorZone("nowhere", [], [])]
    assert zone_at(zones, (1.0, 1.0)) == "south"
    assert zone_at(zones, (1.0, 4.0)) == "north"
    assert zone_at(zones, (1.0, 2.0)) == "south"  # on the shared wall: the first listed
    assert zone_at(zones, (6.0, 1.0)) is None


# ---------------------------------------------------------------------------------------- [[zones]] config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text(text)
    return p


GOOD = """\
[[receivers]]
id = "rx-a"
position = [1.0, 1.0]
zones = [{ name = "a", max_m = 3 }]

[[zones]]
name = "a"
polygon = [[0, 0], [2, 0], [2, 2], [0, 2]]

[[zones]]
name = "b"
polygon = [[2, 0], [4, 0], [4, 2]]
adjacent = ["a"]
"""


def test_a_good_floor_plan_loads() -> None:
    s = Settings(zones=[rect_zone("a", 0, 0, 2, 2), FloorZone("b", [], ["a"])])
    assert [z.name for z in s.zones] == ["a", "b"]


def test_a_good_floor_plan_file_loads(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, GOOD), environ={})
    assert s.zones[1].polygon == [[2.0, 0.0], [4.0, 0.0], [4.0, 2.0]]
    assert s.receivers[0].position == [1.0, 1.0]
    assert adjacency(s.zones) == {"a": {"b"}, "b": {"a"}}


@pytest.mark.parametrize(("old", "new", "line", "expected"), [
    ('name = "b"', 'name = "a"', 11, "zones[1].name: zone defined twice (first as zones[0]), got 'a'"),
    ("polygon = [[2, 0], [4, 0], [4, 2]]", "polygon = [[2, 0], [4, 0]]", 12,
     "zones[1].polygon: a polygon needs at least 3 corners"),
    ("polygon = [[2, 0], [4, 0], [4, 2]]", "polygon = [[2, 0], [4, 0], [4, nan]]", 12,
     "zones[1].polygon: every corner must be [x, y] in metres, finite"),
    ("polygon = [[2, 0], [4, 0], [4, 2]]", "polygon = [[2, 0], [4, 0], [4, 2, 1]]", 12,
     "zones[1].polygon: every corner must be [x, y]"),
    ("polygon = [[2, 0], [4, 0], [4, 2]]", "polygon = [[2, 0], [3, 0], [4, 0]]", 12,
     "zones[1].polygon: the polygon encloses no area"),
    ('adjacent = ["a"]', 'adjacent = ["a", "shoes"]', 13,
     "zones[1].adjacent[1]: unknown zone (known: a, b), got 'shoes'"),
    ('adjacent = ["a"]', 'adjacent = ["b"]', 13, "zones[1].adjacent[0]: a zone is not adjacent to itself"),
    ('zones = [{ name = "a", max_m = 3 }]', 'zones = [{ name = "c", max_m = 3 }]', 4,
     "receivers[0].zones[0].name: not a zone of the floor plan (known: a, b), got 'c'"),
    ("position = [1.0, 1.0]", "position = [1.0, inf]", 1, "position must be [x, y] in metres"),
])
def test_bad_floor_plans_name_the_line_and_the_problem(tmp_path: Path, old: str, new: str, line: int,
                                                       expected: str) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={})
    assert f"{path}, line {line}: " in str(err.value)
    assert expected in str(err.value)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace('name = "b"', 'name = "a"').replace('adjacent = ["a"]', 'adjacent = ["x"]')
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text), environ={})
    assert "zones[1].name" in str(err.value) and "zones[1].adjacent[0]" in str(err.value)


def test_bands_need_no_floor_plan() -> None:
    s = Settings(receivers=[ReceiverSettings("rx", [ZoneBand("anywhere", 3.0)])])
    assert s.zones == []


# ---------------------------------------------------------------------------------------- where floor plans come from


def test_the_scenario_settings_carry_the_floor_plan_and_receiver_positions() -> None:
    from gateway.app.scenarios import apply_scenario
    from simulators.scenario import load_scenario

    sc = load_scenario(Path(__file__).resolve().parents[1] / "examples" / "store.yaml")
    s = apply_scenario(Settings(), sc)
    assert [z.name for z in s.zones] == ["entrance", "shoes", "apparel", "checkout"]
    shoes = s.zones[1]
    assert area(shoes.polygon) == pytest.approx(80.0)  # rect [8, 0, 18, 8]
    assert zone_at(s.zones, (13.0, 4.0)) == "shoes" and zone_at(s.zones, (6.5, 10.0)) is None
    assert {r.id: r.position for r in s.receivers}["rx-shoes"] == [13.0, 4.0]
    # What it built passes the config's own checks, and each receiver stands in its own zone.
    checked = Settings.model_validate({"zones": s.zones, "receivers": s.receivers})
    assert all(zone_at(checked.zones, (r.position[0], r.position[1])) == r.zones[0].name
               for r in checked.receivers if r.position is not None)
    # The example store's zones stand 3 m and more apart: no zone adjoins another, every move is through an aisle.
    assert adjacency(s.zones) == {z.name: frozenset() for z in s.zones}


def test_the_datasets_configs_carry_the_rooms_and_the_anchors(tmp_path: Path) -> None:
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_datasets", root / "benchmarks" / "datasets.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_datasets", mod)
    spec.loader.exec_module(mod)
    receivers, _ = mod.receivers_of("flat", root / "tests" / "data" / "datasets")
    path = tmp_path / "flat.toml"
    path.write_text(mod.config_toml(receivers, mod.FLAT_ZONES, "kolakowski-flat"))
    s = load_settings(path, environ={})
    assert [z.name for z in s.zones] == list(mod.FLAT_ZONES)
    assert {r.id: r.position for r in s.receivers} == {rid: list(pos) for rid, pos in receivers.items()}
    adj = adjacency(s.zones)
    assert adj is not None
    assert adj["east"] == {"centre"}  # the east room opens only onto the centre
    assert adj["centre"] == {"south", "south-east", "west", "east"}


def test_gateway_run_hands_the_floor_plan_to_the_tracker() -> None:
    """The pipeline's tracker moves as one given the floor plan's adjacency does: two zones 2 m apart do not
    adjoin, so the tag crosses through no zone, later than a tracker without a floor plan switches."""
    from beacons.types import Sighting
    from gateway.app.pipeline import Pipeline
    from gateway.campaigns.model import CampaignIndex
    from gateway.presence.tracker import PresenceTracker
    from gateway.profiles.identity import IdentityIndex

    t0 = 1_700_000_000.0
    s = Settings()
    s.receivers = [ReceiverSettings("rx-a", [ZoneBand("a", 3.0)], measured_power=-59, position=[1.5, 1.5]),
                   ReceiverSettings("rx-b", [ZoneBand("b", 3.0)], measured_power=-59, position=[6.5, 1.5])]
    s.zones = [rect_zone("a", 0, 0, 3, 3), rect_zone("b", 5, 0, 8, 3)]

    def walk(tracker: PresenceTracker) -> list[tuple[float, str, str | None]]:
        out = []
        for i in range(600):  # 30 s by rx-a, then 30 s by rx-b, 10 adverts a second
            t = t0 + i * 0.1
            near, far = ("rx-a", "rx-b") if i < 300 else ("rx-b", "rx-a")
            evs = tracker.observe_many([Sighting("tag", near, -60, t, -59), Sighting("tag", far, -75, t, -59)])
            if i % 10 == 0:
                evs += tracker.tick(t)
            out += [(round(t, 1), e.kind, e.zone) for e in evs if e.kind in ("enter", "exit")]
        return out

    piped = walk(Pipeline(s, db=None, campaigns=CampaignIndex([]),  # type: ignore[arg-type]
                          identities=IdentityIndex()).presence)
    assert piped == walk(PresenceTracker(s.presence, s.receivers, adjacency=adjacency(s.zones)))
    assert piped != walk(PresenceTracker(s.presence, s.receivers))
    assert [(kind, zone) for _, kind, zone in piped] == [("enter", "a"), ("exit", "a"), ("enter", "b")]
