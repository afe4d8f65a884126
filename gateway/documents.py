"""What a JSON document or a string from outside must be for the gateway to store it and serve it again.

PostgreSQL's text and JSONB refuse NUL (``\\u0000``), UTF-8 cannot encode a lone surrogate (``\\ud800``),
pydantic stops serialising at 255 levels and Python's JSON tools near the recursion limit: a document
that breaks any of these is refused at the door (``check_document``, ``text_problem``) rather than
committed and then unreadable. Rows stored before these checks are guarded when read (``servable``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("gateway.documents")

DEPTH_MAX = 32
"""Objects and arrays nested in a stored document, at most (profile attributes, campaigns, facts)."""
ITEMS_MAX = 10_000
"""Keys and array elements in one stored document, all levels together, at most."""
SERVE_DEPTH_MAX = 200
"""Past this a stored document is not served (pydantic refuses 255 levels; the page around it needs some)."""
UNAVAILABLE = "_unavailable"
"""The key of the marker shown in place of a stored document that cannot be served."""
_LOGGED_MAX = 10_000  # rows named in the log so far, remembered so each is logged once


class DocumentError(ValueError):
    """A document or a string the gateway will not store; the message says what and where."""


def text_problem(text: str) -> str | None:
    """Why the databases cannot hold this string, or None when they can."""
    if "\x00" in text:
        return "contains NUL (\\u0000), which the database cannot store"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone surrogate (such as \\ud800), which UTF-8 cannot encode"
    return None


def _where(path: tuple[str | int, ...]) -> str:
    """A path in a document as people write it (``offer.codes[2]``), cut short when it is long."""
    shown = "".join(f"[{p}]" if isinstance(p, int) else f".{p[:40]}" for p in path[:6]).lstrip(".")
    return (shown + "..." if len(path) > 6 else shown) or "the top level"


def _children(value: Any, path: tuple[str | int, ...]) -> Iterator[tuple[str | None, Any, tuple[str | int, ...]]]:
    """(key, child, child's path) of an object or an array; the key is None for array elements."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, v, (*path, k)
    else:
        for i, v in enumerate(value):
            yield None, v, (*path, i)


def check_document(doc: Any, depth_max: int = DEPTH_MAX, items_max: int = ITEMS_MAX) -> None:
    """Raise DocumentError naming the first reason not to store ``doc``: nested deeper than ``depth_max``
    objects and arrays, more than ``items_max`` keys and elements, a key or a string the databases cannot
    hold, or a number that is not finite (no JSON reader takes NaN or Infinity)."""
    items = 0
    stack: list[tuple[Any, int, tuple[str | int, ...]]] = [(doc, 1, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            problem = text_problem(value)
            if problem:
                raise DocumentError(f"the value at {_where(path)} {problem}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise DocumentError(f"the number at {_where(path)} is not finite (no NaN or Infinity)")
        elif isinstance(value, (dict, list, tuple)):
            if depth > depth_max:
                raise DocumentError(f"nested deeper than {depth_max} levels of objects and arrays "
                                    f"(at {_where(path)})")
            items += len(value)
            if items > items_max:
                raise DocumentError(f"more than {items_max} keys and array elements in all")
            for key, child, where in _children(value, path):
                if key is not None:  # named by where it is, never echoed: the answer must stay encodable
                    problem = text_problem(key) if isinstance(key, str) else "is not text"
                    if problem:
                        raise DocumentError(f"a key in {_where(path)} {problem}")
                stack.append((child, depth + 1, where))


def _unservable(doc: Any) -> str | None:
    """Why a stored document cannot be sent back (too deep for the serialisers, or text UTF-8 cannot
    encode), or None. Cheaper than ``check_document``: no paths, no counts."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and text_problem(value):
                return "it holds text that UTF-8 cannot encode"
        elif isinstance(value, dict):
            if depth > SERVE_DEPTH_MAX:
                return f"it is nested deeper than {SERVE_DEPTH_MAX} levels"
            for k, v in value.items():
                stack.append((k, depth))
                stack.append((v, depth + 1))
        elif isinstance(value, list):
            if depth > SERVE_DEPTH_MAX:
                return f"it is nested deeper than {SERVE_DEPTH_MAX} levels"
            stack.extend((v, depth + 1) for v in value)
    return None


_logged: set[str] = set()


def servable(doc: Any, what: str) -> Any:
    """``doc`` as stored, or a marker in its place when it cannot be served, so one bad row (written
    before the checks at the door) does not turn every page that shows it into a 500. ``what`` names
    the row in the log (once per row and process), e.g. ``profile 7 attributes``."""
    problem = _unservable(doc)
    if problem is None:
        return doc
    if what not in _logged and len(_logged) < _LOGGED_MAX:
        _logged.add(what)
        log.warning("%s cannot be served (%s); a marker is shown in its place", what, problem)
    marker = {UNAVAILABLE: f"this stored document cannot be shown: {problem}"}
    return [marker] if isinstance(doc, list) else marker
