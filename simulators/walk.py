"""A simulated staff calibration walk: a member of staff carries a tag to every zone of the floor.

This is what ``gateway calibrate`` learns from (docs/presence.md, "Calibration"): the trace of one tag
(``time,receiver,beacon,rssi,tx_power``) and its labels (``beacon,start,end,zone``), made the way the
dashboard's calibration walk makes them. The member of staff walks into each zone and taps its name
on arrival (a label starts, a moment after stepping in: ``tap_at="edge"``; or after stopping at the
first spot, ``"spot"``), stays a while (``stand_s``), moving from shelf to shelf inside the zone as a
shopper does, then taps "walking on" (the label ends) and walks along the floor to the next zone.
The walks between zones are left unlabelled, or (``walking_labels``) labelled "no zone" from the
"walking on" tap to the next arrival tap, as a dashboard that records its "walking" state would: those
labels are the aisles, but also the last steps inside the zone just left and the first ones inside the
next, before its tap.

The tag is heard through the store simulator's own radio model (``simulators.store_sim``), with its own
seeded streams: the same scenario and seed give the same walk, advert for advert, and nothing sleeps;
times are seconds of the simulator's virtual clock from ``start``.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from beacons.types import Sighting
from gateway.presence.traces import Label, TraceWriter, write_labels
from simulators.people import VisitPath
from simulators.scenario import (
    BeaconSpec,
    Crowd,
    Person,
    RouteStop,
    Scenario,
    ScenarioError,
    Visit,
    Zone,
    load_scenario,
)
from simulators.store_sim import StoreSimulator

#: The member of staff's own tag: no customer's, no crowd's (their UUIDs differ).
STAFF_BEACON = BeaconSpec("5afe0000-ca1b-4a7e-9000-000000000001", 1, 1)
STAND_S = (20.0, 40.0)  # browsing in each zone, from reaching its first spot to setting off ("walking on")
TAP_DELAY_S = (0.5, 2.0)  # from stepping into the zone (or stopping at its first spot) to the arrival tap
AISLE_S = (10.0, 20.0)  # time standing in an aisle between two zones (``aisles``), labelled no zone
AISLE = "\x00aisle-"  # the stand-in zones of aisle stops (a name no floor plan uses)
WAIT_S = (20.0, 30.0)  # "tap the zone and wait": standing still just inside the zone before browsing it (``wait_s``)
WAIT_INSIDE_M = 1.0  # ... this far inside the edge one walked in by
WAIT = "\x00wait-"  # the stand-in zones of waits: WAIT + number + ":" + the zone waited in


@dataclass(frozen=True, slots=True)
class CalibrationWalk:
    """One walk: what the receivers heard of the staff tag, the dashboard's labels, and the true path."""

    beacon: str
    sightings: list[Sighting]
    labels: list[Label]
    path: VisitPath
    simulator: StoreSimulator  # the walk alone, for callers that add their own fading to its adverts


def aisle_spot(scenario: Scenario, a: Zone, b: Zone) -> tuple[float, float, float, float] | None:
    """A square of floor (up to 1 x 1 m) between zones ``a`` and ``b`` that lies in no zone and inside the store:
    around the middle of the longest stretch of the straight line between their centres outside every zone,
    if that stretch is 1 m or more. None when the zones leave no such aisle between them."""
    ax, ay = (a.rect[0] + a.rect[2]) / 2, (a.rect[1] + a.rect[3]) / 2
    bx, by = (b.rect[0] + b.rect[2]) / 2, (b.rect[1] + b.rect[3]) / 2
    width, depth = scenario.store.size_m
    steps = max(1, math.ceil(math.hypot(bx - ax, by - ay) / 0.1))

    def free(x: float, y: float) -> bool:
        in_store = width <= 0 or depth <= 0 or (0 <= x <= width and 0 <= y <= depth)
        return in_store and not any(z.contains(x, y) for z in scenario.zones)

    best: tuple[int, int] = (0, -1)
    run_start: int | None = None
    for k in range(steps + 2):
        if k <= steps and free(ax + (bx - ax) * k / steps, ay + (by - ay) * k / steps):
            run_start = k if run_start is None else run_start
        elif run_start is not None:
            if k - 1 - run_start > best[1] - best[0]:
                best = (run_start, k - 1)
            run_start = None
    if (best[1] - best[0]) * math.hypot(bx - ax, by - ay) / steps < 1.0:
        return None
    u = (best[0] + best[1]) / 2 / steps
    cx, cy = ax + (bx - ax) * u, ay + (by - ay) * u
    gap = min(math.hypot(max(z.rect[0] - cx, 0.0, cx - z.rect[2]), max(z.rect[1] - cy, 0.0, cy - z.rect[3]))
              for z in scenario.zones)
    half = min(0.5, (gap - 0.1) / math.sqrt(2))
    if half < 0.2:
        return None
    return (cx - half, cy - half, cx + half, cy + half)


def wait_spot(a: Zone | None, b: Zone, inside_m: float = WAIT_INSIDE_M) -> tuple[float, float, float, float]:
    """A 0.2 x 0.2 m square of zone ``b``, ``inside_m`` in from the edge one crosses walking in from ``a``'s
    centre to ``b``'s (``b``'s centre when there is no ``a``, or it is ``b``): where a member of staff who
    taps the zone on stepping in and waits there stands."""
    x0, y0, x1, y1 = b.rect
    bx, by = (x0 + x1) / 2, (y0 + y1) / 2
    cx, cy = bx, by
    if a is not None and a.name != b.name:
        ax, ay = (a.rect[0] + a.rect[2]) / 2, (a.rect[1] + a.rect[3]) / 2
        length = math.hypot(bx - ax, by - ay)
        clip = _clip_line(ax, ay, bx - ax, by - ay, b.rect)
        if length > 0 and clip is not None:
            u = min(clip[0] + inside_m / length, 1.0)
            cx, cy = ax + (bx - ax) * u, ay + (by - ay) * u
    return (cx - 0.1, cy - 0.1, cx + 0.1, cy + 0.1)


def _clip_line(x: float, y: float, dx: float, dy: float, rect: tuple[float, float, float, float]) -> (
        tuple[float, float] | None):
    """The parameter range [u0, u1] of (x, y) + u (dx, dy), u in [0, 1], inside ``rect`` (None: it misses)."""
    u0, u1 = 0.0, 1.0
    for p, q in ((-dx, x - rect[0]), (dx, rect[2] - x), (-dy, y - rect[1]), (dy, rect[3] - y)):
        if p == 0:
            if q < 0:
                return None
            continue
        r = q / p
        u0, u1 = (max(u0, r), u1) if p < 0 else (u0, min(u1, r))
    return (u0, u1) if u0 < u1 else None


def staff_scenario(scenario: Scenario, *, seed: int, zones: Sequence[str] | None = None,
                   stand_s: tuple[float, float] = STAND_S, beacon: BeaconSpec = STAFF_BEACON,
                   aisles: bool = False, aisle_s: tuple[float, float] = AISLE_S,
                   wait_s: tuple[float, float] | None = None) -> Scenario:
    """The scenario with only the member of staff in it: one visit at 0 s through ``zones`` (default: every
    zone, in the scenario's order), ``stand_s`` seconds in each (drawn from the seed); with ``aisles``, a stop
    of ``aisle_s`` seconds in the aisle between each two zones that have one (``aisle_spot``), each added to
    the scenario as a small zone named ``AISLE`` + a number (the walk labels it as no zone); with ``wait_s``,
    first a wait of that long in each zone, standing just inside the edge walked in by (``wait_spot``), each
    spot added as a small zone named ``WAIT`` + a number + ":" + the zone (the walk labels it as that zone)."""
    names = [z.name for z in scenario.zones] if zones is None else list(zones)
    for name in names:
        scenario.zone(name)  # KeyError naming an unknown zone
    for what, (lo, hi) in (("stand_s", stand_s), ("aisle_s", aisle_s), ("wait_s", wait_s or (1.0, 1.0))):
        if not 0 < lo <= hi:
            raise ValueError(f"{what}: expected (min, max) with 0 < min <= max, got {(lo, hi)!r}")
    rng = random.Random(f"{seed}/walk/stand")
    waits = random.Random(f"{seed}/walk/wait")  # its own stream: the stays are those of a walk without waits
    route: list[RouteStop] = []
    extra: list[Zone] = []
    for k, name in enumerate(names):
        if aisles and k:
            spot = aisle_spot(scenario, scenario.zone(names[k - 1]), scenario.zone(name))
            if spot is not None:
                extra.append(Zone(f"{AISLE}{len(extra)}", spot))
                route.append(RouteStop(extra[-1].name, rng.uniform(*aisle_s)))
        if wait_s is not None:
            came_from = scenario.zone(names[k - 1]) if len(names) > 1 else None
            extra.append(Zone(f"{WAIT}{len(extra)}:{name}", wait_spot(came_from, scenario.zone(name))))
            route.append(RouteStop(extra[-1].name, waits.uniform(*wait_s)))
        route.append(RouteStop(name, rng.uniform(*stand_s)))
    staff = Person("calibration-walk", "Calibration walk", None, beacon, visits=(Visit(0.0, tuple(route)),))
    return dataclasses.replace(scenario, zones=(*scenario.zones, *extra), people=(staff,), crowd=Crowd(),
                               devices=(), carts=())


def _zone(name: str | None) -> str | None:
    """The floor plan's zone of a stop's zone name: aisle stops are no zone, waits their zone."""
    if name is not None and name.startswith(WAIT):
        return name.partition(":")[2]
    return None if name is None or name.startswith(AISLE) else name


def arrivals(path: VisitPath) -> list[float]:
    """When the walk steps into each stop's zone: the start of the run of segments in that zone that ends
    at the stop (the stop's own start for the first one, already inside)."""
    t0s = [seg.t0 for seg in path.segments]
    out = []
    for (begin, _), stop in zip(path.stops, path.route, strict=True):
        i = bisect.bisect_right(t0s, begin) - 1
        while i > 0 and _zone(path.segments[i - 1].zone) == _zone(stop.zone):
            i -= 1
        out.append(min(begin, path.segments[i].t0))
    return out


def dashboard_labels(path: VisitPath, key: str, *, seed: int, tap_delay_s: tuple[float, float] = TAP_DELAY_S,
                     start: float = 0.0, walking_labels: bool = False, tap_at: str = "edge") -> list[Label]:
    """The labels the dashboard writes for a walk: per zone, from the arrival tap to the "walking on" tap
    as the member of staff sets off. The arrival tap comes ``tap_delay_s`` after stepping into the zone
    (``tap_at="edge"``) or after stopping at its first spot (``"spot"``). With ``walking_labels``, "no
    zone" (None) from each "walking on" tap to the next arrival tap. ``path`` still names aisle stops."""
    if tap_at not in ("edge", "spot"):
        raise ValueError(f"tap_at: expected edge or spot, got {tap_at!r}")
    rng = random.Random(f"{seed}/walk/taps")
    entered = arrivals(path) if tap_at == "edge" else [begin for begin, _ in path.stops]
    out: list[Label] = []
    waited = False
    for (begin, end), stop, arrival in zip(path.stops, path.route, entered, strict=True):
        tap = round(start + min(arrival + rng.uniform(*tap_delay_s), (begin + end) / 2), 3)
        if waited:  # a wait and the browse after it: one tap, one label
            out[-1] = out[-1]._replace(end=round(start + end, 3))
            waited = False
            continue
        waited = stop.zone.startswith(WAIT)
        if walking_labels and out:
            if out[-1].zone is None:  # an aisle stop just before: one label of no zone
                out[-1] = out[-1]._replace(end=tap)
            else:
                out.append(Label(key, out[-1].end, tap, None))
        out.append(Label(key, tap, round(start + end, 3), _zone(stop.zone)))
    return out


def calibration_walk(scenario: Scenario, *, seed: int, start: float = 0.0, zones: Sequence[str] | None = None,
                     stand_s: tuple[float, float] = STAND_S, tap_delay_s: tuple[float, float] = TAP_DELAY_S,
                     beacon: BeaconSpec = STAFF_BEACON, walking_labels: bool = False, aisles: bool = False,
                     aisle_s: tuple[float, float] = AISLE_S, tap_at: str = "edge",
                     wait_s: tuple[float, float] | None = None) -> CalibrationWalk:
    """Walk ``scenario``'s floor (every zone, or ``zones`` in that order) and return its trace and labels.

    ``start`` is the virtual clock's reading when the walk begins: sightings and labels are in its seconds.
    """
    staff = staff_scenario(scenario, seed=seed, zones=zones, stand_s=stand_s, beacon=beacon, aisles=aisles,
                           aisle_s=aisle_s, wait_s=wait_s)
    route_s = sum(stop.seconds for stop in staff.people[0].visits[0].route)
    sim = StoreSimulator(staff, start=start, seed=seed, duration_s=route_s + 1.0)
    (walker,) = sim.walkers
    (visit,) = walker.visits
    path = VisitPath(visit.key, visit.number, visit.route,  # aisle stops are no zone of the floor plan
                     [seg._replace(zone=_zone(seg.zone)) for seg in visit.segments], visit.stops, visit.address)
    tx = scenario.radio.tx_power
    sightings = [Sighting(walker.key, adv.receiver, adv.rssi, adv.time, tx)
                 for adv in sim.advertisements(start + path.start, start + path.end + 1.0)]
    labels = dashboard_labels(visit, walker.key, seed=seed, tap_delay_s=tap_delay_s, start=start,
                              walking_labels=walking_labels, tap_at=tap_at)
    return CalibrationWalk(walker.key, sightings, labels, path, sim)


def write_walk(walk: CalibrationWalk, out: Path, name: str = "walk") -> tuple[Path, Path]:
    """``<name>.trace.csv`` (with ``tx_power``) and ``<name>.labels.csv`` in ``out``: ``gateway calibrate``'s input."""
    out.mkdir(parents=True, exist_ok=True)
    trace, labels = out / f"{name}.trace.csv", out / f"{name}.labels.csv"
    with open(trace, "w", newline="") as f:
        TraceWriter(f, tx_power=True).write_many(walk.sightings)
    with open(labels, "w", newline="") as f:
        write_labels(f, walk.labels)
    return trace, labels


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simulators.walk SCENARIO --out DIR [--seed N] [--rounds N] [--aisles]``: write a walk's files."""
    ap = argparse.ArgumentParser(prog="python -m simulators.walk", description=main.__doc__)
    ap.add_argument("scenario", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, help="how many times the walk goes round every zone")
    ap.add_argument("--aisles", action="store_true", help="also stand in the aisle between two zones")
    ap.add_argument("--walking-labels", action="store_true", help="label the walks between zones as no zone")
    args = ap.parse_args(argv)
    try:
        sc = load_scenario(args.scenario)
    except ScenarioError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.rounds < 1:
        print(f"--rounds: expected 1 or more, got {args.rounds}", file=sys.stderr)
        return 2
    walk = calibration_walk(sc, seed=args.seed, zones=[z.name for z in sc.zones] * args.rounds, aisles=args.aisles,
                            walking_labels=args.walking_labels)
    trace, labels = write_walk(walk, args.out)
    print(f"{trace}: {len(walk.sightings)} sightings; {labels}: {len(walk.labels)} labels "
          f"({walk.path.end - walk.path.start:.0f} s walk)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
