"""What the campaign, segment, device-rule and scenario loaders made of a corpus of documents, kept as a snapshot.

The snapshot (``tests/data/file-formats/snapshot.json``) was written by the hand-written parsers, before
the pydantic models replaced them; ``tests/test_file_formats.py`` checks that the models load every document
the old parsers loaded to an equal object, and refuse what they refused. The corpus is every document the test
suite parsed then (recorded by :class:`Recorder`, a pytest plugin), the examples, and mutants of both: one
or two random edits (a value replaced, a key dropped, an unknown key added) of each.

Objects are compared through :func:`canon`: plain JSON with the types kept (a tuple is not a list, 1 is not
1.0), a parsed condition by its class, text, reads and source.

Regenerate (only from parsers known to be right): ``python -m tests.file_format_snapshot`` after running the
tests named in ``RECORDED`` with ``-p tests.file_format_snapshot``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests/data/file-formats/snapshot.json"
RECORDING = Path(os.environ.get("FILE_FORMAT_RECORDING", "/tmp/file-format-recording.jsonl"))
FORMATS = ("campaign", "segments", "rule", "scenario")
RECORDED = ["tests/test_engine.py", "tests/test_engine_controls.py", "tests/test_conditions.py",
            "tests/test_condition_tree.py", "tests/test_device_rules.py", "tests/test_device_rules_wearable.py",
            "tests/test_simulators.py", "tests/test_engine_parts.py", "tests/test_engine_bulk.py",
            "tests/test_engine_properties.py", "tests/test_presence_triggers.py", "tests/test_figures_zones.py",
            "tests/test_alarms.py", "tests/test_privacy.py", "tests/test_pipeline_storage.py",
            "tests/test_campaigns_api.py", "tests/test_input_limits.py", "tests/test_simulate.py"]


# ---------------------------------------------------------------- canonical form

def canon(x: Any) -> Any:
    """``x`` as plain JSON that keeps what equality sees: types of containers and numbers, conditions' trees."""
    from gateway.campaigns.conditions import Condition

    if isinstance(x, Condition):
        return {"__condition__": type(x).__name__, "text": x.text, "reads": sorted(x.reads),
                "source": canon(x.source)}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {"__": type(x).__name__, **{f.name: canon(getattr(x, f.name)) for f in dataclasses.fields(x)}}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return {"__": type(x).__name__, **{k: canon(v) for k, v in zip(x._fields, x, strict=True)}}
    if isinstance(x, tuple):
        return {"__tuple__": [canon(v) for v in x]}
    if isinstance(x, list):
        return [canon(v) for v in x]
    if isinstance(x, frozenset | set):
        return {"__set__": sorted((canon(v) for v in x), key=repr)}
    if isinstance(x, Mapping):
        return {"__map__": sorted(([canon(k), canon(v)] for k, v in x.items()), key=repr)}
    if isinstance(x, dt.time | dt.date):
        return {"__time__": x.isoformat()}
    if isinstance(x, float) and not math.isfinite(x):
        return {"__float__": repr(x)}
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return {"__other__": type(x).__name__, "repr": repr(x)}


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(canon(obj), sort_keys=True).encode()).hexdigest()[:20]


# ---------------------------------------------------------------- the loaders, one call per format

def load(fmt: str, doc: Any) -> Any:
    """The runtime objects one document gives (a segments document is the file's list)."""
    if fmt == "campaign":
        from gateway.campaigns.model import parse_campaign
        return parse_campaign(doc, "corpus")
    if fmt == "rule":
        from devices.rules import parse_rule
        return parse_rule(doc, "corpus")
    if fmt == "scenario":
        from simulators.scenario import parse_scenario
        return parse_scenario(doc, source="corpus")
    from gateway.campaigns.model import load_segments
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "segments.yaml").write_text(json.dumps(doc))  # JSON is YAML, and keeps every value's type
        return load_segments(d)


def outcome(fmt: str, doc: Any) -> dict[str, str]:
    try:
        return {"ok": digest(load(fmt, doc))}
    except Exception as exc:
        return {"error": type(exc).__name__}


# ---------------------------------------------------------------- mutants

POOL: list[Any] = [None, 0, -1, 1, 2.5, -0.5, 1e300, 70000, float("inf"), float("nan"), True, False, "", "x", "1",
                   "10:00", "25:00", "24:00", "9:5", "mon", "Monday", "never", "any", "gt", "in", "v" * 65, [], {},
                   [1, 2], ["a"], ["10:00", "08:30"], [0, 0, 10, 10], {"a": 1}, {"on": True},
                   {"fact": "a", "op": "eq", "value": 1}, {"metric": "a", "op": "gt", "value": 1},
                   "00000000-0000-4000-8000-000000000001", "8F3C0A52-6D1E-4B7A-9C2D-5E4F3A2B1C00"]


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def mutate(doc: Any, edit: list[Any]) -> Any:
    """``doc`` with one edit: ``[op, path, value]``, op ``set``, ``del`` or ``add`` (a key to a mapping)."""
    op, path, value = edit
    out = copy.deepcopy(doc)
    if not path:
        return copy.deepcopy(value) if op == "set" else out
    parent = _at(out, tuple(path[:-1]))
    key = path[-1]
    if op == "set":
        parent[key] = copy.deepcopy(value)
    elif op == "del":
        del parent[key]
    else:
        target = parent[key]
        if isinstance(target, dict):
            target[value[0]] = copy.deepcopy(value[1])
    return out


def random_edits(doc: Any, rng: random.Random) -> list[list[Any]]:
    """One or two edits; values from the pool or from elsewhere in the same document (plausible ones)."""
    edits: list[list[Any]] = []
    current = doc
    for _ in range(rng.choice((1, 1, 2))):
        paths = list(_paths(current))
        path = list(rng.choice(paths))
        values = [_at(current, p) for p in paths if p]
        keys = [*sorted({str(p[-1]) for p in paths if p and isinstance(p[-1], str)}), "zz"]
        value = rng.choice(POOL) if rng.random() < 0.6 or not values else rng.choice(values)
        kind = rng.random()
        if kind < 0.15 and path:
            edit = ["del", path, None]
        elif kind < 0.3 and isinstance(_at(current, tuple(path)), dict):
            edit = ["add", path, [rng.choice(keys), value]]
        else:
            edit = ["set", path, value]
        edits.append(edit)
        current = mutate(current, edit)
    return edits


def apply(doc: Any, edits: list[list[Any]]) -> Any:
    for edit in edits:
        doc = mutate(doc, edit)
    return doc


# ---------------------------------------------------------------- the documents

def examples() -> dict[str, tuple[str, Any]]:
    """Every example file's documents: name -> (format, document)."""
    out: dict[str, tuple[str, Any]] = {}
    for path in sorted((ROOT / "examples/campaigns").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if path.name == "segments.yaml":
            out[f"examples/campaigns/{path.name}"] = ("segments", data)
            continue
        for i, item in enumerate(data if isinstance(data, list) else [data]):
            out[f"examples/campaigns/{path.name}[{i}]"] = ("campaign", item)
    for path in sorted((ROOT / "examples/device-rules").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        for i, item in enumerate(data if isinstance(data, list) else [data]):
            out[f"examples/device-rules/{path.name}[{i}]"] = ("rule", item)
    out["examples/store.yaml"] = ("scenario", yaml.safe_load((ROOT / "examples/store.yaml").read_text()))
    return out


def _jsonable(doc: Any) -> bool:
    try:
        return json.loads(json.dumps(doc)) == doc
    except (TypeError, ValueError):
        return False


class Recorder:
    """A pytest plugin that notes every document the parsers see (``-p tests.file_format_snapshot``)."""

    def __init__(self) -> None:
        import devices.rules
        import gateway.campaigns.model
        import simulators.scenario

        self.out = RECORDING.open("a")
        self._wrap(gateway.campaigns.model, "parse_campaign", "campaign")
        self._wrap(devices.rules, "parse_rule", "rule")
        self._wrap(simulators.scenario, "parse_scenario", "scenario")
        original = gateway.campaigns.model.load_segments

        def load_segments(directory: Any) -> Any:
            path = Path(directory) / "segments.yaml"
            if path.is_file():
                with contextlib.suppress(yaml.YAMLError):
                    self._note("segments", yaml.safe_load(path.read_text()))
            return original(directory)

        gateway.campaigns.model.load_segments = load_segments  # type: ignore[assignment]

    def _note(self, fmt: str, doc: Any) -> None:
        if _jsonable(doc):
            self.out.write(json.dumps({"format": fmt, "doc": doc}) + "\n")
            self.out.flush()

    def _wrap(self, module: Any, name: str, fmt: str) -> None:
        original: Callable[..., Any] = getattr(module, name)

        def wrapped(data: Any, *args: Any, **kwargs: Any) -> Any:
            self._note(fmt, data)
            return original(data, *args, **kwargs)

        setattr(module, name, wrapped)


def pytest_load_initial_conftests(early_config: Any, parser: Any, args: Any) -> None:
    """Before the conftests import anything that takes the parsers by name."""
    early_config.pluginmanager.register(Recorder(), "file-format-recorder")


SCALE = {"scenario": 8, "segments": 6, "rule": 3}  # mutants per example, relative to a campaign's


def build(mutants_per_doc: int = 40, seed: int = 20240611) -> dict[str, Any]:
    """The corpus and what the current parsers make of it."""
    rng = random.Random(seed)
    bases: dict[str, list[Any]] = {}
    for name, (fmt, doc) in examples().items():
        bases[name] = [fmt, doc]
    seen = {json.dumps(v, sort_keys=True) for v in bases.values()}
    refused: dict[str, int] = {}
    if RECORDING.exists():  # every recorded document that loads; of the refused (fuzz tests'), a sample
        for n, line in enumerate(RECORDING.read_text().splitlines()):
            rec = json.loads(line)
            key = json.dumps([rec["format"], rec["doc"]], sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            if "error" in outcome(rec["format"], rec["doc"]):
                refused[rec["format"]] = refused.get(rec["format"], 0) + 1
                if refused[rec["format"]] > 100:
                    continue
            bases[f"tests#{n}"] = [rec["format"], rec["doc"]]
    cases = []
    # As the snapshot stores them (keys sorted), so that str() of a mapping reads the same when checked.
    bases = {name: json.loads(json.dumps(base, sort_keys=True)) for name, base in bases.items()}
    for name, (fmt, doc) in bases.items():
        cases.append({"base": name, "edits": [], **outcome(fmt, doc)})
        many = 6 if name.startswith("tests#") else mutants_per_doc * SCALE.get(fmt, 1)
        for _ in range(many):
            edits = random_edits(doc, rng)
            cases.append({"base": name, "edits": edits, **outcome(fmt, apply(doc, edits))})
    loaded = {}
    from devices.rules import load_rules
    from gateway.campaigns.model import load_campaigns, load_segments
    from simulators.scenario import load_scenario

    loaded["examples/campaigns"] = canon(load_campaigns(ROOT / "examples/campaigns"))
    loaded["examples/campaigns/segments.yaml"] = canon(load_segments(ROOT / "examples/campaigns"))
    loaded["examples/device-rules"] = canon(load_rules(ROOT / "examples/device-rules"))
    loaded["examples/store.yaml"] = canon(load_scenario(ROOT / "examples/store.yaml"))
    return {"bases": bases, "cases": cases, "examples": loaded}


if __name__ == "__main__":
    snapshot = build()
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else SNAPSHOT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(snapshot, indent=None, sort_keys=True) + "\n")
    ok = sum("ok" in c for c in snapshot["cases"])
    print(f"{len(snapshot['bases'])} documents, {len(snapshot['cases'])} cases ({ok} load), written to {out}")
