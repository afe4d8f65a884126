"""People walking through the simulated store: where each tag is, and which zone it is really in.

Each visit is turned once into a list of straight-line segments (browse inside a zone,
pause, walk to the next zone), so ``position(t)`` is a bisect plus one multiply-add. Times
here are seconds from the scenario start; :mod:`simulators.store_sim` maps them to epoch.

The ground truth is geometric during transit (the zone whose rect the walker is crossing,
None in the aisles between) and the route's zone while the walker browses a stop.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from simulators.scenario import BeaconSpec, Person, RouteStop, Scenario, Zone

WALK_SPEED_M_S = 1.2  # between zones
BROWSE_SPEED_M_S = 0.6  # wandering inside a zone
PAUSE_S = (2.0, 8.0)  # standing still at a shelf
MARGIN_M = 0.5  # keep wander points off the zone edge so browsing stays inside the rect
FIRST_WAVE_S = 60.0


class Segment(NamedTuple):
    """Linear motion from (x0, y0) at t0 with velocity (vx, vy) until t1."""

    t0: float
    t1: float
    x0: float
    y0: float
    vx: float
    vy: float
    zone: str | None


class VisitPath:
    """One visit's precomputed timeline, from arrival until leaving the store."""

    __slots__ = ("_t0s", "address", "end", "key", "number", "route", "segments", "start", "stops")

    def __init__(
        self,
        key: str,
        number: int,
        route: tuple[RouteStop, ...],
        segments: Sequence[Segment],
        stops: Sequence[tuple[float, float]],
        address: str,
    ) -> None:
        self.key = key
        self.number = number
        self.route = route
        self.segments = tuple(segments)
        self.stops = tuple(stops)  # (t0, t1) of each route stop, for tests and ground truth checks
        self.address = address
        self.start = self.segments[0].t0
        self.end = self.segments[-1].t1
        self._t0s = [s.t0 for s in self.segments]

    def __repr__(self) -> str:
        return f"VisitPath({self.key!r}, #{self.number}, {self.start:.1f}..{self.end:.1f})"

    def segment_at(self, t: float) -> Segment | None:
        if not self.start <= t < self.end:
            return None
        return self.segments[bisect.bisect_right(self._t0s, t) - 1]

    def position(self, t: float) -> tuple[float, float] | None:
        s = self.segment_at(t)
        if s is None:
            return None
        dt = t - s.t0
        return (s.x0 + s.vx * dt, s.y0 + s.vy * dt)

    def zone(self, t: float) -> str | None:
        s = self.segment_at(t)
        return None if s is None else s.zone


class Walker:
    """One tag (an enrolled person's, or an anonymous shopper's) and all its visits."""

    __slots__ = ("beacon", "person", "visits")

    def __init__(self, beacon: BeaconSpec, person: Person | None, visits: Iterable[VisitPath]) -> None:
        self.beacon = beacon
        self.person = person
        self.visits = tuple(sorted(visits, key=lambda v: v.start))

    def __repr__(self) -> str:
        who = self.person.id if self.person else "anonymous"
        return f"Walker({who}, {self.key}, {len(self.visits)} visits)"

    @property
    def key(self) -> str:
        return self.beacon.key

    @property
    def person_id(self) -> str | None:
        return self.person.id if self.person else None

    def visit_at(self, t: float) -> VisitPath | None:
        for v in self.visits:
            if v.start <= t < v.end:
                return v
        return None

    def present(self, t: float) -> bool:
        return self.visit_at(t) is not None

    def position(self, t: float) -> tuple[float, float] | None:
        """Where the tag is, or None when it is not in the store."""
        v = self.visit_at(t)
        return None if v is None else v.position(t)

    def zone(self, t: float) -> str | None:
        """Ground-truth zone; None when absent or between zones (use ``present`` to tell apart)."""
        v = self.visit_at(t)
        return None if v is None else v.zone(t)


# ---------------------------------------------------------------------------------------
# Building visits


def random_address(rng: random.Random) -> str:
    """A resolvable-private-looking BLE address (top two bits 0b01), as bleak prints it."""
    v = (rng.getrandbits(48) & ~(0b11 << 46)) | (0b01 << 46)
    return ":".join(f"{(v >> s) & 0xFF:02X}" for s in range(40, -8, -8))


def _random_point(rng: random.Random, zone: Zone) -> tuple[float, float]:
    x0, y0, x1, y1 = zone.rect
    mx = MARGIN_M if x1 - x0 > 2 * MARGIN_M else 0.0
    my = MARGIN_M if y1 - y0 > 2 * MARGIN_M else 0.0
    return (rng.uniform(x0 + mx, x1 - mx), rng.uniform(y0 + my, y1 - my))


def _clip(x: float, y: float, dx: float, dy: float, rect: tuple[float, float, float, float]) -> (
    tuple[float, float] | None
):
    """Liang-Barsky: the parameter range [u0, u1] of p + u*d (u in [0, 1]) inside rect."""
    u0, u1 = 0.0, 1.0
    xmin, ymin, xmax, ymax = rect
    for p, q in ((-dx, x - xmin), (dx, xmax - x), (-dy, y - ymin), (dy, ymax - y)):
        if p == 0:
            if q < 0:
                return None
            continue
        r = q / p
        if p < 0:
            u0 = max(u0, r)
        else:
            u1 = min(u1, r)
    return (u0, u1) if u0 < u1 else None


def _transit(
    t0: float, a: tuple[float, float], b: tuple[float, float], zones: Sequence[Zone]
) -> list[Segment]:
    """Walk a -> b at walking speed, labelled by the zone rects crossed (None between them)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    dur = math.hypot(dx, dy) / WALK_SPEED_M_S
    if dur <= 0:
        return []
    cuts = {0.0, 1.0}
    for z in zones:
        c = _clip(a[0], a[1], dx, dy, z.rect)
        if c:
            cuts.update(c)
    us = sorted(cuts)
    vx, vy = dx / dur, dy / dur
    out: list[Segment] = []
    for ua, ub in itertools.pairwise(us):
        if ub - ua < 1e-9:
            continue
        mid = (ua + ub) / 2
        mx, my = a[0] + dx * mid, a[1] + dy * mid
        label = next((z.name for z in zones if z.contains(mx, my)), None)
        ta = t0 + ua * dur
        if out and out[-1].zone == label:
            out[-1] = out[-1]._replace(t1=t0 + ub * dur)
        else:
            out.append(Segment(ta, t0 + ub * dur, a[0] + dx * ua, a[1] + dy * ua, vx, vy, label))
    return out


def build_visit(
    scenario: Scenario, key: str, number: int, at: float, route: tuple[RouteStop, ...], rng: random.Random
) -> VisitPath:
    """Arrive at a random spot of the first zone, browse each stop for its seconds, walk between."""
    segments: list[Segment] = []
    stops: list[tuple[float, float]] = []
    t = float(at)
    pos: tuple[float, float] | None = None
    for stop in route:
        zone = scenario.zone(stop.zone)
        if pos is None:
            pos = _random_point(rng, zone)
        else:
            target = _random_point(rng, zone)
            walk = _transit(t, pos, target, scenario.zones)
            segments.extend(walk)
            if walk:
                t = walk[-1].t1
            pos = target
        begin, end = t, t + stop.seconds
        while t < end:
            pause = min(rng.uniform(*PAUSE_S), end - t)
            segments.append(Segment(t, t + pause, pos[0], pos[1], 0.0, 0.0, zone.name))
            t += pause
            if t >= end:
                break
            target = _random_point(rng, zone)
            dist = math.hypot(target[0] - pos[0], target[1] - pos[1])
            if dist <= 0:
                continue
            dur = dist / BROWSE_SPEED_M_S
            vx, vy = (target[0] - pos[0]) / dur, (target[1] - pos[1]) / dur
            step = min(dur, end - t)
            segments.append(Segment(t, t + step, pos[0], pos[1], vx, vy, zone.name))
            pos = target if step == dur else (pos[0] + vx * step, pos[1] + vy * step)
            t += step
        stops.append((begin, end))
    return VisitPath(key, number, route, segments, stops, random_address(rng))


def crowd_route(scenario: Scenario, rng: random.Random) -> tuple[RouteStop, ...]:
    """2-4 stops from ``route_zones``, always entrance first and checkout last."""
    c = scenario.crowd
    rz = c.route_zones
    first = "entrance" if "entrance" in rz else rz[0]
    last = "checkout" if "checkout" in rz else rz[-1]
    middle = [z for z in rz if z not in (first, last)]
    n_mid = min(rng.randint(0, 2), len(middle))
    names = [first, *rng.sample(middle, n_mid)] + ([last] if last != first else [])
    return tuple(RouteStop(z, rng.uniform(*c.dwell_s)) for z in names)


# ---------------------------------------------------------------------------------------
# Everyone


class Population:
    """All walkers of a scenario over ``duration_s`` seconds: enrolled people, then the crowd.

    The crowd is ``crowd.count`` anonymous tags: ``first_wave`` of them arrive within the
    first minute, then arrivals follow a Poisson process at ``arrivals_per_hour``; each
    arrival is a tag not currently inside (an arrival is dropped when all are), so the same
    anonymous tag can come back, as real footfall does.
    """

    def __init__(self, scenario: Scenario, duration_s: float, seed: int = 0) -> None:
        self.scenario = scenario
        self.duration_s = float(duration_s)
        self.seed = seed
        walkers = [self._enrolled(p) for p in scenario.people]
        walkers.extend(self._crowd())
        self.walkers: tuple[Walker, ...] = tuple(walkers)
        self.by_key = {w.key: w for w in self.walkers}
        #: Every visit, ordered by start (then walker order), with its walker.
        self.visits: tuple[tuple[Walker, VisitPath], ...] = tuple(
            sorted(((w, v) for w in self.walkers for v in w.visits), key=lambda wv: wv[1].start)
        )

    def _visit_rng(self, key: str, number: int) -> random.Random:
        """Each visit's own stream: adding a person or a crowd arrival leaves other paths unchanged."""
        return random.Random(f"{self.seed}/visit/{key}/{number}")

    def _enrolled(self, person: Person) -> Walker:
        key = person.beacon.key
        paths = [
            build_visit(self.scenario, key, n, v.at, v.route, self._visit_rng(key, n))
            for n, v in enumerate(person.visits)
            if v.at < self.duration_s
        ]
        return Walker(person.beacon, person, paths)

    def _crowd(self) -> list[Walker]:
        c = self.scenario.crowd
        if c.count <= 0:
            return []
        rng = random.Random(f"{self.seed}/crowd")
        taken = {p.beacon.key for p in self.scenario.people}
        beacons: list[BeaconSpec] = []
        while len(beacons) < c.count:
            b = BeaconSpec(c.uuid, rng.randrange(1, 0x10000), rng.randrange(1, 0x10000))
            if b.key not in taken:
                taken.add(b.key)
                beacons.append(b)

        arrivals = sorted(rng.uniform(0.0, FIRST_WAVE_S) for _ in range(min(c.first_wave, c.count)))
        if c.arrivals_per_hour > 0:
            t = FIRST_WAVE_S
            while True:
                t += rng.expovariate(c.arrivals_per_hour / 3600.0)
                if t >= self.duration_s:
                    break
                arrivals.append(t)

        busy_until = [-math.inf] * c.count
        paths: list[list[VisitPath]] = [[] for _ in beacons]
        for at in arrivals:
            if at >= self.duration_s:
                continue
            free = [i for i, until in enumerate(busy_until) if until <= at]
            if not free:
                continue
            i = rng.choice(free)
            route = crowd_route(self.scenario, rng)
            key, n = beacons[i].key, len(paths[i])
            path = build_visit(self.scenario, key, n, at, route, self._visit_rng(key, n))
            paths[i].append(path)
            busy_until[i] = path.end
        return [Walker(b, None, p) for b, p in zip(beacons, paths, strict=True)]

    def walker(self, key: str) -> Walker:
        return self.by_key[key]

    def present(self, t: float) -> list[Walker]:
        """Walkers inside the store at ``t`` (seconds from the scenario start)."""
        return [w for w in self.walkers if w.present(t)]

    def ground_truth(self, t: float) -> dict[str, str | None]:
        """beacon key -> true zone (None between zones) for everyone inside at ``t``."""
        out: dict[str, str | None] = {}
        for w in self.walkers:
            v = w.visit_at(t)
            if v is not None:
                out[w.key] = v.zone(t)
        return out
