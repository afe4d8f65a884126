"""Scoring presence against the truth, and the baselines it is scored beside.

Shared by ``gateway replay --labels`` (truth from a labels file) and the benchmarks
(``benchmarks/presence_quality.py``: truth from the simulator; ``benchmarks/presence_real.py``:
truth from recordings). docs/presence.md has the scoring rules.

The baselines are written from their published descriptions and share the tracker's zone bands:

- ``altbeacon_running_average``: AltBeacon's RunningAverageRssiFilter, the samples of the last
  20 s, sorted, 10 % trimmed at each end, averaged;
- ``espresense_tukey``: ESPresense-style, the samples of the last 15 s, mean of those inside the
  Tukey fences [Q1 - 1.5 IQR, Q3 + 1.5 IQR];
- ``loudest_receiver``: the room-presence rule of thumb: the identity is in the zone of the receiver
  that heard it loudest (mean RSSI of the last ``LOUDEST_WINDOW_S``, against the receiver's 1 m
  reference), whatever the distance.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from beacons.types import Sighting
from gateway.presence.settings import ReceiverSettings
from gateway.presence.traces import Label
from gateway.presence.tracker import DEFAULT_MEASURED_POWER, rssi_at

SETTLE_S = 3.0  # grace after a true zone change: the old zone or the new one both count as right
LOUDEST_WINDOW_S = 2.0

Event = tuple[str, str, str | None, float]  # kind, key, zone, emission time


class Tracker(Protocol):
    def observe(self, key: str, rx: str, rssi: int, t: float) -> list[Event]: ...
    def tick(self, now: float) -> list[Event]: ...



def altbeacon_running_average(v: list[int]) -> float:
    """RunningAverageRssiFilter on the window's samples (``v`` sorted): drop 10 % at each end, average."""
    cut = len(v) // 10
    kept = v[cut:len(v) - cut] if len(v) - 2 * cut > 0 else v
    return sum(kept) / len(kept)


def espresense_tukey(v: list[int]) -> float:
    """Mean of the window's samples (``v`` sorted) inside the Tukey fences (1.5 IQR beyond the quartiles)."""
    n = len(v)
    if n < 4:
        return sum(v) / n
    q1, q3 = v[n // 4], v[(3 * n) // 4]
    lo, hi = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
    kept = v[bisect.bisect_left(v, lo):bisect.bisect_right(v, hi)]
    return sum(kept) / len(kept)


class ZoneRule:
    """What the baselines share: a zone is entered at once (leaving the last), and left on silence."""

    exit_after_s: float
    zone: dict[str, str | None]
    last: dict[str, float]

    def _move(self, key: str, zone: str | None, t: float) -> list[Event]:
        cur = self.zone.get(key)
        if zone is None or zone == cur:
            return []
        out: list[Event] = [("exit", key, cur, t)] if cur is not None else []
        self.zone[key] = zone
        out.append(("enter", key, zone, t))
        return out

    def _forget(self, key: str) -> None:
        """Drop an identity's samples once it has gone quiet."""

    def tick(self, now: float) -> list[Event]:
        out: list[Event] = []
        for key, last in list(self.last.items()):
            if now - last > self.exit_after_s:
                cur = self.zone.pop(key, None)
                if cur is not None:
                    out.append(("exit", key, cur, now))
                del self.last[key]
                self._forget(key)
        return out


class WindowBaseline(ZoneRule):
    """A windowed RSSI filter + strongest receiver + distance bands, no hysteresis, exit on silence."""

    def __init__(self, window_s: float, estimate: Callable[[list[int]], float],
                 receivers: list[ReceiverSettings], exit_after_s: float) -> None:
        self.window_s, self.estimate, self.exit_after_s = window_s, estimate, exit_after_s
        self.ref = {r.id: float(r.measured_power or -59) for r in receivers}
        self.bands = {r.id: [(rssi_at(z.max_m, self.ref[r.id], r.path_loss_exponent), z.name)
                             for z in sorted(r.zones, key=lambda z: z.max_m)] for r in receivers}
        self.samples: dict[tuple[str, str], deque[tuple[float, int]]] = defaultdict(deque)
        self.sorted: dict[tuple[str, str], list[int]] = defaultdict(list)  # the window's samples, sorted
        self.value: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)  # key -> rx -> (est, last)
        self.zone: dict[str, str | None] = {}
        self.last: dict[str, float] = {}

    def observe(self, key: str, rx: str, rssi: int, t: float) -> list[Event]:
        q, v = self.samples[(key, rx)], self.sorted[(key, rx)]
        q.append((t, rssi))
        bisect.insort(v, rssi)
        while q[0][0] < t - self.window_s:
            del v[bisect.bisect_left(v, q.popleft()[1])]
        est = self.estimate(v)
        links = self.value[key]
        links[rx] = (est - self.ref[rx], t)
        self.last[key] = t
        best, strength = None, -math.inf
        for r, (s, last) in links.items():
            if t - last <= self.exit_after_s / 2 and s > strength:
                best, strength = r, s
        if best is None:
            return []
        zone = None
        for thr, name in self.bands[best]:
            if strength + self.ref[best] >= thr:
                zone = name
                break
        return self._move(key, zone, t)

    def _forget(self, key: str) -> None:
        self.value.pop(key, None)
        for rx in self.ref:
            self.samples.pop((key, rx), None)
            self.sorted.pop((key, rx), None)



def replay(tracker: Tracker, steps: Iterable[tuple[float, list[tuple[str, str, int, float]]]]) -> tuple[
        list[Event], float]:
    events: list[Event] = []
    observe, tick = tracker.observe, tracker.tick
    n = 0
    t0 = time.process_time()  # CPU time: other jobs on the machine do not inflate it
    for t1, rows in steps:
        for key, rx, rssi, t in rows:
            n += 1
            evs = observe(key, rx, rssi, t)
            if evs:
                events.extend(evs)
        events.extend(tick(t1))
    return events, (time.process_time() - t0) / max(n, 1)


def timelines(events: list[Event]) -> dict[str, tuple[list[float], list[str | None]]]:
    """Per key: the tracker's zone as a step function of emission time."""
    out: dict[str, tuple[list[float], list[str | None]]] = {}
    cur: dict[str, str | None] = {}
    for kind, key, zone, t in events:
        if kind == "enter":
            cur[key] = zone
        elif kind == "exit" and cur.get(key) == zone:
            cur[key] = None
        else:
            continue
        ts, zs = out.setdefault(key, ([], []))
        ts.append(t)
        zs.append(cur[key])
    return out


def state_at(line: tuple[list[float], list[str | None]] | None, t: float) -> str | None:
    if line is None:
        return None
    i = bisect.bisect_right(line[0], t) - 1
    return line[1][i] if i >= 0 else None



def p90(values: list[float]) -> float:
    v = sorted(values)
    return round(v[min(len(v) - 1, math.ceil(0.9 * len(v)) - 1)], 2) if v else math.nan


def p50(values: list[float]) -> float:
    v = sorted(values)
    return round(v[len(v) // 2], 2) if v else math.nan




class LoudestReceiver(ZoneRule):
    """The zone of the receiver heard loudest lately (its nearest band's zone), no hysteresis, exit on silence."""

    def __init__(self, receivers: Sequence[ReceiverSettings], exit_after_s: float,
                 window_s: float = LOUDEST_WINDOW_S) -> None:
        self.window_s, self.exit_after_s = window_s, exit_after_s
        self.ref = {r.id: float(r.measured_power or DEFAULT_MEASURED_POWER) for r in receivers}
        self.zone_of = {r.id: min(r.zones, key=lambda z: z.max_m).name for r in receivers if r.zones}
        self.samples: dict[str, dict[str, deque[tuple[float, int]]]] = defaultdict(dict)
        self.zone: dict[str, str | None] = {}
        self.last: dict[str, float] = {}

    def observe(self, key: str, rx: str, rssi: int, t: float) -> list[Event]:
        if rx not in self.zone_of:
            return []
        links = self.samples[key]
        q = links.get(rx)
        if q is None:
            q = links[rx] = deque()
        q.append((t, rssi))
        self.last[key] = t
        best, strength = None, -math.inf
        for r, lq in links.items():
            while lq and lq[0][0] < t - self.window_s:
                lq.popleft()
            if lq:
                s = sum(v for _, v in lq) / len(lq) - self.ref[r]
                if s > strength:
                    best, strength = r, s
        return self._move(key, self.zone_of[best] if best is not None else None, t)

    def _forget(self, key: str) -> None:
        self.samples.pop(key, None)


def baselines(receivers: Sequence[ReceiverSettings], exit_after_s: float) -> dict[str, Tracker]:
    """Fresh baselines by name, as every score reports them."""
    return {
        "altbeacon_running_average": WindowBaseline(20.0, altbeacon_running_average, list(receivers), exit_after_s),
        "espresense_tukey": WindowBaseline(15.0, espresense_tukey, list(receivers), exit_after_s),
        "loudest_receiver": LoudestReceiver(receivers, exit_after_s),
    }


Step = tuple[float, list[tuple[str, str, int, float]]]  # (step end, [(key, receiver, rssi, time)])


def steps(sightings: Iterable[Sighting], step_s: float = 1.0) -> Iterator[Step]:
    """Sightings (in time order) grouped per ``step_s``, as ``replay`` takes them: (step end, rows)."""
    rows: list[tuple[str, str, int, float]] = []
    end: float | None = None
    for s in sightings:
        if end is None:
            end = math.floor(s.time / step_s) * step_s + step_s
        while s.time >= end:
            yield end, rows
            rows = []
            end += step_s
        rows.append((s.key, s.receiver, s.rssi, s.time))
    if end is not None:
        yield end, rows


# ---------------------------------------------------------------------------------------
# Against labels


def _label_at(labels: list[Label], starts: list[float], t: float) -> Label | None:
    i = bisect.bisect_right(starts, t) - 1
    return labels[i] if i >= 0 and t < labels[i].end else None


def changes(line: tuple[list[float], list[str | None]] | None, t0: float, t1: float) -> int:
    """How often the zone changes inside [t0, t1) (entering no zone counts, repeating a zone does not)."""
    if line is None:
        return 0
    ts, zs = line
    n, prev = 0, state_at(line, t0)
    for i, (t, z) in enumerate(zip(ts, zs, strict=True)):
        if t0 < t < t1 and z != prev and (i + 1 == len(ts) or ts[i + 1] != t):  # an exit and enter at once: one
            n += 1
            prev = z
    return n


def score_labels(events: list[Event], labels: Sequence[Label], exit_after_s: float,
                 gaps_unknown: bool = False) -> dict[str, Any]:
    """Per-second zone accuracy, enter latency p50/p90, false exits per person-hour, zone changes per hour.

    Seconds are scored from each beacon's first label to its last; a gap between labels is "in no zone"
    (``gaps_unknown``: not scored, as a calibration walk's unlabelled walks from zone to zone).
    After a true change the old zone still counts for ``SETTLE_S``; after the last label, the last zone
    counts until an exit on silence was due (``exit_after_s + SETTLE_S``).
    """
    by_beacon: dict[str, list[Label]] = defaultdict(list)
    for lb in labels:
        by_beacon[lb.beacon].append(lb)
    lines = timelines(events)
    ok = total = 0
    person_s = 0.0
    latencies: list[float] = []
    missed = got_changes = true_changes = false_exits = 0
    for beacon, own in by_beacon.items():
        own.sort(key=lambda lb: lb.start)
        starts = [lb.start for lb in own]
        line = lines.get(beacon)
        t0, t1 = own[0].start, own[-1].end
        person_s += t1 - t0
        t = math.ceil(t0)
        while t < t1:
            allowed = {(at.zone if (at := _label_at(own, starts, t - k)) else None)
                       for k in range(int(SETTLE_S) + 1) if t - k >= t0}
            if not gaps_unknown or _label_at(own, starts, t) is not None:
                ok += state_at(line, t) in allowed
                total += 1
            t += 1
        prev: str | None = None
        for lb in own:
            if lb.zone != prev:
                true_changes += 1
            prev = lb.zone
            if lb.zone is None:
                continue
            first = _first_in(line, lb)
            if first is None:
                missed += 1
                latencies.append(lb.end - lb.start)
            else:
                latencies.append(first - lb.start)
        got_changes += changes(line, t0, t1)
        for kind, key, zone, when in events:
            if kind == "exit" and key == beacon:
                at = _label_at(own, starts, when)
                false_exits += at is not None and at.zone == zone
    hours = person_s / 3600.0
    return {
        "zone_accuracy": round(ok / total, 4) if total else math.nan,
        "enter_latency_p50_s": p50(latencies),
        "enter_latency_p90_s": p90(latencies),
        "false_exits_per_person_hour": round(false_exits / hours, 3) if hours else math.nan,
        "zone_changes_per_hour": round(got_changes / hours, 1) if hours else math.nan,
        "truth_zone_changes_per_hour": round(true_changes / hours, 1) if hours else math.nan,
        "false_exits": false_exits,
        "missed_enters": missed,
        "stops": len(latencies),
    }


def _first_in(line: tuple[list[float], list[str | None]] | None, lb: Label) -> float | None:
    """When the timeline first shows the label's zone within the label (its start if already there)."""
    if line is None:
        return None
    if state_at(line, lb.start) == lb.zone:
        return lb.start
    k = bisect.bisect_left(line[0], lb.start)
    while k < len(line[0]) and line[0][k] < lb.end:
        if line[1][k] == lb.zone:
            return line[0][k]
        k += 1
    return None


class NaiveBayesFingerprint(ZoneRule):
    """The fingerprinting baseline: per zone (and "no zone"), a Gaussian per receiver over its windowed
    mean RSSI, learnt from labelled traces; each sighting picks the likeliest class, no hysteresis.

    A receiver that has not heard the identity within the window reads ``FLOOR_DBM``, so silence is
    evidence too (a zone far from a receiver is learnt as "that receiver does not hear it").
    """

    FLOOR_DBM = -105.0
    WINDOW_S = 3.0
    MIN_VAR = 4.0  # dB^2: a receiver that always read the same in a zone must not be infinitely sure

    def __init__(self, receivers: Sequence[str], exit_after_s: float) -> None:
        self.receivers = list(receivers)
        self.exit_after_s = exit_after_s
        self.zone: dict[str, str | None] = {}
        self.last: dict[str, float] = {}
        self.samples: dict[str, dict[str, deque[tuple[float, int]]]] = defaultdict(dict)
        self.model: dict[str | None, list[tuple[float, float]]] = {}  # class -> per receiver (mean, var)
        self._sums: dict[str | None, list[list[float]]] = {}  # class -> per receiver (n, sum, sum of squares)

    def _features(self, key: str, rx: str, rssi: int, t: float) -> list[float]:
        links = self.samples[key]
        q = links.get(rx)
        if q is None:
            q = links[rx] = deque()
        q.append((t, rssi))
        out = []
        for r in self.receivers:
            lq = links.get(r)
            while lq and lq[0][0] < t - self.WINDOW_S:
                lq.popleft()
            out.append(sum(v for _, v in lq) / len(lq) if lq else self.FLOOR_DBM)
        return out

    def fit(self, sightings: Iterable[Sighting], labels: Sequence[Label]) -> None:
        """Add one labelled trace to the training set (call per trace, then score with ``observe``)."""
        own: dict[str, list[Label]] = defaultdict(list)
        for lb in labels:
            own[lb.beacon].append(lb)
        starts = {b: [lb.start for lb in v] for b, v in own.items()}
        sums = self._sums
        for s in sightings:
            if s.receiver not in self.receivers or s.key not in own:
                continue
            x = self._features(s.key, s.receiver, s.rssi, s.time)
            at = _label_at(own[s.key], starts[s.key], s.time)
            if at is None:
                continue
            acc = sums.setdefault(at.zone, [[0.0, 0.0, 0.0] for _ in self.receivers])
            for a, v in zip(acc, x, strict=True):
                a[0] += 1
                a[1] += v
                a[2] += v * v
        self.samples.clear()
        self.model = {c: [(a[1] / a[0], max(self.MIN_VAR, a[2] / a[0] - (a[1] / a[0]) ** 2)) for a in acc]
                      for c, acc in sums.items()}

    def observe(self, key: str, rx: str, rssi: int, t: float) -> list[Event]:
        if rx not in self.receivers or not self.model:
            return []
        x = self._features(key, rx, rssi, t)
        self.last[key] = t
        best = max(self.model, key=lambda c: -sum((v - m) ** 2 / var + math.log(var)
                                                   for v, (m, var) in zip(x, self.model[c], strict=True)))
        cur = self.zone.get(key)
        if best is None and cur is not None:
            del self.zone[key]
            return [("exit", key, cur, t)]
        return self._move(key, best, t)

    def _forget(self, key: str) -> None:
        self.samples.pop(key, None)
