"""Presence on real recordings: the public datasets of ../shared/datasets through `gateway replay`.

Per dataset (the flat: five robot runs; the hall: nine tracks), every recording is converted by
``benchmarks/datasets.py``, replayed through the tracker (as ``gateway replay`` does) and through each
baseline of gateway/presence/scoring.py, and scored against its labels; the recordings of a dataset
are pooled (each its own identity), so the figures weigh every scored second alike.

``held_out`` scores every tracker on the recordings outside ``CALIBRATION`` only, beside the naive-Bayes
fingerprint baseline trained on those inside it; the calibrated tracker (``gateway/presence/calibration.py``)
learns from the same split and is scored on the held-out recordings only (never on what it learned from).

Usage: ``.venv/bin/python benchmarks/presence_real.py [--root ../shared/datasets] [--quick]``; the last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from datasets import DEFAULT_ROOT, FLAT_ZONES, HALL_ZONES, build, receivers_of  # noqa: E402

from gateway.app.config import load_settings  # noqa: E402
from gateway.app.replay import baseline_events, replay_events  # noqa: E402
from gateway.presence.calibration import Calibration, report  # noqa: E402
from gateway.presence.floor import adjacency  # noqa: E402
from gateway.presence.scoring import Event, NaiveBayesFingerprint, replay, score_labels, steps  # noqa: E402
from gateway.presence.settings import FloorZone, ReceiverSettings  # noqa: E402
from gateway.presence.traces import Label, open_trace, read_labels  # noqa: E402
from gateway.presence.tuning import learn_tuned  # noqa: E402

KEYS = ("zone_accuracy", "zone_changes_per_hour", "enter_latency_p90_s")
# The split calibration will use: learn from these recordings, score on every other one.
CALIBRATION = {"flat": ("flat-calib1", "flat-calib2", "flat-calib3", "flat-calib4"),
               "hall": ("hall-straight-01", "hall-rectangular-with-rotation", "hall-zigzagging-with-rotation")}
QUICK = {"flat": ("flat-calib1", "flat-robot-test"), "hall": ("hall-straight-01", "hall-straight-04")}


def tagged(events: list[Event], name: str) -> list[Event]:
    return [(kind, f"{name}/{key}", zone, t) for kind, key, zone, t in events]


def pooled(runs: dict[str, list[Event]], labels: dict[str, list[Label]], names: list[str],
           exit_after_s: float) -> dict[str, Any]:
    """One score over several recordings, each its own identity, so every scored second weighs alike."""
    events = [e for n in names for e in tagged(runs[n], n)]
    return score_labels(events, [lb._replace(beacon=f"{n}/{lb.beacon}") for n in names for lb in labels[n]],
                        exit_after_s)


def fingerprint_events(files: dict[str, dict[str, str]], train: list[str], test: list[str],
                       labels: dict[str, list[Label]], receivers: list[str],
                       exit_after_s: float) -> dict[str, list[Event]]:
    """The naive-Bayes fingerprint baseline, trained on ``train``, replayed over each of ``test``."""
    fp = NaiveBayesFingerprint(receivers, exit_after_s)
    for name in train:
        f, reader = open_trace(files[name]["trace"], receivers)
        with f:
            fp.fit(reader, labels[name])
    out = {}
    for name in test:
        f, reader = open_trace(files[name]["trace"], receivers)
        with f:
            out[name], _ = replay(fp, steps(reader))
        fp.zone.clear()
        fp.last.clear()
        fp.samples.clear()
    return out


def floor_of(dataset: str, root: Path, receivers: list[ReceiverSettings]) -> tuple[list[ReceiverSettings],
                                                                                   list[FloorZone]]:
    """The receivers with their positions and the zones' polygons, from the dataset's metadata."""
    positions, _ = receivers_of(dataset, root)
    zones = FLAT_ZONES if dataset == "flat" else HALL_ZONES
    placed = [r if r.position is not None or r.id not in positions
              else dataclasses.replace(r, position=[float(v) for v in positions[r.id]]) for r in receivers]
    return placed, [FloorZone(name, [[x, y] for x, y in poly]) for name, poly in zones.items()]


def calibrate(files: dict[str, dict[str, str]], train: list[str], labels: dict[str, list[Label]],
              receivers: list[ReceiverSettings], settings: Any, zones: list[FloorZone]) -> Calibration:
    """One calibration from every training recording (each its own identity), as `gateway calibrate` learns."""
    def sightings() -> Any:
        for name in train:
            f, reader = open_trace(files[name]["trace"], [r.id for r in receivers])
            with f:
                for s in reader:
                    yield s._replace(key=f"{name}/{s.key}")

    lbs = [lb._replace(beacon=f"{n}/{lb.beacon}") for n in train for lb in labels[n]]
    return learn_tuned(sightings(), lbs, receivers, settings, zones)


def score_dataset(dataset: str, files: dict[str, dict[str, str]], root: Path = DEFAULT_ROOT) -> dict[str, Any]:
    """Scores of ours and each baseline over every recording of one dataset, and on the held-out ones."""
    names = [n for n, f in files.items() if f["dataset"] == dataset]
    settings = load_settings(files[names[0]]["config"])
    receivers = list(settings.receivers)
    exit_after = settings.presence.exit_after_s
    runs: dict[str, dict[str, list[Event]]] = {"ours": {}}
    labels: dict[str, list[Label]] = {}
    rows = bad = 0
    cpu = wall = 0.0
    for name in names:
        f = files[name]
        with open(f["labels"], newline="") as fh:
            labels[name], _ = read_labels(fh, f["labels"])
        run = replay_events(Path(f["trace"]), settings.presence, receivers,
                            adjacency=adjacency(settings.zones))  # as `gateway replay` does
        runs["ours"][name] = run.events
        rows, bad, cpu, wall = rows + run.rows, bad + run.errors.count, cpu + run.cpu_s, wall + run.wall_s
        for b, events in baseline_events(Path(f["trace"]), settings.presence, receivers).items():
            runs.setdefault(b, {})[name] = events
    train = [n for n in names if n in CALIBRATION[dataset]]
    test = [n for n in names if n not in CALIBRATION[dataset]]
    scored = {who: pooled(r, labels, names, exit_after) for who, r in runs.items()}
    held = {who: pooled(r, labels, test, exit_after) for who, r in runs.items()} if train and test else {}
    calibrated: dict[str, Any] = dict.fromkeys(KEYS)
    cal_report = None
    chosen: dict[str, Any] = {}
    if held:
        fp = fingerprint_events(files, train, test, labels, [r.id for r in receivers], exit_after)
        held["naive_bayes_fingerprint"] = pooled(fp, labels, test, exit_after)
        placed, zones = floor_of(dataset, root, receivers)
        cal = calibrate(files, train, labels, placed, settings.presence, zones)
        cal_report = report(cal)
        chosen = {"tuned": dict(cal.tuned), "band_weight": cal.band_weight,
                  "windowed_weight": cal.windowed_weight, "sd_floor_db": cal.sd_floor_db}
        print(f"[{dataset}] chosen on the calibration split: {chosen}", file=sys.stderr)
        cal_runs = {n: replay_events(Path(files[n]["trace"]), settings.presence, placed, calibration=cal,
                                     adjacency=adjacency(settings.zones or zones)).events for n in test}
        held["ours_calibrated"] = pooled(cal_runs, labels, test, exit_after)
        calibrated = {k: held["ours_calibrated"][k] for k in KEYS}
        print(f"[{dataset}] calibration:\n{cal_report}", file=sys.stderr)
    ours = scored.pop("ours")
    out: dict[str, Any] = {
        "recordings": names,
        "sightings": rows,
        "bad_rows": bad,
        "truth_zone_changes_per_hour": ours["truth_zone_changes_per_hour"],
        "ours": {"uncalibrated": {k: ours[k] for k in KEYS}, "calibrated": calibrated},
        "baselines": {b: {k: s[k] for k in KEYS} for b, s in scored.items()},
        "held_out": {"calibrate_on": train, "score_on": test, "chosen": chosen,
                     "truth_zone_changes_per_hour": held["ours"]["truth_zone_changes_per_hour"] if held else None,
                     **{who: {k: s[k] for k in KEYS} for who, s in held.items()}},
        "replay_cpu_s": round(cpu, 3),
        "replay_wall_s": round(wall, 3),
        "details": {"ours": ours, **scored},
    }
    print(f"[{dataset}] {len(names)} recordings, {rows} sightings ({bad} bad rows); truth "
          f"{out['truth_zone_changes_per_hour']} changes/h", file=sys.stderr)
    for who, s in [("ours (uncalibrated)", ours), *scored.items()]:
        print(f"[{dataset}] {who:28s} " + " ".join(f"{k}={s[k]}" for k in KEYS), file=sys.stderr)
    for who, s in held.items():
        print(f"[{dataset}] held out: {who:18s} " + " ".join(f"{k}={s[k]}" for k in KEYS), file=sys.stderr)
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
        result: dict[str, Any] = {d: score_dataset(d, files, args.root) for d in ("flat", "hall")}
    result["calibration"] = "ours.calibrated: learned on held_out.calibrate_on, scored on held_out.score_on"
    result["cpu_s"] = round(time.process_time() - cpu, 2)
    result["wall_s"] = round(time.perf_counter() - wall, 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
