"""The comparison operators that campaign conditions and device rules share, in one place.

A comparison of values that cannot be ordered (a string with a number, None with anything) is
false, never an error: bad data makes a condition not hold, it never stops the stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda left, right: bool(left == right),
    "ne": lambda left, right: bool(left != right),
    "gt": lambda left, right: bool(left > right),
    "gte": lambda left, right: bool(left >= right),
    "lt": lambda left, right: bool(left < right),
    "lte": lambda left, right: bool(left <= right),
    "in": lambda left, right: left in right,
    "not_in": lambda left, right: left not in right,
    "contains": lambda left, right: right in left,
}


def compare(op: str, left: Any, right: Any) -> bool:
    """``left <op> right``; False when the values cannot be compared. ``op`` is one of OPERATORS."""
    try:
        return bool(OPERATORS[op](left, right))
    except TypeError:
        return False
