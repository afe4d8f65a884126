"""Declarative campaigns: trigger + conditions + action + limits, loaded from YAML or JSON.

Conditions are data (``all``/``any``/``not`` over ``{fact, op, value}``) and templates only
substitute ``{dotted.fact}`` paths, so a campaign file can never run code.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.campaigns.conditions import MISSING, Condition, ConditionError, get, parse_condition, split
from gateway.storage.models import ChannelName, Purpose

PURPOSES: tuple[Purpose, ...] = tuple(Purpose)  # defined with the columns that hold them
TRIGGERS = ("visit_start", "enter", "dwell", "exit", "visit_end", "telemetry", "cart_abandoned", "purchase",
            "alarm", "alarm_cleared",  # alarm*: a device rule raised (or cleared) an alarm, see docs/device-rules.md
            "segment_entered", "schedule")  # a profile joined a live segment; a time of day (store time)
CHANNELS: tuple[ChannelName, ...] = tuple(ChannelName)
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
LIMITS = ("cooldown_s", "max_per_profile", "budget", "quiet_hours", "ttl_s")
VARIANT_NAME_MAX = 64  # the variant column of decisions and notifications
_MISSING = MISSING


class CampaignError(ValueError):
    pass


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

def parse_campaign(data: Any, source: str = "campaign") -> Campaign:
    if not isinstance(data, Mapping):
        raise CampaignError(f"{source}: a campaign is a mapping")
    cid = data.get("id")
    if not isinstance(cid, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", cid):
        raise CampaignError(f"{source}: 'id' must be 1-128 letters, digits, '-', '_' or '.'")
    where = f"{source} ({cid})"
    purpose = data.get("purpose")
    if purpose not in PURPOSES:
        raise CampaignError(f"{where}: 'purpose' must be one of {', '.join(PURPOSES)}")
    trig = data.get("trigger")
    if not isinstance(trig, Mapping) or trig.get("type") not in TRIGGERS:
        raise CampaignError(f"{where}: 'trigger.type' must be one of {', '.join(TRIGGERS)}")
    trigger = _trigger(trig, where)
    act = data.get("action")
    if not isinstance(act, Mapping) or not isinstance(act.get("title"), str) or not isinstance(
        act.get("body"), str
    ):
        raise CampaignError(f"{where}: 'action' needs a 'title' and a 'body' (text templates)")
    unknown = set(data) - {"id", "name", "purpose", "trigger", "conditions", "action", "limits", "priority",
                           "enabled", "cancel_on", "experiment", "description", "channels"}
    if unknown:
        raise CampaignError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    cond = data.get("conditions")
    conditions = _condition(cond, f"{where}: conditions") if cond is not None else None
    limits = data.get("limits") or {}
    if not isinstance(limits, Mapping):
        raise CampaignError(f"{where}: 'limits' is a mapping")
    unknown = set(limits) - set(LIMITS)
    if unknown:
        raise CampaignError(f"{where}: unknown limit(s) {', '.join(sorted(unknown))}; known: {', '.join(LIMITS)}")
    budget = limits.get("budget") or {}
    if not isinstance(budget, Mapping) or set(budget) - {"max_sends", "max_redemptions"}:
        raise CampaignError(f"{where}: 'limits.budget' takes max_sends and max_redemptions")
    channels = data.get("channels") or []
    if not isinstance(channels, list) or not all(c in CHANNELS for c in channels):
        raise CampaignError(f"{where}: 'channels' is a list from {', '.join(CHANNELS)}")
    cancel_on = data.get("cancel_on") or []
    if not isinstance(cancel_on, list) or any(c not in TRIGGERS for c in cancel_on):
        raise CampaignError(f"{where}: 'cancel_on' is a list of event kinds from {', '.join(TRIGGERS)}")
    try:
        cooldown = float(limits.get("cooldown_s", 0))
        priority = int(data.get("priority", 0))
        max_per_profile = int(limits.get("max_per_profile", 0))
        budget_sends = int(budget.get("max_sends", 0))
        budget_redemptions = int(budget.get("max_redemptions", 0))
        ttl = float(limits.get("ttl_s", 0))
        delay = float(act.get("delay_s", 0))
    except (TypeError, ValueError):
        raise CampaignError(f"{where}: cooldown_s, max_per_profile, max_sends, ttl_s, delay_s and priority "
                            "are numbers") from None
    if min(cooldown, max_per_profile, budget_sends, budget_redemptions, ttl, delay) < 0:
        raise CampaignError(f"{where}: limits and delays cannot be negative")
    return Campaign(
        id=cid,
        name=str(data.get("name", cid)),
        purpose=purpose,
        trigger=trigger,
        action=_action(act, where),
        conditions=conditions,
        cooldown_s=cooldown,
        priority=priority,
        enabled=bool(data.get("enabled", True)),
        max_per_profile=max_per_profile,
        budget_sends=budget_sends,
        budget_redemptions=budget_redemptions,
        quiet_hours=_quiet_hours(limits.get("quiet_hours"), where),
        delay_s=delay,
        ttl_s=ttl,
        cancel_on=tuple(cancel_on),
        experiment=_experiment(data.get("experiment"), where),
        channels=tuple(dict.fromkeys(channels)),
    )


_TRIGGER_FIELDS = {
    "dwell": {"zone", "min_dwell_s"}, "enter": {"zone"}, "exit": {"zone"}, "visit_start": {"zone"},
    "visit_end": set(), "telemetry": {"metric", "above", "below"}, "segment_entered": {"segment"},
    "schedule": {"at", "days", "within_s"},
}


def _trigger(trig: Mapping[str, Any], where: str) -> Trigger:
    kind = trig["type"]
    allowed = {"type"} | _TRIGGER_FIELDS.get(kind, {"zone", "min_dwell_s", "metric", "above", "below"})
    unknown = set(trig) - allowed
    if unknown:
        raise CampaignError(f"{where}: unknown trigger field(s) {', '.join(sorted(unknown))} for {kind}; "
                            f"known: {', '.join(sorted(allowed))}")
    if ("above" in trig or "below" in trig) and not trig.get("metric"):
        raise CampaignError(f"{where}: a threshold ('above'/'below') needs a 'metric'")
    if trig.get("segment") is not None and not isinstance(trig["segment"], str):
        raise CampaignError(f"{where}: trigger.segment is a segment id")
    at: tuple[dt.time, ...] = ()
    days = tuple(range(7))
    if kind == "schedule":
        raw_at = trig.get("at")
        raw_at = [raw_at] if isinstance(raw_at, str) else raw_at
        if not isinstance(raw_at, list) or not raw_at:
            raise CampaignError(f"{where}: a schedule needs 'at': 'HH:MM' or a list of them (store time)")
        at = tuple(sorted({_clock_time(v, where) for v in raw_at}))
        raw_days = trig.get("days", list(DAYS))
        if not isinstance(raw_days, list) or not raw_days or any(str(d).lower()[:3] not in DAYS for d in raw_days):
            raise CampaignError(f"{where}: trigger.days is a list of weekdays ({', '.join(DAYS)})")
        days = tuple(sorted({DAYS.index(str(d).lower()[:3]) for d in raw_days}))
    try:
        within = float(trig.get("within_s", 3600))
        trigger = Trigger(type=kind, zone=trig.get("zone"), min_dwell_s=float(trig.get("min_dwell_s", 0)),
                          metric=trig.get("metric"),
                          above=None if trig.get("above") is None else float(trig["above"]),
                          below=None if trig.get("below") is None else float(trig["below"]),
                          segment=trig.get("segment"), at=at, days=days, within_s=within)
    except (TypeError, ValueError):
        raise CampaignError(f"{where}: min_dwell_s, above, below and within_s are numbers") from None
    if within <= 0 or trigger.min_dwell_s < 0:
        raise CampaignError(f"{where}: within_s is positive and min_dwell_s not negative")
    return trigger


def _action(act: Mapping[str, Any], where: str) -> Action:
    unknown = set(act) - {"title", "body", "data", "delay_s"}
    if unknown:
        raise CampaignError(f"{where}: unknown action field(s) {', '.join(sorted(unknown))}")
    if not isinstance(act.get("title"), str) or not isinstance(act.get("body"), str):
        raise CampaignError(f"{where}: an action needs a 'title' and a 'body' (text templates)")
    data = act.get("data") or {}
    if not isinstance(data, Mapping):
        raise CampaignError(f"{where}: 'action.data' is a mapping")
    return Action(title=act["title"], body=act["body"], data=dict(data))


def _clock_time(value: Any, where: str) -> dt.time:
    try:
        hh, mm = str(value).split(":")
        return dt.time(int(hh), int(mm))
    except (ValueError, TypeError):
        raise CampaignError(f"{where}: times are 'HH:MM', got {value!r}") from None


def _quiet_hours(value: Any, where: str) -> QuietHours | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or "start" not in value or "end" not in value:
        raise CampaignError(f"{where}: 'quiet_hours' needs start and end ('HH:MM', store time)")
    mode = value.get("mode", "hold")
    if mode not in ("hold", "drop"):
        raise CampaignError(f"{where}: quiet_hours.mode is hold or drop")
    return QuietHours(_clock_time(value["start"], where), _clock_time(value["end"], where), mode)


def _experiment(value: Any, where: str) -> Experiment | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise CampaignError(f"{where}: 'experiment' is a mapping with variants and holdout")
    try:
        holdout = float(value.get("holdout", 0))
    except (TypeError, ValueError):
        raise CampaignError(f"{where}: experiment.holdout is a share between 0 and 1") from None
    if not 0 <= holdout < 1:
        raise CampaignError(f"{where}: experiment.holdout is a share between 0 and 1")
    raw = value.get("variants") or [{"name": "control"}]
    if not isinstance(raw, list):
        raise CampaignError(f"{where}: experiment.variants is a list")
    variants = []
    for i, v in enumerate(raw):
        if not isinstance(v, Mapping) or not isinstance(v.get("name"), str):
            raise CampaignError(f"{where}: experiment.variants[{i}] needs a name")
        if not 1 <= len(v["name"]) <= VARIANT_NAME_MAX:  # stored with each decision and notification
            raise CampaignError(f"{where}: experiment.variants[{i}].name has 1 to {VARIANT_NAME_MAX} characters")
        try:
            weight = float(v.get("weight", 1))
        except (TypeError, ValueError):
            weight = -1
        if weight <= 0:
            raise CampaignError(f"{where}: experiment.variants[{i}].weight must be positive")
        action = _action(v["action"], f"{where}: variant {v['name']}") if v.get("action") else None
        variants.append(Variant(v["name"], weight, action))
    if len({v.name for v in variants}) != len(variants) or any(v.name == "holdout" for v in variants):
        raise CampaignError(f"{where}: variant names are unique and 'holdout' is reserved")
    return Experiment(tuple(variants), holdout)


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
    try:
        data = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError as exc:
        raise CampaignError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, list):
        raise CampaignError(f"{path}: a list of segments")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, Mapping) or not isinstance(item.get("id"), str) or "conditions" not in item:
            raise CampaignError(f"{path}[{i}]: a segment needs an id and conditions")
        out.append(Segment(item["id"], _condition(item["conditions"], f"{path} ({item['id']})")))
    return out


def load_campaign_file(path: Path) -> list[Campaign]:
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise CampaignError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    items = data if isinstance(data, list) else [data]
    return [parse_campaign(item, str(path)) for item in items]


def load_campaigns(directory: str | Path) -> list[Campaign]:
    d = Path(directory)
    if not d.is_dir():
        raise CampaignError(f"campaign directory not found: {d}")
    campaigns: list[Campaign] = []
    for path in sorted(d.iterdir()):
        if path.suffix in (".yaml", ".yml", ".json") and path.name != SEGMENTS_FILE:
            campaigns.extend(load_campaign_file(path))
    seen: set[str] = set()
    for c in campaigns:
        if c.id in seen:
            raise CampaignError(f"campaign id {c.id!r} is defined twice in {d}")
        seen.add(c.id)
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
