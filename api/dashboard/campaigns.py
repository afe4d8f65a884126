"""The campaigns page's pieces: the list with its last 24 h, a campaign as YAML, its problems by line,
and a condition tree laid out for an explanation.

Every verdict comes from the services the API uses: ``GatewayService.validate_campaign`` (the path of
``POST /v1/campaigns/validate``, given the parsed YAML so each problem names its line), ``put_campaign``,
``set_campaign_enabled``, ``decision_counts``. Nothing here decides whether a campaign is valid or fires.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from devices.files import Document, FileError, parse_yaml, read
from gateway.campaigns.conditions import All, Any_, Condition, Leaf, Not
from gateway.campaigns.model import Campaign, CampaignError, parse_campaign
from gateway.errors import Invalid, NotFound
from gateway.profiles.service import GatewayService

DAY_S = 86400.0
MAX_YAML_BYTES = 65536
SOURCE = "campaign"  # the name problems are reported under: ``campaign:LINE: path: message``
_LINE = re.compile(rf"^{SOURCE}:(\d+): ?(.*)$")


@dataclass(frozen=True)
class Problem:
    line: int | None
    message: str


def problems_of(message: str) -> list[Problem]:
    """The validator's message (one ``campaign:LINE: ...`` per problem) as (line, message) pairs."""
    out = []
    for text in message.splitlines():
        m = _LINE.match(text.strip())
        if m:
            out.append(Problem(int(m.group(1)), m.group(2)))
        elif text.strip():
            out.append(Problem(None, text.strip().removeprefix(f"{SOURCE}: ")))
    return out


def check_yaml(text: str, campaign_id: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    """The definition in ``text`` when the validator accepts it as campaign ``campaign_id``; else its
    problems, each with the line it is on. Nothing is saved."""
    if len(text.encode()) > MAX_YAML_BYTES:
        return None, [Problem(None, f"a campaign is at most {MAX_YAML_BYTES} bytes of YAML")]
    try:
        doc: Document = parse_yaml(text, SOURCE)
    except FileError as exc:
        return None, problems_of(str(exc))
    if not isinstance(doc.data, dict):
        return None, [Problem(1, "a campaign is a mapping: id, purpose, trigger, action and the rest")]
    given = doc.data.get("id", campaign_id)
    if given != campaign_id:
        return None, [Problem(doc.line(("id",)), f"id is {given!r}, but this page edits {campaign_id!r}")]
    try:
        GatewayService.validate_campaign({"id": campaign_id, **doc.data}, doc)
    except Invalid as exc:
        return None, problems_of(str(exc))
    return {"id": campaign_id, **doc.data}, []


def as_yaml(definition: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(definition), sort_keys=False, allow_unicode=True, default_flow_style=False)


def starter_yaml(campaign_id: str, zones: list[str]) -> str:
    """What a new campaign's editor starts from: the fields every campaign needs, to be changed."""
    trigger: dict[str, Any] = {"type": "enter", **({"zone": zones[0]} if zones else {})}
    return as_yaml({"id": campaign_id, "name": campaign_id, "purpose": "offers", "trigger": trigger,
                    "action": {"title": "Hello {profile.first_name}", "body": "Something useful, in a line."},
                    "limits": {"cooldown_s": 86400}, "enabled": False})


def file_definition(directory: str | None, campaign_id: str) -> tuple[str, dict[str, Any]] | None:
    """(file name, definition as written) of a campaign defined in the campaigns directory, if found."""
    if not directory or not Path(directory).is_dir():
        return None
    for path in sorted(Path(directory).iterdir()):
        if path.suffix not in (".yaml", ".yml", ".json"):
            continue
        try:
            data = read(path).data
        except FileError:
            continue
        for item in data if isinstance(data, list) else [data]:
            if isinstance(item, dict) and item.get("id") == campaign_id:
                return path.name, item
    return None


def campaign_of(service: GatewayService, campaign_id: str) -> Campaign | None:
    """The campaign as the engine holds it (a file's, or the API's parsed again), None if it is gone."""
    if campaign_id in service.file_campaigns:
        return service.file_campaigns[campaign_id]
    try:
        view = service.get_campaign(campaign_id)
        return parse_campaign(view["definition"], f"campaign {campaign_id}")
    except (NotFound, CampaignError, KeyError):
        return None


@dataclass(frozen=True)
class ConditionRow:
    depth: int
    text: str
    failed: bool = False


def condition_rows(cond: Condition | None, detail: str | None = None, depth: int = 0) -> list[ConditionRow]:
    """The tree as indented rows; a leaf the engine's detail names (``fact op``) is marked as the one that
    failed. Presentation only: the verdict is the engine's, in the detail."""
    if cond is None:
        return []
    if isinstance(cond, All | Any_):
        word = "all of" if isinstance(cond, All) else "any of"
        rows = [ConditionRow(depth, word)]
        for part in cond.parts:
            rows += condition_rows(part, detail, depth + 1)
        return rows
    if isinstance(cond, Not):
        return [ConditionRow(depth, "not"), *condition_rows(cond.inner, detail, depth + 1)]
    failed = isinstance(cond, Leaf) and detail is not None and f"{cond.fact} {cond.op} " in detail
    return [ConditionRow(depth, cond.text, failed)]


def campaign_rows(service: GatewayService, now: float) -> list[dict[str, Any]]:
    """The list: each campaign's summary (source, state) and its decisions in the last 24 h."""
    counts = service.decision_counts(now - DAY_S)
    return [{**c, **counts.get(c["id"], {"fired": 0, "suppressed": 0})} for c in service.list_campaigns()]
