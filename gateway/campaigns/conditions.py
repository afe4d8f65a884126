"""Conditions parsed once, at load, into a small tree: each node checks itself and knows what it reads.

The file format is data (``all``/``any``/``not`` over ``{fact, op, value}`` leaves, or
``value_fact`` to compare two facts); :func:`parse_condition` refuses anything it would misread and
builds the tree. ``check(facts)`` is None when the condition holds, else a short description of
the first failing leaf (a decision's detail). ``reads`` names the facts it looks at, so the engine
fetches cart or behaviour facts only for the campaigns that use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from devices.compare import OPERATORS, compare

OPS = (*OPERATORS, "exists")
MISSING: Any = object()
"""A fact path that leads nowhere (unlike a fact that is there and None)."""

_GROUPS = ("all", "any", "not")
_LEAF_KEYS = frozenset({"fact", "op", "value", "value_fact"})


class ConditionError(ValueError):
    """A condition that would be misread; the message says where (``file: conditions.all[1]: ...``)."""


def split(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def get(facts: Mapping[str, Any], parts: tuple[str, ...]) -> Any:
    """The fact at a split dotted path, or MISSING; plain dicts (nearly every fact) skip the Mapping check."""
    cur: Any = facts
    for part in parts:
        if type(cur) is dict:
            if part not in cur:
                return MISSING
            cur = cur[part]
        elif isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        else:
            return MISSING
    return cur


class Condition:
    """A node of a parsed condition."""

    __slots__ = ("reads", "source", "text")
    reads: frozenset[str]
    """The dotted fact paths this condition looks at."""
    source: Mapping[str, Any]
    """The condition as written (what the API shows and explanations quote)."""
    text: str
    """One line, for a decision's detail."""

    def check(self, facts: Mapping[str, Any]) -> str | None:
        raise NotImplementedError

    def reads_from(self, *roots: str) -> bool:
        """Whether it reads any fact under these roots (``cart`` covers ``cart.items``...)."""
        return any(p == r or p.startswith(r + ".") for p in self.reads for r in roots)


class All(Condition):
    __slots__ = ("parts",)

    def __init__(self, parts: tuple[Condition, ...], source: Mapping[str, Any]) -> None:
        self.parts, self.source = parts, source
        self.reads = frozenset().union(*(p.reads for p in parts))
        self.text = "all(" + "; ".join(p.text for p in parts) + ")"

    def check(self, facts: Mapping[str, Any]) -> str | None:
        for part in self.parts:
            failed = part.check(facts)
            if failed is not None:
                return failed
        return None


class Any_(Condition):
    __slots__ = ("parts",)

    def __init__(self, parts: tuple[Condition, ...], source: Mapping[str, Any]) -> None:
        self.parts, self.source = parts, source
        self.reads = frozenset().union(*(p.reads for p in parts))
        self.text = "any(" + "; ".join(p.text for p in parts) + ")"

    def check(self, facts: Mapping[str, Any]) -> str | None:
        fails = [part.check(facts) for part in self.parts]
        return None if any(f is None for f in fails) else "any(" + "; ".join(str(f) for f in fails) + ")"


class Not(Condition):
    __slots__ = ("held", "inner")

    def __init__(self, inner: Condition, source: Mapping[str, Any]) -> None:
        self.inner, self.source, self.reads = inner, source, inner.reads
        self.text = f"not({inner.text})"
        self.held = f"{self.text} (it held)"

    def check(self, facts: Mapping[str, Any]) -> str | None:
        return self.held if self.inner.check(facts) is None else None


class Leaf(Condition):
    """``fact op value``, or ``fact op value_fact`` (two facts compared, e.g. cart.zones contains event.zone)."""

    __slots__ = ("fact", "op", "other", "other_missing", "parts", "value")

    def __init__(self, fact: str, op: str, value: Any, value_fact: str | None, source: Mapping[str, Any]) -> None:
        self.fact, self.op, self.value, self.source = fact, op, value, source
        self.parts = split(fact)
        self.other = split(value_fact) if value_fact is not None else None
        self.other_missing = f"{value_fact} is missing"
        self.reads = frozenset({fact} if value_fact is None else {fact, value_fact})
        self.text = f"{fact} {op} {value_fact if value_fact is not None else repr(value)}"

    def check(self, facts: Mapping[str, Any]) -> str | None:
        right = self.value
        if self.other is not None:
            right = get(facts, self.other)
            if right is MISSING:
                return self.other_missing
        left = get(facts, self.parts)
        if self.op == "exists":
            if (left is not MISSING and left is not None) == bool(right):
                return None
        elif left is not MISSING and compare(self.op, left, right):
            return None
        shown = "missing" if left is MISSING else repr(left)
        return f"{self.fact} {self.op} {right!r} (was {shown})"


def parse_condition(cond: Any, where: str = "conditions") -> Condition:
    """The tree of a condition as written, or ConditionError naming where it is wrong."""
    if not isinstance(cond, Mapping):
        raise ConditionError(f"{where}: a condition is a mapping")
    # A second group or a stray key would be silently ignored (a typo like 'vaule' compares with None).
    if any(k in cond for k in _GROUPS) and len(cond) != 1:
        raise ConditionError(f"{where}: a condition is one of all / any / not, or a leaf {{fact, op, value}}; "
                             f"found {', '.join(sorted(map(str, cond)))}")
    if not any(k in cond for k in _GROUPS) and set(cond) - _LEAF_KEYS:
        raise ConditionError(f"{where}: unknown condition field(s) "
                             f"{', '.join(sorted(map(str, set(cond) - _LEAF_KEYS)))} "
                             "(a leaf has fact, op, value or value_fact)")
    if "all" in cond or "any" in cond:
        key = "all" if "all" in cond else "any"
        subs = cond[key]
        if not isinstance(subs, list) or not subs:
            raise ConditionError(f"{where}.{key}: a non-empty list of conditions")
        parts = tuple(parse_condition(sub, f"{where}.{key}[{i}]") for i, sub in enumerate(subs))
        return All(parts, cond) if key == "all" else Any_(parts, cond)
    if "not" in cond:
        return Not(parse_condition(cond["not"], f"{where}.not"), cond)
    fact = cond.get("fact")
    if not isinstance(fact, str) or not fact:
        raise ConditionError(f"{where}: needs a 'fact' (a dotted path like profile.attributes.tier)")
    op = cond.get("op")
    if op not in OPS:
        raise ConditionError(f"{where}: 'op' must be one of {', '.join(OPS)}")
    value_fact = cond.get("value_fact")
    if "value_fact" in cond and not isinstance(value_fact, str):
        raise ConditionError(f"{where}: 'value_fact' is a dotted path")
    if op in ("in", "not_in") and value_fact is None and not isinstance(cond.get("value"), list):
        raise ConditionError(f"{where}: '{op}' needs a list value")
    return Leaf(fact, op, cond.get("value"), value_fact, cond)
