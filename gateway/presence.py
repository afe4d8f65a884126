"""Sightings in, presence events out: which zone each identity is in, and for how long.

The model (docs/presence.md has the figures behind each default):

- **Filter**, per identity and receiver (a *link*): a scalar Kalman filter on RSSI whose process
  noise grows with the time since the last advert, so it is correct for irregular adverts: dense
  adverts are averaged by count, and after a loss burst the estimate is uncertain and catches up
  fast. Innovations beyond ``GATE_SIGMAS`` are clamped (outliers). ``rssi_filter = "ema"`` selects
  a time-aware EMA with an outlier clamp instead.
- **Distance**: log-distance path loss, per-receiver calibration (measured power at 1 m, exponent),
  defaulting to the beacon's advertised tx power. Bands are precomputed as RSSI thresholds, so the
  hot path never takes a logarithm.
- **Ownership**: the strongest receiver (RSSI above its own 1 m reference) owns an identity; once
  the identity is in a zone, a challenger takes over by a sequential test (CUSUM) on its lead over the
  owner: evidence grows by ``(lead - k) x dt`` and the switch happens at ``owner_evidence_db_s``, so a
  large lead switches in a fraction of a second and a marginal one (a fade) rarely. ``k`` is
  ``owner_margin_db``; optionally (``owner_out_margin_db >= 0``, off by default: the benchmark found
  it adds false exits) 0 once the owner puts the identity that far beyond its zone's band.
- **Zones** with hysteresis: entering needs ``enter_samples`` observations over ``enter_hold_s``
  agreeing on the owner's band; staying needs none. Moving between two bands of one receiver
  needs the estimate ``band_margin_db`` inside the new band. Leaving without a new zone needs the zone's
  receiver to hear the identity beyond ``exit_band_factor`` x the band for ``exit_band_hold_s``, or
  silence for ``exit_after_s`` (found by ``tick``: the tracker never looks at a wall clock).
- **Time**: the tracker keeps its own monotonic time base. A ``tick`` more than ``REORDER_S`` before
  the newest tick or sighting is a clock step back (NTP on a Pi without an RTC): it is counted in ``clock_steps``
  and the base shifts by the step, so silence keeps counting and nobody is frozen in a zone. Event
  times are in that base; it returns to the caller's clock once no identity is tracked.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from beacons.types import Sighting
from gateway.config import PresenceSettings, ReceiverSettings

EventKind = Literal["visit_start", "enter", "dwell", "exit", "visit_end"]

DEFAULT_MEASURED_POWER = -59
OUTLIER_CLAMP_DB = 12.0  # EMA: a single sample may move the estimate by at most this much
GATE_SIGMAS = 2.5  # Kalman: innovations clamped at this many predicted standard deviations
REORDER_S = 2.0  # sightings this much older than an identity's newest are a clock step back
EVIDENCE_DT_MAX_S = 0.5  # one advert adds at most this much time to the ownership test (loss gaps)
RSSI_UNAVAILABLE = 127  # what HCI reports when the controller has no RSSI

#: (enter threshold dBm, zone name, exit threshold dBm), nearest band first
Bands = tuple[tuple[float, str, float], ...]


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    kind: EventKind
    key: str
    time: float
    zone: str | None = None
    zone_since: float | None = None  # when the current zone stay began (identifies the stay)
    visit_since: float | None = None  # when the visit began (identifies the visit)
    dwell_s: float = 0.0


def distance_m(rssi: float, measured_power: float, exponent: float) -> float:
    """Log-distance path loss model inverted: d = 10 ^ ((P1m - RSSI) / (10 n))."""
    return float(10.0 ** ((measured_power - rssi) / (10.0 * exponent)))


def rssi_at(distance: float, measured_power: float, exponent: float) -> float:
    """The model forward: the RSSI expected at ``distance`` metres."""
    return measured_power - 10.0 * exponent * math.log10(distance)


@dataclass(slots=True)
class _Link:
    """One receiver's filtered view of one identity."""

    rssi: float  # filtered estimate
    var: float  # its variance (Kalman)
    last: float  # newest sample time
    ref: float  # calibrated RSSI at 1 m: strength = rssi - ref
    bands: Bands
    evidence: float = 0.0  # CUSUM of this receiver's lead over the owner (dB x s)
    evidence_at: float = 0.0


@dataclass(slots=True)
class _Track:
    links: dict[str, _Link] = field(default_factory=dict)
    last_seen: float = 0.0
    zone: str | None = None
    zone_rx: str | None = None  # the receiver whose band named the zone
    zone_since: float = 0.0
    last_dwell: float = 0.0
    candidate: str | None = None
    candidate_count: int = 0
    candidate_since: float = 0.0
    visit_since: float | None = None
    tx_power: int | None = None
    owner: str | None = None
    challenger: str | None = None  # the receiver whose evidence against the owner is growing
    prev_seen: float = 0.0  # last_seen before the current sighting
    out_since: float | None = None  # when the zone's receiver first heard it beyond the exit band


class PresenceTracker:
    def __init__(
        self,
        settings: PresenceSettings,
        receivers: Iterable[ReceiverSettings],
        *,
        enter_samples: int = 2,
    ) -> None:
        if settings.rssi_filter not in ("kalman", "ema"):
            raise ValueError(f"presence.rssi_filter: expected 'kalman' or 'ema', got {settings.rssi_filter!r}")
        self.settings = settings
        self.receivers = {r.id: r for r in receivers}
        self._bands = {
            r.id: sorted((z.max_m, z.name) for z in r.zones) for r in self.receivers.values()
        }
        self._band_cache: dict[tuple[str, float], Bands] = {}
        self.enter_samples = enter_samples
        self.tracks: dict[str, _Track] = {}
        self.dropped: Counter[str] = Counter()
        self._kalman = settings.rssi_filter == "kalman"
        self._r = settings.rssi_noise_db ** 2
        self._q = settings.rssi_drift_db_s ** 2
        self._link_timeout = settings.exit_after_s / 2
        self._exit_after = settings.exit_after_s  # settings are read once, here
        self._dwell_every = settings.dwell_every_s
        self._offset = 0.0  # added to every input time: the monotonic base (see the module docstring)
        self._high = -math.inf  # newest tick or sighting time, in the base
        self._last_step = 0.0
        self.clock_steps = 0

    # ------------------------------------------------------------ calibration

    def _ref(self, rx: ReceiverSettings, tx_power: int | None) -> float:
        if rx.measured_power is not None:
            return float(rx.measured_power)
        return float(tx_power if tx_power is not None else DEFAULT_MEASURED_POWER)

    def _bands_for(self, rx: ReceiverSettings, ref: float) -> Bands:
        """Distance bands as RSSI thresholds for one calibration, computed once."""
        cached = self._band_cache.get((rx.id, ref))
        if cached is None:
            n, factor = rx.path_loss_exponent, self.settings.exit_band_factor
            cached = tuple(
                (rssi_at(max_m, ref, n), name, rssi_at(max_m * factor, ref, n) if factor >= 1.0 else -math.inf)
                for max_m, name in self._bands[rx.id]
            )
            self._band_cache[(rx.id, ref)] = cached
        return cached

    def zone_for(self, receiver: str, rssi: float, tx_power: int | None) -> str | None:
        """The band ``receiver`` puts a (filtered) RSSI in; None outside every band."""
        rx = self.receivers.get(receiver)
        if rx is None:
            return None
        for thr, name, _ in self._bands_for(rx, self._ref(rx, tx_power)):
            if rssi >= thr:
                return name
        return None

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

    def observe(self, s: Sighting) -> list[PresenceEvent]:
        rx = self.receivers.get(s.receiver)
        if rx is None:
            self.dropped["unknown_receiver"] += 1
            return []
        rssi, t = s.rssi, s.time
        try:
            ok = -127 <= rssi < 0 and t - t == 0.0  # t - t is nan for nan and inf
        except TypeError:
            ok = False
        if not ok:
            self.dropped[self._reject(s) or "bad_input"] += 1
            return []
        if self._offset:
            t += self._offset
            if t > self._high + self._last_step / 2:  # stamped before the step, delivered after it
                self.dropped["clock_backwards"] += 1
                return []
        tr = self.tracks.get(s.key)
        if tr is None:
            tr = self.tracks[s.key] = _Track(last_seen=t, prev_seen=t)
        elif t < tr.last_seen - REORDER_S:
            self.dropped["clock_backwards"] += 1
            return []
        else:
            tr.prev_seen = tr.last_seen
        tx = s.tx_power
        if tx is not None and tx != tr.tx_power and isinstance(tx, int) and -127 < tx < 0:
            tr.tx_power = tx
            if rx.measured_power is None:  # links that use the advertised power recalibrate
                for rid, lk in tr.links.items():
                    r = self.receivers[rid]
                    if r.measured_power is None:
                        lk.ref = float(tx)
                        lk.bands = self._bands_for(r, lk.ref)
        rx_id = rx.id
        link = tr.links.get(rx_id)
        if link is None or t - link.last > self._exit_after:
            ref = self._ref(rx, tr.tx_power)
            link = tr.links[rx_id] = _Link(float(rssi), self._r, t, ref, self._bands_for(rx, ref))
        else:
            dt = t - link.last
            if dt < 0.0:
                dt = 0.0
            else:
                link.last = t
            innov = rssi - link.rssi
            if self._kalman:
                p = link.var + self._q * dt
                s2 = p + self._r
                gate2 = GATE_SIGMAS * GATE_SIGMAS * s2
                if innov * innov > gate2:
                    innov = math.copysign(math.sqrt(gate2), innov)
                k = p / s2
                link.rssi += k * innov
                link.var = (1.0 - k) * p
            else:
                alpha = 1.0 - (1.0 - self.settings.smoothing) ** max(dt, 0.05)
                link.rssi += alpha * max(-OUTLIER_CLAMP_DB, min(OUTLIER_CLAMP_DB, innov))
        if t > tr.last_seen:
            tr.last_seen = t
            if t > self._high:
                self._high = t
        owner = tr.owner
        if owner != rx_id:
            self._update_owner(tr, rx_id, link, t)
        if (tr.owner == owner and tr.zone is not None and tr.candidate is None and tr.out_since is None
                and t - tr.last_dwell < self._dwell_every):
            # Fast path, most adverts: settled in a zone, no dwell due. Another receiver's advert
            # cannot change the owner's zone; the owner's own must still name it.
            if rx_id != owner:
                return []
            for thr, name, _ in link.bands:
                if link.rssi >= thr:
                    if name == tr.zone:
                        return []
                    break
        return self._update_zone(s.key, tr, t)

    def _update_owner(self, tr: _Track, rx_id: str, link: _Link, now: float) -> None:
        """The strongest receiver owns the identity; inside a zone, a CUSUM on the lead decides a takeover."""
        owner = tr.owner
        ol = tr.links.get(owner) if owner is not None else None
        # The owner is gone only if others kept hearing the identity while it did not: after a loss
        # burst that silenced every receiver, the first receiver heard again must not win by default.
        if ol is None or (now - ol.last > self._link_timeout and tr.prev_seen - ol.last > self._link_timeout):
            self._set_owner(tr, rx_id, now)
            return
        lead = (link.rssi - link.ref) - (ol.rssi - ol.ref)
        if tr.zone is None:  # nothing to protect yet: plain strongest
            if lead > 0.0:
                self._set_owner(tr, rx_id, now)
            return
        k = self.settings.owner_margin_db
        out = self.settings.owner_out_margin_db
        if out >= 0.0:
            for thr, name, _ in ol.bands:
                if name == tr.zone:
                    if ol.rssi < thr - out:
                        k = 0.0  # the owner itself says the identity has left its zone
                    break
        dt = now - link.evidence_at
        dt = 0.0 if dt < 0.0 else EVIDENCE_DT_MAX_S if dt > EVIDENCE_DT_MAX_S else dt
        ev = link.evidence + (lead - k) * dt
        link.evidence, link.evidence_at = (ev if ev > 0.0 else 0.0), now
        if ev <= 0.0:
            if tr.challenger == rx_id:
                tr.challenger = None
            return
        tr.challenger = rx_id
        if ev >= self.settings.owner_evidence_db_s:
            # The test was sustained evidence already: a zone the new owner names is entered at once.
            for thr, name, _ in link.bands:
                if link.rssi >= thr:
                    if name != tr.zone:
                        tr.candidate, tr.candidate_count = name, self.enter_samples
                        tr.candidate_since = now - self.settings.enter_hold_s
                    break
            self._set_owner(tr, rx_id, now)

    @staticmethod
    def _set_owner(tr: _Track, rx_id: str, now: float) -> None:
        tr.owner, tr.challenger = rx_id, None
        for lk in tr.links.values():
            lk.evidence, lk.evidence_at = 0.0, now

    def _update_zone(self, key: str, tr: _Track, now: float) -> list[PresenceEvent]:
        owner = tr.owner
        ol = tr.links[owner] if owner is not None else None
        zone: str | None = None
        if ol is not None:
            x = ol.rssi
            for thr, name, _ in ol.bands:
                if x >= thr:
                    zone = name
                    break
        if zone is not None and zone != tr.zone and owner == tr.zone_rx and ol is not None:
            zone = self._clear_band(ol, zone)  # between two bands of one receiver: a dB margin
        if zone is not None and zone == tr.zone:
            tr.candidate, tr.candidate_count, tr.out_since = None, 0, None
            if now - tr.last_dwell >= self._dwell_every:
                tr.last_dwell = now
                return [PresenceEvent("dwell", key, now, zone, tr.zone_since, tr.visit_since, now - tr.zone_since)]
            return []
        if zone is None:
            tr.candidate, tr.candidate_count = None, 0
            return self._check_exit_band(key, tr, now) if tr.zone is not None else []
        if zone != tr.candidate:
            tr.candidate, tr.candidate_count, tr.candidate_since = zone, 0, now
        tr.candidate_count += 1
        if tr.candidate_count < self.enter_samples or now - tr.candidate_since < self.settings.enter_hold_s:
            return []
        events: list[PresenceEvent] = []
        if tr.visit_since is None:
            tr.visit_since = now
            events.append(PresenceEvent("visit_start", key, now, zone, now, now))
        if tr.zone is not None:
            events.append(PresenceEvent("exit", key, now, tr.zone, tr.zone_since, tr.visit_since,
                                        now - tr.zone_since))
        tr.zone, tr.zone_rx, tr.zone_since, tr.last_dwell = zone, owner, now, now
        tr.candidate, tr.candidate_count, tr.out_since = None, 0, None
        events.append(PresenceEvent("enter", key, now, zone, now, tr.visit_since))
        return events

    def _clear_band(self, link: _Link, zone: str) -> str | None:
        """``zone`` if the estimate is inside its band by ``band_margin_db`` on both sides, else None."""
        m = self.settings.band_margin_db
        hi = lo = None
        for thr, name, _ in link.bands:
            if hi is None and link.rssi - m >= thr:
                hi = name
            if lo is None and link.rssi + m >= thr:
                lo = name
        return zone if hi == zone and lo == zone else None

    def _check_exit_band(self, key: str, tr: _Track, now: float) -> list[PresenceEvent]:
        """Still heard, but out of every band: leave once the zone's receiver puts it beyond the exit band."""
        zl = tr.links.get(tr.zone_rx) if tr.zone_rx is not None else None
        exit_thr = -math.inf
        if zl is not None:
            for _, name, thr in zl.bands:
                if name == tr.zone:
                    exit_thr = thr
                    break
        outside = zl is None or now - zl.last > self._link_timeout or zl.rssi < exit_thr
        if not outside:
            tr.out_since = None
            return []
        if tr.out_since is None:
            tr.out_since = now
        if now - tr.out_since < self.settings.exit_band_hold_s:
            return []
        ev = PresenceEvent("exit", key, now, tr.zone, tr.zone_since, tr.visit_since, now - tr.zone_since)
        tr.zone, tr.zone_rx, tr.out_since = None, None, None
        return [ev]

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
        exit_after = self.settings.exit_after_s
        for key, tr in self.tracks.items():
            silent = now - tr.last_seen
            if tr.zone is not None and silent > exit_after:
                events.append(PresenceEvent("exit", key, tr.last_seen, tr.zone, tr.zone_since,
                                            tr.visit_since, max(0.0, tr.last_seen - tr.zone_since)))
                tr.zone, tr.zone_rx, tr.candidate, tr.candidate_count, tr.out_since = None, None, None, 0, None
            if silent > self.settings.visit_end_after_s:
                if tr.visit_since is not None:
                    events.append(PresenceEvent("visit_end", key, tr.last_seen, None, None,
                                                tr.visit_since, max(0.0, tr.last_seen - tr.visit_since)))
                gone.append(key)
        for key in gone:
            del self.tracks[key]
        return events

    def stats(self) -> dict[str, Any]:
        """Counters for operations: drops by reason, clock steps, identities tracked and in a zone."""
        return {"dropped": dict(self.dropped), "clock_steps": self.clock_steps, "tracked": len(self.tracks),
                "in_zone": sum(1 for tr in self.tracks.values() if tr.zone is not None)}

    def occupancy(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for tr in self.tracks.values():
            if tr.zone is not None:
                counts[tr.zone] += 1
        return dict(counts)
