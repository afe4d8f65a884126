"""Sightings in, presence events out: which zone each identity is in, and for how long.

The model (docs/presence.md has the figures behind each default):

- **Filter**, per identity and receiver (a *link*): a scalar Kalman filter on RSSI whose process
  noise grows with the time since the last advert, so it is correct for irregular adverts: dense
  adverts are averaged by count, and after a loss burst the estimate is uncertain and catches up
  fast. Innovations beyond ``GATE_SIGMAS`` are clamped (outliers). ``rssi_filter = "ema"`` selects
  a time-aware EMA with an outlier clamp instead.
- **Zones: an online HMM forward filter per identity** over the hidden state {each zone, no zone}.
  A receiver's distance bands define what it expects to hear: inside a band, the identity is anywhere
  in the band's ring (uniform over the floor area, so farther is likelier) and the RSSI follows the
  log-distance model plus slow shadowing (``shadowing_db``); outside every band it is somewhere out to
  ``outside_factor`` x the widest band. The log-likelihood ratio of each of the receiver's zones
  against "outside" is tabulated once per calibration, so one advert costs a table lookup per zone of
  *that* receiver. The filtered RSSI is correlated from advert to advert, so each link adds evidence at
  the rate of one independent look per ``fade_time_s``, whatever the advert rate. Sticky transitions
  (a zone stay lasts ``zone_stay_s`` on average, a walk between zones ``transit_s``) are applied every
  ``STEP_S`` of the identity's time, with the posterior normalised there.
- **Decisions with hysteresis on the posterior**: from no zone, a zone is entered once its posterior
  reaches ``enter_posterior``; from a zone, the identity moves (to the likeliest other state: a zone,
  or no zone) once the zone's own posterior has fallen to ``1 - switch_posterior``, however the rest
  is split. Entering also needs ``enter_samples`` adverts and ``enter_hold_s``.
- **Calibrated** (``gateway calibrate``): learned signatures replace the bands' evidence; optionally every
  receiver's 3 s windowed mean RSSI (silence as a reading) against each state's Gaussians
  (``windowed_weight``), exits to no zone held to ``exit_posterior``, signatures widened to ``sd_floor_db``.
- **Distance**: log-distance path loss (``gateway/presence/model.py``), per-receiver calibration
  (measured power at 1 m, exponent), defaulting to the beacon's advertised tx power.
- **Exit on silence**: ``exit_after_s`` without an advert (found by ``tick``: the tracker never looks
  at a wall clock).
- **Time**: the tracker keeps its own monotonic time base. A ``tick`` more than ``REORDER_S`` before
  the newest tick or sighting is a clock step back (NTP on a Pi without an RTC): it is counted in ``clock_steps``
  and the base shifts by the step, so silence keeps counting and nobody is frozen in a zone. Event
  times are in that base; it returns to the caller's clock once no identity is tracked. A step forward
  looks like silence from here, so the runtime, which sees it against monotonic time, says so
  (``wall_stepped``) and the base shifts back by the step.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from beacons.types import Sighting
from gateway.presence.calibration import WINDOW_FLOOR_DBM, WINDOW_S, Calibration, Signature
from gateway.presence.model import rssi_at
from gateway.presence.settings import PresenceSettings, ReceiverSettings

EventKind = Literal["visit_start", "enter", "dwell", "exit", "visit_end"]

DEFAULT_MEASURED_POWER = -59
OUTLIER_CLAMP_DB = 12.0  # EMA: a single sample may move the estimate by at most this much
GATE_SIGMAS = 2.5  # Kalman: innovations clamped at this many predicted standard deviations
REORDER_S = 2.0  # sightings this much older than an identity's newest are a clock step back
RSSI_UNAVAILABLE = 127  # what HCI reports when the controller has no RSSI
STEP_S = 0.25  # the HMM's transition step, in the identity's own time (adverts drive it)
EVIDENCE_DT_MAX_S = 1.0  # one advert stands for at most this much of a link's time (loss gaps add none)
FIRST_LOOK_S = 0.1  # what the first advert of a link stands for
MISSING_LLR = 3.0  # per look: a zone whose receivers have not heard the identity lately (nats)
LLR_CLAMP = 8.0  # one look's log-likelihood ratios span at most +-this (nats): no single look decides
NEAREST_M = 0.3  # the closest a carried tag gets to a receiver, for the innermost band's ring
HEARD_RANGE = (0.05, 0.95)  # calibrated: a receiver's share of seconds heard, as used (no certainty either way)
# Uncalibrated, per look: when two or more receivers heard read beyond where their innermost band's evidence
# saturates, the loudest of them (against its 1 m reference) gives its zone this (the bands cannot rank them).
# Three clamps' worth: on the recordings' calibration split (benchmarks/presence_real.py), accuracy rises with it
# up to here and little beyond (8: flat 0.793 / hall 0.771; 16: 0.827 / 0.820; 24: 0.841 / 0.824; 32: 0.843 /
# 0.824), while zone changes keep rising. Configs whose measured power is right never saturate two receivers.
LOUDEST_LLR = 3 * LLR_CLAMP
REFERENCE_SD_MIN = 8.0  # calibrated: the broad per-receiver reference density is at least this wide (dB)
WHY_STATES = 3  # a switch's ``why`` shows this many likeliest states before and after
# The tabulated log-likelihood ratios: filtered RSSI from X_MIN, X_RES steps per dB.
X_MIN, X_MAX, X_RES = -140.0, 10.0, 4

#: (enter threshold dBm, zone name), nearest band first
Bands = tuple[tuple[float, str], ...]


@dataclass(frozen=True, slots=True)
class Why:
    """Why the tracker switched: the receivers heard lately (filtered RSSI, loudest first), and the likeliest
    states (a zone, or None for no zone) with their posterior before this step's evidence and after it."""

    heard: tuple[tuple[str, float], ...]
    before: tuple[tuple[str | None, float], ...]
    after: tuple[tuple[str | None, float], ...]


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    kind: EventKind
    key: str
    time: float
    zone: str | None = None
    zone_since: float | None = None  # when the current zone stay began (identifies the stay)
    visit_since: float | None = None  # when the visit began (identifies the visit)
    dwell_s: float = 0.0
    why: Why | None = None  # on an enter or exit decided on evidence (not on silence)


def _phi_diff(a: float, b: float) -> float:
    """Phi(a) - Phi(b) for a >= b, accurate in both tails."""
    r = math.sqrt(0.5)
    if b > 0.0:
        return 0.5 * (math.erfc(b * r) - math.erfc(a * r))
    if a < 0.0:
        return 0.5 * (math.erfc(-a * r) - math.erfc(-b * r))
    return 0.5 * (math.erf(a * r) - math.erf(b * r))


def _saturation(table: tuple[float, ...]) -> float:
    """The lowest grid RSSI from which ``table`` stays at its maximum (inf if it never does to the grid's end)."""
    top = max(table)
    i = len(table)
    while i and table[i - 1] >= top - 1e-9:
        i -= 1
    return X_MIN + i / X_RES - 0.5 / X_RES if i < len(table) else math.inf


def _log_normal(x: float, mean: float, sd: float) -> float:
    return -0.5 * ((x - mean) / sd) ** 2 - math.log(sd) - 0.5 * math.log(2.0 * math.pi)


def ring_log_likelihood(x: float, near_m: float, far_m: float, ref: float, exponent: float, sigma: float) -> float:
    """log p(RSSI = x | the tag is uniformly spread over the floor ring near_m..far_m from the receiver).

    In RSSI terms the ring is a truncated exponential (uniform area: density grows with d, so with
    -RSSI), convolved with the Gaussian shadowing: closed form, no numerical integration.
    """
    beta = math.log(10.0) / (5.0 * exponent)  # density of mu = P - 10 n log10 d is prop. to d^2 = exp(-beta mu)
    m1, m2 = rssi_at(far_m, ref, exponent), rssi_at(near_m, ref, exponent)  # m1 < m2
    shift = x - beta * sigma * sigma
    diff = _phi_diff((m2 - shift) / sigma, (m1 - shift) / sigma)
    # normaliser of exp(-beta mu) on [m1, m2], factored around m1 so nothing overflows
    norm = math.log(-math.expm1(-beta * (m2 - m1))) - beta * m1 - math.log(beta)
    return -beta * x + 0.5 * (beta * sigma) ** 2 + math.log(max(diff, 1e-300)) - norm


@dataclass(frozen=True, slots=True)
class _Model:
    """One receiver's calibration: its bands as RSSI thresholds and its zones' evidence tables."""

    bands: Bands
    states: tuple[int, ...]  # the HMM state of each band, nearest first
    tables: tuple[tuple[float, ...], ...]  # per band: clamped LLR (band vs outside) over the RSSI grid
    pairs: tuple[tuple[int, tuple[float, ...]], ...] = ()  # (state, table) per band: the hot loop's view
    cover: int = 0  # the states of its bands as a bit mask: which zones a link that hears the identity vouches for
    # (calibrated: the receiver's own bit, and the missing-receiver penalty comes from the signatures)
    ref: float = 0.0  # the RSSI at 1 m it was built for
    nearest: int = -1  # the state of its innermost band (-1: none)
    saturates: float = math.inf  # the filtered RSSI from which its innermost band's evidence is at its ceiling


@dataclass(slots=True)
class _Link:
    """One receiver's filtered view of one identity."""

    rssi: float  # filtered estimate
    var: float  # its variance (Kalman)
    last: float  # newest sample time
    model: _Model
    quiet: float = 0.0  # the track's ``quiet`` at that sample: silence on every receiver is not this link's
    window: deque[tuple[float, int]] = field(default_factory=deque)  # calibrated, windowed: the last WINDOW_S
    window_sum: float = 0.0  # ... and the sum of their RSSI


@dataclass(slots=True)
class _Track:
    post: list[float]  # posterior over states (zones, then "no zone") at the last step
    llr: list[float]  # evidence gathered since the last step (nats, against "outside")
    stepped: float  # time of the last step
    links: dict[str, _Link] = field(default_factory=dict)
    last_seen: float = 0.0
    quiet: float = 0.0  # total time heard by no receiver at all (gaps beyond EVIDENCE_DT_MAX_S), cumulative
    quiet_stepped: float = 0.0  # ``quiet`` at the last step
    evidence: list[float] = field(default_factory=list)  # the last step's evidence (for a switch's ``why``)
    zone: str | None = None
    state: int = -1  # the confirmed state: a zone index, or the "no zone" index
    zone_since: float = 0.0
    last_dwell: float = 0.0
    visit_since: float | None = None
    tx_power: int | None = None
    seen: int = 0  # adverts since the track (re)started
    candidate: int = -1  # the state whose posterior has passed its threshold ...
    candidate_since: float = 0.0  # ... since this time


class PresenceTracker:
    def __init__(
        self,
        settings: PresenceSettings,
        receivers: Iterable[ReceiverSettings],
        *,
        enter_samples: int = 2,
        calibration: Calibration | None = None,
        adjacency: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        """``calibration`` (``gateway calibrate``) replaces the bands' evidence by the zones' learned signatures
        and the transition prior by the walk's; ``adjacency`` (zone -> the zones one may walk to directly)
        confines direct moves to it. With neither, every zone may follow every other."""
        if calibration is not None and calibration.tuned:  # what the walk chose overrides [presence]
            settings = dataclasses.replace(settings, **dict(calibration.tuned))  # type: ignore[arg-type]
        if settings.rssi_filter not in ("kalman", "ema"):
            raise ValueError(f"presence.rssi_filter: expected 'kalman' or 'ema', got {settings.rssi_filter!r}")
        self.settings = settings
        self.receivers = {r.id: r for r in receivers}
        self._bands = {
            r.id: sorted((z.max_m, z.name) for z in r.zones) for r in self.receivers.values()
        }
        names: list[str] = []
        for r in self.receivers.values():
            for z in r.zones:
                if z.name not in names:
                    names.append(z.name)
        self.calibration = calibration
        for zc in calibration.zones if calibration is not None else ():
            if zc.name not in names:  # a zone with no receiver of its own, told apart by its signature
                names.append(zc.name)
        self.zones: tuple[str, ...] = tuple(names)
        self._none = len(names)  # the "no zone" state's index
        self._index = {n: i for i, n in enumerate(names)}
        self._voters = Counter(name for r in self.receivers.values() for name in {z.name for z in r.zones})
        self._models: dict[tuple[str, float], _Model] = {}
        self.enter_samples = enter_samples
        self.tracks: dict[str, _Track] = {}
        self.dropped: Counter[str] = Counter()
        self._kalman = settings.rssi_filter == "kalman"
        self._r = settings.rssi_noise_db ** 2
        self._q = settings.rssi_drift_db_s ** 2
        self._exit_after = settings.exit_after_s  # settings are read once, here
        self._dwell_every = settings.dwell_every_s
        self._look = 1.0 / settings.fade_time_s
        self._stay_s, self._transit_s, self._direct = settings.zone_stay_s, settings.transit_s, settings.direct_share
        self._enter_at, self._keep_above = settings.enter_posterior, 1.0 - settings.switch_posterior
        # to no zone: as far down at least (the inline hold in _step is then right for exits too)
        self._keep_exit = min(self._keep_above, 1.0 - (settings.exit_posterior or settings.switch_posterior))
        self._per_db = settings.fade_time_s / getattr(settings, "fade_db", 1e9)  # s of look per dB moved
        self._half_exit = settings.exit_after_s / 2
        n = len(names)
        # A zone none of the receivers hearing the identity names is unlikely (a loss likelihood): the zones
        # heard are an OR of the links' ``cover`` masks, and the zones missed by each mask are cached.
        self._all_zones = (1 << n) - 1
        self._missed: dict[int, tuple[tuple[int, float], ...]] = {}
        if calibration is not None:  # a link vouches for its receiver: the mask is over receivers
            self._rx_bit = {rid: 1 << k for k, rid in enumerate(self.receivers)}
            self._all_zones = (1 << len(self.receivers)) - 1
            self._rx_cal = {rc.id: rc for rc in calibration.receivers}
            self._sigs = self._signatures(calibration)
        # Windowed-mean evidence: per state, per receiver (in self.receivers' order) mean, 1 / (2 var), log sd
        self._windowed: list[tuple[int, list[tuple[float, float, float]]]] = []
        self._windowed_weight = calibration.windowed_weight if calibration is not None else 0.0
        if calibration is not None and self._windowed_weight:
            rx_order = list(self.receivers)
            classes = [(self._index[z.name], z.windowed) for z in calibration.zones]
            classes.append((self._none, calibration.outside_windowed))
            for state, sigs in classes:
                by_rx = {sg.receiver: (sg.mean, sg.sd) for sg in sigs if sg.mean is not None and sg.sd}
                if sigs and all(r in by_rx for r in rx_order):
                    self._windowed.append((state, [(m, 0.5 / sd ** 2, math.log(sd))
                                                   for m, sd in (by_rx[r] for r in rx_order)]))
            # A state the walk did not teach gets a broad reference (per receiver: the taught states' centre and
            # spread, at least REFERENCE_SD_MIN wide): the windowed readings then neither favour nor rule it out much.
            self._windowed_ref: list[tuple[float, float, float]] = []
            if self._windowed:
                for k in range(len(rx_order)):
                    ms = [model[k][0] for _, model in self._windowed]
                    sds = [math.sqrt(0.5 / model[k][1]) for _, model in self._windowed]
                    centre = sum(ms) / len(ms)
                    sd = max(math.sqrt(sum((m - centre) ** 2 + v * v for m, v in zip(ms, sds, strict=True)) / len(ms)),
                             REFERENCE_SD_MIN)
                    self._windowed_ref.append((centre, 0.5 / sd ** 2, math.log(sd)))
            self._unwindowed = [i for i in range(n + 1) if i not in {st for st, _ in self._windowed}]
        if calibration is not None or adjacency is not None:
            self._graph = self._transitions(calibration, adjacency)
            self._step = self._step_graph  # type: ignore[method-assign]
        self._out_share = 1.0 - settings.direct_share if n > 1 else 1.0  # of the stays that end, to no zone
        self._step_dt, self._step_terms = math.nan, (0.0, 0.0, 0.0, 0.0, 0.0)  # the last step's length and terms
        # Prior: heard at all means in the store; as likely in no zone as in some zone.
        self._prior = [0.5 / n] * n + [0.5] if n else [1.0]
        if calibration is not None and n:  # the walk's share of time in no zone
            self._prior = [(1.0 - calibration.outside_share) / n] * n + [calibration.outside_share]
        self._offset = 0.0  # added to every input time: the monotonic base (see the module docstring)
        self._high = -math.inf  # newest tick or sighting time, in the base
        self._last_step = 0.0
        self.clock_steps = 0

    # ------------------------------------------------------------ calibration

    def _ref(self, rx: ReceiverSettings, tx_power: int | None) -> float:
        if rx.measured_power is not None:
            return float(rx.measured_power)
        return float(tx_power if tx_power is not None else DEFAULT_MEASURED_POWER)

    def _model(self, rx: ReceiverSettings, ref: float) -> _Model:
        """Thresholds and evidence tables for one calibration, computed once."""
        cached = self._models.get((rx.id, ref))
        if cached is not None:
            return cached
        n = rx.path_loss_exponent
        bands = self._bands[rx.id]
        if self.calibration is not None:
            model = self._calibrated_model(rx, ref)
        else:
            tables = self._band_tables(bands, ref, n)
            # A zone that k receivers name: together they vouch for it at most as one receiver can (each one's
            # evidence for it is capped at LLR_CLAMP / k; evidence against it is not), so a room with two
            # saturated receivers does not outvote a room with one (their readings are not independent).
            tables = [t if self._voters[name] == 1 else tuple(min(v, LLR_CLAMP / self._voters[name]) for v in t)
                      for t, (_, name) in zip(tables, bands, strict=True)]
            states = tuple(self._index[name] for _, name in bands)
            model = _Model(tuple((rssi_at(max_m, ref, n), name) for max_m, name in bands), states, tuple(tables),
                           tuple(zip(states, tables, strict=True)), sum(1 << i for i in set(states)), ref,
                           states[0] if states else -1, _saturation(tables[0]) if tables else math.inf)
        self._models[(rx.id, ref)] = model
        return model

    def _band_tables(self, bands: list[tuple[float, str]], ref: float, n: float) -> list[tuple[float, ...]]:
        """Per band, the clamped LLR of its ring against "outside" over the RSSI grid."""
        st = self.settings
        sigma = math.sqrt(st.shadowing_db ** 2 + 1.0)  # slow shadowing + what the filter leaves of the fast noise
        grid = [X_MIN + i / X_RES for i in range(int((X_MAX - X_MIN) * X_RES) + 1)]
        tables: list[tuple[float, ...]] = []
        if bands:
            widest = bands[-1][0]
            out = [ring_log_likelihood(x, widest, widest * max(st.outside_factor, 1.01), ref, n, sigma) for x in grid]
            near = min(NEAREST_M, bands[0][0] / 2)
            rings = []
            for max_m, _ in bands:
                rings.append([ring_log_likelihood(x, near, max_m, ref, n, sigma) for x in grid])
                near = max_m
            # Each state is floored LLR_CLAMP below the likeliest one at that RSSI, then taken against
            # "outside": bounded looks that still tell two bands of one receiver apart.
            best = [max(o, *(r[i] for r in rings)) for i, o in enumerate(out)]
            floor_out = [max(o - b, -LLR_CLAMP) for o, b in zip(out, best, strict=True)]
            for r in rings:
                tables.append(tuple(max(v - b, -LLR_CLAMP) - fo for v, b, fo in zip(r, best, floor_out, strict=True)))
        return tables

    def _signatures(self, cal: Calibration) -> dict[str, list[tuple[int, Signature]]]:
        """Per receiver, the (state, signature) pairs of the calibration: its zones, and no zone when learned."""
        out: dict[str, list[tuple[int, Signature]]] = {}
        states = [(self._index[z.name], z.signature) for z in cal.zones]
        if cal.outside:
            states.append((self._none, cal.outside))
        for state, signature in states:
            for sg in signature:
                if sg.receiver in self.receivers:
                    out.setdefault(sg.receiver, []).append((state, sg))
        return out

    def _calibrated_model(self, rx: ReceiverSettings, ref: float) -> _Model:
        """One table per state the calibration has a signature for at this receiver: the log-likelihood of
        the filtered RSSI (and of being heard at all) against a broad reference density; zones the walk
        missed keep their bands, with the fitted offset and exponent. With a ``band_weight``, the zones the
        walk covered also keep their bands (the config's, unfitted) at that weight: a product of the two
        models, so a signature learned from a few seconds cannot outvote the survey's geometry alone."""
        rc = self._rx_cal.get(rx.id)
        offset, n = (rc.offset_db, rc.exponent) if rc is not None else (0.0, rx.path_loss_exponent)
        sigs = self._sigs.get(rx.id, [])
        floor = self.calibration.sd_floor_db if self.calibration is not None else 0.0
        if floor:
            sigs = [(state, dataclasses.replace(sg, sd=max(sg.sd, floor)) if sg.sd is not None else sg)
                    for state, sg in sigs]
        fitted = [(sg.mean, sg.sd) for _, sg in sigs if sg.mean is not None and sg.sd is not None]
        if fitted:
            centre = sum(m for m, _ in fitted) / len(fitted)
            spread = math.sqrt(sum((m - centre) ** 2 + sd * sd for m, sd in fitted) / len(fitted))
        else:
            centre, spread = ref + offset - 20.0, REFERENCE_SD_MIN
        ref_sd = max(spread, REFERENCE_SD_MIN)
        lo, hi = HEARD_RANGE
        grid = [X_MIN + i / X_RES for i in range(int((X_MAX - X_MIN) * X_RES) + 1)]
        rows = []
        for x in grid:
            lref = _log_normal(x, centre, ref_sd)
            ls = [math.log(min(max(sg.heard, lo), hi))
                  + (lref if sg.mean is None or sg.sd is None else _log_normal(x, sg.mean, sg.sd)) for _, sg in sigs]
            best = max(ls) if ls else lref
            rows.append([min(max(max(v - best, -LLR_CLAMP) + best - lref, -LLR_CLAMP), LLR_CLAMP) for v in ls])
        states = [state for state, _ in sigs]
        tables = [tuple(row[k] for row in rows) for k in range(len(sigs))]
        covered = {z.name for z in self.calibration.zones} if self.calibration is not None else set()
        bands = [(m, name) for m, name in self._bands[rx.id] if name not in covered]
        states += [self._index[name] for _, name in bands]
        tables += self._band_tables(bands, ref + offset, n)
        weight = self.calibration.band_weight if self.calibration is not None else 0.0
        surveyed = [(m, name) for m, name in self._bands[rx.id] if name in covered]
        if weight and surveyed:  # the config's bands as the site survey drew them, weighed beside the signatures
            states += [self._index[name] for _, name in surveyed]
            tables += [tuple(weight * v for v in t) for t in self._band_tables(surveyed, ref, rx.path_loss_exponent)]
        return _Model(tuple((rssi_at(max_m, ref + offset, n), name) for max_m, name in bands), tuple(states),
                      tuple(tables), tuple(zip(states, tables, strict=True)), self._rx_bit[rx.id])

    def _transitions(self, cal: Calibration | None,
                     adjacency: Mapping[str, Collection[str]] | None) -> tuple[list[float], list[tuple[int, ...]],
                                                                                float, float]:
        """Per zone its mean stay and the zones it moves to directly (the adjacency given, and the moves
        the calibration walk made, both ways), the mean transit and the direct share. A move nobody
        listed still happens, through no zone."""
        st, n = self.settings, self._none
        stays = [st.zone_stay_s] * n
        nbrs: list[set[int]] = [set() for _ in range(n)]
        pairs: list[tuple[str, str]] = [(a, b) for a, bs in (adjacency or {}).items() for b in bs]
        if cal is not None:
            for zc in cal.zones:
                stays[self._index[zc.name]] = zc.stay_s
                pairs += [(zc.name, b) for b in zc.neighbours]
        for a, b in pairs:
            i, j = self._index.get(a), self._index.get(b)
            if i is not None and j is not None and i != j:
                nbrs[i].add(j)
                nbrs[j].add(i)
        transit = cal.transit_s if cal is not None else st.transit_s
        direct = cal.direct_share if cal is not None else st.direct_share
        return stays, [tuple(sorted(x)) for x in nbrs], transit, direct

    # ------------------------------------------------------------ sightings

    def _reject(self, s: Sighting) -> str | None:
        """Why a sighting cannot be used, or None. Called only off the fast path."""
        rssi, t = s.rssi, s.time
        if not isinstance(t, int | float) or not math.isfinite(t):
            return "bad_time"
        if not isinstance(rssi, int | float) or rssi != rssi:
            return "rssi_out_of_range"
        if rssi == RSSI_UNAVAILABLE:
            return "rssi_unavailable"
        if rssi >= 0:
            return "rssi_not_negative"
        if rssi < -127:
            return "rssi_out_of_range"
        return None

    def _new_track(self, t: float) -> _Track:
        return _Track(list(self._prior), [0.0] * len(self._prior), t, last_seen=t, state=self._none)

    def observe(self, s: Sighting) -> list[PresenceEvent]:
        """One sighting: a drain of one (replays and tests hand them over singly, the runtime in drains)."""
        return self.observe_many((s,))

    def observe_many(self, sightings: Iterable[Sighting]) -> list[PresenceEvent]:
        """A drain of sightings, in order: each one's filter update and evidence, and the HMM step when due.

        The usual sighting (a valid advert on a link of a tracked identity, the same advertised power, no
        clock step pending) goes straight to the filter; any other is first settled by ``_admit`` (a drop
        with its reason, a new track, a new advertised power, the clock step's base). The settings are
        read into locals once per drain, which is most of what a drain saves over single calls.
        """
        out: list[PresenceEvent] = []
        tracks_get, admit, step = self.tracks.get, self._admit, self._step
        kalman, q, r, smoothing = self._kalman, self._q, self._r, self.settings.smoothing
        exit_after, per_db, rate, high, offset = self._exit_after, self._per_db, self._look, self._high, self._offset
        gate = GATE_SIGMAS * GATE_SIGMAS
        reorder, dt_max, x_min, x_res, step_s = REORDER_S, EVIDENCE_DT_MAX_S, X_MIN, X_RES, STEP_S
        sqrt, copysign = math.sqrt, math.copysign
        windowed = bool(self.calibration is not None and self._windowed)
        for s in sightings:
            key, rid, rssi, t, tx = s
            tr = tracks_get(key)
            link = None
            if tr is not None and not offset:
                link = tr.links.get(rid)
                try:
                    if link is not None and not (-127 <= rssi < 0 and t - t == 0.0 and t >= tr.last_seen - reorder
                                                 and (tx is None or tx == tr.tx_power)):
                        link = None
                except TypeError:  # an RSSI or a time that is not a number (t - t is nan for nan and inf)
                    link = None
            if tr is None or link is None:
                self._high = high
                ready = admit(s)
                if ready is None:
                    continue
                tr, t = ready
                link = tr.links.get(rid)
            seen = tr.last_seen
            if t - seen > dt_max:  # nobody heard it meanwhile (a loss burst, a pocket)
                tr.quiet += t - seen - dt_max
            if link is None or t - link.last > exit_after:  # a new link, or one silent too long: from this advert
                link = self._new_link(tr, rid, rssi, t)
                look = FIRST_LOOK_S
            else:
                dt = t - link.last
                if dt < 0.0:
                    dt = 0.0  # out of order: used by the filter as simultaneous, adds no time
                else:
                    link.last, link.quiet = t, tr.quiet
                before = link.rssi
                innov = rssi - before
                if kalman:  # process noise grows with the time since the last advert; the innovation is gated
                    p = link.var + q * dt
                    s2 = p + r
                    gate2 = gate * s2
                    if innov * innov > gate2:
                        innov = copysign(sqrt(gate2), innov)
                    k = p / s2
                    link.rssi = est = before + k * innov
                    link.var = (1.0 - k) * p
                else:  # a time-aware EMA with an outlier clamp
                    alpha = 1.0 - (1.0 - smoothing) ** max(dt, 0.05)
                    link.rssi = est = before + alpha * max(-OUTLIER_CLAMP_DB, min(OUTLIER_CLAMP_DB, innov))
                look = dt if dt < dt_max else dt_max
                moved = est - before
                look += (moved if moved > 0.0 else -moved) * per_db
            tr.seen += 1
            if windowed:
                link.window.append((t, rssi))
                link.window_sum += rssi
            if look:
                w = look * rate
                i = int((link.rssi - x_min) * x_res + 0.5)
                llr = tr.llr
                for si, table in link.model.pairs:
                    llr[si] += w * table[i]
            if t > seen:
                tr.last_seen = t
                if t > high:
                    high = t
            if t - tr.stepped >= step_s:
                evs = step(key, tr, t)
                if evs:
                    out.extend(evs)
        self._high = high
        return out

    def _admit(self, s: Sighting) -> tuple[_Track, float] | None:
        """The unusual sighting: dropped and counted by reason (None), or its track made ready for the filter
        (made from the prior if new, links recalibrated to a new advertised power), with its time in the base."""
        rx = self.receivers.get(s.receiver)
        if rx is None:
            self.dropped["unknown_receiver"] += 1
            return None
        rssi, t = s.rssi, s.time
        try:
            ok = -127 <= rssi < 0 and t - t == 0.0  # t - t is nan for nan and inf
        except TypeError:
            ok = False
        if not ok:
            self.dropped[self._reject(s) or "bad_input"] += 1
            return None
        if self._offset:
            t += self._offset
            if t > self._high + self._last_step / 2:  # stamped before the step, delivered after it
                self.dropped["clock_backwards"] += 1
                return None
        tr = self.tracks.get(s.key)
        if tr is None:
            tr = self.tracks[s.key] = self._new_track(t)
        elif t < tr.last_seen - REORDER_S:
            self.dropped["clock_backwards"] += 1
            return None
        tx = s.tx_power
        if tx is not None and tx != tr.tx_power and isinstance(tx, int) and -127 < tx < 0:
            tr.tx_power = tx
            if rx.measured_power is None:  # links that use the advertised power recalibrate
                for rid, lk in tr.links.items():
                    other = self.receivers[rid]
                    if other.measured_power is None:
                        lk.model = self._model(other, float(tx))
        return tr, t

    def _new_link(self, tr: _Track, receiver: str, rssi: float, t: float) -> _Link:
        """A link (re)started by an advert: the estimate starts at its RSSI, calibrated for the track's power."""
        rx = self.receivers[receiver]
        link = tr.links[receiver] = _Link(float(rssi), self._r, t, self._model(rx, self._ref(rx, tr.tx_power)),
                                          tr.quiet)
        return link

    # ------------------------------------------------------------ the filter and the decisions

    def _missed_zones(self, cover: int) -> tuple[tuple[int, float], ...]:
        """The zones outside ``cover`` (a mask of zones some receiver hearing the identity names), each with
        its loss per look, cached. Calibrated, ``cover`` is a mask of the receivers heard, and each silent
        receiver costs each state -log(1 - its share heard there), less the most tolerant state's cost."""
        if len(self._missed) >= 1024:
            self._missed.clear()
        if self.calibration is None:
            missed = tuple((i, MISSING_LLR) for i in range(self._none) if not cover >> i & 1)
        else:
            cost = [0.0] * (self._none + 1)
            lo, hi = HEARD_RANGE
            for rid, sigs in self._sigs.items():
                if cover & self._rx_bit[rid] or not sigs:
                    continue
                per = {state: min(-math.log(1.0 - min(max(sg.heard, lo), hi)), LLR_CLAMP) for state, sg in sigs}
                least = min(per.values())
                for i in range(self._none + 1):
                    cost[i] += per.get(i, least)
            least = min(cost)
            missed = tuple((i, c - least) for i, c in enumerate(cost) if c > least)
        self._missed[cover] = missed
        return missed

    def _heard_evidence(self, tr: _Track, live: float, heard: float, llr: list[float]) -> None:
        """What the receivers hearing the identity lately (links heard since ``live``, silence on every
        receiver not counted) say over ``heard`` seconds: the zones none of them vouches for lose their loss
        per look; and when two or more of them read past where their innermost band saturates (a tag louder
        than the config's reference power saturates every band: the bands cannot rank them), the loudest
        of those (against its 1 m reference) gives its band's zone ``LOUDEST_LLR`` per look."""
        cover = 0
        loudest: _Link | None = None
        saturated = 0
        for lk in tr.links.values():
            if lk.last - lk.quiet >= live:
                m = lk.model
                cover |= m.cover
                if lk.rssi >= m.saturates:
                    saturated += 1
                    if loudest is None or lk.rssi - m.ref > loudest.rssi - loudest.model.ref:
                        loudest = lk
        look = self._look
        if saturated > 1 and loudest is not None:
            llr[loudest.model.nearest] += LOUDEST_LLR * heard * look
        if cover != self._all_zones:  # when the zones heard cover all, no zone misses it
            missed = self._missed.get(cover)
            if missed is None:
                missed = self._missed_zones(cover)
            for i, w in missed:
                llr[i] -= w * heard * look

    def _windowed_evidence(self, tr: _Track, now: float, heard: float, llr: list[float]) -> None:
        """The fingerprint's observation: every receiver's mean RSSI over the last WINDOW_S (WINDOW_FLOOR_DBM
        when silent) against each state's learned Gaussians, ``windowed_weight`` looks per second heard, each
        state floored LLR_CLAMP below the likeliest (states without windowed Gaussians sit at the floor)."""
        cut = now - WINDOW_S
        xs = []
        links = tr.links
        for rid in self.receivers:
            lk = links.get(rid)
            if lk is None:
                xs.append(WINDOW_FLOOR_DBM)
                continue
            q = lk.window
            while q and q[0][0] < cut:
                lk.window_sum -= q.popleft()[1]
            total, k = lk.window_sum, len(q)
            while k and q[k - 1][0] >= now:  # this instant's rows: the rest of them may still be on their way
                k -= 1
                total -= q[k][1]
            xs.append(total / k if k else WINDOW_FLOOR_DBM)
        ll = [-sum((x - m) * (x - m) * h + lsd for x, (m, h, lsd) in zip(xs, model, strict=True))
              for _, model in self._windowed]
        ref = -sum((x - m) * (x - m) * h + lsd for x, (m, h, lsd) in zip(xs, self._windowed_ref, strict=True))
        top = max(*ll, ref) if self._unwindowed else max(ll)
        w = heard * self._windowed_weight
        for (state, _), v in zip(self._windowed, ll, strict=True):
            d = v - top
            llr[state] += w * (d if d > -LLR_CLAMP else -LLR_CLAMP)
        if self._unwindowed:
            d = ref - top
            d = w * (d if d > -LLR_CLAMP else -LLR_CLAMP)
            for state in self._unwindowed:
                llr[state] += d

    def _step(self, key: str, tr: _Track, now: float) -> list[PresenceEvent]:
        """Predict (sticky transitions over the elapsed time), weigh by the evidence, then decide.

        On a busy stream a step follows most sightings, so this is the per-advert path's largest share:
        the transition terms are reused while the step length repeats (regular adverts), the zones
        missed come from a mask, the posterior is computed over the old one, and the decision's usual
        outcome (no change) is taken here; ``_decide`` only runs when a threshold is crossed. Same
        arithmetic, in the same order, as the formulas in the comments.
        """
        n = self._none
        if not n:  # no zones: nothing to filter
            tr.stepped = now
            return self._decide(key, tr, now)
        dt = now - tr.stepped
        tr.stepped = now
        p, llr = tr.post, tr.llr
        if dt == self._step_dt:  # the last step's length again (regular adverts): its transition terms
            stay, moves, arrive, keep_out, leave_out = self._step_terms
        else:
            leave = -math.expm1(-dt / self._stay_s)  # a zone stay ends within dt
            arrive = -math.expm1(-dt / self._transit_s)  # a walk between zones ends within dt
            # of the stays that end, the share ``direct`` goes straight to another zone (none with one zone)
            stay, moves, keep_out, leave_out = 1.0 - leave, leave * self._direct, 1.0 - arrive, leave * self._out_share
            self._step_dt, self._step_terms = dt, (stay, moves, arrive, keep_out, leave_out)
        pn = p[n]
        total = 1.0 - pn
        per_zone = arrive * pn / n
        # A receiver that does not hear the identity while others do says it is not near it; a silence
        # on every receiver (a loss burst) says nothing of the kind, so that time counts for no link.
        quiet = tr.quiet
        heard = dt - (quiet - tr.quiet_stepped)
        tr.quiet_stepped = quiet
        if heard > 0.0:  # else the miss is 0
            self._heard_evidence(tr, now - quiet - self._half_exit, heard, llr)
        top = max(llr)
        exp = math.exp
        # zone i: (p[i] (1 - leave) + arrive p[n] / n + leave direct (1 - p[n] - p[i]) / (n - 1)) e^(llr[i] - top)
        # The unnormalised posterior is written over p (each p[i] is read before it is replaced; the
        # list is the track's own and is replaced by the normalised one below).
        if n > 1:
            m = n - 1
            for i in range(n):
                pi = p[i]
                p[i] = (pi * stay + per_zone + moves * ((total - pi) / m)) * exp(llr[i] - top)
        else:
            p[0] = (p[0] * stay + per_zone) * exp(llr[0] - top)  # one zone: nowhere else to move
        # no zone: p[n] (1 - arrive) + leave (1 - direct) (1 - p[n])  (all of leave with one zone)
        p[n] = (pn * keep_out + leave_out * total) * exp(llr[n] - top)
        z = sum(p)
        tr.post = post = [v / z for v in p]
        tr.evidence, tr.llr = llr, [0.0] * (n + 1)
        # _decide's usual outcome inline: the confirmed state holds (from no zone, no zone has reached
        # enter_posterior; from a zone, its posterior is above 1 - switch_posterior).
        cur = tr.state
        if max(post) < self._enter_at if cur == n else post[cur] > self._keep_above:
            return self._hold(key, tr, now)
        return self._decide(key, tr, now)

    def _step_graph(self, key: str, tr: _Track, now: float) -> list[PresenceEvent]:
        """The step with a calibration or a floor plan: per-zone stays, and direct moves only to a zone's
        neighbours (O(edges)); the rest of a stay's end goes to no zone, from which any zone is reached."""
        n = self._none
        if not n:
            tr.stepped = now
            return self._decide(key, tr, now)
        dt = now - tr.stepped
        tr.stepped = now
        p, llr = tr.post, tr.llr
        quiet = tr.quiet
        heard = dt - (quiet - tr.quiet_stepped)
        tr.quiet_stepped = quiet
        if heard > 0.0:  # as in _step
            self._heard_evidence(tr, now - quiet - self._half_exit, heard, llr)
            if self._windowed:
                self._windowed_evidence(tr, now, heard, llr)
        stays, nbrs, transit, direct = self._graph
        expm1 = math.expm1
        arrive = -expm1(-dt / transit)
        pn = p[n]
        new = [arrive * pn / n] * n + [pn * (1.0 - arrive)]
        for i in range(n):
            pi = p[i]
            gone = pi * -expm1(-dt / stays[i])
            new[i] += pi - gone
            out = nbrs[i]
            if out:
                share = gone * direct / len(out)
                for j in out:
                    new[j] += share
                new[n] += gone - gone * direct
            else:
                new[n] += gone
        top = max(llr)
        exp = math.exp
        post = [v * exp(e - top) for v, e in zip(new, llr, strict=True)]
        z = sum(post)
        tr.post = [v / z for v in post]
        tr.evidence, tr.llr = llr, [0.0] * (n + 1)
        return self._decide(key, tr, now)

    def _why(self, tr: _Track, now: float) -> Why:
        """The receivers heard lately and the likeliest states before this step's evidence and after it."""
        names: list[str | None] = [*self.zones, None]
        after = tr.post
        ev = tr.evidence
        if len(ev) == len(after):
            top = max(ev)
            raw = [p * math.exp(min(top - e, 700.0)) for p, e in zip(after, ev, strict=True)]
            z = sum(raw) or 1.0
            before = [v / z for v in raw]
        else:
            before = list(after)

        def top_states(post: list[float]) -> tuple[tuple[str | None, float], ...]:
            order = sorted(range(len(post)), key=lambda i: -post[i])[:WHY_STATES]
            return tuple((names[i], round(post[i], 4)) for i in order)

        live = now - self._half_exit
        heard = sorted(((rid, round(lk.rssi, 1)) for rid, lk in tr.links.items() if lk.last >= live),
                       key=lambda h: -h[1])
        return Why(tuple(heard), top_states(before), top_states(after))

    def _hold(self, key: str, tr: _Track, now: float) -> list[PresenceEvent]:
        """The confirmed state holds: no candidate, and a dwell event when one is due."""
        tr.candidate = -1
        zone = tr.zone
        if zone is not None and now - tr.last_dwell >= self._dwell_every:
            tr.last_dwell = now
            return [PresenceEvent("dwell", key, now, zone, tr.zone_since, tr.visit_since, now - tr.zone_since)]
        return []

    def _decide(self, key: str, tr: _Track, now: float) -> list[PresenceEvent]:
        post, cur = tr.post, tr.state
        top = max(post)
        best = post.index(top)  # the first likeliest state
        # From no zone: the best zone must reach enter_posterior. From a zone: its own posterior must fall
        # to 1 - switch_posterior, however the rest is split (between two equally loud neighbours, say).
        if cur == self._none:
            stay = top < self._enter_at
        else:
            stay = post[cur] > (self._keep_exit if best == self._none else self._keep_above)
        if best == cur or stay:
            return self._hold(key, tr, now)
        if tr.candidate != best:
            tr.candidate, tr.candidate_since = best, now
        if tr.seen < self.enter_samples or now - tr.candidate_since < self.settings.enter_hold_s:
            return []
        events: list[PresenceEvent] = []
        why = self._why(tr, now)
        if tr.zone is not None:
            events.append(PresenceEvent("exit", key, now, tr.zone, tr.zone_since, tr.visit_since,
                                        now - tr.zone_since, why))
            tr.zone = None
        tr.state, tr.candidate = best, -1
        if best != self._none:
            zone = self.zones[best]
            if tr.visit_since is None:
                tr.visit_since = now
                events.append(PresenceEvent("visit_start", key, now, zone, now, now))
            tr.zone, tr.zone_since, tr.last_dwell = zone, now, now
            events.append(PresenceEvent("enter", key, now, zone, now, tr.visit_since, why=why))
        return events

    # ------------------------------------------------------------ time

    def tick(self, now: float) -> list[PresenceEvent]:
        """Exits on silence, visit ends, and forgetting identities nobody hears any more."""
        if not isinstance(now, int | float) or not math.isfinite(now):
            self.dropped["bad_tick_time"] += 1
            return []
        if not self.tracks and self._offset:  # nobody tracked: back to the caller's clock
            self._offset, self._high, self._last_step = 0.0, -math.inf, 0.0
        now += self._offset
        if now < self._high - REORDER_S:
            step = self._high - now
            self.clock_steps += 1
            self._offset += step
            self._last_step = step
            now = self._high
        elif now > self._high:
            self._high = now
        events: list[PresenceEvent] = []
        gone: list[str] = []
        exit_after = self._exit_after
        for key, tr in self.tracks.items():
            silent = now - tr.last_seen
            if silent > exit_after and tr.seen:
                if tr.zone is not None:
                    events.append(PresenceEvent("exit", key, tr.last_seen, tr.zone, tr.zone_since,
                                                tr.visit_since, max(0.0, tr.last_seen - tr.zone_since)))
                # Gone quiet: whoever comes back starts from the prior, not from where this one was.
                tr.zone, tr.state, tr.candidate, tr.seen = None, self._none, -1, 0
                tr.post, tr.llr, tr.links = list(self._prior), [0.0] * len(self._prior), {}
            if silent > self.settings.visit_end_after_s:
                if tr.visit_since is not None:
                    events.append(PresenceEvent("visit_end", key, tr.last_seen, None, None,
                                                tr.visit_since, max(0.0, tr.last_seen - tr.visit_since)))
                gone.append(key)
        for key in gone:
            del self.tracks[key]
        return events

    def wall_stepped(self, seconds: float) -> None:
        """The caller's clock was stepped forward by ``seconds`` (the runtime saw it against monotonic time):
        the base moves back by as much, so the step is not silence, and nobody in the shop exits, ends a
        visit and comes back as a new one. (A step back needs no telling: ``tick`` sees it.)"""
        if seconds <= 0 or not self.tracks:
            return
        self.clock_steps += 1
        self._offset -= seconds
        self._last_step = seconds

    def stats(self) -> dict[str, Any]:
        """Counters for operations: drops by reason, clock steps, identities tracked and in a zone."""
        return {"dropped": dict(self.dropped), "clock_steps": self.clock_steps, "tracked": len(self.tracks),
                "in_zone": sum(1 for tr in list(self.tracks.values()) if tr.zone is not None)}

    def occupancy(self) -> dict[str, int]:
        """Read from other threads (/metrics) while the pipeline's worker changes the tracks: the values
        are copied first, in one C-level call, so the loop below never sees the dict change size."""
        counts: Counter[str] = Counter()
        for tr in list(self.tracks.values()):
            if tr.zone is not None:
                counts[tr.zone] += 1
        return dict(counts)
