"""The campaign and segment files as a user writes them: pydantic models, and the JSON Schemas drawn from them.

``gateway.campaigns.model`` turns a validated file into the engine's frozen types. The models say what a
value must look like (types, ranges, the known words) and carry the descriptions an editor shows on hover;
conditions are only shaped here for the schema: ``gateway.campaigns.conditions`` parses them, once, at load.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, SkipValidation, WithJsonSchema, model_validator
from pydantic.json_schema import JsonDict, SkipJsonSchema

from devices.files import FileModel, LenientModel, OneOf, Whole, drop_null, fail, or_empty
from gateway.storage.models import ChannelName, Purpose

PURPOSES: tuple[Purpose, ...] = tuple(Purpose)  # defined with the columns that hold them
TRIGGERS = ("visit_start", "enter", "dwell", "exit", "visit_end", "telemetry", "cart_abandoned", "purchase",
            "alarm", "alarm_cleared",  # alarm*: a device rule raised (or cleared) an alarm, see docs/device-rules.md
            "segment_entered", "schedule")  # a profile joined a live segment; a time of day (store time)
CHANNELS: tuple[ChannelName, ...] = tuple(ChannelName)
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
LIMITS = ("cooldown_s", "max_per_profile", "budget", "quiet_hours", "ttl_s")
VARIANT_NAME_MAX = 64  # the variant column of decisions and notifications
CAMPAIGN_ID = r"[A-Za-z0-9_.-]{1,128}"
CONDITION_OPS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "contains", "exists")

# The fields each trigger type takes besides ``type`` (the others: zone, min_dwell_s, metric, above, below).
TRIGGER_FIELDS = {
    "dwell": {"zone", "min_dwell_s"}, "enter": {"zone"}, "exit": {"zone"}, "visit_start": {"zone"},
    "visit_end": set(), "telemetry": {"metric", "above", "below"}, "segment_entered": {"segment"},
    "schedule": {"at", "days", "within_s"},
}
OTHER_TRIGGER_FIELDS = {"zone", "min_dwell_s", "metric", "above", "below"}
_HHMM_SCHEMA: JsonDict = {"type": "string", "pattern": r"^([01]?\d|2[0-3]):[0-5]\d$"}


def clock_time(value: Any) -> dt.time:
    """'HH:MM' in store time, read as the gateway always has (``9:5`` is 09:05)."""
    try:
        hh, mm = str(value).split(":")
        return dt.time(int(hh), int(mm))
    except (ValueError, TypeError):
        fail(f"times are 'HH:MM', got {value!r}")


def _campaign_id(value: str) -> str:
    if not re.fullmatch(CAMPAIGN_ID, value):
        fail("'id' must be 1-128 letters, digits, '-', '_' or '.'")
    return value


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _weekday(value: Any) -> int:
    day = str(value).lower()[:3]
    if day not in DAYS:
        fail(f"trigger.days is a list of weekdays ({', '.join(DAYS)})")
    return DAYS.index(day)


ClockTime = Annotated[dt.time, BeforeValidator(clock_time), WithJsonSchema(_HHMM_SCHEMA)]


# ---------------------------------------------------------------- conditions (the schema's view)

class Leaf(FileModel):
    """Compares one fact with a value (or with another fact, ``value_fact``)."""

    fact: str = Field(min_length=1, description="A dotted fact path, e.g. profile.attributes.tier, cart.abandoned.")
    op: Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "contains", "exists"] = Field(
        description="in / not_in take a list; exists takes true or false.")
    value: Any = Field(None, description="What the fact is compared with.")
    value_fact: str | SkipJsonSchema[None] = Field(
        None, description="A second fact to compare with, instead of a value.")


class AllOf(FileModel):
    """Holds when every condition in the list holds."""

    all: list[Condition] = Field(min_length=1)


class AnyOf(FileModel):
    """Holds when at least one condition in the list holds."""

    any: list[Condition] = Field(min_length=1)


class NotOf(FileModel):
    """Holds when the condition does not."""

    not_: Condition = Field(alias="not")


Condition = Leaf | AllOf | AnyOf | NotOf
"""A condition as written; validated by ``gateway.campaigns.conditions.parse_condition``, not by these models."""

ConditionField = SkipValidation[Condition]


# ---------------------------------------------------------------- campaigns

class TriggerFile(FileModel):
    """What raises the event a campaign answers; which fields apply depends on ``type``."""

    type: Annotated[str, OneOf(TRIGGERS, "Input should be one of {}")] = Field(
        description="visit_start, enter, exit, visit_end, dwell (presence); telemetry; alarm, alarm_cleared "
                    "(device rules); cart_abandoned, purchase; segment_entered; schedule (a time of day).")
    zone: str | None = Field(None, description="Only events in this zone (presence triggers; none: any zone).")
    min_dwell_s: float = Field(0.0, ge=0, description="dwell: fires once the stay in the zone is this long.")
    metric: str | None = Field(None, description="telemetry: the metric the thresholds read.")
    above: float | None = Field(None, description="telemetry: fires when the metric crosses up through this.")
    below: float | None = Field(None, description="telemetry: fires when the metric crosses down through this.")
    segment: str | None = Field(None, description="segment_entered: the segment id (none: any segment).")
    at: Annotated[list[ClockTime], BeforeValidator(_one_or_many, json_schema_input_type=ClockTime | list[ClockTime]),
                  Field(json_schema_extra={"minItems": 1})] | None = Field(
        None, description="schedule: 'HH:MM' or a list of them, store time.", json_schema_extra=drop_null)
    days: Annotated[list[Annotated[Any, AfterValidator(_weekday)]], Field(min_length=1)] = Field(
        list(DAYS), validate_default=True, description="schedule: the weekdays it runs (mon ... sun; default: "
                                                       "every day).",
        json_schema_extra={"items": {"type": "string", "enum": list(DAYS)}})
    within_s: float = Field(3600.0, gt=0, description="schedule: a run missed (gateway down) still happens this "
                                                       "long after its time.")

    @model_validator(mode="before")
    @classmethod
    def _fields_of_its_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("type"), str) and data["type"] in TRIGGERS:
            kind = data["type"]
            allowed = {"type"} | TRIGGER_FIELDS.get(kind, OTHER_TRIGGER_FIELDS)
            unknown = set(map(str, data)) - allowed
            if unknown:
                fail(f"unknown trigger field(s) {', '.join(sorted(unknown))} for {kind}; "
                     f"known: {', '.join(sorted(allowed))}")
            if ("above" in data or "below" in data) and not data.get("metric"):
                fail("a threshold ('above'/'below') needs a 'metric'")
            if kind == "schedule" and not data.get("at"):
                fail("a schedule needs 'at': 'HH:MM' or a list of them (store time)")
        return data


class ActionFile(FileModel):
    """The message: title and body are templates over facts ({profile.first_name}, {cart.items_where})."""

    title: str = Field(description="A template: {dotted.fact} placeholders, nothing else.")
    body: str = Field(description="A template: {dotted.fact} placeholders, nothing else.")
    data: Annotated[dict[Any, Any], or_empty(dict)] = Field(
        default_factory=dict, description="Sent with the notification to the app, as is.")
    delay_s: float = Field(0.0, ge=0, description="Send this long after the trigger, unless a cancel_on event "
                                                  "comes first.")

    @model_validator(mode="before")
    @classmethod
    def _title_and_body(cls, data: Any) -> Any:
        if isinstance(data, dict) and not (isinstance(data.get("title"), str) and isinstance(data.get("body"), str)):
            fail("'action' needs a 'title' and a 'body' (text templates)")
        return data


class QuietHoursFile(LenientModel):
    """No sends between start and end (store time; start after end spans midnight)."""

    start: ClockTime = Field(description="'HH:MM', store time.")
    end: ClockTime = Field(description="'HH:MM', store time.")
    mode: Annotated[str, OneOf(("hold", "drop"), "quiet_hours.mode is {}")] = Field(
        "hold", description="hold: send when they end; drop: do not send.")


class BudgetFile(FileModel):
    """Campaign-wide budgets (0: no limit)."""

    max_sends: Whole = Field(0, ge=0, description="Stop after this many sends in all.")
    max_redemptions: Whole = Field(0, ge=0, description="Stop once this many offers were redeemed.")


class LimitsFile(FileModel):
    """How often a campaign may send."""

    cooldown_s: float = Field(0.0, ge=0, description="At most one send per profile in this many seconds.")
    max_per_profile: Whole = Field(0, ge=0, description="At most this many sends per profile, ever (0: no limit).")
    budget: Annotated[BudgetFile, or_empty(dict)] = BudgetFile.model_validate({})
    quiet_hours: QuietHoursFile | None = None
    ttl_s: float = Field(0.0, ge=0, description="A held or delayed send older than this is dropped (0: never).")


class VariantFile(LenientModel):
    """One arm of an experiment."""

    name: str = Field(description=f"1 to {VARIANT_NAME_MAX} characters; 'holdout' is reserved.")
    weight: float = Field(1.0, description="Its share, relative to the other arms' weights.")
    action: Annotated[ActionFile | None, or_empty(lambda: None)] = Field(
        None, description="Its own message (none: the campaign's action).")

    @model_validator(mode="before")
    @classmethod
    def _positive_weight(cls, data: Any) -> Any:
        if isinstance(data, dict) and "weight" in data:
            try:
                weight = float(data["weight"])
            except (TypeError, ValueError):
                weight = -1
            if not weight > 0 and weight == weight:  # a NaN weight has always passed
                fail("weight must be positive")
        return data


class ExperimentFile(LenientModel):
    """Split the audience into arms (sticky per profile), with an optional holdout that gets nothing."""

    holdout: float = Field(0.0, ge=0, lt=1, description="The share of profiles that never receive it.")
    variants: Annotated[list[VariantFile], or_empty(lambda: [{"name": "control"}])] = Field(
        default_factory=lambda: [VariantFile.model_validate({"name": "control"})])


class CampaignFile(FileModel):
    """A campaign: a trigger, conditions, an action and limits (docs/campaigns.md)."""

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            fail("a campaign is a mapping")
        return data

    id: Annotated[str, AfterValidator(_campaign_id)] = Field(
        description="1-128 letters, digits, '-', '_' or '.'; unique among the campaigns.",
        json_schema_extra={"pattern": f"^{CAMPAIGN_ID}$"})
    name: Annotated[str | SkipJsonSchema[None], BeforeValidator(str)] = Field(
        None, description="For people (default: the id).")
    description: Any = Field(None, description="Notes for people; the gateway ignores it.")
    purpose: Annotated[str, OneOf(PURPOSES, "Input should be one of {}")] = Field(
        description="The consent it needs; a customer who did not agree to it gets nothing.")
    trigger: TriggerFile
    conditions: ConditionField | None = Field(
        None, description="all / any / not over {fact, op, value} leaves (docs/campaigns.md).")
    action: ActionFile
    limits: Annotated[LimitsFile, or_empty(dict)] = LimitsFile.model_validate({})
    priority: Whole = Field(0, description="When several campaigns could send for one event, the highest sends.")
    enabled: Any = Field(True, description="false: loaded but never sends.", json_schema_extra={"type": "boolean"})
    cancel_on: Annotated[list[Annotated[str, OneOf(TRIGGERS, "Input should be one of {}")]], or_empty(list)] = Field(
        default_factory=list, description="Event kinds that cancel a send still waiting (delay_s, quiet hours).")
    experiment: ExperimentFile | None = None
    channels: Annotated[list[Annotated[str, OneOf(CHANNELS, "Input should be one of {}")]], or_empty(list)] = Field(
        default_factory=list, description="The channels it may go out on (none: every configured channel).")


class SegmentFile(LenientModel):
    """A live group of profiles, named in conditions as ``segments`` and by the segment_entered trigger."""

    id: str = Field(description="Its name in conditions and triggers.")
    conditions: ConditionField = Field(
        description="Who is in it: all / any / not over {fact, op, value} leaves.")


CampaignsFile = CampaignFile | list[CampaignFile]
SegmentsFile = Annotated[list[SegmentFile], or_empty(list)]
