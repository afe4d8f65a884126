"""The JSON Schemas of the file formats, drawn from their pydantic models, for editors (docs/schemas/).

An editor that knows a file's schema (VS Code's YAML extension: a ``# yaml-language-server: $schema=``
line, or the ``yaml.schemas`` setting) checks it as it is typed and shows each field's description.
``gateway schemas --out docs/schemas`` writes them; tests/test_file_formats.py fails when the committed
files are not what the models give now. It lives with the entry points: it is the one place that sees
the campaigns' models (the core), the device rules' (``devices``) and the scenario's (``simulators``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from devices.rules import RulesFile
from gateway.campaigns.files import CampaignsFile, SegmentsFile
from gateway.presence.calibration import CalibrationFile
from simulators.scenario import ScenarioFile

DIALECT = "https://json-schema.org/draft/2020-12/schema"
FORMATS: dict[str, tuple[Any, str, str]] = {
    "campaign": (CampaignsFile, "Campaign", "A campaign file: one campaign or a list of them (docs/campaigns.md)."),
    "segments": (SegmentsFile, "Segments",
                 "segments.yaml beside the campaigns: live groups of profiles (docs/campaigns.md)."),
    "device-rule": (RulesFile, "Device rule",
                    "A device-rules file: one rule or a list of them (docs/device-rules.md)."),
    "scenario": (ScenarioFile, "Scenario", "A simulated store for gateway demo and gateway simulate."),
    "calibration": (CalibrationFile, "Presence calibration",
                    "What gateway calibrate learned from labelled walks, for [presence] calibration "
                    "(docs/presence.md)."),
}


def schema(name: str) -> dict[str, Any]:
    """One format's schema, with its title and description first."""
    model, title, description = FORMATS[name]
    body = TypeAdapter(model).json_schema(by_alias=True)
    body.pop("title", None)
    body.pop("description", None)
    return {"$schema": DIALECT, "title": title, "description": description, **body}


def rendered(name: str) -> str:
    return json.dumps(schema(name), indent=2, ensure_ascii=False) + "\n"


def filename(name: str) -> str:
    return f"{name}.schema.json"


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FORMATS:
        path = out / filename(name)
        path.write_text(rendered(name), encoding="utf-8")
        written.append(path)
    return written


def stale(out: Path) -> list[str]:
    """The schema files under ``out`` that differ from what the models give (or are missing)."""
    return [filename(n) for n in FORMATS
            if not (out / filename(n)).is_file() or (out / filename(n)).read_text(encoding="utf-8") != rendered(n)]


def run(out: Path, check: bool) -> int:
    if check:
        bad = stale(out)
        for name in bad:
            print(f"{out / name}: not what the models give; run gateway schemas --out {out}", file=sys.stderr)
        return 1 if bad else 0
    for path in write(out):
        print(path)
    return 0

