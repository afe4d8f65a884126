"""`gateway calibrate TRACE --labels L --config C --out FILE`: learn a calibration from a labelled walk.

Prints the report (per zone: its nearest other zone in signature space and how far apart they are),
and writes FILE for ``[presence] calibration`` or ``gateway replay --calibration``. Bad rows of either
file are skipped and reported with their line numbers; input that teaches nothing is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import IO

from gateway.app.config import load_settings
from gateway.errors import ConfigError
from gateway.presence.calibration import MIN_SECONDS, dumps, report
from gateway.presence.traces import TraceError, open_trace, read_labels
from gateway.presence.tuning import learn_tuned


def main(trace: str, *, labels: str, config: str, out: str, stdout: IO[str] | None = None,
         stderr: IO[str] | None = None) -> int:
    """0 when FILE was written; 2 on a config, trace or labels file that cannot be used."""
    so, se = stdout or sys.stdout, stderr or sys.stderr
    try:
        settings = load_settings(config)
        if not settings.receivers:
            raise ConfigError(f"{config}: no [[receivers]]: a trace's rows name configured receivers")
        with open(labels, newline="", encoding="utf-8") as lf:
            lbs, lerr = read_labels(lf, labels)
        if lerr.count:
            print(f"gateway calibrate: {lerr.count} bad label rows skipped\n{lerr.report()}", file=se)
        if not lbs:
            raise ConfigError(f"{labels}: no usable labels")
        receivers = list(settings.receivers)
        f, reader = open_trace(trace, [r.id for r in receivers])
        with f:
            cal = learn_tuned(reader, lbs, receivers, settings.presence, settings.zones)
        if reader.errors.count:
            print(f"gateway calibrate: {reader.errors.count} bad rows skipped\n{reader.errors.report()}", file=se)
        if not cal.zones:
            raise ConfigError(f"{trace}: no zone has {MIN_SECONDS} labelled seconds with sightings "
                              f"({reader.rows} good rows): nothing to learn")
        cal = dataclasses.replace(cal, source=(f"from {trace} ({reader.rows} rows, {reader.errors.count} bad) "
                                               f"and {labels} ({len(lbs)} labels, {lerr.count} bad), config {config}",
                                               *cal.source))
        Path(out).write_text(dumps(cal), encoding="utf-8")
    except (ConfigError, TraceError, OSError, UnicodeDecodeError) as exc:
        print(f"gateway calibrate: {exc}", file=se)
        return 2
    print(report(cal), file=so)
    print(f"wrote {out}", file=so)
    return 0
