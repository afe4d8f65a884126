"""The calibration walk: staff tap the zone they are in as they walk; the taps become a labels CSV.

A tap at time t in zone z labels the walker's tag in z from t until the next tap (or the stop), in the
gateway's clock, which is the clock of the sightings ``gateway run --record`` writes: so the labels
line up with the recorded trace that ``gateway calibrate TRACE --labels LABELS`` reads. The walks are
kept in one small JSON file under the data dir, rewritten whole (write beside, then rename) on every
change, so a reload or a restart loses no tap.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError
from gateway.presence.traces import Label, write_labels

MAX_TAG_LEN = 128
NO_ZONE = ""
"""A tap on "outside every zone": its label's zone column is empty, as gateway calibrate reads it."""


class WalkError(ValueError):
    """A request the walk cannot take (no walk under way, an unknown zone...): nothing changed."""


@dataclass
class Walk:
    tag: str
    started: float
    taps: list[tuple[float, str]] = field(default_factory=list)
    stopped: float | None = None

    @property
    def active(self) -> bool:
        return self.stopped is None


def check_tag(tag: str) -> str:
    """A beacon key as the trace names it (``gateway decode`` prints it): one CSV cell, no quoting needed."""
    tag = tag.strip()
    if not tag:
        raise WalkError("pick your tag: its beacon key (as gateway decode names it) is empty")
    if len(tag) > MAX_TAG_LEN or any(c in tag for c in ',"\r\n') or not tag.isprintable():
        raise WalkError(f"a tag is a beacon key of at most {MAX_TAG_LEN} printable characters, no commas or quotes")
    return tag


def walk_labels(walk: Walk) -> list[Label]:
    """Each tap's zone from its time to the next tap's (the last one's to the stop); a walk still under
    way labels nothing after its last tap. Time before the first tap is not labelled (staff had not said
    where they were); a tap at the same instant as the next one labels nothing."""
    taps = sorted(walk.taps)
    ends = [t for t, _ in taps[1:]] + ([walk.stopped] if walk.stopped is not None else [])
    return [Label(walk.tag, start, end, zone or None)
            for (start, zone), end in zip(taps, ends, strict=False) if end > start]


def labels_csv(labels: Iterable[Label]) -> str:
    out = io.StringIO()
    write_labels(out, labels)
    return out.getvalue()


class Walks:
    """Every walk, by tag (one under way per tag at a time), persisted to ``path`` (None: memory only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.walks: dict[str, Walk] = self._load(path) if path is not None and path.exists() else {}

    @staticmethod
    def _load(path: Path) -> dict[str, Walk]:
        """The walks file, or a ConfigError (a ValueError) naming the file and the line that is wrong."""
        text = path.read_text(encoding="utf-8")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from None
        walks: dict[str, Walk] = {}
        for i, w in enumerate(raw.get("walks", []) if isinstance(raw, dict) else []):
            try:
                walk = Walk(check_tag(w["tag"]), float(w["started"]),
                            [(float(t), str(z)) for t, z in w.get("taps", [])],
                            None if w.get("stopped") is None else float(w["stopped"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{path}: walk {i + 1} (line {_line_of(text, i)}) is malformed: {exc}") from None
            walks[walk.tag] = walk
        return walks

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        body: dict[str, Any] = {"walks": [asdict(w) for w in self.walks.values()]}
        tmp.write_text(json.dumps(body, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)

    def start(self, tag: str, now: float) -> Walk:
        """A new walk of ``tag`` (a finished walk of the same tag is replaced; one under way is refused)."""
        tag = check_tag(tag)
        with self._lock:
            old = self.walks.get(tag)
            if old is not None and old.active:
                raise WalkError(f"a walk of {tag} is already under way: stop it first")
            self.walks[tag] = walk = Walk(tag, now)
            self._save()
        return walk

    def tap(self, tag: str, zone: str, zones: Sequence[str], now: float) -> Walk:
        if zone != NO_ZONE and zone not in zones:
            raise WalkError(f"no zone {zone!r} on this floor plan")
        with self._lock:
            walk = self._active(tag)
            walk.taps.append((now, zone))
            self._save()
        return walk

    def stop(self, tag: str, now: float) -> Walk:
        with self._lock:
            walk = self._active(tag)
            walk.stopped = now
            self._save()
        return walk

    def _active(self, tag: str) -> Walk:
        walk = self.walks.get(tag)
        if walk is None or not walk.active:
            raise WalkError(f"no walk of {tag!r} is under way: press start first")
        return walk

    def of(self, tag: str) -> Walk | None:
        return self.walks.get(tag)

    def all(self) -> list[Walk]:
        with self._lock:
            return sorted(self.walks.values(), key=lambda w: -w.started)


def _line_of(text: str, index: int) -> int:
    """The line where the index-th walk's object opens in the file (indent=1 puts each ``{`` on its own)."""
    seen = -1
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("{") and n > 1:
            seen += 1
            if seen == index:
                return n
    return 1
