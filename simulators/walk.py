"""A simulated staff calibration walk: a member of staff carries a tag to every zone of the floor.

This is what ``gateway calibrate`` learns from (docs/presence.md, "Calibration"): the trace of one tag
(``time,receiver,beacon,rssi,tx_power``) and its labels (``beacon,start,end,zone``), made the way the
dashboard's calibration walk makes them. The member of staff walks to a spot in each zone, taps the
zone's name on arrival (a label starts, a moment after arriving: people tap after they stop), stays a
while (``stand_s``), moving from shelf to shelf inside the zone as a shopper does, then taps "walking
on" (the label ends) and walks along the floor to the next zone. The walks between zones are left
unlabelled: on the dashboard they are "walking", which says nothing about where.

The tag is heard through the store simulator's own radio model (``simulators.store_sim``), with its own
seeded streams: the same scenario and seed give the same walk, advert for advert, and nothing sleeps;
times are seconds of the simulator's virtual clock from ``start``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass

from beacons.types import Sighting
from gateway.presence.traces import Label
from simulators.people import VisitPath
from simulators.scenario import BeaconSpec, Crowd, Person, RouteStop, Scenario, Visit
from simulators.store_sim import StoreSimulator

#: The member of staff's own tag: no customer's, no crowd's (their UUIDs differ).
STAFF_BEACON = BeaconSpec("5afe0000-ca1b-4a7e-9000-000000000001", 1, 1)
STAND_S = (20.0, 40.0)  # time in each zone, from the arrival tap to the "walking on" tap
TAP_DELAY_S = (0.5, 2.0)  # from stopping at the first spot to the tap


@dataclass(frozen=True, slots=True)
class CalibrationWalk:
    """One walk: what the receivers heard of the staff tag, the dashboard's labels, and the true path."""

    beacon: str
    sightings: list[Sighting]
    labels: list[Label]
    path: VisitPath
    simulator: StoreSimulator  # the walk alone, for callers that add their own fading to its adverts


def staff_scenario(scenario: Scenario, *, seed: int, zones: Sequence[str] | None = None,
                   stand_s: tuple[float, float] = STAND_S, beacon: BeaconSpec = STAFF_BEACON) -> Scenario:
    """The scenario with only the member of staff in it: one visit at 0 s through ``zones`` (default: every
    zone, in the scenario's order), ``stand_s`` seconds in each (drawn from the seed)."""
    names = [z.name for z in scenario.zones] if zones is None else list(zones)
    for name in names:
        scenario.zone(name)  # KeyError naming an unknown zone
    if not 0 < stand_s[0] <= stand_s[1]:
        raise ValueError(f"stand_s: expected (min, max) with 0 < min <= max, got {stand_s!r}")
    rng = random.Random(f"{seed}/walk/stand")
    route = tuple(RouteStop(name, rng.uniform(*stand_s)) for name in names)
    staff = Person("calibration-walk", "Calibration walk", None, beacon, visits=(Visit(0.0, route),))
    return dataclasses.replace(scenario, people=(staff,), crowd=Crowd(), devices=(), carts=())


def dashboard_labels(path: VisitPath, key: str, *, seed: int,
                     tap_delay_s: tuple[float, float] = TAP_DELAY_S, start: float = 0.0) -> list[Label]:
    """The labels the dashboard writes for a walk: per zone, from the arrival tap (``tap_delay_s`` after the
    member of staff stops at the zone's first spot) to the "walking on" tap as they set off."""
    rng = random.Random(f"{seed}/walk/taps")
    out = []
    for (begin, end), stop in zip(path.stops, path.route, strict=True):
        tap = min(begin + rng.uniform(*tap_delay_s), (begin + end) / 2)
        out.append(Label(key, round(start + tap, 3), round(start + end, 3), stop.zone))
    return out


def calibration_walk(scenario: Scenario, *, seed: int, start: float = 0.0, zones: Sequence[str] | None = None,
                     stand_s: tuple[float, float] = STAND_S, tap_delay_s: tuple[float, float] = TAP_DELAY_S,
                     beacon: BeaconSpec = STAFF_BEACON) -> CalibrationWalk:
    """Walk ``scenario``'s floor (every zone, or ``zones`` in that order) and return its trace and labels.

    ``start`` is the virtual clock's reading when the walk begins: sightings and labels are in its seconds.
    """
    staff = staff_scenario(scenario, seed=seed, zones=zones, stand_s=stand_s, beacon=beacon)
    route_s = sum(stop.seconds for stop in staff.people[0].visits[0].route)
    sim = StoreSimulator(staff, start=start, seed=seed, duration_s=route_s + 1.0)
    (walker,) = sim.walkers
    (path,) = walker.visits
    tx = scenario.radio.tx_power
    sightings = [Sighting(walker.key, adv.receiver, adv.rssi, adv.time, tx)
                 for adv in sim.advertisements(start + path.start, start + path.end + 1.0)]
    labels = dashboard_labels(path, walker.key, seed=seed, tap_delay_s=tap_delay_s, start=start)
    return CalibrationWalk(walker.key, sightings, labels, path, sim)
