"""Sightings in, presence events out: which zone each identity is in, and for how long.

Per identity and receiver the RSSI is smoothed (EMA with an outlier clamp) and turned into a
distance by the log-distance model; the strongest receiver heard recently owns the identity,
and its distance bands name the zone. Entering a zone needs ``enter_samples`` agreeing
observations; staying needs none (hysteresis), so noise does not make people flap.
Exit comes from silence, found by ``tick``: the tracker never looks at a wall clock.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from beacons.types import Sighting
from gateway.config import PresenceSettings, ReceiverSettings

EventKind = Literal["visit_start", "enter", "dwell", "exit", "visit_end"]

DEFAULT_MEASURED_POWER = -59
OUTLIER_CLAMP_DB = 12.0  # a single sample may move the estimate by at most this much


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


@dataclass(slots=True)
class _Link:
    rssi: float
    last: float


@dataclass(slots=True)
class _Track:
    links: dict[str, _Link] = field(default_factory=dict)
    last_seen: float = 0.0
    zone: str | None = None
    zone_since: float = 0.0
    last_dwell: float = 0.0
    candidate: str | None = None
    candidate_count: int = 0
    visit_since: float | None = None
    tx_power: int | None = None


class PresenceTracker:
    def __init__(
        self,
        settings: PresenceSettings,
        receivers: Iterable[ReceiverSettings],
        *,
        enter_samples: int = 2,
    ) -> None:
        self.settings = settings
        self.receivers = {r.id: r for r in receivers}
        self._bands = {
            r.id: sorted((z.max_m, z.name) for z in r.zones) for r in self.receivers.values()
        }
        self.enter_samples = enter_samples
        self.tracks: dict[str, _Track] = {}
        self.dropped: Counter[str] = Counter()

    def zone_for(self, receiver: str, rssi: float, tx_power: int | None) -> str | None:
        rx = self.receivers.get(receiver)
        if rx is None:
            return None
        power = rx.measured_power if rx.measured_power is not None else (tx_power or DEFAULT_MEASURED_POWER)
        d = distance_m(rssi, power, rx.path_loss_exponent)
        for max_m, name in self._bands[receiver]:
            if d <= max_m:
                return name
        return None

    def observe(self, s: Sighting) -> list[PresenceEvent]:
        if s.receiver not in self.receivers:
            self.dropped["unknown_receiver"] += 1
            return []
        if not -127 < s.rssi < 0 or not math.isfinite(s.time):
            self.dropped["bad_rssi"] += 1
            return []
        tr = self.tracks.get(s.key)
        if tr is None:
            tr = self.tracks[s.key] = _Track()
        elif s.time < tr.last_seen - 2.0:
            self.dropped["clock_backwards"] += 1
            return []
        alpha = self.settings.smoothing
        link = tr.links.get(s.receiver)
        if link is None or s.time - link.last > self.settings.exit_after_s:
            link = tr.links[s.receiver] = _Link(float(s.rssi), s.time)
        else:
            delta = max(-OUTLIER_CLAMP_DB, min(OUTLIER_CLAMP_DB, s.rssi - link.rssi))
            link.rssi += alpha * delta
            link.last = max(link.last, s.time)
        tr.last_seen = max(tr.last_seen, s.time)
        if s.tx_power is not None:
            tr.tx_power = s.tx_power
        return self._update_zone(s.key, tr, s.time)

    def _owner(self, tr: _Track, now: float) -> tuple[str, float] | None:
        best: tuple[str, float] | None = None
        horizon = self.settings.exit_after_s / 2
        for rx, link in tr.links.items():
            if now - link.last <= horizon and (best is None or link.rssi > best[1]):
                best = (rx, link.rssi)
        return best

    def _update_zone(self, key: str, tr: _Track, now: float) -> list[PresenceEvent]:
        owner = self._owner(tr, now)
        zone = self.zone_for(owner[0], owner[1], tr.tx_power) if owner else None
        events: list[PresenceEvent] = []
        if zone == tr.zone:
            tr.candidate, tr.candidate_count = None, 0
            if zone is not None and now - tr.last_dwell >= self.settings.dwell_every_s:
                tr.last_dwell = now
                events.append(PresenceEvent("dwell", key, now, zone, tr.zone_since, tr.visit_since,
                                            now - tr.zone_since))
            return events
        if zone is None:
            # Out of every band but still heard: leave the zone only after silence or a new zone.
            return events
        if zone != tr.candidate:
            tr.candidate, tr.candidate_count = zone, 0
        tr.candidate_count += 1
        if tr.candidate_count < self.enter_samples:
            return events
        if tr.visit_since is None:
            tr.visit_since = now
            events.append(PresenceEvent("visit_start", key, now, zone, now, now))
        if tr.zone is not None:
            events.append(PresenceEvent("exit", key, now, tr.zone, tr.zone_since, tr.visit_since,
                                        now - tr.zone_since))
        tr.zone, tr.zone_since, tr.last_dwell = zone, now, now
        tr.candidate, tr.candidate_count = None, 0
        events.append(PresenceEvent("enter", key, now, zone, now, tr.visit_since))
        return events

    def tick(self, now: float) -> list[PresenceEvent]:
        """Exits on silence, visit ends, and forgetting identities nobody hears any more."""
        events: list[PresenceEvent] = []
        gone: list[str] = []
        exit_after = self.settings.exit_after_s
        for key, tr in self.tracks.items():
            silent = now - tr.last_seen
            if tr.zone is not None and silent > exit_after:
                events.append(PresenceEvent("exit", key, tr.last_seen, tr.zone, tr.zone_since,
                                            tr.visit_since, tr.last_seen - tr.zone_since))
                tr.zone, tr.candidate, tr.candidate_count = None, None, 0
            if silent > self.settings.visit_end_after_s:
                if tr.visit_since is not None:
                    events.append(PresenceEvent("visit_end", key, tr.last_seen, None, None,
                                                tr.visit_since, tr.last_seen - tr.visit_since))
                gone.append(key)
        for key in gone:
            del self.tracks[key]
        return events

    def occupancy(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for tr in self.tracks.values():
            if tr.zone is not None:
                counts[tr.zone] += 1
        return dict(counts)
