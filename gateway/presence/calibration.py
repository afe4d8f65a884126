"""What a labelled walk teaches about the floor: each zone's RSSI signature over every receiver, each
receiver's offset and path loss, and how fast people move between zones (docs/presence.md, "Calibration").

``learn`` runs the tracker's own RSSI filter over a trace, so a signature is the distribution of what the
tracker sees at run time: per (zone, receiver) a Gaussian of the filtered RSSI (its sd floored at
``SD_FLOOR_DB``) and the share of labelled seconds in which the receiver heard the identity at all. A
zone is then told apart by the joint readings of all receivers, so it needs no receiver of its own.
``dumps`` writes it as commented TOML, ``load`` reads it back (a ``ConfigError`` naming the file and the
key on bad input), ``report`` says how well each zone stands apart from its nearest other zone.
"""

from __future__ import annotations

import bisect
import math
import re
import tomllib
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import ConfigDict, Field, model_validator

from beacons.types import Sighting
from devices.files import Document, FileModel, Invalid, Problem, build, fail
from gateway.errors import ConfigError
from gateway.presence.model import rssi_at
from gateway.presence.settings import FloorZone, PresenceSettings, ReceiverSettings
from gateway.presence.traces import Label

SAMPLE_S = 1.0  # signatures are sampled once per labelled second (time weighs, not the advert rate)
SD_FLOOR_DB = 2.5  # a signature's sd is at least this: a short walk must not make a zone razor-thin
MIN_SECONDS = 10  # a zone heard in fewer labelled seconds keeps the band model (the config's [[receivers]])
MIN_HEARD = 5  # samples of a receiver in a zone before its Gaussian is learned (else: heard share only)
PRIOR_STAYS = 1.0  # stays (and transits) the settings' zone_stay_s / transit_s weigh as, against the walk's
PRIOR_SECONDS = 30.0  # labelled seconds the even prior (half in no zone) weighs as, against the walk's share
DEFAULT_MEASURED_POWER = -59.0  # as the tracker: the RSSI at 1 m when neither receiver nor beacon says
GATE_SIGMAS, OUTLIER_CLAMP_DB = 2.5, 12.0  # the tracker's filter constants (gateway/presence/tracker.py)
EXPONENT_RANGE = (1.2, 6.0)  # a fitted path-loss exponent is clamped to what indoor radio does
# Windowed-mean evidence (the fingerprint's observation, ``Calibration.windowed_weight``): per receiver the mean
# RSSI of its adverts of the last WINDOW_S, or WINDOW_FLOOR_DBM when it heard none, a Gaussian per state.
WINDOW_S = 3.0
WINDOW_FLOOR_DBM = -105.0
WINDOW_SD_FLOOR_DB = 2.0
# The [presence] settings a calibration may carry (chosen on the walk: gateway/presence/tuning.py).
TUNABLE = frozenset({"fade_time_s", "fade_db", "rssi_drift_db_s", "switch_posterior", "exit_posterior"})


@dataclass(frozen=True)
class Signature:
    """What one receiver hears of an identity in one zone: filtered RSSI mean and sd (None when the receiver
    was heard too rarely there to fit one), and the share of seconds it heard the identity at all."""

    receiver: str
    mean: float | None
    sd: float | None
    heard: float


@dataclass(frozen=True)
class ZoneCalibration:
    name: str
    seconds: float  # labelled seconds the signature is learned from
    stay_s: float  # mean stay (the walk's, weighed with the settings' zone_stay_s)
    neighbours: tuple[str, ...]  # the zones the walk went to from this one, directly or through no zone
    signature: tuple[Signature, ...]
    # per receiver the windowed mean RSSI's mean and sd (silence read as WINDOW_FLOOR_DBM), heard: share not silent
    windowed: tuple[Signature, ...] = ()


@dataclass(frozen=True)
class ReceiverCalibration:
    """The log-distance model fitted to one receiver: RSSI = (reference + offset_db) - 10 exponent log10 d,
    with reference its configured measured_power (or -59 dBm). Used for zones the walk did not cover."""

    id: str
    offset_db: float
    exponent: float
    fitted: str  # "positions" (receiver position + zone polygons), "bands" (against its bands), or "none"


@dataclass(frozen=True)
class Calibration:
    """Pure data, serialisable with ``dumps`` / ``load``."""

    receivers: tuple[ReceiverCalibration, ...]
    zones: tuple[ZoneCalibration, ...]
    outside: tuple[Signature, ...] = ()  # "no zone", when the walk had labelled seconds outside every zone
    transit_s: float = 5.0
    direct_share: float = 0.2
    outside_share: float = 0.5  # of the labelled seconds, the share in no zone: the prior of someone first heard
    tuned: tuple[tuple[str, float], ...] = ()  # [presence] settings chosen on the walk (leave one beacon out)
    # How much the config's distance bands still count beside the signatures, per look (0: not at all;
    # chosen on the walk with ``tuned``): a short walk's Gaussians overfit where the bands' geometry does not.
    band_weight: float = 0.0
    # How much the windowed-mean evidence counts, in looks per second (0: not used; chosen on the walk):
    # the joint reading of every receiver, silent ones included, against each state's ``windowed`` Gaussians.
    windowed_weight: float = 0.0
    outside_windowed: tuple[Signature, ...] = ()  # "no zone"'s windowed Gaussians, when learned
    # The tracker widens every learned signature's sd to at least this (dB; 0: as learned, chosen on the walk):
    # a walk's minutes in a zone see fewer spots and fades than shoppers standing anywhere in it.
    sd_floor_db: float = 0.0
    source: tuple[str, ...] = ()  # how it was made (the TOML's header comment)

    def zone(self, name: str) -> ZoneCalibration | None:
        return next((z for z in self.zones if z.name == name), None)


# ---------------------------------------------------------------------------------------- learning


@dataclass
class _Filtered:
    rssi: float
    var: float
    last: float


@dataclass
class _Acc:
    """Per (state, receiver): samples heard, their sum and sum of squares, and seconds labelled."""

    seconds: int = 0
    heard_any: int = 0  # of those, the seconds in which some receiver heard the identity
    heard: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0, 0.0]))
    windowed: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0, 0.0, 0.0]))


def _filter(link: _Filtered | None, rssi: float, t: float, st: PresenceSettings) -> _Filtered:
    """The tracker's per-link filter (Kalman with a gated innovation, or the time-aware EMA), one advert."""
    if link is None or t - link.last > st.exit_after_s:
        return _Filtered(float(rssi), st.rssi_noise_db ** 2, t)
    dt = max(0.0, t - link.last)
    innov = rssi - link.rssi
    if st.rssi_filter == "kalman":
        p = link.var + st.rssi_drift_db_s ** 2 * dt
        s2 = p + st.rssi_noise_db ** 2
        gate2 = GATE_SIGMAS * GATE_SIGMAS * s2
        if innov * innov > gate2:
            innov = math.copysign(math.sqrt(gate2), innov)
        k = p / s2
        link.rssi += k * innov
        link.var = (1.0 - k) * p
    else:
        alpha = 1.0 - (1.0 - st.smoothing) ** max(dt, 0.05)
        link.rssi += alpha * max(-OUTLIER_CLAMP_DB, min(OUTLIER_CLAMP_DB, innov))
    link.last = max(link.last, t)
    return link


def _label_at(labels: list[Label], starts: list[float], t: float) -> Label | None:
    i = bisect.bisect_right(starts, t) - 1
    return labels[i] if i >= 0 and t < labels[i].end else None


def _runs(labels: list[Label]) -> list[tuple[str | None, float, float]]:
    """A beacon's labels as runs of one state (zone or None), touching labels of one zone merged; a gap
    between labels ends a run (nothing is known there)."""
    runs: list[tuple[str | None, float, float]] = []
    for lb in labels:
        if runs and runs[-1][0] == lb.zone and abs(runs[-1][2] - lb.start) < 1e-9:
            runs[-1] = (lb.zone, runs[-1][1], lb.end)
        else:
            runs.append((lb.zone, lb.start, lb.end))
    return runs


def _mean_distance(pos: Sequence[float], polygon: Sequence[Sequence[float]]) -> float | None:
    """Mean distance from ``pos`` to the points of a polygon (a 20 x 20 grid over its box, inside only)."""
    if len(polygon) < 3:
        return None
    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    total, count = 0.0, 0
    for i in range(20):
        for j in range(20):
            x = min(xs) + (i + 0.5) * (max(xs) - min(xs)) / 20
            y = min(ys) + (j + 0.5) * (max(ys) - min(ys)) / 20
            if _inside((x, y), polygon):
                total += max(math.hypot(x - pos[0], y - pos[1]), 0.5)
                count += 1
    return total / count if count else None


def _inside(p: tuple[float, float], poly: Sequence[Sequence[float]]) -> bool:
    x, y = p
    inside = False
    for (x1, y1), (x2, y2) in zip(poly, [*poly[1:], poly[0]], strict=True):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def _signature(acc: _Acc, receivers: Sequence[str]) -> tuple[Signature, ...]:
    out = []
    for rid in receivers:
        n, s, ss = acc.heard.get(rid, (0.0, 0.0, 0.0))
        heard = round(n / acc.seconds, 4) if acc.seconds else 0.0
        if n >= MIN_HEARD:
            mean = s / n
            sd = math.sqrt(max(ss / n - mean * mean, 0.0) * n / (n - 1))
            out.append(Signature(rid, round(mean, 2), round(max(sd, SD_FLOOR_DB), 2), heard))
        else:
            out.append(Signature(rid, None, None, heard))
    return tuple(out)


def _windowed(acc: _Acc, receivers: Sequence[str]) -> tuple[Signature, ...]:
    out = []
    for rid in receivers:
        n, s, ss, heard = acc.windowed.get(rid, (0.0, 0.0, 0.0, 0.0))
        if n < MIN_HEARD:
            return ()
        mean = s / n
        sd = math.sqrt(max(ss / n - mean * mean, 0.0) * n / (n - 1))
        out.append(Signature(rid, round(mean, 2), round(max(sd, WINDOW_SD_FLOOR_DB), 2), round(heard / n, 4)))
    return tuple(out)


def _fit_receiver(rx: ReceiverSettings, zones: Sequence[ZoneCalibration],
                  polygons: dict[str, FloorZone]) -> ReceiverCalibration:
    """Offset and exponent from the zones' mean RSSI at this receiver: against the distances from its
    position to each zone's floor (a line fit in log distance), else against its own bands."""
    ref = float(rx.measured_power) if rx.measured_power is not None else DEFAULT_MEASURED_POWER
    n = rx.path_loss_exponent
    means = {z.name: sg.mean for z in zones for sg in z.signature if sg.receiver == rx.id and sg.mean is not None}
    points: list[tuple[float, float]] = []
    if rx.position is not None:
        for name, mean in means.items():
            fz = polygons.get(name)
            d = _mean_distance(rx.position, fz.polygon) if fz is not None else None
            if d is not None:
                points.append((math.log10(d), mean))
    if len(points) >= 2 and max(p[0] for p in points) - min(p[0] for p in points) > 0.1:
        mx = sum(p[0] for p in points) / len(points)
        my = sum(p[1] for p in points) / len(points)
        slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
        n = min(max(-slope / 10.0, EXPONENT_RANGE[0]), EXPONENT_RANGE[1])
        power = my + 10.0 * n * mx
        return ReceiverCalibration(rx.id, round(power - ref, 2), round(n, 2), "positions")
    if points:
        power = sum(y + 10.0 * n * x for x, y in points) / len(points)
        return ReceiverCalibration(rx.id, round(power - ref, 2), n, "positions")
    # Against its bands: uniform over a disc of radius R, the mean of log10 d is log10 R - 1 / (2 ln 10).
    offsets = [means[b.name] - rssi_at(b.max_m * math.exp(-0.5), ref, n) for b in rx.zones if b.name in means]
    if offsets:
        return ReceiverCalibration(rx.id, round(sum(offsets) / len(offsets), 2), n, "bands")
    return ReceiverCalibration(rx.id, 0.0, n, "none")


def learn(sightings: Iterable[Sighting], labels: Sequence[Label], receivers: Sequence[ReceiverSettings],
          settings: PresenceSettings, zones: Sequence[FloorZone] = ()) -> Calibration:
    """A calibration from a labelled walk: sightings in time order (as a trace has them), labels of any beacons.

    Each labelled second, every receiver whose link was heard in the last ``exit_after_s / 2`` (the
    tracker's notion of a live link) gives one sample of its filtered RSSI to the labelled state.
    Sightings of unknown receivers or unlabelled beacons are ignored. ``gateway/presence/tuning.py``
    (``learn_tuned``) also chooses the tracker's look time, drift and switch threshold on the walk.
    """
    rx_ids = [r.id for r in receivers]
    known = set(rx_ids)
    by_beacon: dict[str, list[Label]] = defaultdict(list)
    for lb in sorted(labels, key=lambda lb: (lb.beacon, lb.start)):
        by_beacon[lb.beacon].append(lb)
    starts = {b: [lb.start for lb in lbs] for b, lbs in by_beacon.items()}
    acc: dict[str | None, _Acc] = defaultdict(_Acc)
    links: dict[str, dict[str, _Filtered]] = defaultdict(dict)
    windows: dict[str, dict[str, deque[tuple[float, int]]]] = defaultdict(lambda: defaultdict(deque))
    clock: dict[str, float] = {b: lbs[0].start for b, lbs in by_beacon.items()}
    live_s = settings.exit_after_s / 2
    used = 0

    def sample_until(beacon: str, t: float) -> None:
        lbs, st = by_beacon[beacon], starts[beacon]
        now = clock[beacon]
        while now <= t and now < lbs[-1].end:
            lb = _label_at(lbs, st, now)
            if lb is not None:
                a = acc[lb.zone]
                a.seconds += 1
                live = [(rid, lk) for rid, lk in links[beacon].items() if now - lk.last <= live_s]
                a.heard_any += bool(live)
                for rid, lk in live:
                    h = a.heard[rid]
                    h[0] += 1
                    h[1] += lk.rssi
                    h[2] += lk.rssi * lk.rssi
                wins = windows[beacon]
                for rid in rx_ids:
                    q = wins.get(rid)
                    while q and q[0][0] < now - WINDOW_S:
                        q.popleft()
                    x = sum(v for _, v in q) / len(q) if q else WINDOW_FLOOR_DBM
                    h = a.windowed[rid]
                    h[0] += 1
                    h[1] += x
                    h[2] += x * x
                    h[3] += bool(q)
            now += SAMPLE_S
        clock[beacon] = now

    for s in sightings:
        if s.key not in by_beacon or s.receiver not in known or not -127 <= s.rssi < 0:
            continue
        sample_until(s.key, s.time - 1e-9)
        links[s.key][s.receiver] = _filter(links[s.key].get(s.receiver), s.rssi, s.time, settings)
        q = windows[s.key][s.receiver]
        q.append((s.time, s.rssi))
        while q[0][0] < s.time - WINDOW_S:  # later samples are all after this sighting
            q.popleft()
        used += 1
    for beacon in by_beacon:
        sample_until(beacon, math.inf)

    # Transitions: stays per zone, transits through no zone, and the moves the walk made.
    stays: dict[str, list[float]] = defaultdict(list)
    transits: list[float] = []
    moves: dict[str, set[str]] = defaultdict(set)
    ends = direct = 0
    for lbs in by_beacon.values():
        runs = _runs(lbs)
        for i, (zone, begin, b) in enumerate(runs):
            if zone is None:
                if 0 < i < len(runs) - 1:
                    transits.append(b - begin)
                continue
            stays[zone].append(b - begin)
            nxt = runs[i + 1] if i + 1 < len(runs) else None
            if nxt is None or abs(nxt[1] - b) > 1e-9:
                continue
            ends += 1
            if nxt[0] is not None:
                direct += 1
                moves[zone].add(nxt[0])
                moves[nxt[0]].add(zone)
            elif i + 2 < len(runs) and runs[i + 2][0] is not None and runs[i + 2][0] != zone:
                moves[zone].add(runs[i + 2][0])  # type: ignore[arg-type]
                moves[runs[i + 2][0]].add(zone)  # type: ignore[index]
    polygons = {z.name: z for z in zones}
    zone_cals = []
    kept = {n for n, a in acc.items() if n is not None and a.heard_any >= MIN_SECONDS}  # too short: the bands
    for name in sorted(kept, key=lambda n: (n not in polygons, n)):
        a = acc[name]
        st = stays.get(name, [])
        stay = (sum(st) + PRIOR_STAYS * settings.zone_stay_s) / (len(st) + PRIOR_STAYS)
        zone_cals.append(ZoneCalibration(name, float(a.seconds), round(stay, 1),
                                         tuple(sorted(moves.get(name, set()) & kept)), _signature(a, rx_ids),
                                         _windowed(a, rx_ids)))
    outside = _signature(acc[None], rx_ids) if acc[None].heard_any >= MIN_SECONDS else ()
    transit = (sum(transits) + PRIOR_STAYS * settings.transit_s) / (len(transits) + PRIOR_STAYS)
    share = (direct + PRIOR_STAYS * settings.direct_share) / (ends + PRIOR_STAYS)
    total = sum(a.seconds for a in acc.values())
    out_share = (acc[None].seconds + 0.5 * PRIOR_SECONDS) / (total + PRIOR_SECONDS)
    cal_receivers = tuple(_fit_receiver(r, zone_cals, polygons) for r in receivers)
    source = (f"{used} sightings of {len(by_beacon)} beacons, {len(labels)} labels, "
              f"{sum(a.seconds for a in acc.values())} labelled seconds",)
    outside_windowed = _windowed(acc[None], rx_ids) if acc[None].seconds >= MIN_SECONDS else ()
    return Calibration(cal_receivers, tuple(zone_cals), outside, round(transit, 1), round(share, 3),
                       round(out_share, 4), outside_windowed=outside_windowed, source=source)


# ---------------------------------------------------------------------------------------- TOML


def _num(v: float) -> str:
    return repr(float(v))


def _sig_toml(sg: Signature) -> str:
    parts = ([] if sg.mean is None or sg.sd is None else [f"mean = {_num(sg.mean)}", f"sd = {_num(sg.sd)}"])
    return f'"{sg.receiver}" = {{ {", ".join([*parts, f"heard = {_num(sg.heard)}"])} }}'


def dumps(cal: Calibration) -> str:
    """Human-readable TOML with comments; ``load`` reads it back to an equal Calibration."""
    lines = ["# Presence calibration, written by `gateway calibrate` (docs/presence.md, \"Calibration\").",
             *(f"# {s}" for s in cal.source),
             "# [receivers.<id>]: the log-distance model fitted to each receiver (for zones the walk missed):",
             "#   RSSI = measured_power (or -59) + offset_db - 10 exponent log10(d).",
             "# [zones.<name>]: labelled seconds, mean stay, the zones walked to from it, and its signature:",
             "#   per receiver the filtered RSSI's mean and sd (dBm) and the share of seconds it heard the tag.",
             "", "[transitions]", f"transit_s = {_num(cal.transit_s)}  # mean walk outside every zone",
             f"direct_share = {_num(cal.direct_share)}  # of zone stays that end, the share going straight to another",
             f"outside_share = {_num(cal.outside_share)}  # of labelled time, the share in no zone (first-heard prior)",
             ""]
    if cal.tuned:
        lines += ["# Chosen on the walk (each walk scored by a calibration learned on the others): over [presence].",
                  "[presence]", *(f"{k} = {_num(v)}" for k, v in cal.tuned), ""]
    if cal.band_weight or cal.windowed_weight or cal.sd_floor_db:
        lines += ["# Chosen on the walk: the config's bands count band_weight per look beside the signatures;",
                  "# windowed_weight: looks per second of the receivers' windowed mean RSSI ([zones.<name>.windowed]);",
                  "# sd_floor_db: every signature's sd is widened to at least this when used.",
                  "[model]", f"band_weight = {_num(cal.band_weight)}", f"windowed_weight = {_num(cal.windowed_weight)}",
                  f"sd_floor_db = {_num(cal.sd_floor_db)}", ""]
    for r in cal.receivers:
        lines += [f'[receivers."{r.id}"]', f"offset_db = {_num(r.offset_db)}", f"exponent = {_num(r.exponent)}",
                  f'fitted = "{r.fitted}"', ""]
    for z in cal.zones:
        lines += [f'[zones."{z.name}"]', f"seconds = {_num(z.seconds)}", f"stay_s = {_num(z.stay_s)}",
                  "neighbours = [" + ", ".join(f'"{n}"' for n in z.neighbours) + "]",
                  f'[zones."{z.name}".signature]', *(_sig_toml(sg) for sg in z.signature), ""]
        if z.windowed:
            lines += [f'[zones."{z.name}".windowed]', *(_sig_toml(sg) for sg in z.windowed), ""]
    if cal.outside:
        lines += ["# No zone: the labelled seconds outside every zone.", "[outside.signature]",
                  *(_sig_toml(sg) for sg in cal.outside), ""]
    if cal.outside_windowed:
        lines += ["[outside.windowed]", *(_sig_toml(sg) for sg in cal.outside_windowed), ""]
    return "\n".join(lines)


Dbm = Annotated[float, Field(ge=-140.0, lt=20.0)]


class _Strict(FileModel):
    """Numbers as numbers (a quoted "5" is refused, as the hand-written parser did), finite ones."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class SignatureEntry(_Strict):
    """What one receiver hears of the tag in one state."""

    mean: Dbm | None = Field(default=None, description="Mean RSSI (dBm): the filtered RSSI's, or the windowed mean's.")
    sd: float | None = Field(default=None, gt=0.0, description="Its standard deviation (dB).")
    heard: float = Field(ge=0.0, le=1.0, description="The share of labelled seconds in which the receiver heard it.")

    @model_validator(mode="after")
    def _both(self) -> SignatureEntry:
        if (self.mean is None) != (self.sd is None):
            fail("mean and sd go together (neither: the receiver was heard too rarely to fit one)")
        return self


class WindowedEntry(SignatureEntry):
    """A receiver's windowed mean RSSI in one state (silence read as -105 dBm): mean and sd always."""

    mean: Dbm = Field(description="Mean of the receiver's 3 s mean RSSI (dBm), silence counted as -105 dBm.")
    sd: float = Field(gt=0.0, description="Its standard deviation (dB).")


class TransitionsTable(_Strict):
    """How people move, from the walk."""

    transit_s: float = Field(gt=0.0, description="Mean walk outside every zone (s).")
    direct_share: float = Field(ge=0.0, le=1.0, description="Of zone stays that end, the share going straight on.")
    outside_share: float = Field(gt=0.0, lt=1.0, description="Of labelled time, the share in no zone.")


class ReceiverEntry(_Strict):
    """The log-distance model fitted to one receiver."""

    offset_db: float = Field(description="Added to its measured power (or -59 dBm) at 1 m.")
    exponent: float = Field(gt=0.0, description="Path-loss exponent.")
    fitted: str = Field(default="none", description="positions, bands or none: what it was fitted against.")


class ZoneEntry(_Strict):
    """One zone's stay, neighbours and signatures."""

    seconds: float = Field(ge=0.0, description="Labelled seconds it was learned from.")
    stay_s: float = Field(gt=0.0, description="Mean stay (s).")
    neighbours: list[str] = Field(description="The zones the walk went to from it.")
    signature: dict[str, SignatureEntry] = Field(default_factory=dict, description="Per receiver: filtered RSSI.")
    windowed: dict[str, WindowedEntry] = Field(default_factory=dict, description="Per receiver: windowed mean RSSI.")


class OutsideTable(_Strict):
    """No zone, when the walk had labelled seconds outside every zone."""

    signature: dict[str, SignatureEntry] = Field(default_factory=dict, description="Per receiver: filtered RSSI.")
    windowed: dict[str, WindowedEntry] = Field(default_factory=dict, description="Per receiver: windowed mean RSSI.")


class TunedTable(_Strict):
    """[presence] settings chosen on the walk; they override the config's when the calibration is used."""

    fade_time_s: float | None = Field(default=None, gt=0.0, description="A link's look time (s).")
    fade_db: float | None = Field(default=None, gt=0.0, description="One more look per this many dB moved.")
    rssi_drift_db_s: float | None = Field(default=None, gt=0.0, description="Kalman drift (dB per sqrt(s)).")
    switch_posterior: float | None = Field(default=None, gt=0.0, le=1.0, description="Leave a zone at 1 - this.")
    exit_posterior: float | None = Field(default=None, gt=0.0, le=1.0, description="Leave to no zone at 1 - this.")


class ModelTable(_Strict):
    """How the tracker weighs what was learned."""

    band_weight: float = Field(default=0.0, ge=0.0, le=1.0,
                               description="The config's bands, per look, beside the signatures.")
    windowed_weight: float = Field(default=0.0, ge=0.0, le=100.0, description="Looks per second of the windowed means.")
    sd_floor_db: float = Field(default=0.0, ge=0.0, le=30.0,
                               description="Every signature's sd widened to at least this (dB).")


class CalibrationFile(_Strict):
    """A calibration file as `gateway calibrate` writes it."""

    transitions: TransitionsTable = Field(description="How people move, from the walk.")
    receivers: dict[str, ReceiverEntry] = Field(default_factory=dict, description="Per receiver: its fitted model.")
    zones: dict[str, ZoneEntry] = Field(default_factory=dict, description="Per zone: what the walk taught.")
    outside: OutsideTable = Field(default=OutsideTable(), description="No zone's signatures.")
    presence: TunedTable = Field(default=TunedTable(), description="Settings chosen on the walk.")
    model: ModelTable = Field(default=ModelTable(), description="How the tracker weighs what was learned.")



def _sigs(table: dict[str, SignatureEntry] | dict[str, WindowedEntry]) -> tuple[Signature, ...]:
    return tuple(Signature(rid, v.mean, v.sd, v.heard) for rid, v in table.items())


def _calibration(data: object) -> Calibration:
    f = CalibrationFile.model_validate(data)
    wrong = [Problem(("zones", name, "neighbours"), f"{n!r} is not a zone of this file")
             for name, z in f.zones.items() for n in z.neighbours if n not in f.zones]
    if wrong:
        raise Invalid(*wrong)
    tuned = tuple((k, v) for k, v in f.presence.model_dump().items() if v is not None)
    return Calibration(
        tuple(ReceiverCalibration(rid, r.offset_db, r.exponent, r.fitted) for rid, r in f.receivers.items()),
        tuple(ZoneCalibration(name, z.seconds, z.stay_s, tuple(z.neighbours), _sigs(z.signature), _sigs(z.windowed))
              for name, z in f.zones.items()),
        _sigs(f.outside.signature), f.transitions.transit_s, f.transitions.direct_share,
        f.transitions.outside_share, tuned, band_weight=f.model.band_weight, windowed_weight=f.model.windowed_weight,
        outside_windowed=_sigs(f.outside.windowed), sd_floor_db=f.model.sd_floor_db)


_HEADER = re.compile(r'^\s*\[([^\[\]]+)\]\s*(#.*)?$')
_KEY = re.compile(r'^\s*("(?:[^"\\]|\\.)*"|[A-Za-z0-9_-]+)\s*=')


def _toml_path(text: str) -> list[str | int]:
    """A dotted TOML key (``zones."a b".signature``) as its parts."""
    parts: list[str | int] = []
    for m in re.finditer(r'"((?:[^"\\]|\\.)*)"|([A-Za-z0-9_-]+)', text):
        parts.append(m.group(1) if m.group(1) is not None else m.group(2))
    return parts


def _lines(text: str) -> dict[tuple[str | int, ...], int]:
    """Where each table and key starts (1-based), for a calibration file's error messages."""
    out: dict[tuple[str | int, ...], int] = {}
    table: tuple[str | int, ...] = ()
    for n, line in enumerate(text.splitlines(), 1):
        if (h := _HEADER.match(line)) is not None:
            table = tuple(_toml_path(h.group(1)))
            out.setdefault(table, n)
        elif (k := _KEY.match(line)) is not None:
            out.setdefault((*table, *_toml_path(k.group(1))), n)
    return out


def parse(text: str, source: str = "calibration") -> Calibration:
    """The Calibration in a TOML text; ConfigError naming ``source``, the line and the key on bad input."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    document = Document(doc, source, _lines(text))
    return build(_calibration, doc, ConfigError, source, model=CalibrationFile, doc=document)


def load(path: str | Path) -> Calibration:
    """A calibration file; ConfigError naming the file (and the line or key) when it cannot be used."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the calibration: {exc}") from None
    return parse(text, str(path))


# ---------------------------------------------------------------------------------------- report


def _bhattacharyya(a: Sequence[Signature], b: Sequence[Signature]) -> float:
    """Bhattacharyya distance between two zones' signatures, receivers taken as independent: per receiver
    the heard / not heard Bernoulli's, plus the Gaussians' where both were heard."""
    other = {s.receiver: s for s in b}
    total = 0.0
    for s in a:
        t = other.get(s.receiver)
        if t is None:
            continue
        pa, pb = min(max(s.heard, 0.01), 0.99), min(max(t.heard, 0.01), 0.99)
        total += -math.log(math.sqrt(pa * pb) + math.sqrt((1 - pa) * (1 - pb)))
        if s.mean is not None and s.sd is not None and t.mean is not None and t.sd is not None:
            va, vb = s.sd ** 2, t.sd ** 2
            gauss = (s.mean - t.mean) ** 2 / (4 * (va + vb)) + 0.5 * math.log((va + vb) / (2 * math.sqrt(va * vb)))
            total += math.sqrt(pa * pb) * gauss  # weighed by how often both hear it
    return total


def separations(cal: Calibration) -> dict[str, tuple[str | None, float]]:
    """Per zone: its nearest other state (a zone, or None for "no zone" when learned) and their distance."""
    states: list[tuple[str | None, tuple[Signature, ...]]] = [(z.name, z.signature) for z in cal.zones]
    if cal.outside:
        states.append((None, cal.outside))
    out: dict[str, tuple[str | None, float]] = {}
    for z in cal.zones:
        best: tuple[str | None, float] = (None, math.inf)
        for name, sig in states:
            if name != z.name:
                d = _bhattacharyya(z.signature, sig)
                if d < best[1]:
                    best = (name, d)
        out[z.name] = best
    return out


def report(cal: Calibration) -> str:
    """Per zone, the nearest other zone in signature space and the Bhattacharyya distance between them
    (above about 2: told apart within seconds; under 0.5: hard to tell apart, add or move a receiver)."""
    lines = [f"{'zone':16s} {'seconds':>8s} {'stay_s':>7s} {'nearest':16s} {'distance':>8s}  verdict"]
    apart = separations(cal)
    for z in cal.zones:
        near, d = apart[z.name]
        verdict = "alone" if d == math.inf else "apart" if d >= 2.0 else "close" if d >= 0.5 else "hard to tell apart"
        shown = near or ("-" if d == math.inf else "(no zone)")
        lines.append(f"{z.name:16s} {z.seconds:8.0f} {z.stay_s:7.1f} {shown:16s} {d:8.2f}  {verdict}")
    for r in cal.receivers:
        lines.append(f"receiver {r.id}: offset {r.offset_db:+.1f} dB, exponent {r.exponent:.2f} ({r.fitted})")
    return "\n".join(lines)
