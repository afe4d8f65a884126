"""The public BLE recordings of ../shared/datasets as replayable traces, labels and configs.

Per recording, three files in ``--out`` (default ``data/datasets``):

- ``<name>.trace.csv``: ``time,receiver,beacon,rssi`` (seconds from the recording's start);
- ``<name>.labels.csv``: ``beacon,start,end,zone``: the zone the ground-truth position falls in,
  changing half way between two positions in different zones;
- ``<dataset>.toml``: the dataset's ``[[receivers]]`` as a site survey would set them without
  calibration: a receiver inside a zone gets one band for it reaching the zone's farthest corner,
  no ``measured_power`` (the documented default applies), path loss exponent 2, and its ``position``
  from the dataset's metadata; the zones' polygons as ``[[zones]]`` (the floor plan).

Zones are polygons drawn over the floor plans (``FLAT_ZONES``, ``HALL_ZONES``; docs/presence.md,
"Real recordings", has the pictures this script also writes with ``--svg``):

- **kolakowski-flat** (CC BY 4.0; Kolakowski, Sensors 21:6270, 2021): the rooms of the flat, drawn
  from the outline in ``layout.csv`` and its wall stubs. Rows are the dataset's preprocessed ``*_df.csv``
  (about 3 Hz, RSSI averaged per anchor, rounded here to integer dBm); the LiDAR position of each row
  labels it. ``calibration_df.csv`` holds four robot sessions (split at gaps over ``SESSION_GAP_S``);
  ``tests/test_robot_df.csv`` is a fifth, separate run. The walking test has no per-row position and
  is left out.
- **position-annotated** (CC0 1.0; Danis et al., IEEE Access 9:37022, 2021): the 20.7 x 17.6 m hall
  in four areas around its four clusters of three receivers; every row of ``trk/*_all_sensors.mbd`` is
  one advert heard by one receiver, with the camera-tracked position.

Usage: ``.venv/bin/python benchmarks/datasets.py [--root ../shared/datasets] [--out DIR] [--svg DIR]``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from beacons.types import Sighting  # noqa: E402
from gateway.presence.traces import Label, TraceWriter, write_labels  # noqa: E402

DEFAULT_ROOT = ROOT.parent / "shared" / "datasets"
SESSION_GAP_S = 60.0  # the flat's calibration file joins four sessions with gaps of 20 min and more
BEACON = "tag"  # each dataset has one tag: its key in the traces

Polygon = tuple[tuple[float, float], ...]

# The flat (metres, the frame of anchors.csv): the outline of layout.csv split at its wall stubs:
# x = 3.96 (a wall with a door from y 0.6 to 1.42), y = 2.12 (the wall along the south rooms),
# x = 2.64 (the west room's wall) and x = 6.32 (the stub at y 4.19-4.82 before the east room).
FLAT_ZONES: dict[str, Polygon] = {
    "south": ((0.0, 0.0), (3.96, 0.0), (3.96, 2.12), (0.0, 2.12)),
    "south-east": ((3.96, 0.0), (6.22, 0.0), (6.22, 2.12), (3.96, 2.12)),
    "west": ((0.0, 2.12), (2.64, 2.12), (2.64, 7.1), (0.0, 7.1)),
    "centre": ((2.64, 2.12), (6.32, 2.12), (6.32, 7.1), (2.64, 7.1)),
    "east": ((6.32, 4.19), (9.07, 4.19), (9.07, 7.1), (6.32, 7.1)),
}
# The hall (metres, the frame of cnf/tetam.dev): four areas split at the middle of the limits of
# cnf/tetam.par; each holds one cluster of three receivers (sensor1x .. sensor4x).
HALL_W, HALL_H = 20.66, 17.64
HALL_ZONES: dict[str, Polygon] = {
    "area-1": ((0.0, 0.0), (HALL_W / 2, 0.0), (HALL_W / 2, HALL_H / 2), (0.0, HALL_H / 2)),
    "area-2": ((0.0, HALL_H / 2), (HALL_W / 2, HALL_H / 2), (HALL_W / 2, HALL_H), (0.0, HALL_H)),
    "area-3": ((HALL_W / 2, HALL_H / 2), (HALL_W, HALL_H / 2), (HALL_W, HALL_H), (HALL_W / 2, HALL_H)),
    "area-4": ((HALL_W / 2, 0.0), (HALL_W, 0.0), (HALL_W, HALL_H / 2), (HALL_W / 2, HALL_H / 2)),
}


@dataclass
class Recording:
    name: str  # e.g. "flat-calib1"
    dataset: str  # the config it replays with
    sightings: list[Sighting]
    positions: list[tuple[float, float, float]]  # (time, x, y), in time order


def inside(p: tuple[float, float], poly: Polygon) -> bool:
    """Ray casting; a point on a shared edge belongs to one polygon (half-open on the right and top)."""
    x, y = p
    hit = False
    n = len(poly)
    for i in range(n):
        (x0, y0), (x1, y1) = poly[i], poly[(i + 1) % n]
        if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            hit = not hit
    return hit


def zone_of(p: tuple[float, float], zones: dict[str, Polygon]) -> str | None:
    return next((name for name, poly in zones.items() if inside(p, poly)), None)


def labels_of(positions: Sequence[tuple[float, float, float]], zones: dict[str, Polygon],
              beacon: str = BEACON) -> list[Label]:
    """Intervals of one zone; a change falls half way between the two positions either side of it."""
    out: list[Label] = []
    if not positions:
        return out
    start, cur = positions[0][0], zone_of(positions[0][1:], zones)
    for (t0, *_), (t1, x, y) in itertools.pairwise(positions):
        z = zone_of((x, y), zones)
        if z != cur:
            mid = round((t0 + t1) / 2, 3)
            if mid > start:
                out.append(Label(beacon, start, mid, cur))
            start, cur = mid, z
    end = positions[-1][0] + 1.0
    out.append(Label(beacon, start, end, cur))
    return out


# ---------------------------------------------------------------------------------------- the flat


def flat_anchors(root: Path) -> dict[str, tuple[float, float]]:
    with open(root / "kolakowski-flat" / "anchors.csv", newline="") as f:
        return {f"anchor{r['id']}": (float(r["x"]), float(r["y"])) for r in csv.DictReader(f)}


def flat_rows(path: Path) -> Iterator[tuple[float, float, float, dict[str, int]]]:
    """(unix s, x, y, {anchor: rounded RSSI}) per row; NaN (not heard) is left out."""
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            heard = {}
            for k in range(1, 7):
                v = float(r[f"rssi_{k}"] or "nan")
                if math.isfinite(v):
                    heard[f"anchor{k}"] = round(v)
            yield float(r["ts"]) / 1e9, float(r["x"]), float(r["y"]), heard


def flat_recordings(root: Path) -> list[Recording]:
    base = root / "kolakowski-flat"
    sessions: list[list[tuple[float, float, float, dict[str, int]]]] = [[]]
    for row in flat_rows(base / "calibration" / "calibration_df.csv"):
        if sessions[-1] and row[0] - sessions[-1][-1][0] > SESSION_GAP_S:
            sessions.append([])
        sessions[-1].append(row)
    named = [(f"flat-calib{i + 1}", s) for i, s in enumerate(sessions)]
    named.append(("flat-robot-test", list(flat_rows(base / "tests" / "test_robot_df.csv"))))
    out = []
    for name, rows in named:
        t0 = rows[0][0]
        sightings = [Sighting(BEACON, rx, rssi, round(t - t0, 3)) for t, _, _, heard in rows
                     for rx, rssi in sorted(heard.items())]
        out.append(Recording(name, "flat", sightings, [(round(t - t0, 3), x, y) for t, x, y, _ in rows]))
    return out


# ---------------------------------------------------------------------------------------- the hall


def hall_sensors(root: Path) -> dict[str, tuple[str, tuple[float, float]]]:
    """MAC -> (alias, (x, y)) from cnf/tetam.dev's ``Dongles:`` line."""
    for line in (root / "position-annotated" / "cnf" / "tetam.dev").read_text().splitlines():
        if line.startswith("Dongles:"):
            return {mac: (v[2], (float(v[0][0]), float(v[0][1])))
                    for mac, v in json.loads(line.split(":", 1)[1]).items()}
    raise ValueError("cnf/tetam.dev: no Dongles: line")


def hall_recording(path: Path, sensors: dict[str, tuple[str, tuple[float, float]]]) -> Recording:
    rows = []
    with open(path, newline="") as f:
        for r in csv.reader(f):
            rows.append((float(r[0]), sensors[r[1]][0], round(float(r[3])), float(r[4]), float(r[5])))
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0]
    name = "hall-" + path.name.removesuffix("_all_sensors.mbd").replace("_", "-")
    return Recording(name, "hall", [Sighting(BEACON, rx, rssi, round(t - t0, 3)) for t, rx, rssi, _, _ in rows],
                     [(round(t - t0, 3), x, y) for t, _, _, x, y in rows])


def hall_recordings(root: Path) -> list[Recording]:
    sensors = hall_sensors(root)
    return [hall_recording(p, sensors) for p in sorted((root / "position-annotated" / "trk").glob("*_all_sensors.mbd"))]


# ---------------------------------------------------------------------------------------- configs


def config_toml(receivers: dict[str, tuple[float, float]], zones: dict[str, Polygon], source: str) -> str:
    """``[[receivers]]``: a band for the zone each receiver stands in, out to that zone's farthest corner, and
    the receiver's position from the dataset's metadata; ``[[zones]]``: the floor plan's polygons (the
    tracker's adjacency: zones whose polygons touch)."""
    lines = [f"# Receivers of {source} (benchmarks/datasets.py). Uncalibrated: no measured_power, so",
             "# the default at 1 m applies (docs/presence.md); one band per receiver, for the zone it stands in.", ""]
    for rid, pos in receivers.items():
        zone = zone_of(pos, zones)
        lines += ["[[receivers]]", f'id = "{rid}"', f"position = [{float(pos[0])}, {float(pos[1])}]  # metres"]
        if zone is None:
            lines += ["zones = []", ""]
            continue
        far = max(math.hypot(x - pos[0], y - pos[1]) for x, y in zones[zone])
        lines += [f'zones = [{{ name = "{zone}", max_m = {round(far, 1)} }}]', "path_loss_exponent = 2.0", ""]
    lines += ["# The floor plan: zones drawn by us over the dataset's plan (docs/presence.md, \"The recordings\").", ""]
    for name, poly in zones.items():
        corners = ", ".join(f"[{round(x, 3)}, {round(y, 3)}]" for x, y in poly)
        lines += ["[[zones]]", f'name = "{name}"', f"polygon = [{corners}]", ""]
    return "\n".join(lines)


def receivers_of(dataset: str, root: Path) -> tuple[dict[str, tuple[float, float]], dict[str, Polygon]]:
    if dataset == "flat":
        return flat_anchors(root), FLAT_ZONES
    return {alias: pos for alias, pos in hall_sensors(root).values()}, HALL_ZONES


def write_recording(rec: Recording, zones: dict[str, Polygon], out: Path) -> tuple[Path, Path]:
    trace, labels = out / f"{rec.name}.trace.csv", out / f"{rec.name}.labels.csv"
    with open(trace, "w", newline="") as f:
        TraceWriter(f).write_many(rec.sightings)
    with open(labels, "w", newline="") as f:
        write_labels(f, labels_of(rec.positions, zones))
    return trace, labels


def recordings(root: Path) -> list[Recording]:
    return flat_recordings(root) + hall_recordings(root)


def build(root: Path, out: Path) -> dict[str, dict[str, str]]:
    """Every recording's files and each dataset's config; returns name -> {trace, labels, config}."""
    out.mkdir(parents=True, exist_ok=True)
    configs = {}
    for dataset, source in (("flat", "kolakowski-flat"), ("hall", "position-annotated")):
        receivers, zones = receivers_of(dataset, root)
        configs[dataset] = out / f"{dataset}.toml"
        configs[dataset].write_text(config_toml(receivers, zones, source))
    done = {}
    for rec in recordings(root):
        trace, labels = write_recording(rec, FLAT_ZONES if rec.dataset == "flat" else HALL_ZONES, out)
        done[rec.name] = {"dataset": rec.dataset, "trace": str(trace), "labels": str(labels),
                          "config": str(configs[rec.dataset]), "sightings": str(len(rec.sightings))}
    return done


# ---------------------------------------------------------------------------------------- pictures


def svg(zones: dict[str, Polygon], receivers: dict[str, tuple[float, float]], path: Iterable[tuple[float, float]],
        scale: float = 40.0) -> str:
    """The zones, the receivers and one recording's ground-truth path (y up, as in the datasets' frames)."""
    w = max(x for p in zones.values() for x, _ in p)
    h = max(y for p in zones.values() for _, y in p)

    def pt(x: float, y: float) -> str:
        return f"{(x + 0.5) * scale:.1f},{(h - y + 0.5) * scale:.1f}"

    colours = ("#fde2e2", "#e2f0fd", "#e5fde2", "#fdf7e2", "#efe2fd")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{(w + 1) * scale:.0f}" height="{(h + 1) * scale:.0f}" '
             'font-family="sans-serif" font-size="12">']
    for (name, poly), colour in zip(zones.items(), colours * 2, strict=False):
        parts.append(f'<polygon points="{" ".join(pt(x, y) for x, y in poly)}" fill="{colour}" stroke="#555"/>')
        cx, cy = sum(x for x, _ in poly) / len(poly), sum(y for _, y in poly) / len(poly)
        parts.append(f'<text x="{pt(cx, cy).split(",")[0]}" y="{pt(cx, cy).split(",")[1]}" '
                     f'text-anchor="middle">{name}</text>')
    line = " ".join(pt(x, y) for x, y in path)
    parts.append(f'<polyline points="{line}" fill="none" stroke="#1565c0" stroke-width="1" opacity="0.6"/>')
    for rid, (x, y) in receivers.items():
        px, py = pt(x, y).split(",")
        parts.append(f'<circle cx="{px}" cy="{py}" r="5" fill="#c62828"/>'
                     f'<text x="{float(px) + 7:.1f}" y="{float(py) - 5:.1f}" fill="#c62828">{rid}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, dict[str, str]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the folder holding both datasets")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "datasets")
    ap.add_argument("--svg", type=Path, default=None, help="also draw each floor plan with a path into this folder")
    args = ap.parse_args(argv)
    done = build(args.root, args.out)
    if args.svg is not None:
        args.svg.mkdir(parents=True, exist_ok=True)
        recs = {r.name: r for r in recordings(args.root)}
        pictures = (("flat", FLAT_ZONES, "flat-robot-test"), ("hall", HALL_ZONES, "hall-straight-05"))
        for dataset, zones, shown in pictures:
            receivers, _ = receivers_of(dataset, args.root)
            path = [(x, y) for _, x, y in recs[shown].positions]
            (args.svg / f"presence-{dataset}.svg").write_text(svg(zones, receivers, path))
    print(json.dumps(done))
    return done


if __name__ == "__main__":
    main()
