"""The floor plan (``[[zones]]`` of gateway.toml): which zone a point is in, and which zones adjoin.

Adjacency is the tracker's transition prior: a shopper walks from a zone only into a zone whose
polygon touches it (or that the config lists as ``adjacent``: a door, an aisle the polygons do not
show). Everything here is a pure function of plain data, cheap enough to run once at start-up.
Polygons are ``[[x, y], ...]`` in metres, in order around the outline (either direction), not closed
(the last corner joins the first).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from gateway.errors import ConfigError
from gateway.presence.settings import FloorZone

Point = tuple[float, float]
Polygon = Sequence[Sequence[float]]

#: A point this close to an edge is on it (metres): floating point, not geometry.
EPS_M = 1e-9


def rectangle(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    """The polygon of an axis-aligned rectangle (a scenario's ``rect``), counter-clockwise."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _edges(polygon: Polygon) -> list[tuple[Point, Point]]:
    pts = [(float(p[0]), float(p[1])) for p in polygon]
    return list(zip(pts, pts[1:] + pts[:1], strict=True))


def _point_segment(p: Point, a: Point, b: Point) -> float:
    """Distance from ``p`` to the segment ``ab``."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    length2 = dx * dx + dy * dy
    u = 0.0 if length2 == 0 else max(0.0, min(1.0, ((p[0] - a[0]) * dx + (p[1] - a[1]) * dy) / length2))
    return math.hypot(p[0] - a[0] - u * dx, p[1] - a[1] - u * dy)


def _cross(o: Point, a: Point, b: Point) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _segments_cross(a: Point, b: Point, c: Point, d: Point) -> bool:
    """Whether ``ab`` and ``cd`` cross at a point inside both (touching ends are found by distance)."""
    d1, d2 = _cross(c, d, a), _cross(c, d, b)
    d3, d4 = _cross(a, b, c), _cross(a, b, d)
    return ((d1 > 0) != (d2 > 0)) and ((d3 > 0) != (d4 > 0)) and 0 not in (d1, d2, d3, d4)


def _segment_distance(a: Point, b: Point, c: Point, d: Point) -> float:
    if _segments_cross(a, b, c, d):
        return 0.0
    return min(_point_segment(a, c, d), _point_segment(b, c, d), _point_segment(c, a, b), _point_segment(d, a, b))


def contains(polygon: Polygon, point: Point) -> bool:
    """Whether ``point`` is inside ``polygon`` or on its outline (ray casting, edges included)."""
    x, y = point
    edges = _edges(polygon)
    if any(_point_segment((x, y), a, b) <= EPS_M for a, b in edges):
        return True
    hit = False
    for (x0, y0), (x1, y1) in edges:
        if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            hit = not hit
    return hit


def area(polygon: Polygon) -> float:
    """The polygon's area in square metres (shoelace; either winding)."""
    return abs(sum(a[0] * b[1] - b[0] * a[1] for a, b in _edges(polygon))) / 2.0


def centroid(polygon: Polygon) -> Point:
    """The polygon's centre of area; for a degenerate (zero-area) outline, the mean of its corners."""
    edges = _edges(polygon)
    twice = sum(a[0] * b[1] - b[0] * a[1] for a, b in edges)
    if abs(twice) <= EPS_M:
        n = len(edges)
        return (sum(a[0] for a, _ in edges) / n, sum(a[1] for a, _ in edges) / n)
    cx = sum((a[0] + b[0]) * (a[0] * b[1] - b[0] * a[1]) for a, b in edges)
    cy = sum((a[1] + b[1]) * (a[0] * b[1] - b[0] * a[1]) for a, b in edges)
    return (cx / (3.0 * twice), cy / (3.0 * twice))


def distance(p: Polygon, q: Polygon) -> float:
    """The shortest distance between two polygons' areas: 0 when they overlap or touch."""
    ep, eq = _edges(p), _edges(q)
    if contains(q, ep[0][0]) or contains(p, eq[0][0]):  # one inside the other, or overlapping
        return 0.0
    return min(_segment_distance(a, b, c, d) for (a, b), (c, d) in itertools.product(ep, eq))


def adjacency(zones: Sequence[FloorZone], *, touch_m: float = 0.5) -> dict[str, frozenset[str]] | None:
    """Zone -> the zones one may walk to directly: polygons closer than ``touch_m`` (a shared wall, an
    overlap, corners that nearly meet), or listed in either zone's ``adjacent`` (the relation is
    symmetric). A zone without a polygon adjoins only by ``adjacent``. No zones at all: None, meaning
    the floor plan says nothing and any move is allowed."""
    if not zones:
        return None
    if not touch_m >= 0:
        raise ConfigError(f"zones: touch_m must not be negative, got {touch_m!r}")
    names = [z.name for z in zones]
    out: dict[str, set[str]] = {name: set() for name in names}
    for z in zones:
        for other in z.adjacent:
            if other not in out:
                raise ConfigError(f"zones: {z.name!r} adjacent names unknown zone {other!r} "
                                  f"(known: {', '.join(sorted(out))})")
            if other != z.name:
                out[z.name].add(other)
                out[other].add(z.name)
    drawn = [z for z in zones if len(z.polygon) >= 3]
    for a, b in itertools.combinations(drawn, 2):
        if a.name != b.name and distance(a.polygon, b.polygon) <= touch_m:
            out[a.name].add(b.name)
            out[b.name].add(a.name)
    return {name: frozenset(near) for name, near in out.items()}


def zone_at(zones: Sequence[FloorZone], point: Point) -> str | None:
    """The first zone (in config order) whose polygon holds ``point``; None in the aisles between."""
    for z in zones:
        if len(z.polygon) >= 3 and contains(z.polygon, point):
            return z.name
    return None



Problem = tuple[tuple[str | int, ...], str, object]


def _corner_ok(corner: object) -> bool:
    return (isinstance(corner, Sequence) and len(corner) == 2
            and all(isinstance(v, int | float) and math.isfinite(v) for v in corner))


def problems(zones: Sequence[FloorZone], band_zones: Sequence[Sequence[str]] = ()) -> list[Problem]:
    """What is wrong with a floor plan, as (place, message, value): places like ``("zones", 1, "adjacent")``
    so the config loader can name the line. ``band_zones`` holds, per ``[[receivers]]`` entry, the zones of
    its bands: with a floor plan, each must be one of its zones. Empty: nothing wrong."""
    out: list[Problem] = []
    first: dict[str, int] = {}
    for i, z in enumerate(zones):
        if not z.name:
            out.append((("zones", i, "name"), "a zone needs a name", z.name))
        elif z.name in first:
            out.append((("zones", i, "name"), f"zone defined twice (first as zones[{first[z.name]}])", z.name))
        else:
            first[z.name] = i
        if not z.polygon:
            continue  # no polygon: the zone adjoins others only by `adjacent`
        if len(z.polygon) < 3:
            out.append((("zones", i, "polygon"), "a polygon needs at least 3 corners [x, y]", z.polygon))
        elif not all(_corner_ok(c) for c in z.polygon):
            out.append((("zones", i, "polygon"), "every corner must be [x, y] in metres, finite", z.polygon))
        elif area(z.polygon) <= EPS_M:
            out.append((("zones", i, "polygon"), "the polygon encloses no area", z.polygon))
    for i, z in enumerate(zones):
        for j, other in enumerate(z.adjacent):
            if other == z.name:
                out.append((("zones", i, "adjacent", j), "a zone is not adjacent to itself", other))
            elif other not in first:
                out.append((("zones", i, "adjacent", j),
                            f"unknown zone (known: {', '.join(sorted(first)) or 'none'})", other))
    if zones:
        for i, names in enumerate(band_zones):
            for j, name in enumerate(names):
                if name not in first:
                    out.append((("receivers", i, "zones", j, "name"),
                                f"not a zone of the floor plan (known: {', '.join(sorted(first))})", name))
    return out
