"""Device profiles: what a kind of product reports, in which unit, within which range, how often.

A profile is YAML (one file per profile in a directory, or a list in one file)::

    id: robot_mower
    description: Robotic lawn mower
    reporting_interval_s: 60        # the device reports at least this often
    offline_after_intervals: 3      # silent this many intervals: offline
    strict: true                    # a metric the profile does not declare is a reject
    metrics:
      blade_hours: {unit: h, min: 0, max: 100000}
      battery_pct: {unit: "%", min: 0, max: 100}

Validation is pure: a :class:`Reading` in, ``None`` (fine) or a :class:`Violation` out, so the
pipeline can dead-letter the message with the reason and carry on with the rest of the batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from devices.payloads import Reading

log = logging.getLogger(__name__)

# Reason codes of the profile check (the parser's are in devices.payloads).
UNKNOWN_METRIC = "unknown_metric"
OUT_OF_RANGE = "out_of_range"
NOT_INTEGER = "not_integer"


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class MetricDef:
    unit: str | None = None
    min: float | None = None
    max: float | None = None
    integer: bool = False


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    id: str
    metrics: Mapping[str, MetricDef]
    reporting_interval_s: float = 60.0
    offline_after_intervals: float = 3.0
    strict: bool = True
    description: str = ""

    @property
    def offline_after_s(self) -> float:
        """Silence after which a device of this profile counts as offline."""
        return self.reporting_interval_s * self.offline_after_intervals


@dataclass(frozen=True, slots=True)
class Violation:
    reason: str
    detail: str


@dataclass
class ProfileSet:
    """Profiles by id. ``for_device`` picks a device's: its own ``device_profile``, else its kind."""

    profiles: dict[str, DeviceProfile] = field(default_factory=dict)

    def get(self, profile_id: str | None) -> DeviceProfile | None:
        return self.profiles.get(profile_id) if profile_id else None

    def for_device(self, device_profile: str | None, kind: str | None) -> DeviceProfile | None:
        return self.get(device_profile) or self.get(kind)

    def __len__(self) -> int:
        return len(self.profiles)


def validate(profile: DeviceProfile, reading: Reading) -> Violation | None:
    """The first way the reading breaks its profile, or None. Hot path: no allocation when fine."""
    defs = profile.metrics
    for name, value in reading.metrics.items():
        d = defs.get(name)
        if d is None:
            if profile.strict:
                return Violation(UNKNOWN_METRIC, f"metric {name[:40]!r} is not in profile {profile.id!r}")
            continue
        if (d.min is not None and value < d.min) or (d.max is not None and value > d.max):
            return Violation(OUT_OF_RANGE, f"{name[:40]}={value:g} outside [{d.min}, {d.max}] {d.unit or ''}".strip())
        if d.integer and not float(value).is_integer():
            return Violation(NOT_INTEGER, f"{name[:40]}={value:g} must be a whole number")
    return None


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProfileError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def parse_profile(data: Any, where: str = "profile") -> DeviceProfile:
    """One profile from its YAML/JSON document; ProfileError names what is wrong."""
    if not isinstance(data, Mapping):
        raise ProfileError(f"{where}: expected a mapping")
    known = {"id", "description", "reporting_interval_s", "offline_after_intervals", "strict", "metrics"}
    unknown = set(data) - known
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    pid = data.get("id")
    if not isinstance(pid, str) or not pid:
        raise ProfileError(f"{where}: 'id' must be a non-empty string")
    raw = data.get("metrics")
    if not isinstance(raw, Mapping) or not raw:
        raise ProfileError(f"{where} ({pid}): 'metrics' must be a non-empty mapping")
    metrics: dict[str, MetricDef] = {}
    for name, spec in raw.items():
        w = f"{where} ({pid}) metric {name}"
        spec = spec or {}
        if not isinstance(spec, Mapping):
            raise ProfileError(f"{w}: expected a mapping")
        bad = set(spec) - {"unit", "min", "max", "integer"}
        if bad:
            raise ProfileError(f"{w}: unknown key(s) {', '.join(sorted(map(str, bad)))}")
        lo, hi = _number(spec.get("min"), f"{w}.min"), _number(spec.get("max"), f"{w}.max")
        if lo is not None and hi is not None and lo > hi:
            raise ProfileError(f"{w}: min {lo} is above max {hi}")
        unit = spec.get("unit")
        metrics[str(name)] = MetricDef(unit=None if unit is None else str(unit), min=lo, max=hi,
                                       integer=bool(spec.get("integer", False)))
    interval = _number(data.get("reporting_interval_s", 60.0), f"{where} ({pid}).reporting_interval_s")
    after = _number(data.get("offline_after_intervals", 3.0), f"{where} ({pid}).offline_after_intervals")
    if not interval or interval <= 0 or not after or after <= 0:
        raise ProfileError(f"{where} ({pid}): reporting_interval_s and offline_after_intervals must be > 0")
    return DeviceProfile(id=pid, metrics=metrics, reporting_interval_s=interval, offline_after_intervals=after,
                         strict=bool(data.get("strict", True)), description=str(data.get("description", "")))


def parse_profiles(documents: Iterable[Any], where: str = "profiles") -> ProfileSet:
    out: dict[str, DeviceProfile] = {}
    for i, doc in enumerate(documents):
        items = doc if isinstance(doc, list) else [doc]
        for j, item in enumerate(items):
            p = parse_profile(item, f"{where}[{i}.{j}]")
            if p.id in out:
                raise ProfileError(f"{where}: profile {p.id!r} is defined twice")
            out[p.id] = p
    return ProfileSet(out)


def load_profiles(directory: str | Path | None) -> ProfileSet:
    """Every *.yaml/*.yml file in ``directory`` (none, or a missing directory: no profiles)."""
    if not directory:
        return ProfileSet()
    root = Path(directory)
    if not root.is_dir():
        log.warning("device profiles directory %s not found: no readings will be range-checked", root)
        return ProfileSet()
    out: dict[str, DeviceProfile] = {}
    for path in sorted([*root.glob("*.yaml"), *root.glob("*.yml")]):
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as exc:
            raise ProfileError(f"{path}: not valid YAML ({exc})") from None
        for pid, p in parse_profiles(docs, str(path)).profiles.items():
            if pid in out:
                raise ProfileError(f"{path}: profile {pid!r} is defined twice")
            out[pid] = p
    return ProfileSet(out)
