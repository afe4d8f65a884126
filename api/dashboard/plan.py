"""The floor plan as the page draws it: the config's ``[[zones]]`` polygons and receivers' positions
mapped into one SVG box (y flipped: the config's y grows away from the door, the screen's grows down)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.presence.floor import centroid
from gateway.presence.settings import FloorZone, ReceiverSettings

PAD_M = 0.6  # room around the outline for the receivers' markers and labels


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

    @property
    def empty(self) -> bool:
        return not self.zones and not self.receivers


def plan(zones: Sequence[FloorZone], receivers: Sequence[ReceiverSettings]) -> Plan:
    points = [(float(p[0]), float(p[1])) for z in zones for p in z.polygon]
    placed = [r for r in receivers if r.position is not None and len(r.position) >= 2]
    points += [(float(r.position[0]), float(r.position[1])) for r in placed if r.position is not None]
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
    return Plan(f"0 0 {round(x1 - x0, 3):g} {round(y1 - y0, 3):g}", shapes, marks,
                [r.id for r in receivers if r not in placed])


def zone_names(zones: Sequence[FloorZone], receivers: Sequence[ReceiverSettings]) -> list[str]:
    """The zones staff can tap: the floor plan's, else the receivers' bands' (a store with no [[zones]])."""
    if zones:
        return [z.name for z in zones]
    return sorted({b.name for r in receivers for b in r.zones})
