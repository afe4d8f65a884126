"""Presence on real recordings: the public datasets of ../shared/datasets through `gateway replay`.

Per dataset (the flat: five robot runs; the hall: nine tracks), every recording is converted by
``benchmarks/datasets.py``, replayed through the tracker (as ``gateway replay`` does) and through each
baseline of gateway/presence/scoring.py, and scored against its labels; the recordings of a dataset
are pooled (each its own identity), so the figures weigh every scored second alike.

Calibration does not exist yet: the calibrated figures and the split they will use (``CALIBRATION``:
calibrate on those recordings, score on the others) are printed with null figures.

Usage: ``.venv/bin/python benchmarks/presence_real.py [--root ../shared/datasets] [--quick]``; the last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from datasets import DEFAULT_ROOT, build  # noqa: E402

from gateway.app.config import load_settings  # noqa: E402
from gateway.app.replay import baseline_events, replay_events  # noqa: E402
from gateway.presence.scoring import Event, score_labels  # noqa: E402
from gateway.presence.traces import Label, read_labels  # noqa: E402

KEYS = ("zone_accuracy", "zone_changes_per_hour", "enter_latency_p90_s")
# The split calibration will use: learn from these recordings, score on every other one.
CALIBRATION = {"flat": ("flat-calib1", "flat-calib2", "flat-calib3", "flat-calib4"),
               "hall": ("hall-straight-01", "hall-rectangular-with-rotation", "hall-zigzagging-with-rotation")}
QUICK = {"flat": ("flat-robot-test",), "hall": ("hall-straight-04",)}


def tagged(events: list[Event], name: str) -> list[Event]:
    return [(kind, f"{name}/{key}", zone, t) for kind, key, zone, t in events]


def score_dataset(dataset: str, files: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Pooled scores of every recording of one dataset, ours and each baseline's."""
    names = [n for n, f in files.items() if f["dataset"] == dataset]
    settings = load_settings(files[names[0]]["config"])
    receivers = list(settings.receivers)
    ours: list[Event] = []
    base: dict[str, list[Event]] = {}
    labels: list[Label] = []
    rows = bad = 0
    cpu = wall = 0.0
    for name in names:
        f = files[name]
        with open(f["labels"], newline="") as fh:
            own, _ = read_labels(fh, f["labels"])
        labels += [lb._replace(beacon=f"{name}/{lb.beacon}") for lb in own]
        run = replay_events(Path(f["trace"]), settings.presence, receivers)
        ours += tagged(run.events, name)
        rows, bad, cpu, wall = rows + run.rows, bad + run.errors.count, cpu + run.cpu_s, wall + run.wall_s
        for b, events in baseline_events(Path(f["trace"]), settings.presence, receivers).items():
            base.setdefault(b, []).extend(tagged(events, name))
    exit_after = settings.presence.exit_after_s
    scored = score_labels(ours, labels, exit_after)
    out: dict[str, Any] = {
        "recordings": names,
        "sightings": rows,
        "bad_rows": bad,
        "truth_zone_changes_per_hour": scored["truth_zone_changes_per_hour"],
        "ours": {"uncalibrated": {k: scored[k] for k in KEYS}, "calibrated": dict.fromkeys(KEYS)},
        "baselines": {},
        "calibration_split": {"calibrate_on": list(CALIBRATION[dataset]), "figures": None},
        "replay_cpu_s": round(cpu, 3),
        "replay_wall_s": round(wall, 3),
        "details": {"ours": scored},
    }
    for b, events in base.items():
        s = score_labels(events, labels, exit_after)
        out["baselines"][b] = {k: s[k] for k in KEYS}
        out["details"][b] = s
    out["baselines"]["naive_bayes_fingerprint"] = None  # needs the calibration split: not built yet
    print(f"[{dataset}] {len(names)} recordings, {rows} sightings ({bad} bad rows); truth "
          f"{out['truth_zone_changes_per_hour']} changes/h", file=sys.stderr)
    for name, s in [("ours (uncalibrated)", scored)] + [(b, out["details"][b]) for b in base]:
        print(f"[{dataset}] {name:28s} " + " ".join(f"{k}={s[k]}" for k in KEYS), file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the folder holding both datasets")
    ap.add_argument("--quick", action="store_true", help="one recording per dataset")
    args = ap.parse_args(argv)
    cpu, wall = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        files = build(args.root, Path(tmp))
        if args.quick:
            files = {n: f for n, f in files.items() if n in QUICK[f["dataset"]]}
        result: dict[str, Any] = {d: score_dataset(d, files) for d in ("flat", "hall")}
    result["calibration"] = "not implemented yet: calibrated figures are null"
    result["cpu_s"] = round(time.process_time() - cpu, 2)
    result["wall_s"] = round(time.perf_counter() - wall, 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
