"""Presence from sightings: zones by distance bands, hysteresis, dwell ticks, exits on silence."""

from __future__ import annotations

from beacons.types import Sighting
from gateway.config import PresenceSettings, ReceiverSettings, ZoneBand
from gateway.presence import PresenceTracker, distance_m

T0 = 1_000_000.0
KEY = "ibeacon:00000000-0000-0000-0000-000000000001:1:1"


def tracker(**over: float) -> PresenceTracker:
    settings = PresenceSettings(exit_after_s=10, dwell_every_s=5, smoothing=0.3, visit_end_after_s=60)
    for k, v in over.items():
        setattr(settings, k, v)
    receivers = [
        ReceiverSettings("rx-a", [ZoneBand("a-near", 2.0), ZoneBand("a-far", 6.0)], measured_power=-59),
        ReceiverSettings("rx-b", [ZoneBand("b", 4.0)], measured_power=-59),
    ]
    return PresenceTracker(settings, receivers)


def see(t: PresenceTracker, time: float, rssi: int, rx: str = "rx-a", key: str = KEY):
    return t.observe(Sighting(key, rx, rssi, time, -59))


def kinds(events):
    return [(e.kind, e.zone) for e in events]


def test_distance_model():
    assert abs(distance_m(-59, -59, 2.0) - 1.0) < 1e-9
    assert abs(distance_m(-79, -59, 2.0) - 10.0) < 1e-9


def test_enter_needs_two_agreeing_samples_then_visit_and_zone_start():
    t = tracker()
    assert see(t, T0, -60) == []  # one sample is not evidence enough
    assert kinds(see(t, T0 + 1, -60)) == [("visit_start", "a-near"), ("enter", "a-near")]


def test_a_single_outlier_does_not_move_anyone():
    t = tracker()
    see(t, T0, -60)
    see(t, T0 + 1, -60)
    evs = see(t, T0 + 2, -90)  # one very weak sample: clamped, still near
    assert evs == [] and t.tracks[KEY].zone == "a-near"


def test_dwell_every_n_seconds_with_growing_duration():
    t = tracker()
    see(t, T0, -60)
    see(t, T0 + 1, -60)
    dwells = [e for s in range(2, 13) for e in see(t, T0 + s, -60) if e.kind == "dwell"]
    assert [round(e.dwell_s) for e in dwells] == [5, 10]


def test_exit_after_silence_and_visit_end_later():
    t = tracker()
    see(t, T0, -60)
    see(t, T0 + 1, -60)
    assert t.tick(T0 + 10) == []  # 9 s of silence: still inside
    evs = t.tick(T0 + 12)
    assert kinds(evs) == [("exit", "a-near")] and evs[0].time == T0 + 1
    assert kinds(t.tick(T0 + 62)) == [("visit_end", None)]
    assert KEY not in t.tracks  # forgotten: nothing about it is kept


def test_strongest_receiver_owns_the_identity():
    t = tracker()
    for s in range(4):
        see(t, T0 + s, -75, "rx-a")  # ~6 m from a: a-far would match
        see(t, T0 + s + 0.5, -62, "rx-b")  # ~1.4 m from b
    assert t.tracks[KEY].zone == "b"


def test_moving_between_zones_exits_the_old_one():
    t = tracker()
    see(t, T0, -60)
    see(t, T0 + 1, -60)
    events = []
    for s in range(2, 30):
        events += see(t, T0 + s, -70)  # about 3.5 m: a-far
    assert ("exit", "a-near") in kinds(events) and ("enter", "a-far") in kinds(events)


def test_bad_input_is_counted_and_dropped():
    t = tracker()
    assert see(t, T0, 127) == [] and see(t, T0, 0) == [] and see(t, T0, 5) == []
    assert see(t, T0, -60, rx="rx-unknown") == []
    assert t.dropped["bad_rssi"] == 3 and t.dropped["unknown_receiver"] == 1
    see(t, T0 + 100, -60)
    assert see(t, T0 + 50, -60) == []  # the clock stepped back
    assert t.dropped["clock_backwards"] == 1


def test_occupancy_counts_people_per_zone():
    t = tracker()
    for key in ("k1", "k2"):
        see(t, T0, -60, key=key)
        see(t, T0 + 1, -60, key=key)
    assert t.occupancy() == {"a-near": 2}
