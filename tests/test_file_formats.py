"""The file formats' pydantic models: the same objects as the hand-written parsers made, errors with lines.

The snapshot (tests/file_format_snapshot.py) holds what the old parsers made of the examples, every
document the tests parsed and mutants of them. Errors name the file, the line and the field path; the
JSON Schemas in docs/schemas/ are what the models give, and accept every example.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import jsonschema_rs  # schemathesis's validator (a dev dependency through it)
import pytest
import yaml
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from api.app import create_app
from api.deps import ApiContext
from devices.rules import RuleError, load_rules
from gateway.app import schemas
from gateway.app.cli import main
from gateway.campaigns.model import CampaignError, load_campaign_file, load_campaigns, load_segments, parse_campaign
from gateway.delivery.hub import StreamHub
from gateway.profiles.service import GatewayService
from simulators.scenario import ScenarioError, load_scenario, parse_scenario
from tests.file_format_snapshot import ROOT, SNAPSHOT, apply, canon, digest, load

FORMAT_ERRORS: dict[str, type[ValueError]] = {"campaign": CampaignError, "segments": CampaignError,
                                             "rule": RuleError, "scenario": ScenarioError}
# What the old parsers let through and the models refuse, on purpose: a trigger zone or metric that is not
# text (a campaign that never met an event), and NaN where a number has a range (NaN passed every check).
TIGHTENED = re.compile(r"trigger\.(zone|metric): Input should be a valid string")
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def snapshot() -> dict[str, Any]:
    return json.loads(SNAPSHOT.read_text())


def _has_nan(doc: Any) -> bool:
    if isinstance(doc, float):
        return math.isnan(doc)
    if isinstance(doc, dict):
        return any(_has_nan(v) for v in doc.values())
    return isinstance(doc, list) and any(_has_nan(v) for v in doc)


def test_every_document_loads_as_the_old_parsers_loaded_it_or_is_refused_as_they_refused_it(
        snapshot: dict[str, Any]) -> None:
    wrong, tightened = [], 0
    for case in snapshot["cases"]:
        fmt, doc = snapshot["bases"][case["base"]]
        doc = apply(doc, case["edits"])
        try:
            now = {"ok": digest(load(fmt, doc))}
        except FORMAT_ERRORS[fmt] as exc:
            if "ok" in case and (TIGHTENED.search(str(exc)) or _has_nan(doc)):
                tightened += 1
                continue
            now = {"error": FORMAT_ERRORS[fmt].__name__}
        except Exception as exc:  # any other exception is a bug: the loaders raise their format's error
            now = {"error": f"{type(exc).__name__}: {exc}"}
        expected = {"ok": case["ok"]} if "ok" in case else {"error": FORMAT_ERRORS[fmt].__name__}
        if now != expected:
            wrong.append((case["base"], case["edits"], now))
    assert not wrong, f"{len(wrong)} of {len(snapshot['cases'])}:\n" + "\n".join(map(str, wrong[:30]))
    loaded = sum("ok" in c for c in snapshot["cases"])
    assert loaded > 700 and tightened < 40  # the corpus is the one recorded, and the refusals are the few above


def test_the_examples_load_to_the_objects_the_old_parsers_made(snapshot: dict[str, Any]) -> None:
    got = {"examples/campaigns": canon(load_campaigns(EXAMPLES / "campaigns")),
           "examples/campaigns/segments.yaml": canon(load_segments(EXAMPLES / "campaigns")),
           "examples/device-rules": canon(load_rules(EXAMPLES / "device-rules")),
           "examples/store.yaml": canon(load_scenario(EXAMPLES / "store.yaml"))}
    for name, expected in snapshot["examples"].items():
        now = json.loads(json.dumps(got[name]))
        if name == "examples/store.yaml":  # where the snapshot was taken and where it is checked differ
            assert now.pop("source").endswith(name) and expected.pop("source").endswith(name)
        assert now == expected, name


# ---------------------------------------------------------------- errors: file, line, field path

SHOES = """\
# yaml-language-server: $schema=../docs/schemas/campaign.schema.json
id: shoes
purpose: offers
trigger:
  type: dwell
  zone: shoes
  min_dwell_s: -5
action:
  title: Hi
  body: there
limits:
  cooldwn_s: 60
"""


def test_a_bad_campaign_file_names_the_file_the_line_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "shoes.yaml"
    path.write_text(SHOES)
    with pytest.raises(CampaignError) as err:
        load_campaign_file(path)
    assert str(err.value).splitlines() == [
        f"{path}:7: trigger.min_dwell_s: Input should be greater than or equal to 0",
        f"{path}:12: limits.cooldwn_s: unknown field (known: budget, cooldown_s, max_per_profile, quiet_hours, "
        "ttl_s)"]


def test_a_condition_error_points_at_the_leaf_that_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(SHOES.replace("-5", "5").replace("cooldwn_s", "cooldown_s") + (
        "conditions:\n  all:\n    - {fact: a, op: eq, value: 1}\n    - {fact: b, op: approx, value: 1}\n"))
    with pytest.raises(CampaignError, match=re.escape(f"{path}:16: conditions.all[1]: 'op' must be one of")):
        load_campaign_file(path)


def test_a_json_campaign_list_names_the_line_and_the_campaign_by_its_id(tmp_path: Path) -> None:
    path = tmp_path / "two.json"
    path.write_text('[\n  {"id": "ok", "purpose": "offers", "trigger": {"type": "enter"},\n'
                    '   "action": {"title": "t", "body": "b"}},\n'
                    '  {"id": "late", "purpose": "offers",\n'
                    '   "trigger": {"type": "schedule", "at": ["10:00", "25:61"]},\n'
                    '   "action": {"title": "t", "body": "b"}}\n]\n')
    with pytest.raises(CampaignError) as err:
        load_campaign_file(path)
    assert str(err.value) == f"{path}:5: [late].trigger.at[1]: times are 'HH:MM', got '25:61'"
    path.write_text('{"id": "x",\n "purpose": ')
    with pytest.raises(CampaignError, match=re.escape(f"{path}:2: not valid JSON")):
        load_campaign_file(path)


def test_an_api_definition_gets_the_field_path_and_no_line() -> None:
    with pytest.raises(CampaignError) as err:
        parse_campaign({"id": "x", "purpose": "offers", "trigger": {"type": "dwell", "min_dwell_s": "long"},
                        "action": {"title": "t", "body": "b"}})
    assert str(err.value) == ("campaign: trigger.min_dwell_s: Input should be a valid number, unable to parse "
                              "string as a number")


def test_a_bad_campaign_over_the_api_is_a_422_with_the_field_path(service: GatewayService) -> None:
    app = create_app(ApiContext(service=service, hub=StreamHub(), admin_key="k" * 32, health=dict))
    body = {"purpose": "offers", "trigger": {"type": "dwell", "min_dwell_s": -1}, "action": {"title": "t", "body": "b"}}
    with TestClient(app) as client:
        for r in (client.put("/v1/campaigns/bad", json=body, headers={"X-API-Key": "k" * 32}),
                  client.post("/v1/campaigns/validate", json=body, headers={"X-API-Key": "k" * 32})):
            assert r.status_code == 422, r.text
            assert r.json()["detail"] == "campaign: trigger.min_dwell_s: Input should be greater than or equal to 0"


def test_a_bad_segments_file_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "segments.yaml").write_text("- id: regular\n  conditions:\n    fact: behaviour.visits_30d\n"
                                            "    op: gte\n    valeu: 4\n- id: 7\n  conditions: {}\n")
    with pytest.raises(CampaignError) as err:
        load_segments(tmp_path)
    assert str(err.value) == f"{tmp_path / 'segments.yaml'}:6: [1].id: Input should be a valid string"


def test_a_bad_rule_file_names_the_line_and_the_rule(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        "- id: ok\n  create: {when: {metric: a, op: gt, value: 1}}\n"
        "- id: fast\n  create:\n    - severity: warning\n      when:\n        all:\n"
        "          - {metric: a, op: gt, value: 1}\n          - {rate: b, op: lt, value: -5, windw: 60}\n")
    with pytest.raises(RuleError) as err:
        load_rules(tmp_path)
    assert str(err.value) == (f"{tmp_path / 'r.yaml'}:9: [fast].create[0].when.all[1].windw: unknown field "
                              "(known: op, rate, value, window_s)")


def test_a_rule_refers_to_a_counter_on_its_line(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("id: x\ncreate:\n  when:\n    counter: nope\n    op: gt\n    value: 1\n")
    with pytest.raises(RuleError, match=re.escape("r.yaml:4: create.when.counter: counter 'nope' is not "
                                                  "declared under 'counters'")):
        load_rules(tmp_path)


def test_a_bad_scenario_names_the_line_and_the_entry(tmp_path: Path) -> None:
    text = (EXAMPLES / "store.yaml").read_text()
    lines = text.splitlines()
    n = next(i for i, line in enumerate(lines) if "[shoes, 45]" in line)
    path = tmp_path / "store.yaml"
    path.write_text(text.replace("[shoes, 45]", "[shooes, 45]", 1))
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert str(err.value) == (f"{path}:{n + 1}: people[alice].visits[0].route[1]: unknown zone 'shooes' "
                              "(known: apparel, checkout, entrance, shoes)")


def test_several_problems_are_each_on_their_own_line_and_the_list_is_bounded() -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario({"store": {"id": "s"}, "zones": [{"name": f"z{i}", "rect": [1, 1, 0, 0]} for i in range(12)]})
    lines = str(err.value).splitlines()
    assert lines[0] == "<scenario>: zones[0].rect: expected [x0, y0, x1, y1] with x0 < x1 and y0 < y1"
    assert len(lines) == 11 and lines[-1] == "<scenario>: ... and 2 more"


# ---------------------------------------------------------------- the JSON Schemas

def test_the_committed_schemas_are_what_the_models_give() -> None:
    assert schemas.stale(ROOT / "docs/schemas") == [], "run: gateway schemas --out docs/schemas"
    assert main(["schemas", "--out", str(ROOT / "docs/schemas"), "--check"]) == 0


def test_schemas_check_says_which_file_is_stale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schemas", "--out", str(tmp_path)]) == 0
    (tmp_path / "scenario.schema.json").write_text("{}")
    assert main(["schemas", "--out", str(tmp_path), "--check"]) == 1
    assert "scenario.schema.json: not what the models give" in capsys.readouterr().err


def _descriptions(node: Any) -> int:
    if isinstance(node, dict):
        return ("description" in node) + sum(_descriptions(v) for v in node.values())
    return sum(_descriptions(v) for v in node) if isinstance(node, list) else 0


@pytest.mark.parametrize(("name", "files"), [
    ("campaign", [p for p in sorted((EXAMPLES / "campaigns").glob("*.yaml")) if p.name != "segments.yaml"]),
    ("segments", [EXAMPLES / "campaigns/segments.yaml"]),
    ("device-rule", sorted((EXAMPLES / "device-rules").glob("*.yaml"))),
    ("scenario", [EXAMPLES / "store.yaml"]),
])
def test_each_schema_has_a_title_descriptions_and_accepts_the_examples(name: str, files: list[Path]) -> None:
    schema = json.loads((ROOT / "docs/schemas" / f"{name}.schema.json").read_text())
    assert schema["title"] and schema["description"] and _descriptions(schema) >= 10
    validator = jsonschema_rs.validator_for(schema)
    for path in files:
        text = path.read_text()
        assert text.startswith(f"# yaml-language-server: $schema=../{'../' if path.parent != EXAMPLES else ''}"
                               f"docs/schemas/{name}.schema.json\n"), path
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(text))]
        assert not errors, (path, errors[:3])


def test_the_schema_flags_what_the_loader_refuses() -> None:
    validator = jsonschema_rs.validator_for(json.loads((ROOT / "docs/schemas/campaign.schema.json").read_text()))
    good = {"id": "x", "purpose": "offers", "trigger": {"type": "schedule", "at": "10:00", "days": ["mon"]},
            "action": {"title": "t", "body": "b"}}
    assert validator.is_valid(good) and validator.is_valid([good, good])
    for bad in ({**good, "purpose": "spam"}, {**good, "limits": {"cooldwn_s": 1}},
                {**good, "trigger": {"type": "schedule", "at": "25:00"}}, {**good, "priority": "high"}):
        assert not validator.is_valid(bad), bad
        with pytest.raises(CampaignError):
            parse_campaign(bad)


# ---------------------------------------------------------------- fuzz: load, or the format's error

_words = st.sampled_from(["id", "purpose", "offers", "trigger", "type", "dwell", "schedule", "zone", "at", "days",
                          "action", "title", "body", "limits", "quiet_hours", "start", "end", "experiment",
                          "variants", "name", "weight", "conditions", "all", "fact", "op", "eq", "value", "create",
                          "when", "metric", "rate", "clear", "never", "store", "zones", "rect", "people", "beacon",
                          "uuid", "major", "visits", "route", "10:00", "mon", "x"])
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-70000, 70000), st.floats(allow_nan=True), _words,
                     st.text(max_size=6))
_docs = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(_words, inner, max_size=5)), max_leaves=30)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(sorted(FORMAT_ERRORS)), doc=st.dictionaries(_words, _docs, max_size=7),
       wrap=st.booleans())
def test_random_mappings_load_or_raise_the_formats_error(fmt: str, doc: dict[str, Any], wrap: bool) -> None:
    data: Any = [doc] if wrap and fmt == "segments" else doc
    try:
        load(fmt, data)
    except FORMAT_ERRORS[fmt] as exc:
        assert str(exc)


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab: -[]{},'\"\n#&*!1")), max_size=60), suffix=st.sampled_from(
    [".yaml", ".json"]))
@example(text="[]", suffix=".yaml")  # an emptied file: refused, not loaded as no campaign
def test_random_text_is_refused_with_a_campaign_error(tmp_path_factory: pytest.TempPathFactory, text: str,
                                                      suffix: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / f"c{suffix}"
    path.write_text(text)
    with pytest.raises(CampaignError):  # nothing in this alphabet spells a campaign
        load_campaign_file(path)
