"""The tracker's settings chosen on the calibration walk itself, never on what is scored later.

``learn_tuned`` learns a calibration (``calibration.learn``) and, with two or more labelled walks
(beacons), picks from ``TUNE_GRID`` how often a link gives an independent look, how fast its filter
follows and how low a zone's posterior must fall before the tracker leaves it: each candidate is scored
by leaving one walk out at a time (learned on the others, replayed through the tracker, scored against
its labels), each with every ``BAND_WEIGHTS`` (how much the config's bands count beside the learned
signatures). The choice lands in the calibration's ``tuned`` ([presence] in its TOML), which the tracker
applies over the config's, and its ``band_weight`` ([model]). Apart from calibration.py because it runs
the tracker, which reads calibrations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

from beacons.types import Sighting
from gateway.presence.calibration import Calibration, learn
from gateway.presence.floor import adjacency
from gateway.presence.scoring import Event, score_labels
from gateway.presence.settings import FloorZone, PresenceSettings, ReceiverSettings
from gateway.presence.traces import Label
from gateway.presence.tracker import PresenceTracker

Candidate = tuple[tuple[str, float], ...]
TUNE_GRID: tuple[Candidate, ...] = tuple(
    (("fade_time_s", f), ("rssi_drift_db_s", d), ("switch_posterior", w))
    for f in (3.0, 1.5, 1.0, 0.5) for d in (1.5, 3.0) for w in (0.995, 0.98, 0.9))
BAND_WEIGHTS = (0.0, 0.25, 0.5)  # how much the config's bands count beside the signatures (Calibration.band_weight)
# The second round, around the first round's choice: the windowed-mean evidence (Calibration.windowed_weight,
# looks per second; with it, the per-link signatures may step aside: fade_time_s 30 and fade_db 1000 make their
# looks rare), and exits to no zone that need more evidence than moves (exit_posterior; 0: as switch_posterior).
WINDOWED_WEIGHTS = (0.0, 3.0, 6.0, 12.0)
QUIET_LINKS: Candidate = (("fade_time_s", 30.0), ("fade_db", 1000.0))
EXIT_POSTERIORS = (0.0, 0.9999, 0.99999)
SD_FLOORS = (0.0, 4.0, 6.0)  # Calibration.sd_floor_db
# In a candidate, these are not [presence] settings but the calibration's own fields.
WINDOWED, SD_FLOOR = "windowed_weight", "sd_floor_db"
MODEL_KEYS = (WINDOWED, SD_FLOOR)
FILTER_KEYS = frozenset({"rssi_drift_db_s"})  # the settings that change what the walk teaches (the filter's)
CHANGES_LIMIT = 1.5  # a candidate may change zone at most this many times as often as the labels do
# Round two also weighs flapping: accuracy minus this per labels' worth of changes beyond the labels' own (a walk
# from zone to zone through an aisle is one change, not an exit and an enter; each extra one reaches campaigns).
CHANGE_COST = 0.05


def learn_tuned(sightings: Iterable[Sighting], labels: Sequence[Label], receivers: Sequence[ReceiverSettings],
                settings: PresenceSettings, zones: Sequence[FloorZone] = ()) -> Calibration:
    """``learn``, and with two or more walks the best candidate of ``TUNE_GRID`` and of the settings' own
    values: the best zone accuracy among those changing zone at most ``CHANGES_LIMIT`` x as often as the
    labels and exiting a labelled zone no more often than the settings' own values do (a walk is faster
    than a shopper: a candidate that buys accuracy with false exits is not taken); fewer changes break ties.
    Each candidate is tried with every ``BAND_WEIGHTS`` (the settings' own values with weight 0 are the bar).
    A second round tries, around that choice, the windowed evidence, exit hysteresis and an sd floor
    (``WINDOWED_WEIGHTS`` x ``EXIT_POSTERIORS`` x ``SD_FLOORS``) under the same conditions, zone accuracy less
    ``CHANGE_COST`` per labels' worth of extra zone changes. Walks are scored on their labelled time only."""
    rows = list(sightings)
    if len({lb.beacon for lb in labels}) < 2:
        return learn(rows, labels, receivers, settings, zones)
    own = tuple((k, float(getattr(settings, k))) for k, _ in TUNE_GRID[0])
    scores = tune_scores(rows, labels, receivers, settings, zones, (own, *TUNE_GRID), BAND_WEIGHTS)
    bar = scores[(own, 0.0)][3]

    def pick(scores: dict[tuple[Candidate, float], tuple[float, float, float, float]],
             default: tuple[Candidate, float], change_cost: float = 0.0) -> tuple[Candidate, float]:
        fit = [c for c, (_, changes, truth, exits) in scores.items()
               if changes <= CHANGES_LIMIT * truth and exits <= bar] or [default]

        def merit(c: tuple[Candidate, float]) -> tuple[float, float]:
            acc, changes, truth, _ = scores[c]
            return acc - change_cost * max(0.0, changes / truth - 1.0) if truth else acc, -changes

        return max(fit, key=merit)

    best, weight = pick(scores, (own, 0.0))
    # Round two: windowed evidence and exit hysteresis, each beside the first round's choice.
    second: list[Candidate] = []
    for ww in WINDOWED_WEIGHTS:
        for ep in EXIT_POSTERIORS:
            for floor in SD_FLOORS:
                base = dict(best)
                if ww:
                    base.update(QUIET_LINKS)
                    base[WINDOWED] = ww
                if ep:
                    base["exit_posterior"] = ep
                if floor:
                    base[SD_FLOOR] = floor
                second.append(tuple(base.items()))
    more = tune_scores(rows, labels, receivers, settings, zones, second, (weight,))
    final, _ = pick(more, (best, weight), CHANGE_COST)
    params, model = split(final)
    chosen = dataclasses.replace(settings, **params)  # type: ignore[arg-type]
    return dataclasses.replace(learn(rows, labels, receivers, chosen, zones), tuned=tuple(params.items()),
                               band_weight=weight, windowed_weight=model.get(WINDOWED, 0.0),
                               sd_floor_db=model.get(SD_FLOOR, 0.0))


def _taught_parts(labels: Sequence[Label], taught: set[str]) -> list[list[Label]]:
    """A walk's labels in time order, cut at every label of an untaught zone: the runs of labels in taught
    zones (or no zone) that remain, each to be scored as its own walk."""
    parts: list[list[Label]] = [[]]
    for lb in sorted(labels, key=lambda lb: lb.start):
        if lb.zone is None or lb.zone in taught:
            parts[-1].append(lb)
        elif parts[-1]:
            parts.append([])
    return [p for p in parts if p]


def split(cand: Candidate) -> tuple[dict[str, float], dict[str, float]]:
    """A candidate's [presence] settings, and its calibration fields (``MODEL_KEYS``)."""
    params = dict(cand)
    return params, {k: params.pop(k) for k in MODEL_KEYS if k in params}


def replay_walk(rows: Iterable[Sighting], tracker: PresenceTracker) -> list[Event]:
    """Enter, dwell and exit events of sightings (time order) one by one, with a tick every second."""
    events: list[Event] = []
    next_tick = -math.inf
    for s in rows:
        if next_tick == -math.inf:
            next_tick = math.floor(s.time) + 1.0
        while s.time >= next_tick:
            events += [(e.kind, e.key, e.zone, next_tick) for e in tracker.tick(next_tick)]
            next_tick += 1.0
        events += [(e.kind, e.key, e.zone, s.time) for e in tracker.observe(s)]
    return [e for e in events if e[0] in ("enter", "exit", "dwell")]


def tune_scores(rows: Sequence[Sighting], labels: Sequence[Label], receivers: Sequence[ReceiverSettings],
                settings: PresenceSettings, zones: Sequence[FloorZone] = (),
                grid: Sequence[Candidate] = TUNE_GRID, band_weights: Sequence[float] = (0.0,),
                taught_only: bool = True) -> dict[tuple[Candidate, float], tuple[float, float, float, float]]:
    """Per candidate and band weight: zone accuracy, zone changes per hour, the labels' changes per hour and
    false exits per person-hour, each walk scored by a tracker calibrated on the other walks only.

    ``taught_only``: a walk is scored only on its labelled stretches in zones the fold's training taught (and
    in no zone), each stretch on its own, the whole walk still replayed, by a tracker that does not know the
    zones only the held-out walk taught: a fold whose training never entered a room cannot say how well a
    model knows that room (with one walk per room, leaving it out would otherwise rank models by how they fail
    on rooms nobody walked, which the calibration scored later, taught by every walk, never meets)."""
    walked_zones = {lb.zone for lb in labels if lb.zone is not None}
    floor = adjacency(zones)
    beacons = sorted({lb.beacon for lb in labels})
    out: dict[tuple[Candidate, float], tuple[float, float, float, float]] = {}
    learned: dict[tuple[object, ...], Calibration] = {}  # only the filter's settings change what is learned
    for cand in grid:
        params, model = split(cand)
        st = dataclasses.replace(settings, **params)  # type: ignore[arg-type]
        for weight in band_weights:
            events: list[Event] = []
            scored: list[Label] = []
            for held in beacons:
                key = (held, *(v for k, v in cand if k in FILTER_KEYS))
                if key not in learned:
                    learned[key] = learn([s for s in rows if s.key != held],
                                         [lb for lb in labels if lb.beacon != held], receivers, st, zones)
                cal = dataclasses.replace(learned[key], tuned=tuple(params.items()), band_weight=weight,
                                          windowed_weight=model.get(WINDOWED, 0.0),
                                          sd_floor_db=model.get(SD_FLOOR, 0.0))
                taught = {z.name for z in learned[key].zones}
                own = [lb for lb in labels if lb.beacon == held]
                fold = receivers
                if taught_only:  # the zones only the held-out walk taught are not the fold's to know either
                    fold = [dataclasses.replace(r, zones=[b for b in r.zones if b.name not in walked_zones - taught])
                            for r in receivers]
                tracker = PresenceTracker(settings, fold, calibration=cal, adjacency=floor)
                walked = replay_walk((s for s in rows if s.key == held), tracker)
                if not taught_only:
                    events += walked
                    scored += own
                    continue
                pieces = _taught_parts(own, taught)
                scored += [lb._replace(beacon=f"{held}#{k}") for k, piece in enumerate(pieces) for lb in piece]
                events += [(kind, f"{held}#{k}", zone, t) for k in range(len(pieces)) for kind, _, zone, t in walked]
            sc = score_labels(events, scored, settings.exit_after_s, gaps_unknown=True)
            out[(cand, weight)] = (sc["zone_accuracy"], sc["zone_changes_per_hour"],
                                   sc["truth_zone_changes_per_hour"], sc["false_exits_per_person_hour"])
    return out
