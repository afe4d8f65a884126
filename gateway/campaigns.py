"""Declarative campaigns: trigger + conditions + action + limits, loaded from YAML or JSON.

Conditions are data (``all``/``any``/``not`` over ``{fact, op, value}``) and templates only
substitute ``{dotted.fact}`` paths, so a campaign file can never run code.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PURPOSES = ("offers", "cart_reminders", "maintenance", "analytics")
TRIGGERS = ("visit_start", "enter", "dwell", "exit", "visit_end", "telemetry", "cart_abandoned")
OPS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "exists", "contains")
_MISSING = object()


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


@dataclass(frozen=True, slots=True)
class Action:
    title: str
    body: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Campaign:
    id: str
    name: str
    purpose: str
    trigger: Trigger
    action: Action
    conditions: Mapping[str, Any] | None = None
    cooldown_s: float = 0.0
    priority: int = 0
    enabled: bool = True


# ---------------------------------------------------------------- conditions

def lookup(facts: Mapping[str, Any], path: str) -> Any:
    cur: Any = facts
    for part in path.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        else:
            return _MISSING
    return cur


def _compare(op: str, left: Any, right: Any) -> bool:
    if op == "exists":
        return (left is not _MISSING and left is not None) == bool(right)
    if left is _MISSING:
        return False
    try:
        if op == "eq":
            return bool(left == right)
        if op == "ne":
            return bool(left != right)
        if op == "gt":
            return bool(left > right)
        if op == "gte":
            return bool(left >= right)
        if op == "lt":
            return bool(left < right)
        if op == "lte":
            return bool(left <= right)
        if op == "in":
            return left in right
        if op == "not_in":
            return left not in right
        if op == "contains":
            return right in left
    except TypeError:
        return False
    raise CampaignError(f"unknown operator {op!r}")


def evaluate(cond: Mapping[str, Any] | None, facts: Mapping[str, Any]) -> str | None:
    """None when the condition holds, else a short description of the first failing leaf."""
    if cond is None:
        return None
    if "all" in cond:
        for sub in cond["all"]:
            failed = evaluate(sub, facts)
            if failed is not None:
                return failed
        return None
    if "any" in cond:
        fails = [evaluate(sub, facts) for sub in cond["any"]]
        return None if any(f is None for f in fails) else "any(" + "; ".join(str(f) for f in fails) + ")"
    if "not" in cond:
        return "not(...)" if evaluate(cond["not"], facts) is None else None
    fact, op, value = cond["fact"], cond["op"], cond.get("value")
    left = lookup(facts, fact)
    if _compare(op, left, value):
        return None
    shown = "missing" if left is _MISSING else repr(left)
    return f"{fact} {op} {value!r} (was {shown})"


def _validate_condition(cond: Any, where: str) -> None:
    if not isinstance(cond, Mapping):
        raise CampaignError(f"{where}: a condition is a mapping")
    if "all" in cond or "any" in cond:
        key = "all" if "all" in cond else "any"
        subs = cond[key]
        if not isinstance(subs, list) or not subs:
            raise CampaignError(f"{where}.{key}: a non-empty list of conditions")
        for i, sub in enumerate(subs):
            _validate_condition(sub, f"{where}.{key}[{i}]")
        return
    if "not" in cond:
        _validate_condition(cond["not"], f"{where}.not")
        return
    if not isinstance(cond.get("fact"), str) or not cond["fact"]:
        raise CampaignError(f"{where}: needs a 'fact' (a dotted path like profile.attributes.tier)")
    if cond.get("op") not in OPS:
        raise CampaignError(f"{where}: 'op' must be one of {', '.join(OPS)}")
    if cond["op"] in ("in", "not_in") and not isinstance(cond.get("value"), list):
        raise CampaignError(f"{where}: '{cond['op']}' needs a list value")


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
    unknown = set(trig) - {"type", "zone", "min_dwell_s", "metric", "above", "below"}
    if unknown:
        raise CampaignError(f"{where}: unknown trigger field(s) {', '.join(sorted(unknown))}")
    if ("above" in trig or "below" in trig) and not trig.get("metric"):
        raise CampaignError(f"{where}: a threshold ('above'/'below') needs a 'metric'")
    try:
        trigger = Trigger(type=trig["type"], zone=trig.get("zone"), min_dwell_s=float(trig.get("min_dwell_s", 0)),
                          metric=trig.get("metric"),
                          above=None if trig.get("above") is None else float(trig["above"]),
                          below=None if trig.get("below") is None else float(trig["below"]))
    except (TypeError, ValueError):
        raise CampaignError(f"{where}: min_dwell_s, above and below are numbers") from None
    act = data.get("action")
    if not isinstance(act, Mapping) or not isinstance(act.get("title"), str) or not isinstance(
        act.get("body"), str
    ):
        raise CampaignError(f"{where}: 'action' needs a 'title' and a 'body' (text templates)")
    cond = data.get("conditions")
    if cond is not None:
        _validate_condition(cond, f"{where}: conditions")
    limits = data.get("limits") or {}
    if not isinstance(limits, Mapping):
        raise CampaignError(f"{where}: 'limits' is a mapping")
    try:
        cooldown = float(limits.get("cooldown_s", 0))
        priority = int(data.get("priority", 0))
    except (TypeError, ValueError):
        raise CampaignError(f"{where}: cooldown_s and priority are numbers") from None
    return Campaign(
        id=cid,
        name=str(data.get("name", cid)),
        purpose=purpose,
        trigger=trigger,
        action=Action(title=act["title"], body=act["body"], data=dict(act.get("data") or {})),
        conditions=cond,
        cooldown_s=cooldown,
        priority=priority,
        enabled=bool(data.get("enabled", True)),
    )


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
        if path.suffix in (".yaml", ".yml", ".json"):
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

    def candidates(self, trigger: str, zone: str | None, dwell_s: float = 0.0,
                   metrics: Iterable[str] = ()) -> list[Campaign]:
        out = []
        for c in self.by_trigger.get(trigger, ()):
            t = c.trigger
            if t.zone is not None and t.zone != zone:
                continue
            if t.min_dwell_s and dwell_s < t.min_dwell_s:
                continue
            if t.metric is not None and t.metric not in metrics:
                continue
            out.append(c)
        return out
