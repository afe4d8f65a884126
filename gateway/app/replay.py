"""`gateway replay`: a trace through the same presence tracker as `gateway run`, in virtual time.

Sightings reach the tracker as the runtime hands them over: in drains (``observe_many``, one per
``DRAIN_S`` of trace time) with a ``tick`` every ``TICK_S``. An event's ``time`` is when the gateway
would have emitted it: the drain's last sighting, or the tick. With labels, the run is scored beside
the baselines of gateway/presence/scoring.py (docs/presence.md, "Replay").
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple

from beacons.types import Sighting
from gateway.app.config import load_settings
from gateway.errors import ConfigError
from gateway.presence import calibration as calibration_file
from gateway.presence.calibration import Calibration
from gateway.presence.floor import adjacency as floor_adjacency
from gateway.presence.scoring import Event, baselines, replay, score_labels, steps
from gateway.presence.settings import PresenceSettings, ReceiverSettings
from gateway.presence.traces import Label, RowErrors, TraceError, open_trace, read_labels
from gateway.presence.tracker import PresenceEvent, PresenceTracker

DRAIN_S = 0.25  # the runtime drains adverts continuously; a quarter second is its slow case
TICK_S = 1.0  # the runtime ticks presence about once a second
SHOWN = frozenset({"enter", "dwell", "exit"})  # the events printed (visit start and end are implied)


class Replayed(NamedTuple):
    events: list[Event]  # (kind, key, zone, emitted at)
    rows: int  # good rows replayed
    errors: RowErrors
    cpu_s: float
    wall_s: float


Adjacency = Mapping[str, Collection[str]]


def track(sightings: Iterable[Sighting], settings: PresenceSettings, receivers: list[ReceiverSettings],
          emit: Callable[[PresenceEvent, float], None], calibration: Calibration | None = None,
          adjacency: Adjacency | None = None) -> None:
    """Every sighting through one tracker; ``emit(event, emitted_at)`` per event, in order.

    After the last sighting the clock runs on until every visit has ended, so the last exits come out.
    """
    tracker = PresenceTracker(settings, receivers, calibration=calibration, adjacency=adjacency)
    observe_many, tick = tracker.observe_many, tracker.tick
    batch: list[Sighting] = []
    drain_end = next_tick = -math.inf
    last = -math.inf
    for s in sightings:
        t = s.time
        if t >= drain_end:
            if batch:
                for e in observe_many(batch):
                    emit(e, last)
                batch = []
            if next_tick == -math.inf:
                next_tick = math.floor(t / TICK_S) * TICK_S + TICK_S
            while t >= next_tick:
                for e in tick(next_tick):
                    emit(e, next_tick)
                next_tick += TICK_S
            drain_end = math.floor(t / DRAIN_S) * DRAIN_S + DRAIN_S
        batch.append(s)
        last = t
    if batch:
        for e in observe_many(batch):
            emit(e, last)
    if last == -math.inf:
        return
    end = last + settings.exit_after_s + TICK_S
    while next_tick <= end:
        for e in tick(next_tick):
            emit(e, next_tick)
        next_tick += TICK_S
    for e in tick(last + settings.visit_end_after_s + TICK_S):
        emit(e, last + settings.visit_end_after_s + TICK_S)


def event_json(e: PresenceEvent, emitted: float) -> str:
    out: dict[str, Any] = {"time": round(emitted, 3), "beacon": e.key, "event": e.kind, "zone": e.zone,
                           "since": None if e.zone_since is None else round(e.zone_since, 3)}
    if e.kind != "enter":
        out["dwell_s"] = round(e.dwell_s, 3)
    if e.why is not None:
        out["why"] = {"heard": dict(e.why.heard),
                      "before": [[z, p] for z, p in e.why.before], "after": [[z, p] for z, p in e.why.after]}
    return json.dumps(out)


def replay_events(trace: Path, settings: PresenceSettings, receivers: list[ReceiverSettings],
                  on_event: Callable[[PresenceEvent, float], None] | None = None,
                  calibration: Calibration | None = None, adjacency: Adjacency | None = None) -> Replayed:
    """The tracker's enter / dwell / exit events over a trace file, and what reading it cost.

    Raises TraceError for an unreadable trace; bad rows are skipped and counted in ``errors``.
    """
    events: list[Event] = []

    def emit(e: PresenceEvent, emitted: float) -> None:
        if e.kind in SHOWN:
            events.append((e.kind, e.key, e.zone, emitted))
            if on_event is not None:
                on_event(e, emitted)

    f, reader = open_trace(trace, [r.id for r in receivers])
    cpu, wall = time.process_time(), time.perf_counter()
    with f:
        track(reader, settings, receivers, emit, calibration, adjacency)
    return Replayed(events, reader.rows, reader.errors, time.process_time() - cpu, time.perf_counter() - wall)


def baseline_events(trace: Path, settings: PresenceSettings,
                    receivers: list[ReceiverSettings]) -> dict[str, list[Event]]:
    """Each baseline's events over the same trace (read again: a trace is streamed, never held)."""
    out = {}
    for name, baseline in baselines(receivers, settings.exit_after_s).items():
        f, reader = open_trace(trace, [r.id for r in receivers])
        with f:
            out[name], _ = replay(baseline, steps(reader, TICK_S))
    return out


def run_replay(trace: Path, settings: PresenceSettings, receivers: list[ReceiverSettings],
               labels: list[Label] | None, out: IO[str], err: IO[str], calibration: Calibration | None = None,
               adjacency: Adjacency | None = None) -> dict[str, Any] | None:
    """Print the events (and with labels, the scores as the last line); returns the scores."""
    def show(e: PresenceEvent, at: float) -> None:
        out.write(event_json(e, at) + "\n")

    run = replay_events(trace, settings, receivers, show, calibration, adjacency)
    if run.errors.count:
        print(f"gateway replay: {run.errors.count} bad rows skipped\n{run.errors.report()}", file=err)
    if labels is None:
        return None
    result: dict[str, Any] = {
        "ours": score_labels(run.events, labels, settings.exit_after_s),
        "baselines": {name: score_labels(events, labels, settings.exit_after_s)
                      for name, events in baseline_events(trace, settings, receivers).items()},
        "calibrated": calibration is not None,
        "sightings": run.rows,
        "bad_rows": run.errors.count,
        "replay_cpu_s": round(run.cpu_s, 3),
        "replay_wall_s": round(run.wall_s, 3),
        "sightings_per_cpu_s": round(run.rows / run.cpu_s) if run.cpu_s > 0 else None,
    }
    out.write(json.dumps(result) + "\n")
    return result


def main(trace: str, config: str, labels_path: str | None, out: IO[str] | None = None,
         err: IO[str] | None = None, *, calibration: str | None = None) -> int:
    """The subcommand: 0 on success (bad rows only reported), 2 on a config or file that cannot be used.

    ``calibration`` (``--calibration``) overrides the config's ``[presence] calibration``."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        settings = load_settings(config)
        labels = None
        if labels_path is not None:
            with open(labels_path, newline="", encoding="utf-8") as f:
                labels, lerr = read_labels(f, labels_path)
            if lerr.count:
                print(f"gateway replay: {lerr.count} bad label rows skipped\n{lerr.report()}", file=err)
        if not settings.receivers:
            raise ConfigError(f"{config}: no [[receivers]]: a trace's rows name configured receivers")
        path = calibration or settings.presence.calibration or None
        cal = calibration_file.load(path) if path else None
        run_replay(Path(trace), settings.presence, list(settings.receivers), labels, out, err, cal,
                   floor_adjacency(settings.zones))
    except (ConfigError, TraceError, OSError, UnicodeDecodeError) as exc:
        print(f"gateway replay: {exc}", file=err)
        return 2
    return 0
