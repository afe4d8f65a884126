"""The floor plan as the page draws it: the config's ``[[zones]]`` polygons and receivers' positions
mapped into one SVG box (y flipped: the config's y grows away from the door, the screen's grows down)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import ConfigError
from gateway.presence.floor import centroid
from gateway.presence.settings import FloorZone, ReceiverSettings

PAD_M = 0.6  # room around the outline for the receivers' markers and labels
MAX_IMAGE_BYTES = 5 << 20  # a floor plan's picture; a Pi serves it to every tablet that opens the page
# Raster pictures only: an SVG opened at its own address could run script under the dashboard's origin.
IMAGE_TYPES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


@dataclass(frozen=True)
class FloorImage:
    """The picture under the plan (``[dashboard] floor_image``) and the rectangle of the floor it shows, in
    the config's metres: ``(x0, y0, x1, y1)``, its lower-left and upper-right corners."""

    body: bytes
    media_type: str
    bounds: tuple[float, float, float, float]

    @property
    def etag(self) -> str:
        return hashlib.sha256(self.body).hexdigest()[:16]


def load_floor_image(path: str, bounds: Sequence[float], zones: Sequence[FloorZone]) -> FloorImage:
    """Read and check the picture once, at start: a wrong file is a ConfigError before anything runs.
    Without ``bounds``, the picture spans the zones' outline."""
    where = f"dashboard.floor_image ({path})"
    try:
        body = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{where}: cannot be read: {e.strerror or e}") from e
    if len(body) > MAX_IMAGE_BYTES:
        raise ConfigError(f"{where}: {len(body)} bytes, more than {MAX_IMAGE_BYTES}; make it smaller")
    media = next((m for magic, m in IMAGE_TYPES if body.startswith(magic)), None)
    if media is None:
        raise ConfigError(f"{where}: not a PNG or JPEG picture")
    if bounds:
        if len(bounds) != 4 or not (bounds[2] > bounds[0] and bounds[3] > bounds[1]):
            raise ConfigError(f"dashboard.floor_image_bounds: expected [x0, y0, x1, y1] with x1 > x0 and y1 > y0 "
                              f"(metres), got {list(bounds)!r}")
        box = (float(bounds[0]), float(bounds[1]), float(bounds[2]), float(bounds[3]))
    else:
        corners = [(float(p[0]), float(p[1])) for z in zones for p in z.polygon]
        if not corners:
            raise ConfigError("dashboard.floor_image_bounds: needed when the config has no [[zones]] polygons "
                              "to place the picture on")
        box = (min(x for x, _ in corners), min(y for _, y in corners),
               max(x for x, _ in corners), max(y for _, y in corners))
    return FloorImage(body, media, box)


@dataclass(frozen=True)
class ImageRect:
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class ZoneShape:
    name: str
    points: str  # the SVG polygon's ``points``
    label_x: float
    label_y: float


@dataclass(frozen=True)
class ReceiverMark:
    id: str
    x: float
    y: float


@dataclass(frozen=True)
class Plan:
    view_box: str
    zones: list[ZoneShape]
    receivers: list[ReceiverMark]
    unplaced: list[str]
    """Receivers without a position: listed in the table, not drawn."""
    image: ImageRect | None = None
    """Where the floor's picture goes, under the zones (``[dashboard] floor_image``)."""

    @property
    def empty(self) -> bool:
        return not self.zones and not self.receivers


def plan(zones: Sequence[FloorZone], receivers: Sequence[ReceiverSettings],
         image: tuple[float, float, float, float] | None = None) -> Plan:
    """``image``: the rectangle (x0, y0, x1, y1) the floor's picture covers, in metres; the plan's box
    includes it."""
    points = [(float(p[0]), float(p[1])) for z in zones for p in z.polygon]
    placed = [r for r in receivers if r.position is not None and len(r.position) >= 2]
    points += [(float(r.position[0]), float(r.position[1])) for r in placed if r.position is not None]
    if image is not None:
        points += [(image[0], image[1]), (image[2], image[3])]
    if not points:
        return Plan("0 0 10 6", [], [], [r.id for r in receivers])
    x0, x1 = min(p[0] for p in points) - PAD_M, max(p[0] for p in points) + PAD_M
    y0, y1 = min(p[1] for p in points) - PAD_M, max(p[1] for p in points) + PAD_M

    def flip(x: float, y: float) -> tuple[float, float]:
        return round(x - x0, 3), round(y1 - y, 3)

    shapes = []
    for z in zones:
        pts = [flip(float(p[0]), float(p[1])) for p in z.polygon]
        cx, cy = flip(*centroid(z.polygon))
        shapes.append(ZoneShape(z.name, " ".join(f"{x:g},{y:g}" for x, y in pts), cx, cy))
    marks = [ReceiverMark(r.id, *flip(float(r.position[0]), float(r.position[1])))
             for r in placed if r.position is not None]
    rect = None
    if image is not None:
        left, top = flip(image[0], image[3])
        rect = ImageRect(left, top, round(image[2] - image[0], 3), round(image[3] - image[1], 3))
    return Plan(f"0 0 {round(x1 - x0, 3):g} {round(y1 - y0, 3):g}", shapes, marks,
                [r.id for r in receivers if r not in placed], rect)


def zone_names(zones: Sequence[FloorZone], receivers: Sequence[ReceiverSettings]) -> list[str]:
    """The zones staff can tap: the floor plan's, else the receivers' bands' (a store with no [[zones]])."""
    if zones:
        return [z.name for z in zones]
    return sorted({b.name for r in receivers for b in r.zones})
