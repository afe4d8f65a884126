"""The simulated store's radio side: what every receiver hears, advert by advert.

Each visit gets its own seeded random streams (advert jitter, radio noise, loss), so the
adverts of a window depend only on the seed and the window: asking for [t0, t1) in one call
or in many consecutive calls gives the same list, and going back in time regenerates the
same adverts. A visit's adverts are generated lazily as windows reach them and dropped
once windows have moved past the visit, which keeps a long demo's memory flat.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from operator import attrgetter

from beacons.encode import ibeacon_payload
from beacons.rotating import app_beacon
from beacons.types import Advertisement
from simulators.people import Population, VisitPath, Walker, random_address
from simulators.radio import Link, RadioModel
from simulators.scenario import Scenario

ADV_DELAY_MAX_S = 0.010  # BLE adds 0-10 ms of random delay to every advertising event
_TIME = attrgetter("time")


@dataclass
class AppBeacons:
    """The shop app's rotating iBeacon on enrolled customers' phones: ``secrets`` maps a walker's key (its
    person's beacon key) to the secret the gateway issued at enrolment. Such a phone advertises, in each
    window of ``period_s``, the major/minor of that window from another random private address (phones
    rotate theirs on the same 15 minutes), so nothing it sends repeats from one window to the next."""

    uuid: str
    period_s: int = 900
    secrets: MutableMapping[str, bytes] = field(default_factory=dict)


class _VisitAdverts:
    """Adverts of one visit, generated in time order on demand."""

    __slots__ = (
        "_app",
        "_base",
        "_interval",
        "_jitter",
        "_k",
        "_links",
        "_radio",
        "_seg",
        "_sim",
        "_start",
        "_tag",
        "_walker",
        "_window",
        "address",
        "adverts",
        "payload",
        "times",
        "visit",
    )

    def __init__(self, sim: StoreSimulator, walker: Walker, visit: VisitPath) -> None:
        tag = f"{sim.seed}/{walker.key}/{visit.number}"
        radio = sim.scenario.radio
        self.visit = visit
        self.address = visit.address
        self.payload = sim.payload_for(walker)
        self._tag = tag
        self._window = -1  # the app beacon's window the payload and address are for (unused for a tag)
        self._app = sim.app if sim.app is not None and walker.key in sim.app.secrets else None
        self._walker = walker
        self._sim = sim
        self._radio = RadioModel.for_radio(radio, f"radio/{tag}")
        self._jitter = random.Random(f"jitter/{tag}").random
        self._links = sim._links
        self._start = sim.start
        self._interval = radio.advert_interval_s
        self._base = sim.phase_for(walker)
        k = max(0, math.ceil((visit.start - self._base) / self._interval))
        while self._base + k * self._interval < visit.start:  # float rounding: never before arrival
            k += 1
        self._k = k
        self._seg = 0
        self.adverts: list[Advertisement] = []
        self.times: list[float] = []

    def extend_to(self, r1: float) -> None:
        """Generate every advert whose transmission starts before ``r1`` (scenario seconds)."""
        visit, segs = self.visit, self.visit.segments
        limit = min(r1, visit.end)
        interval, base0, start = self._interval, self._base, self._start
        hear, jitter, links = self._radio.hear, self._jitter, self._links
        adverts, times = self.adverts, self.times
        address, payload = self.address, self.payload
        k, i = self._k, self._seg
        t = base0 + k * interval
        while t < limit:
            while segs[i].t1 <= t:
                i += 1
            s = segs[i]
            dt = t - s.t0
            x, y = s.x0 + s.vx * dt, s.y0 + s.vy * dt
            when = start + t + jitter() * ADV_DELAY_MAX_S
            if self._app is not None and int(when // self._app.period_s) != self._window:
                self._window = int(when // self._app.period_s)
                payload = self.payload = self._sim.app_payload(self._walker, self._window)
                address = self.address = window_address(self._tag, self._window)
            for rx_id, level in hear(x, y, links):
                adverts.append(Advertisement(address, level, when, rx_id, payload))
                times.append(when)
            k += 1
            t = base0 + k * interval
        self._k, self._seg = k, i

    def window(self, t0: float, t1: float) -> list[Advertisement]:
        self.extend_to(t1 - self._start)
        return self.adverts[bisect.bisect_left(self.times, t0):bisect.bisect_left(self.times, t1)]


def window_address(tag: str, window: int) -> str:
    """A phone's random private address for one window: drawn from the visit and the window, so it is the
    same whenever the window is generated again and unrelated to any other window's."""
    return random_address(random.Random(f"address/{tag}/{window}"))


class StoreSimulator:
    """Walkers + radio model + receivers: adverts in, ground truth out.

    ``start`` is the epoch second the scenario starts at (scenario ``at`` values are
    offsets from it); walkers are generated for ``duration_s`` seconds from ``seed``.
    """

    def __init__(self, scenario: Scenario, *, start: float, seed: int = 0, duration_s: float,
                 app: AppBeacons | None = None) -> None:
        """``app``: enrolled customers whose phones advertise the app's rotating beacon (their secrets may be
        added after construction, once the gateway issued them); the others keep their static tags."""
        self.scenario = scenario
        self.app = app
        self.start = float(start)
        self.seed = seed
        self.duration_s = float(duration_s)
        self.population = Population(scenario, duration_s, seed)
        self._links = tuple(Link.of(rx) for rx in scenario.receivers)
        self._payloads: dict[str, bytes] = {}
        self._visits = self.population.visits
        self._visit_starts = [v.start for _, v in self._visits]
        self._streams: dict[int, _VisitAdverts] = {}

    @property
    def walkers(self) -> tuple[Walker, ...]:
        return self.population.walkers

    def payload_for(self, walker: Walker) -> bytes:
        """The raw AD bytes the walker's tag advertises (an iBeacon frame), built once."""
        p = self._payloads.get(walker.key)
        if p is None:
            b = walker.beacon
            p = ibeacon_payload(b.uuid, b.major, b.minor, self.scenario.radio.tx_power)
            self._payloads[walker.key] = p
        return p

    def app_payload(self, walker: Walker, window: int) -> bytes:
        """The app's iBeacon for ``window``, from the walker's secret (AppBeacons)."""
        assert self.app is not None
        major, minor = app_beacon(self.app.secrets[walker.key], window)
        return ibeacon_payload(self.app.uuid, major, minor, self.scenario.radio.tx_power)

    def payload_at(self, walker: Walker, when: float) -> bytes:
        """What the walker advertises at epoch ``when``: the app beacon's window for a phone, else its tag."""
        if self.app is not None and walker.key in self.app.secrets:
            return self.app_payload(walker, int(when // self.app.period_s))
        return self.payload_for(walker)

    def phase_for(self, walker: Walker) -> float:
        """Per-tag advertising phase, so tags do not all transmit on the same instant."""
        rng = random.Random(f"{self.seed}/phase/{walker.key}")
        return rng.uniform(0.0, self.scenario.radio.advert_interval_s)

    def advertisements(self, t0: float, t1: float) -> list[Advertisement]:
        """Every advert heard by any receiver with ``t0 <= time < t1`` (epoch), in time order."""
        if t1 <= t0:
            return []
        r0, r1 = t0 - self.start, t1 - self.start
        out: list[Advertisement] = []
        for idx in range(bisect.bisect_left(self._visit_starts, r1)):
            walker, visit = self._visits[idx]
            if visit.end + ADV_DELAY_MAX_S <= r0:
                self._streams.pop(idx, None)  # windows moved past it; regenerated identically if asked
                continue
            stream = self._streams.get(idx)
            if stream is None:
                stream = self._streams[idx] = _VisitAdverts(self, walker, visit)
            out.extend(stream.window(t0, t1))
        out.sort(key=_TIME)
        return out

    def ground_truth(self, t: float) -> dict[str, str | None]:
        """beacon key -> the zone its walker is really in at epoch ``t`` (None between zones)."""
        return self.population.ground_truth(t - self.start)

    def people_present(self, t: float) -> list[Walker]:
        """Walkers (enrolled and anonymous) inside the store at epoch ``t``."""
        return self.population.present(t - self.start)
