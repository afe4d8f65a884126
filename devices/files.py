"""The project's file formats, read with each node's line, and their errors as ``file:line: path: message``.

Campaigns, segments, device rules and scenarios are YAML (campaigns also JSON) validated by pydantic
models. A ``ValidationError`` names a field path (``trigger.min_dwell_s``); :func:`read` keeps the line
where every mapping key and list item starts, so :func:`message` can say where in the file that is.

It lives in ``devices/``, the lowest package every format's owner may import: device rules are here,
campaigns in the gateway's core and scenarios in the simulators, and both of those import ``devices``
while ``devices`` imports nothing of theirs (the layer contracts in pyproject.toml).
"""

from __future__ import annotations

import bisect
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NamedTuple, NoReturn, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    Tag,
    ValidationError,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

T = TypeVar("T")

Loc = tuple[str | int, ...]
"""Where a value is in a document: mapping keys and list indices from the root."""

MAX_SHOWN = 10  # errors listed in one message; the rest are counted


class Problem(NamedTuple):
    loc: Loc
    message: str


class Invalid(ValueError):
    """Problems found after the models validated (cross-references, a condition's own grammar)."""

    def __init__(self, *problems: Problem) -> None:
        super().__init__("; ".join(p.message for p in problems))
        self.problems = list(problems)


class FileError(ValueError):
    """A file that cannot be read or parsed at all (missing, not YAML, not JSON)."""


@dataclass
class Document:
    """A parsed file: its data and the line (1-based) where each loc's node starts."""

    data: Any
    source: str
    lines: dict[Loc, int] = field(default_factory=dict)

    def line(self, loc: Loc) -> int | None:
        """The line of the deepest node of ``loc`` that the file has (a missing field: its mapping's)."""
        for n in range(len(loc), -1, -1):
            found = self.lines.get(loc[:n])
            if found is not None:
                return found
        return None


# ---------------------------------------------------------------- reading, with lines

class _LineLoader(yaml.SafeLoader):
    """PyYAML's safe loader (so a file loads exactly as with ``yaml.safe_load``), keeping the node tree."""


def _yaml_lines(loader: _LineLoader, node: yaml.Node, loc: Loc, out: dict[Loc, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            try:
                key = loader.construct_object(key_node, deep=True)
            except yaml.YAMLError:
                continue
            if isinstance(key, str | int) and not isinstance(key, bool):
                out.setdefault((*loc, key), key_node.start_mark.line + 1)
                _yaml_lines(loader, value_node, (*loc, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*loc, i)] = item.start_mark.line + 1
            _yaml_lines(loader, item, (*loc, i), out)


def parse_yaml(text: str, source: str) -> Document:
    loader = _LineLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return Document(None, source, {(): 1})
        data = loader.construct_document(node)
        lines: dict[Loc, int] = {(): node.start_mark.line + 1}
        _yaml_lines(loader, node, (), lines)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise FileError(f"{where}: not valid YAML: {problem}") from None
    finally:
        loader.dispose()
    return Document(data, source, lines)


_WS = " \t\n\r"


def _json_lines(text: str, at: int, loc: Loc, out: dict[Loc, int], newlines: list[int]) -> int:
    """Walks one JSON value from ``at`` (already known valid), noting lines; returns where it ends."""
    decoder = json.JSONDecoder()
    while text[at] in _WS:
        at += 1
    out.setdefault(loc, bisect.bisect_right(newlines, at) + 1)
    opener = text[at]
    if opener not in "{[":
        return decoder.raw_decode(text, at)[1]
    closer, at, i = ("}" if opener == "{" else "]"), at + 1, 0
    while True:
        while text[at] in _WS + ",":
            at += 1
        if text[at] == closer:
            return at + 1
        if opener == "{":
            key_at = at
            key, at = decoder.raw_decode(text, at)
            while text[at] in _WS + ":":
                at += 1
            out[(*loc, key)] = bisect.bisect_right(newlines, key_at) + 1
            at = _json_lines(text, at, (*loc, key), out, newlines)
        else:
            at = _json_lines(text, at, (*loc, i), out, newlines)
            i += 1


def parse_json(text: str, source: str) -> Document:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileError(f"{source}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    lines: dict[Loc, int] = {}
    _json_lines(text, 0, (), lines, [i for i, c in enumerate(text) if c == "\n"])
    return Document(data, source, lines)


def read(path: Path) -> Document:
    """A YAML file (or JSON, by its suffix) with its lines; FileError if it cannot be read or parsed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FileError(f"cannot read {path}: {exc}") from exc
    return parse_json(text, str(path)) if path.suffix == ".json" else parse_yaml(text, str(path))


# ---------------------------------------------------------------- messages

def problems(exc: ValidationError, model: type[BaseModel] | None = None, hidden: Iterable[str] = ()) -> list[Problem]:
    """A ValidationError as (loc, message); ``hidden`` loc parts (union tags) are left out of paths.

    An unknown field lists the known ones when ``model`` is the document's root model.
    """
    skip = set(hidden)
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in skip))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            known = _known_fields(model, tuple(err["loc"])[:-1]) if model is not None else None
            msg = "unknown field" + (f" (known: {', '.join(known)})" if known else "")
        out.append(Problem(loc, msg))
    return out


def _known_fields(model: type[BaseModel], loc: Loc) -> list[str] | None:
    """The field names of the model at ``loc`` (tags included), found by following annotations; None if unsure."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        tagged = _tagged(current)
        if isinstance(part, str) and part in tagged:
            current = tagged[part]
        elif isinstance(part, int) and typing.get_origin(current) in (list, tuple):
            current = typing.get_args(current)[0]
        elif isinstance(current, type) and issubclass(current, BaseModel):
            by_alias = {f.alias or name: name for name, f in current.model_fields.items()}
            if part not in by_alias:
                return None
            try:  # the hints, not the fields' annotations: those may still be forward references
                current = typing.get_type_hints(current, include_extras=True)[by_alias[part]]
            except (NameError, TypeError, KeyError):
                return None
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[-1]
        else:
            return None
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(f.alias or name for name, f in current.model_fields.items())
    return None


def _unwrap(annotation: Any) -> Any:
    """Through Annotated and Optional (a union with None and one other type)."""
    for _ in range(8):
        origin = typing.get_origin(annotation)
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if origin is typing.Annotated or (origin in (typing.Union, types.UnionType) and len(args) == 1):
            annotation = args[0]
        else:
            break
    return annotation


def _tagged(annotation: Any) -> dict[str, Any]:
    """A tagged union's members by tag (``Annotated[Model, Tag("<rate>")]``)."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return {}
    out = {}
    for member in typing.get_args(annotation):
        if typing.get_origin(member) is typing.Annotated:
            for meta in member.__metadata__:
                if isinstance(meta, Tag):
                    out[meta.tag] = typing.get_args(member)[0]
    return out


def path_text(loc: Loc, data: Any) -> str:
    """``loc`` as a user writes it: ``trigger.min_dwell_s``, ``people[alice].visits[0]`` (an item by its id)."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            item = node[part] if isinstance(node, Sequence) and not isinstance(node, str) and \
                -len(node) <= part < len(node) else None
            ident = item.get("id") if isinstance(item, Mapping) else None
            out += f"[{ident}]" if isinstance(ident, str) and ident and "]" not in ident else f"[{part}]"
            node = item
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, Mapping) else None
    return out


def as_written(loc: Loc, data: Any) -> Loc:
    """``loc`` without the ``[0]`` of a one-or-many field written as one (``create: {...}``, ``at: '10:00'``)."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(part, int):
            if part == 0 and not (isinstance(node, Sequence) and not isinstance(node, str)):
                continue
            node = node[part] if isinstance(node, Sequence) and not isinstance(node, str) and \
                -len(node) <= part < len(node) else None
        else:
            node = node.get(part) if isinstance(node, Mapping) else None
        out.append(part)
    return tuple(out)


def message(found: Sequence[Problem], doc: Document | None, data: Any, source: str) -> str:
    """One line per problem: ``file:line: path: message`` (no line for data that came from no file)."""
    lines = []
    for p in [Problem(as_written(p.loc, data), p.message) for p in found[:MAX_SHOWN]]:
        where = f"{source}:{doc.line(p.loc)}" if doc is not None and doc.line(p.loc) is not None else source
        path = path_text(p.loc, data)
        text = p.message if not path or p.message.startswith(path) else f"{path}: {p.message}"
        lines.append(f"{where}: {text}")
    if len(found) > MAX_SHOWN:
        lines.append(f"{source}: ... and {len(found) - MAX_SHOWN} more")
    return "\n".join(lines)


def prefixed(loc: Loc, found: Iterable[Problem]) -> list[Problem]:
    """Problems of a part of a document, placed at ``loc`` in the whole."""
    return [Problem((*loc, *p.loc), p.message) for p in found]


def build(parse: Callable[[Any], T], data: Any, error: type[ValueError], source: str, *,
          model: type[BaseModel] | None = None, doc: Document | None = None, at: Loc = (),
          hidden: Iterable[str] = ()) -> T:
    """``parse(data)``, its problems raised as ``error`` with the file, line and path of each.

    ``at`` places ``data`` in the document (an item of a file's list); ``hidden`` are union tags.
    """
    try:
        return parse(data)
    except ValidationError as exc:
        found = problems(exc, model, hidden)
    except Invalid as exc:
        found = exc.problems
    whole = doc.data if doc is not None else data
    raise error(message(prefixed(at, found), doc, whole, source)) from None


# ---------------------------------------------------------------- model parts

def _model_title(model: type) -> str:
    return model.__name__.removesuffix("File")


def _field_title(name: str, _: Any) -> str:
    return name  # an editor shows the key as written, not "Min Dwell S"


_TITLES = ConfigDict(model_title_generator=_model_title, field_title_generator=_field_title)


class FileModel(BaseModel):
    """A mapping of a file: unknown keys are refused (a typo would otherwise be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True, **_TITLES)


class LenientModel(BaseModel):
    """A mapping whose unknown keys the loader has always ignored; its schema flags them, since they do nothing."""

    model_config = ConfigDict(extra="ignore", frozen=True, json_schema_extra={"additionalProperties": False},
                              **_TITLES)


def fail(text: str) -> NoReturn:
    """A validator's refusal, shown as written (no "Value error, " prefix)."""
    raise PydanticCustomError("invalid", "{text}", {"text": text})


class OneOf:
    """``Annotated[str, OneOf(values)]``: one of a few words, an enum in the schema; ``template`` says so."""

    def __init__(self, values: Iterable[str], template: str = "must be one of {}") -> None:
        self.values = tuple(str(v) for v in values)
        self.template = template

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def check(value: str) -> str:
            if value not in self.values:
                fail(self.template.format(", ".join(self.values)))
            return value

        return core_schema.no_info_after_validator_function(check, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {**handler(schema), "enum": list(self.values)}


def or_empty(empty: Callable[[], Any]) -> BeforeValidator:
    """A value left empty (``limits:`` with nothing under it, ``[]``, ``0``) reads as ``empty()``."""
    return BeforeValidator(lambda value: value if value else empty())


def repeated(ids: Iterable[str]) -> str | None:
    """The first id given a second time, or None: a rule's or campaign's id names one thing in its directory."""
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return None


def non_empty(text: str) -> BeforeValidator:
    """A list written empty is refused with ``text`` (a visit with no stop, an ``all`` of nothing): it would mean
    nothing, silently."""

    def check(value: Any) -> Any:
        if isinstance(value, list) and not value:
            fail(text)
        return value

    return BeforeValidator(check)


class AtLeast:
    """``Annotated[float, AtLeast(0)]``: a finite number as written (not text, not true/false), at least this."""

    def __init__(self, minimum: float) -> None:
        self.minimum = minimum

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def check(value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                fail(f"a number, got {value!r}")
            if value < self.minimum:
                fail(f"at least {self.minimum:g}, got {value!r}")
            return float(value)

        return core_schema.no_info_before_validator_function(check, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        out = {**handler(schema), "type": "number"}
        if math.isfinite(self.minimum):
            out["minimum"] = self.minimum
        return out


def _whole(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return value


Whole = Annotated[int, BeforeValidator(_whole)]
"""A whole number; a fraction is dropped (``2.5`` reads as 2), as these files have always been read."""


def not_null(value: T) -> T:
    """For an optional key that, when given, must not be null (``when:`` with nothing under it)."""
    if value is None:
        fail("must not be empty (null)")
    return value


def drop_null(schema: dict[str, Any]) -> None:
    """The JSON Schema of an ``X | None`` field whose null is only "not given": just X."""
    options = schema.get("anyOf")
    if isinstance(options, list):
        kept = [o for o in options if o != {"type": "null"}]
        del schema["anyOf"]
        if len(kept) == 1:
            schema.update(kept[0])
        else:
            schema["anyOf"] = kept


Given = Field(json_schema_extra=drop_null)
"""With ``AfterValidator(not_null)`` on ``X | None = None``: optional, but not null when written."""
