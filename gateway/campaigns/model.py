"""Declarative campaigns: trigger + conditions + action + limits, loaded from YAML or JSON.

Conditions are data (``all``/``any``/``not`` over ``{fact, op, value}``) and templates only
substitute ``{dotted.fact}`` paths, so a campaign file can never run code.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from devices import files
from gateway.campaigns.conditions import MISSING, Condition, ConditionError, get, parse_condition, split
from gateway.campaigns.files import (  # the file format's words, which the engine and the API use too
    CHANNELS as CHANNELS,
)
from gateway.campaigns.files import (
    DAYS as DAYS,
)
from gateway.campaigns.files import (
    LIMITS as LIMITS,
)
from gateway.campaigns.files import (
    PURPOSES as PURPOSES,
)
from gateway.campaigns.files import (
    TRIGGERS as TRIGGERS,
)
from gateway.campaigns.files import (
    VARIANT_NAME_MAX,
    ActionFile,
    CampaignFile,
    ExperimentFile,
    SegmentFile,
    SegmentsFile,
)

_MISSING = MISSING


class CampaignError(ValueError):
    """A campaign or segment file (or an API definition) that cannot be loaded; each line names where."""


@dataclass(frozen=True, slots=True)
class Trigger:
    type: str
    zone: str | None = None
    min_dwell_s: float = 0.0
    metric: str | None = None
    above: float | None = None  # telemetry: fire when the metric crosses up through this value
    below: float | None = None  # telemetry: fire when the metric crosses down through this value
    segment: str | None = None  # segment_entered: which segment (None: any)
    at: tuple[dt.time, ...] = ()  # schedule: local times of day, store timezone
    days: tuple[int, ...] = tuple(range(7))  # schedule: weekdays (0 = Monday)
    within_s: float = 3600.0  # schedule: a run missed (gateway down) still happens this long after its time


@dataclass(frozen=True, slots=True)
class Action:
    title: str
    body: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QuietHours:
    """Local times in the store's timezone; ``start > end`` spans midnight. ``hold`` sends at the end."""

    start: dt.time
    end: dt.time
    mode: str = "hold"  # hold | drop

    def contains(self, local: dt.time) -> bool:
        if self.start <= self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    weight: float = 1.0
    action: Action | None = None  # None: the campaign's own action


@dataclass(frozen=True, slots=True)
class Experiment:
    variants: tuple[Variant, ...]
    holdout: float = 0.0  # share of profiles that never receive it, to measure lift against


@dataclass(frozen=True, slots=True)
class Campaign:
    id: str
    name: str
    purpose: str
    trigger: Trigger
    action: Action
    conditions: Condition | None = None  # parsed at load: checks itself, knows which facts it reads
    cooldown_s: float = 0.0
    priority: int = 0
    enabled: bool = True
    max_per_profile: int = 0  # re-eligibility: at most N sends per profile, ever (0: no limit)
    budget_sends: int = 0  # campaign-wide send budget (0: no limit)
    budget_redemptions: int = 0  # campaign-wide redemption budget: stops sending once this many redeemed
    quiet_hours: QuietHours | None = None
    delay_s: float = 0.0  # send this long after the trigger, unless a cancel event comes first
    ttl_s: float = 0.0  # a held or delayed send older than this is dropped as expired (0: never)
    cancel_on: tuple[str, ...] = ()  # event kinds that cancel a pending send (e.g. purchase, exit)
    experiment: Experiment | None = None
    channels: tuple[str, ...] = ()  # the channels it may go out on (empty: every configured channel)


# ---------------------------------------------------------------- conditions

_PATHS: dict[str, tuple[str, ...]] = {}  # a template's dotted path split once (templates name a few dozen)


def lookup(facts: Mapping[str, Any], path: str) -> Any:
    """The fact at a dotted path, or MISSING."""
    parts = _PATHS.get(path)
    if parts is None:
        parts = split(path)
        if len(_PATHS) < 10_000:  # campaigns over the API may name any path: the cache stays bounded
            _PATHS[path] = parts
    return get(facts, parts)


def evaluate(cond: Condition | None, facts: Mapping[str, Any]) -> str | None:
    """None when the condition holds (or there is none), else a short description of the first failing leaf."""
    return None if cond is None else cond.check(facts)


def _condition(cond: Any, where: str) -> Condition:
    try:
        return parse_condition(cond, where)
    except ConditionError as exc:
        raise CampaignError(str(exc)) from None


# ---------------------------------------------------------------- templates

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")


def render(template: str, facts: Mapping[str, Any]) -> str:
    """Fill ``{profile.name}``-style placeholders; an unknown path renders as empty text."""

    def sub(m: re.Match[str]) -> str:
        value = lookup(facts, m.group(1))
        if value is _MISSING or value is None:
            return ""
        if isinstance(value, float):
            return f"{value:g}" if math.isfinite(value) else ""
        return str(value)

    return _PLACEHOLDER.sub(sub, template)


# ---------------------------------------------------------------- loading

def parse_campaign(data: Any, source: str = "campaign", doc: files.Document | None = None) -> Campaign:
    """A campaign from its definition (a file's item, an API body); CampaignError names each bad field
    (and its line, given the ``doc`` the definition was read from)."""
    return _build(data, source, doc)


def _build(data: Any, source: str, doc: files.Document | None = None, at: files.Loc = ()) -> Campaign:
    return files.build(lambda d: _campaign(CampaignFile.model_validate(d), d), data, CampaignError, source,
                       model=CampaignFile, doc=doc, at=at)


def _campaign(f: CampaignFile, raw: Mapping[str, Any]) -> Campaign:
    """The engine's campaign from a validated file; conditions parsed here, once."""
    t, limits = f.trigger, f.limits
    return Campaign(
        id=f.id,
        name=f.id if f.name is None else f.name,
        purpose=f.purpose,
        trigger=Trigger(type=t.type, zone=t.zone, min_dwell_s=t.min_dwell_s, metric=t.metric, above=t.above,
                        below=t.below, segment=t.segment, at=tuple(sorted(set(t.at or ()))),
                        days=tuple(sorted(set(t.days))), within_s=t.within_s),
        action=_action(f.action),
        conditions=None if f.conditions is None else _parsed(raw["conditions"], ("conditions",)),
        cooldown_s=limits.cooldown_s,
        priority=f.priority,
        enabled=bool(f.enabled),
        max_per_profile=limits.max_per_profile,
        budget_sends=limits.budget.max_sends,
        budget_redemptions=limits.budget.max_redemptions,
        quiet_hours=None if limits.quiet_hours is None else QuietHours(
            limits.quiet_hours.start, limits.quiet_hours.end, limits.quiet_hours.mode),
        delay_s=f.action.delay_s,
        ttl_s=limits.ttl_s,
        cancel_on=tuple(f.cancel_on),
        experiment=None if f.experiment is None else _experiment(f.experiment),
        channels=tuple(dict.fromkeys(f.channels)),
    )


def _action(a: ActionFile) -> Action:
    return Action(title=a.title, body=a.body, data=dict(a.data))


def _experiment(e: ExperimentFile) -> Experiment:
    variants = []
    for i, v in enumerate(e.variants):
        if not 1 <= len(v.name) <= VARIANT_NAME_MAX:  # stored with each decision and notification
            raise files.Invalid(files.Problem(
                ("experiment", "variants", i, "name"),
                f"experiment.variants[{i}].name has 1 to {VARIANT_NAME_MAX} characters"))
        variants.append(Variant(v.name, v.weight, None if v.action is None else _action(v.action)))
    if len({v.name for v in variants}) != len(variants) or any(v.name == "holdout" for v in variants):
        raise files.Invalid(files.Problem(("experiment", "variants"),
                                          "variant names are unique and 'holdout' is reserved"))
    return Experiment(tuple(variants), e.holdout)


_WHERE = re.compile(r"(?s)(conditions(?:\.[A-Za-z_]+|\[\d+\])*): (.*)")
_STEP = re.compile(r"\.([A-Za-z_]+)|\[(\d+)\]")


def _parsed(cond: Any, loc: files.Loc) -> Condition:
    """``parse_condition``'s tree; its error placed at the node it names (``conditions.all[1]``)."""
    try:
        return parse_condition(cond, "conditions")
    except ConditionError as exc:
        m = _WHERE.fullmatch(str(exc))
        if m is None:
            raise files.Invalid(files.Problem(loc, str(exc))) from None
        steps = tuple(int(i) if i else name for name, i in _STEP.findall(m.group(1)[len("conditions"):]))
        raise files.Invalid(files.Problem((*loc, *steps), m.group(2))) from None


def assign_variant(experiment: Experiment, campaign_id: str, profile_id: int) -> Variant | None:
    """Sticky and deterministic: the same profile always lands in the same arm; None is the holdout."""
    digest = hashlib.sha256(f"{campaign_id}:{profile_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < experiment.holdout:
        return None
    u = (u - experiment.holdout) / (1 - experiment.holdout)
    total = sum(v.weight for v in experiment.variants)
    acc = 0.0
    for v in experiment.variants:
        acc += v.weight / total
        if u < acc:
            return v
    return experiment.variants[-1]


@dataclass(frozen=True, slots=True)
class Segment:
    """A live, declarative group of profiles (e.g. frequent visitors), usable as ``segments`` in conditions."""

    id: str
    conditions: Condition

    def __post_init__(self) -> None:
        if not isinstance(self.conditions, Condition):  # written as a mapping: parsed here, once
            object.__setattr__(self, "conditions", _condition(self.conditions, f"segment {self.id}"))


SEGMENTS_FILE = "segments.yaml"


def load_segments(directory: str | Path) -> list[Segment]:
    """``segments.yaml`` beside the campaigns: a list of {id, conditions}."""
    path = Path(directory) / SEGMENTS_FILE
    if not path.is_file():
        return []
    doc = _read(path)
    return files.build(_segments, doc.data, CampaignError, doc.source, model=None, doc=doc)


_SEGMENTS: TypeAdapter[list[SegmentFile]] = TypeAdapter(SegmentsFile)


def _segments(data: Any) -> list[Segment]:
    return [Segment(s.id, _parsed(data[i]["conditions"], (i, "conditions")))
            for i, s in enumerate(_SEGMENTS.validate_python(data))]


def _read(path: Path) -> files.Document:
    try:
        return files.read(path)
    except files.FileError as exc:
        raise CampaignError(str(exc)) from None


def load_campaign_file(path: Path) -> list[Campaign]:
    """One campaign, or a list of them, from a YAML or JSON file."""
    doc = _read(path)
    if isinstance(doc.data, list):
        if not doc.data:  # most likely a file emptied by mistake: say so rather than load nothing
            raise CampaignError(f"{doc.source}: an empty list: a campaign file holds one campaign or a list of them")
        return [_build(item, doc.source, doc, (i,)) for i, item in enumerate(doc.data)]
    return [_build(doc.data, doc.source, doc)]


def load_campaigns(directory: str | Path) -> list[Campaign]:
    d = Path(directory)
    if not d.is_dir():
        raise CampaignError(f"campaign directory not found: {d}")
    campaigns: list[Campaign] = []
    for path in sorted(d.iterdir()):
        if path.suffix in (".yaml", ".yml", ".json") and path.name != SEGMENTS_FILE:
            campaigns.extend(load_campaign_file(path))
    if (twice := files.repeated(c.id for c in campaigns)) is not None:
        raise CampaignError(f"campaign id {twice!r} is defined twice in {d}")
    return campaigns


class CampaignIndex:
    """Campaigns by trigger type, highest priority first, so an event meets only those that can fire."""

    def __init__(self, campaigns: Iterable[Campaign]) -> None:
        self.by_id = {c.id: c for c in campaigns}
        self.by_trigger: dict[str, list[Campaign]] = {}
        for c in sorted(self.by_id.values(), key=lambda c: (-c.priority, c.id)):
            if c.enabled:
                self.by_trigger.setdefault(c.trigger.type, []).append(c)
        # Per trigger and zone: the campaigns for that zone or for any, still highest priority first.
        self._by_zone: dict[tuple[str, str | None], list[Campaign]] = {}

    def _for_zone(self, trigger: str, zone: str | None) -> list[Campaign]:
        found = self._by_zone.get((trigger, zone))
        if found is None:
            found = self._by_zone[(trigger, zone)] = [
                c for c in self.by_trigger.get(trigger, ()) if c.trigger.zone is None or c.trigger.zone == zone]
        return found

    def candidates(self, trigger: str, zone: str | None, dwell_s: float = 0.0,
                   metrics: Iterable[str] = (), segment: str | None = None) -> list[Campaign]:
        out = []
        for c in self._for_zone(trigger, zone):
            t = c.trigger
            if t.segment is not None and t.segment != segment:
                continue
            if t.min_dwell_s and dwell_s < t.min_dwell_s:
                continue
            if t.metric is not None and t.metric not in metrics:
                continue
            out.append(c)
        return out
