"""`gateway calibrate TRACE [TRACE ...] --labels L [--labels L ...] --config C --out FILE`: learn a calibration
from labelled walks.

Several walks (one ``--labels`` per trace, in the same order) are joined one after the other: each trace's
times are moved to start ``GAP_S`` after the previous one ended, and with two or more traces each one's
beacons are named ``walk<k>/<beacon>``, so every walk is its own identity and tuning can leave one walk
out at a time (``gateway/presence/tuning.py``) even when the same tag walked them all.

Prints the report (per zone: its nearest other zone in signature space and how far apart they are),
and writes FILE for ``[presence] calibration`` or ``gateway replay --calibration``. Bad rows of either
file are skipped and reported with their line numbers; input that teaches nothing is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from beacons.types import Sighting
from gateway.app.config import load_settings
from gateway.errors import ConfigError
from gateway.presence.calibration import MIN_SECONDS, dumps, report
from gateway.presence.traces import Label, TraceError, open_trace, read_labels
from gateway.presence.tuning import learn_tuned

GAP_S = 600.0  # between two joined walks: longer than any silence the tracker keeps an identity through


def _joined(traces: Sequence[str], labels: Sequence[str], receivers: list[str],
            err: IO[str]) -> tuple[list[Sighting], list[Label], int, int, int]:
    """Every walk's sightings and labels on one time line, each walk after the previous one; with several
    walks, each one's beacons renamed apart. Returns them with the good rows, bad rows and bad label rows."""
    rows: list[Sighting] = []
    lbs: list[Label] = []
    good = bad = bad_labels = 0
    start: float | None = None  # where the next walk starts (the first one keeps its own times)
    several = len(traces) > 1
    for k, (trace, labels_path) in enumerate(zip(traces, labels, strict=True), 1):
        with open(labels_path, newline="", encoding="utf-8") as lf:
            own, lerr = read_labels(lf, labels_path)
        if lerr.count:
            print(f"gateway calibrate: {lerr.count} bad label rows skipped\n{lerr.report()}", file=err)
        if not own:
            raise ConfigError(f"{labels_path}: no usable labels")
        f, reader = open_trace(trace, receivers)
        with f:
            walk = list(reader)
        if reader.errors.count:
            print(f"gateway calibrate: {reader.errors.count} bad rows skipped\n{reader.errors.report()}", file=err)
        good, bad, bad_labels = good + reader.rows, bad + reader.errors.count, bad_labels + lerr.count
        times = [s.time for s in walk] + [lb.start for lb in own] + [lb.end for lb in own]
        first, last = min(times), max(times)  # labels are never empty here
        shift = start - first if start is not None else 0.0

        def name(key: str, k: int = k) -> str:
            return f"walk{k}/{key}" if several else key

        walk.sort(key=lambda s: s.time)
        rows += [s._replace(key=name(s.key), time=s.time + shift) for s in walk]
        lbs += [lb._replace(beacon=name(lb.beacon), start=lb.start + shift, end=lb.end + shift) for lb in own]
        start = last + shift + GAP_S
    return rows, lbs, good, bad, bad_labels


def main(trace: str | Sequence[str], *, labels: str | Sequence[str], config: str, out: str,
         stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    """0 when FILE was written; 2 on a config, trace or labels file that cannot be used."""
    so, se = stdout or sys.stdout, stderr or sys.stderr
    traces = [trace] if isinstance(trace, str) else list(trace)
    label_files = [labels] if isinstance(labels, str) else list(labels)
    try:
        if len(traces) != len(label_files):
            raise ConfigError(f"{len(traces)} traces and {len(label_files)} --labels files: give one labels file "
                              "per trace, in the same order")
        settings = load_settings(config)
        if not settings.receivers:
            raise ConfigError(f"{config}: no [[receivers]]: a trace's rows name configured receivers")
        receivers = list(settings.receivers)
        rows, lbs, good, bad, bad_labels = _joined(traces, label_files, [r.id for r in receivers], se)
        cal = learn_tuned(rows, lbs, receivers, settings.presence, settings.zones)
        if not cal.zones:
            raise ConfigError(f"{', '.join(traces)}: no zone has {MIN_SECONDS} labelled seconds with sightings "
                              f"({good} good rows): nothing to learn")
        cal = dataclasses.replace(cal, source=(f"from {', '.join(traces)} ({good} rows, {bad} bad) and "
                                               f"{', '.join(label_files)} ({len(lbs)} labels, {bad_labels} bad), "
                                               f"config {config}", *cal.source))
        Path(out).write_text(dumps(cal), encoding="utf-8")
    except (ConfigError, TraceError, OSError, UnicodeDecodeError) as exc:
        print(f"gateway calibrate: {exc}", file=se)
        return 2
    print(report(cal), file=so)
    print(f"wrote {out}", file=so)
    return 0
