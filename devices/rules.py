"""Device rules: alarm conditions over telemetry, as pure functions over plain, serialisable state.

Shaped like ThingsBoard's alarm rules, and answering what their users miss: a create condition per
severity and a separate clear condition (hysteresis, so a value hovering at the threshold does not
flap), ``for_s`` durations and ``repeat`` counts, counters since the last service, rates of change,
error codes, and "clear when it has not recurred for N s". A rule's memory is a :class:`RuleState`
(plain dicts and numbers) that the caller stores, so timers and counters survive a restart; when no
reading comes, :func:`next_due` says when to call :func:`due`, and timers fire at the time they were
due, not when somebody looked.

Nothing here reads a clock, a database or the network: samples in, (state, changes) out.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Discriminator,
    Field,
    StrictBool,
    StringConstraints,
    Tag,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import JsonDict, SkipJsonSchema

from devices import files
from devices.compare import compare

SEVERITIES = ("info", "warning", "major", "critical")
RANK = {s: i for i, s in enumerate(SEVERITIES)}
OPS = ("gt", "gte", "lt", "lte", "eq", "ne", "in", "not_in")
RATE_POINTS = 8  # a rate is measured over about its window from at most this many kept samples
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")

Cond = Mapping[str, Any]
Truth = bool | None  # None: the sample says nothing about it (a metric it does not carry)


class RuleError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Sample:
    """What one message tells the rules: a reading's metrics, or an event's error code.

    ``codes`` is None when the message says nothing about error codes (a reading without an
    ``error_code`` metric), and a set (maybe empty: "no error") when it does.
    """

    time: float
    metrics: Mapping[str, float] = field(default_factory=dict)
    codes: frozenset[str] | None = None


def sample_from_metrics(time: float, metrics: Mapping[str, float], code_metric: str = "error_code") -> Sample:
    """A reading as a sample; a numeric ``error_code`` metric (0: no error) doubles as its code."""
    codes: frozenset[str] | None = None
    code = metrics.get(code_metric)
    if code is not None and math.isfinite(code):
        codes = frozenset() if code == 0 else frozenset({str(int(code)) if code == int(code) else str(code)})
    return Sample(time, metrics, codes)


@dataclass(frozen=True, slots=True)
class CounterSpec:
    """A running total since the last service: increases of a device total, or hours while a condition holds."""

    id: str
    delta_of: str | None = None
    hours_while: Cond | None = None
    max_gap_s: float = 900.0  # a longer silence is a disconnect, not usage


@dataclass(frozen=True, slots=True)
class Level:
    severity: str
    when: Cond
    for_s: float = 0.0  # the condition must hold this long...
    repeat: int = 1  # ...and for this many consecutive samples that speak to it


@dataclass(frozen=True, slots=True)
class ClearSpec:
    when: Cond | None = None  # None: when no create condition holds (unless only after_s is given)
    for_s: float = 0.0
    after_s: float = 0.0  # clear once no create condition has held for this long (0: off)
    auto: bool = True  # False: only a service event ends it


@dataclass(frozen=True, slots=True)
class Actions:
    prompt: bool = True  # an ``alarm`` event to the campaign engine for the owner (consent and caps apply)
    staff: bool = False  # a staff alert (the alarms list; retained on MQTT when configured)
    command: Mapping[str, Any] | None = None  # sent to the device when the alarm is raised
    clear_command: Mapping[str, Any] | None = None  # ...and this when it clears


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    name: str
    levels: tuple[Level, ...]  # most severe first
    clear: ClearSpec = ClearSpec()
    counters: tuple[CounterSpec, ...] = ()
    actions: Actions = Actions()
    kinds: frozenset[str] = frozenset()  # device kinds it applies to (empty: any)
    devices: frozenset[str] = frozenset()  # or these device ids
    service_resets: bool = True  # a service event resets its counters and resolves its alarm
    description: str = ""
    rate_leaves: tuple[Cond, ...] = ()  # the rates it reads, one per (metric, window): kept per sample

    def applies_to(self, device_id: str, kind: str | None) -> bool:
        if self.devices and device_id in self.devices:
            return True
        if self.kinds:
            return kind in self.kinds
        return not self.devices


@dataclass(slots=True)
class RuleState:
    """One rule's memory for one device. Plain data: ``as_dict``/``from_dict`` round-trip through JSON."""

    streak: dict[str, int] = field(default_factory=dict)  # severity -> consecutive true samples
    pending: dict[str, float] = field(default_factory=dict)  # severity -> since when it holds (the for timer)
    counters: dict[str, float] = field(default_factory=dict)
    last: dict[str, list[float]] = field(default_factory=dict)  # metric -> [time, value] (counters' deltas)
    rates: dict[str, list[list[float]]] = field(default_factory=dict)  # metric -> kept [time, value] points
    active: str | None = None  # the raised alarm's severity
    raised_at: float | None = None
    count: int = 0  # samples that met a create condition while raised
    value: float | None = None  # the last value that met a create condition
    detail: str = ""  # ...and what it was
    last_true_at: float | None = None
    clear_since: float | None = None
    service_seq: int = 0  # the last service event applied (counters reset, alarm resolved)

    def as_dict(self) -> dict[str, Any]:
        """What differs from a fresh state, over the same containers (small and cheap to store); ``copy()``
        first to keep evaluating. Equal states give equal mappings, so an unchanged state need not be written."""
        out = {}
        for name in _STATE_FIELDS:
            value = getattr(self, name)
            if value != _STATE_DEFAULTS[name]:
                out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, copy: bool = True) -> RuleState:
        """``copy=False`` adopts ``data``'s containers: evaluating in place then edits them too."""
        if not data:
            return cls()
        if not copy:
            return cls(**{k: v for k, v in data.items() if k in _STATE_FIELDS})
        return cls(**{k: _copied(v) for k, v in data.items() if k in _STATE_FIELDS})

    def copy(self) -> RuleState:
        """Cheap: containers are copied one level down; the evaluator replaces values, never mutates them."""
        return RuleState(**{name: _copied(getattr(self, name)) for name in _STATE_FIELDS})


_STATE_FIELDS = tuple(f.name for f in dataclasses.fields(RuleState))
_STATE_DEFAULTS = {name: getattr(RuleState(), name) for name in _STATE_FIELDS}


def _copied(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: list(v) if isinstance(v, list) else v for k, v in value.items()}
    return value


ChangeKind = Literal["created", "updated", "escalated", "cleared"]


@dataclass(frozen=True, slots=True)
class Change:
    kind: ChangeKind
    rule: str
    time: float
    severity: str
    value: float | None
    count: int
    detail: str


# ---------------------------------------------------------------- conditions

class _Ctx:
    """What a condition can see for one sample: metrics, codes, counters, rates, the store's clock."""

    __slots__ = ("_local", "counters", "rates", "sample", "tz")

    def __init__(self, sample: Sample, counters: Mapping[str, float], rates: Mapping[str, float | None],
                 tz: ZoneInfo) -> None:
        self.sample = sample
        self.counters = counters
        self.rates = rates
        self.tz = tz
        self._local: float | None = None

    def local_s(self) -> float:
        """Seconds since local midnight, worked out once per sample (several leaves ask)."""
        if self._local is None:
            t = dt.datetime.fromtimestamp(self.sample.time, self.tz)
            self._local = t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6
        return self._local


_HHMM: dict[str, float] = {"24:00": 86400.0}  # the few "HH:MM" of the loaded rules, parsed once: leaves ask per sample


def _hhmm(value: Any, where: str) -> float:
    known = _HHMM.get(value) if isinstance(value, str) else None
    if known is not None:
        return known
    m = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", str(value))
    if m is None:
        if str(value) == "24:00":
            return 86400.0
        raise RuleError(f"{where}: a time is 'HH:MM' (store time), got {value!r}")
    seconds = int(m.group(1)) * 3600 + int(m.group(2)) * 60.0
    if isinstance(value, str) and len(_HHMM) < 1000:
        _HHMM[value] = seconds
    return seconds


def quantity(cond: Cond, ctx: _Ctx) -> float | None:
    """The number a leaf compares (a metric, rate, counter or pace), or None if the sample lacks it."""
    if "metric" in cond:
        v = ctx.sample.metrics.get(cond["metric"])
        return None if v is None else float(v)
    if "rate" in cond:
        return ctx.rates.get(_rate_key(cond))
    if "counter" in cond:
        return ctx.counters.get(cond["counter"], 0.0)
    if "pace" in cond:
        v = ctx.sample.metrics.get(cond["pace"])
        if v is None:
            return None
        start, end = _hhmm(cond.get("from", "00:00"), "pace"), _hhmm(cond.get("to", "24:00"), "pace")
        now = ctx.local_s()
        if now <= start:
            return None  # the day has not started: nothing to be behind on
        share = min(1.0, (now - start) / (end - start))
        return float(v) / (float(cond["goal"]) * share)
    return None


def holds(cond: Cond, ctx: _Ctx) -> Truth:
    """Three-valued: True, False, or None when the sample does not speak to it."""
    if "all" in cond:
        results = [holds(c, ctx) for c in cond["all"]]
        if any(r is False for r in results):
            return False
        return None if any(r is None for r in results) else True
    if "any" in cond:
        results = [holds(c, ctx) for c in cond["any"]]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False
    if "not" in cond:
        r = holds(cond["not"], ctx)
        return None if r is None else not r
    if "code" in cond:
        codes = ctx.sample.codes
        if codes is None:
            return None
        wanted = cond["code"]
        return bool(codes) if wanted == "any" else bool(codes & set(wanted))
    if "local_time" in cond:
        spec, now = cond["local_time"], ctx.local_s()
        return _hhmm(spec.get("after", "00:00"), "") <= now < _hhmm(spec.get("before", "24:00"), "")
    v = quantity(cond, ctx)
    return None if v is None else compare(cond["op"], v, cond["value"])


def _leaves(cond: Cond) -> Iterable[Cond]:
    for key in ("all", "any"):
        if key in cond:
            for c in cond[key]:
                yield from _leaves(c)
            return
    if "not" in cond:
        yield from _leaves(cond["not"])
        return
    yield cond


def _rate_key(cond: Cond) -> str:
    key = cond.get("key")  # set when parsed
    return key if isinstance(key, str) else f"{cond['rate']}/{float(cond.get('window_s', 3600)):g}"


def describe(cond: Cond, ctx: _Ctx) -> str:
    """The leaves that hold, with their values: what a staff alert says."""
    parts = []
    for leaf in _leaves(cond):
        if holds(leaf, ctx) is not True:
            continue
        if "code" in leaf:
            parts.append(f"error code {', '.join(sorted(ctx.sample.codes or ()))}")
        elif "local_time" in leaf:
            continue
        else:
            name = next(k for k in ("metric", "rate", "counter", "pace") if k in leaf)
            v = quantity(leaf, ctx)
            unit = "/h" if name == "rate" else ""
            label = f"{leaf[name]} {name}" if name in ("rate", "pace") else str(leaf[name])
            parts.append(f"{label} {v:.4g}{unit} {leaf['op']} {leaf['value']}")
    return "; ".join(parts)


# ---------------------------------------------------------------- evaluation

def _rates_now(rule_rates: Sequence[Cond], st: RuleState, sample: Sample) -> dict[str, float | None]:
    """Change per hour of each rated metric over about its window, before this sample is kept."""
    out: dict[str, float | None] = {}
    for leaf in rule_rates:
        metric, window = leaf["rate"], float(leaf.get("window_s", 3600))
        key = _rate_key(leaf)
        v = sample.metrics.get(metric)
        points = st.rates.get(key) or []
        if v is None or not points:
            out[key] = None
            continue
        t0, v0 = points[0]
        span = sample.time - t0
        out[key] = (float(v) - v0) / span * 3600.0 if span >= window / 2 and span > 0 else None
    return out


def _keep_rate_points(rule_rates: Sequence[Cond], st: RuleState, sample: Sample) -> None:
    for leaf in rule_rates:
        v = sample.metrics.get(leaf["rate"])
        if v is None:
            continue
        window = float(leaf.get("window_s", 3600))
        key = _rate_key(leaf)
        points = [list(p) for p in st.rates.get(key) or []]
        if not points or sample.time - points[-1][0] >= window / RATE_POINTS:
            points.append([sample.time, float(v)])
        while len(points) > 1 and sample.time - points[1][0] >= window:
            points.pop(0)  # the anchor is the youngest point at least a window old
        st.rates[key] = points


def _count(rule: Rule, st: RuleState, sample: Sample, ctx: _Ctx) -> None:
    for c in rule.counters:
        if c.delta_of is not None:
            v = sample.metrics.get(c.delta_of)
            if v is None:
                continue
            prev = st.last.get(c.delta_of)
            if prev is not None and v > prev[-1]:
                st.counters[c.id] = st.counters.get(c.id, 0.0) + (float(v) - prev[-1])
            st.counters.setdefault(c.id, 0.0)  # a total going down is a reset device, not negative usage
            if prev is None or prev[-1] != v:  # only the value: a device that stands still changes nothing
                st.last[c.delta_of] = [float(v)]
        elif c.hours_while is not None:
            prev_t = st.last.get(f"@{c.id}")
            on = holds(c.hours_while, ctx)
            if on is None:
                continue
            if on and prev_t is not None and 0 < sample.time - prev_t[0] <= c.max_gap_s:
                st.counters[c.id] = st.counters.get(c.id, 0.0) + (sample.time - prev_t[0]) / 3600.0
            st.counters.setdefault(c.id, 0.0)
            st.last[f"@{c.id}"] = [sample.time, 1.0 if on else 0.0]


def _clear(rule: Rule, st: RuleState, at: float, detail: str) -> Change:
    ch = Change("cleared", rule.id, at, st.active or rule.levels[-1].severity, st.value, st.count, detail)
    _no_alarm(st)
    return ch


def _no_alarm(st: RuleState) -> None:
    """The alarm is over (cleared, or resolved by a service): its count, clear timer, streaks and pending go too."""
    st.active = None
    st.raised_at = None
    st.count = 0
    st.clear_since = None
    st.streak.clear()
    st.pending.clear()


def _raise(rule: Rule, st: RuleState, level: Level, at: float, value: float | None, detail: str) -> Change:
    escalating = st.active is not None
    st.active = level.severity
    st.count = st.count + 1 if escalating else 1
    st.value = value
    st.clear_since = None
    if not escalating:
        st.raised_at = at
    return Change("escalated" if escalating else "created", rule.id, at, level.severity, value, st.count, detail)


def _due_changes(rule: Rule, st: RuleState, until: float, before: bool = False) -> list[Change]:
    """Timers due by ``until`` (strictly before it, if ``before``), fired at the moment each came due."""
    out: list[Change] = []
    while True:
        when = next_due(rule, st)
        if when is None or when > until or (before and when == until):
            return out
        level = _due_level(rule, st, when)
        if level is not None:
            out.append(_raise(rule, st, level, when, st.value, f"{st.detail} for {level.for_s:g} s".strip()))
            st.pending.pop(level.severity, None)
            st.streak.pop(level.severity, None)
        elif st.active is not None and rule.clear.after_s and st.last_true_at is not None \
                and st.last_true_at + rule.clear.after_s <= when:
            out.append(_clear(rule, st, when, f"did not recur for {rule.clear.after_s:g} s"))
        elif st.active is not None and st.clear_since is not None and st.clear_since + rule.clear.for_s <= when:
            out.append(_clear(rule, st, when, f"clear condition held for {rule.clear.for_s:g} s"))
        else:  # nothing is due after all; do not loop
            return out


def _due_level(rule: Rule, st: RuleState, when: float) -> Level | None:
    active = RANK[st.active] if st.active is not None else -1
    for level in rule.levels:  # most severe first
        since = st.pending.get(level.severity)
        if (since is not None and level.for_s > 0 and since + level.for_s <= when
                and st.streak.get(level.severity, 0) >= level.repeat and RANK[level.severity] > active):
            return level
    return None


def next_due(rule: Rule, st: RuleState) -> float | None:
    """When a timer of this state fires if no sample comes first (None: nothing pending)."""
    if st.active is None and not st.pending:  # the usual case, asked before and after every sample
        return None
    times: list[float] = []
    active = RANK[st.active] if st.active is not None else -1
    for level in rule.levels:
        since = st.pending.get(level.severity)
        if since is not None and level.for_s > 0 and RANK[level.severity] > active \
                and st.streak.get(level.severity, 0) >= level.repeat:
            times.append(since + level.for_s)
    if st.active is not None and rule.clear.auto:
        if rule.clear.after_s and st.last_true_at is not None:
            times.append(st.last_true_at + rule.clear.after_s)
        if st.clear_since is not None and rule.clear.for_s > 0:
            times.append(st.clear_since + rule.clear.for_s)
    return min(times) if times else None


def due(rule: Rule, state: RuleState, now: float) -> tuple[RuleState, list[Change]]:
    """Fire what is due at ``now`` without a new sample (the pipeline's tick, and after a restart)."""
    st = state.copy()
    return st, _due_changes(rule, st, now)


def observe(rule: Rule, state: RuleState, sample: Sample, tz: ZoneInfo) -> tuple[RuleState, list[Change]]:
    """One sample through one rule: the new state and what happened to the alarm."""
    st = state.copy()
    return st, observe_into(rule, st, sample, tz)


def observe_into(rule: Rule, st: RuleState, sample: Sample, tz: ZoneInfo) -> list[Change]:
    """:func:`observe` updating ``st`` in place: for a caller that owns the state (one batch's copy)."""
    changes = _due_changes(rule, st, sample.time, before=True)  # timers that came due before this sample
    rates = _rates_now(rule.rate_leaves, st, sample)
    ctx = _Ctx(sample, st.counters, rates, tz)
    _count(rule, st, sample, ctx)
    _keep_rate_points(rule.rate_leaves, st, sample)

    qualified: Level | None = None
    first: Level | None = None  # the most severe level that holds
    value: float | None = None
    any_true = False
    all_known = True
    for level in rule.levels:  # most severe first
        truth = holds(level.when, ctx)
        if truth is None:
            all_known = False
            continue
        if not truth:
            st.streak.pop(level.severity, None)
            st.pending.pop(level.severity, None)
            continue
        any_true = True
        st.streak[level.severity] = st.streak.get(level.severity, 0) + 1
        since = st.pending.setdefault(level.severity, sample.time)
        if qualified is None and st.streak[level.severity] >= level.repeat and sample.time - since >= level.for_s:
            qualified = level
        if first is None:
            first = level
            value = next((q for q in (quantity(leaf, ctx) for leaf in _leaves(level.when)) if q is not None), None)
    detail = ""
    if first is not None:
        st.last_true_at = sample.time
        st.value = value
        st.detail = detail = describe(first.when, ctx)

    if st.active is None:
        if qualified is not None:
            why = detail if qualified is first else describe(qualified.when, ctx)
            changes.append(_raise(rule, st, qualified, sample.time, value, why))
            st.pending.pop(qualified.severity, None)
        return changes

    if qualified is not None and RANK[qualified.severity] > RANK[st.active]:
        why = detail if qualified is first else describe(qualified.when, ctx)
        changes.append(_raise(rule, st, qualified, sample.time, value, why))
        st.pending.pop(qualified.severity, None)
        return changes
    if any_true:
        st.count += 1
        st.value = value
        changes.append(Change("updated", rule.id, sample.time, st.active, value, st.count, detail))
    if not rule.clear.auto:
        return changes
    clear = rule.clear
    if clear.when is not None:
        truth = holds(clear.when, ctx)
    elif clear.after_s:
        truth = None  # only the silence timer clears it
    else:
        truth = (not any_true) if all_known else None
    if truth is True:
        since = st.clear_since if st.clear_since is not None else sample.time
        st.clear_since = since
        if sample.time - since >= clear.for_s:
            reason = "clear condition held" if clear.when is not None else "condition no longer holds"
            changes.append(_clear(rule, st, sample.time, reason))
    elif truth is False:
        st.clear_since = None
    return changes


def reset_for_service(rule: Rule, state: RuleState, seq: int) -> RuleState:
    """A service event: counters back to zero, the alarm resolved (by the service, not by clearing)."""
    st = state.copy()
    st.service_seq = max(st.service_seq, seq)
    if not rule.service_resets:
        return st
    st.counters = {k: 0.0 for k in st.counters}
    _no_alarm(st)
    return st


def wall_stepped(state: RuleState, after: float, upto: float, by: float) -> RuleState:
    """The state with every time in (``after``, ``upto``] moved by ``by``: the wall clock stepped by that
    much after them, and a condition that held for 30 s before the step has held for 30 s, not an hour
    more (a ``for`` timer would fire at once, a "did not recur" clear too, a rate would flatten) nor an
    hour less (after a step back, the timer would fire an hour late)."""
    def on(t: float) -> float:
        return t + by if after < t <= upto else t

    def opt(t: float | None) -> float | None:
        return None if t is None else on(t)

    st = state.copy()
    st.pending = {k: on(t) for k, t in st.pending.items()}
    st.last = {k: [on(p[0]), *p[1:]] for k, p in st.last.items()}
    st.rates = {k: [[on(p[0]), *p[1:]] for p in points] for k, points in st.rates.items()}
    st.raised_at, st.last_true_at, st.clear_since = opt(st.raised_at), opt(st.last_true_at), opt(st.clear_since)
    return st


# ---------------------------------------------------------------- parsing: the file format

def _hhmm_text(value: str) -> str:
    _hhmm(value, "")
    return value


def _hhmm_checked(value: str) -> str:
    try:
        return _hhmm_text(value)
    except RuleError as exc:
        files.fail(str(exc).removeprefix(": "))


HHMM = Annotated[str, AfterValidator(_hhmm_checked),
                 WithJsonSchema({"type": "string", "pattern": r"^(([01]?\d|2[0-3]):[0-5]\d|24:00)$",
                                 "description": "'HH:MM', store time."})]
Name = Annotated[str, StringConstraints(min_length=1)]
Op = Annotated[str, files.OneOf(OPS, "'op' must be one of {}")]
_NUMBERS: JsonDict = {"anyOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}}],
                      "description": "A number; a list of numbers for in / not_in."}


def _value_for_op(value: Any, info: ValidationInfo) -> Any:
    if info.data.get("op") in ("in", "not_in"):
        if not isinstance(value, list) or not all(isinstance(v, int | float) for v in value):
            files.fail(f"'{info.data['op']}' needs a list of numbers")
        return [float(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        files.fail(f"a number, got {value!r}")
    return float(value)


Compared = Annotated[Any, AfterValidator(_value_for_op), WithJsonSchema(_NUMBERS)]


class _Comparison(files.FileModel):
    """What every comparing leaf ends with: ``op`` and the ``value`` it compares against (checked after op)."""

    op: Op
    value: Compared


class MetricLeaf(_Comparison):
    """Compares a metric of the reading."""

    metric: Name = Field(description="The metric's name, as the device reports it.")


class RateLeaf(_Comparison):
    """Compares a metric's change per hour, measured over about ``window_s``."""

    rate: Name = Field(description="The metric whose rate of change is compared (per hour).")
    window_s: Annotated[float, files.AtLeast(1)] = Field(3600.0, description="Measured over about this long.")


class CounterLeaf(_Comparison):
    """Compares a counter declared under ``counters``."""

    counter: Name = Field(description="A counter's id, declared under counters.")


class PaceLeaf(_Comparison):
    """Compares a daily total with where it should be by now: total / (goal x share of the day gone)."""

    pace: Name = Field(description="The metric holding the day's total so far (steps...).")
    goal: Annotated[float, files.AtLeast(1e-9)] = Field(description="The day's goal.")
    from_: HHMM = Field("00:00", alias="from", description="When the day starts ('HH:MM', store time).")
    to: HHMM = Field("24:00", description="When the goal is due ('HH:MM', store time).")

    @model_validator(mode="after")
    def _ordered(self) -> PaceLeaf:
        if _hhmm(self.to, "to") <= _hhmm(self.from_, "from"):
            files.fail("'to' must be after 'from'")
        return self


def _codes(value: Any) -> Any:
    if value == "any":
        return value
    codes = [value] if isinstance(value, str | int) and not isinstance(value, bool) else value
    if not isinstance(codes, list) or not codes or not all(isinstance(c, str | int) for c in codes):
        files.fail("'code' takes a code, a list of codes or 'any'")
    return frozenset(str(c) for c in codes)


class CodeLeaf(files.FileModel):
    """Holds when the device reports an error code (these, or 'any')."""

    code: Annotated[Any, BeforeValidator(_codes), WithJsonSchema({
        "anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "array", "items": {"type": ["string", "integer"]},
                                                            "minItems": 1}],
        "description": "A code, a list of codes, or 'any'."})]


class LocalTimeSpec(files.FileModel):
    """A time-of-day window, store time."""

    after: HHMM = Field("00:00", description="From this time ('HH:MM').")
    before: HHMM = Field("24:00", description="Until this time ('HH:MM').")

    @model_validator(mode="before")
    @classmethod
    def _not_empty(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data:
            files.fail("'local_time' takes after and/or before ('HH:MM', store time)")
        return data


class LocalTimeLeaf(files.FileModel):
    """Holds inside a time-of-day window."""

    local_time: LocalTimeSpec


_CONDITIONS = files.non_empty("a non-empty list of conditions")


class AllOf(files.FileModel):
    """Holds when every condition holds (and says nothing while one says nothing)."""

    all: Annotated[list[RuleCondition], _CONDITIONS, Field(json_schema_extra={"minItems": 1})]


class AnyOf(files.FileModel):
    """Holds when one condition holds."""

    any: Annotated[list[RuleCondition], _CONDITIONS, Field(json_schema_extra={"minItems": 1})]


class NotOf(files.FileModel):
    """Holds when the condition does not."""

    not_: RuleCondition = Field(alias="not")


_LEAVES = ("metric", "rate", "counter", "pace")
_GROUPS = ("all", "any", "not", "code", "local_time")
CONDITION_TAGS = tuple(f"<{k}>" for k in (*_GROUPS, *_LEAVES, "never", "clear"))
"""The unions' tags (conditions', and clear's), which pydantic puts in an error's path; messages leave them out."""


def _kind(value: Any) -> str | None:
    if not isinstance(value, Mapping):
        return None
    for key in _GROUPS:
        if key in value:
            return f"<{key}>"
    kinds = [k for k in _LEAVES if k in value]
    return f"<{kinds[0]}>" if len(kinds) == 1 else None


RuleCondition = Annotated[
    Annotated[AllOf, Tag("<all>")] | Annotated[AnyOf, Tag("<any>")] | Annotated[NotOf, Tag("<not>")]
    | Annotated[CodeLeaf, Tag("<code>")] | Annotated[LocalTimeLeaf, Tag("<local_time>")]
    | Annotated[MetricLeaf, Tag("<metric>")] | Annotated[RateLeaf, Tag("<rate>")]
    | Annotated[CounterLeaf, Tag("<counter>")] | Annotated[PaceLeaf, Tag("<pace>")],
    Discriminator(_kind, custom_error_type="condition", custom_error_message=(
        "a condition is a mapping: all, any, not, or a leaf that names one of metric, rate, counter, pace, "
        "code or local_time"))]
Leaf = MetricLeaf | RateLeaf | CounterLeaf | PaceLeaf


class CounterFile(files.FileModel):
    """A running total since the last service: increases of a device total, or hours while a condition holds."""

    id: Annotated[str, AfterValidator(lambda v: _rule_id(v, "a counter needs an 'id' of 1-64 letters, digits, "
                                                            "'-', '_' or '.'"))]
    delta_of: Annotated[Name | None, AfterValidator(files.not_null), files.Given] = Field(
        None, description="A device total (odometer...): the counter adds its increases.")
    hours_while: Annotated[RuleCondition | None, AfterValidator(files.not_null), files.Given] = Field(
        None, description="The counter adds the hours while this condition holds.")
    max_gap_s: Annotated[float, files.AtLeast(1)] = Field(
        900.0, description="A longer silence is a disconnect, not usage.")

    @model_validator(mode="after")
    def _one_source(self) -> CounterFile:
        if ("delta_of" in self.model_fields_set) == ("hours_while" in self.model_fields_set):
            files.fail("give exactly one of delta_of (a device total) or hours_while (a condition)")
        return self


def _repeat(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        files.fail("repeat is a whole number of samples, at least 1")
    return value


class LevelFile(files.FileModel):
    """A create condition for one severity."""

    severity: Annotated[str, files.OneOf(SEVERITIES, "severity is one of {}")] = "warning"
    when: RuleCondition
    for_s: Annotated[float, files.AtLeast(0)] = Field(0.0, description="The condition must hold this long...")
    repeat: Annotated[int, BeforeValidator(_repeat)] = Field(
        1, description="...and for this many consecutive samples that speak to it.")


class ClearFile(files.FileModel):
    """When a raised alarm clears (default: when no create condition holds)."""

    when: Annotated[RuleCondition | None, AfterValidator(files.not_null), files.Given] = Field(
        None, description="Clears when this holds (hysteresis: a level apart from the create one).")
    for_s: Annotated[float, files.AtLeast(0)] = Field(0.0, description="...for this long.")
    after_s: Annotated[float, files.AtLeast(0)] = Field(
        0.0, description="Clears once no create condition has held for this long (0: off).")


def _clear_kind(value: Any) -> str | None:
    return "<never>" if value == "never" else "<clear>" if isinstance(value, Mapping) else None


ClearField = Annotated[Annotated[Literal["never"], Tag("<never>")] | Annotated[ClearFile, Tag("<clear>")],
                       Discriminator(_clear_kind, custom_error_type="clear", custom_error_message=(
                           "'clear' takes when, for_s and after_s (or is 'never': only a service ends it)"))]


def _command(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        files.fail("a command is a non-empty mapping (sent as JSON to the device)")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:  # YAML 1.1 reads a bare on/off/yes/no key as a boolean
        files.fail(f"command keys are text; quote {', '.join(repr(k) for k in bad)}")
    return dict(value)


Command = Annotated[dict[str, Any] | None, BeforeValidator(_command)]


class ActionsFile(files.FileModel):
    """What happens when the alarm is raised."""

    prompt: StrictBool = Field(True, description="An alarm event to the campaign engine for the owner.")
    staff: StrictBool = Field(False, description="A staff alert (the alarms list).")
    command: Command = Field(None, description="Sent to the device when the alarm is raised.")
    clear_command: Command = Field(None, description="Sent to the device when it clears.")


def _names(value: Any) -> Any:
    return [value] if isinstance(value, str) else (value or [])


class MatchFile(files.FileModel):
    """The devices a rule applies to (none given: every device)."""

    kind: Annotated[list[Name], BeforeValidator(_names, json_schema_input_type=Name | list[Name])] = Field(
        default_factory=list, description="A device kind or a list of them.")
    devices: Annotated[list[Name], BeforeValidator(_names, json_schema_input_type=Name | list[Name])] = Field(
        default_factory=list, description="Device ids (or add to the kinds).")


def _rule_id(value: str, text: str = "'id' must be 1-64 letters, digits, '-', '_' or '.'") -> str:
    if not _ID.fullmatch(value):
        files.fail(text)
    return value


def _levels(value: Any) -> Any:
    value = [value] if isinstance(value, Mapping) else value
    if not isinstance(value, list) or not value:
        files.fail("'create' is a condition level (or a list of them, one per severity)")
    return value


class RuleFile(files.FileModel):
    """A device rule: when to raise an alarm, when it clears, what it does (docs/device-rules.md)."""

    id: Annotated[str, AfterValidator(_rule_id)] = Field(
        description="1-64 letters, digits, '-', '_' or '.'; unique among the rules.",
        json_schema_extra={"pattern": "^[A-Za-z0-9_.-]{1,64}$"})
    name: Annotated[str | SkipJsonSchema[None], BeforeValidator(str)] = Field(
        None, description="For people (default: the id).")
    description: Annotated[str, BeforeValidator(str)] = Field("", description="For people; shown with the alarm.")
    match: Annotated[MatchFile, files.or_empty(dict)] = Field(default_factory=lambda: MatchFile.model_validate({}))
    counters: Annotated[list[CounterFile], files.or_empty(list)] = Field(default_factory=list)
    create: Annotated[list[LevelFile], BeforeValidator(_levels, json_schema_input_type=LevelFile | list[LevelFile])
                      ] = Field(description="A condition level, or a list of them (one per severity).")
    clear: ClearField = Field(default_factory=lambda: ClearFile.model_validate({}))
    actions: Annotated[ActionsFile, files.or_empty(dict)] = Field(
        default_factory=lambda: ActionsFile.model_validate({}))
    service_resets: StrictBool = Field(True, description="A service event resets its counters and resolves "
                                                         "its alarm.")

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            files.fail("a rule is a mapping")
        return data if "create" in data else {**data, "create": None}  # refused by _levels, with its message


RulesFile = RuleFile | list[RuleFile]


# ---------------------------------------------------------------- parsing: to the evaluator's types

def _cond(c: Any, loc: files.Loc, counters: set[str]) -> Cond:
    """The plain condition the evaluator reads, from a validated one."""
    if isinstance(c, AllOf | AnyOf):
        key = "all" if isinstance(c, AllOf) else "any"
        return {key: [_cond(sub, (*loc, key, i), counters) for i, sub in enumerate(getattr(c, key))]}
    if isinstance(c, NotOf):
        return {"not": _cond(c.not_, (*loc, "not"), counters)}
    if isinstance(c, CodeLeaf):
        return {"code": c.code}
    if isinstance(c, LocalTimeLeaf):
        return {"local_time": {k: getattr(c.local_time, k) for k in c.local_time.model_fields_set}}
    if isinstance(c, CounterLeaf) and c.counter not in counters:
        raise files.Invalid(files.Problem((*loc, "counter"),
                                          f"counter {c.counter!r} is not declared under 'counters'"))
    kind = next(k for k in _LEAVES if k in type(c).model_fields)
    out: dict[str, Any] = {kind: getattr(c, kind), "op": c.op, "value": c.value}
    if isinstance(c, RateLeaf):
        out["window_s"] = c.window_s
        out["key"] = _rate_key(out)
    if isinstance(c, PaceLeaf):
        out["goal"], out["from"], out["to"] = c.goal, c.from_, c.to
    return out


def _rule(f: RuleFile) -> Rule:
    declared: set[str] = set()
    counters = []
    for i, c in enumerate(f.counters):
        if c.id in declared:
            raise files.Invalid(files.Problem(("counters", i, "id"), f"counter {c.id!r} is declared twice"))
        declared.add(c.id)
        hours = None if c.hours_while is None else _cond(c.hours_while, ("counters", i, "hours_while"), set())
        counters.append(CounterSpec(c.id, delta_of=c.delta_of, hours_while=hours, max_gap_s=c.max_gap_s))
    levels = [Level(lv.severity, _cond(lv.when, ("create", i, "when"), declared), lv.for_s, lv.repeat)
              for i, lv in enumerate(f.create or ())]
    if len({lv.severity for lv in levels}) != len(levels):
        raise files.Invalid(files.Problem(("create",), "one create level per severity"))
    levels.sort(key=lambda lv: -RANK[lv.severity])
    if isinstance(f.clear, ClearFile):
        when = None if f.clear.when is None else _cond(f.clear.when, ("clear", "when"), declared)
        clear = ClearSpec(when=when, for_s=f.clear.for_s, after_s=f.clear.after_s)
    else:
        clear = ClearSpec(auto=False)
    actions = Actions(prompt=f.actions.prompt, staff=f.actions.staff, command=f.actions.command,
                      clear_command=f.actions.clear_command)
    rates: dict[str, Cond] = {}
    for cond in [lv.when for lv in levels] + ([clear.when] if clear.when else []):
        for leaf in _leaves(cond):
            if "rate" in leaf:
                rates.setdefault(_rate_key(leaf), leaf)
    return Rule(id=f.id, name=f.id if f.name is None else f.name, levels=tuple(levels), clear=clear,
                counters=tuple(counters), actions=actions, kinds=frozenset(f.match.kind),
                devices=frozenset(f.match.devices), service_resets=f.service_resets, description=f.description,
                rate_leaves=tuple(rates.values()))


def parse_rule(data: Any, source: str = "rule", doc: files.Document | None = None, at: files.Loc = ()) -> Rule:
    """A rule from its definition; RuleError names each bad field (and its line, from a file)."""
    return files.build(lambda d: _rule(RuleFile.model_validate(d)), data, RuleError, source, model=RuleFile,
                       doc=doc, at=at, hidden=CONDITION_TAGS)


def load_rules(directory: str | Path) -> list[Rule]:
    """Every ``*.yaml``/``*.yml`` in the directory: one rule or a list of rules per file."""
    d = Path(directory)
    if not d.is_dir():
        raise RuleError(f"device rules directory not found: {d}")
    rules: list[Rule] = []
    for path in sorted(d.iterdir()):
        if path.suffix not in (".yaml", ".yml"):
            continue
        try:
            doc = files.read(path)
        except files.FileError as exc:
            raise RuleError(str(exc)) from None
        if isinstance(doc.data, list):
            rules += [parse_rule(item, doc.source, doc, (i,)) for i, item in enumerate(doc.data)]
        else:
            rules.append(parse_rule(doc.data, doc.source, doc))
    if (twice := files.repeated(r.id for r in rules)) is not None:
        raise RuleError(f"device rule id {twice!r} is defined twice in {d}")
    return rules
