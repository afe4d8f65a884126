"""The checks the file loaders share (devices/files.py): an id defined twice in a directory, and a list
written empty where it would silently mean nothing, refused with the file's line and nothing loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from devices import files
from devices.rules import RuleError, parse_rule
from gateway.campaigns.model import CampaignError, load_campaigns
from simulators.scenario import ScenarioError, load_scenario

ROOT = Path(__file__).resolve().parents[1]
CAMPAIGN = ("id: {id}\nname: x\npurpose: offers\ntrigger: {{type: dwell, zone: shoes, min_dwell_s: 20}}\n"
            "action: {{title: t, body: b}}\n")


def test_repeated_names_the_first_id_given_twice() -> None:
    assert files.repeated(["a", "b", "c"]) is None
    assert files.repeated(["a", "b", "b", "a"]) == "b"
    assert files.repeated(iter(())) is None


def test_two_campaign_files_with_one_id_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(CAMPAIGN.format(id="same"))
    (tmp_path / "b.yaml").write_text(CAMPAIGN.format(id="other"))
    assert [c.id for c in load_campaigns(tmp_path)] == ["same", "other"]
    (tmp_path / "c.yml").write_text(CAMPAIGN.format(id="same"))
    with pytest.raises(CampaignError, match="campaign id 'same' is defined twice"):
        load_campaigns(tmp_path)


def test_an_empty_list_of_conditions_is_refused_with_its_line() -> None:
    text = "id: r\ncreate:\n  when:\n    all: []\n"
    with pytest.raises(RuleError, match=r"r.yaml:4: create.when.all: a non-empty list of conditions"):
        parse_rule(yaml.safe_load(text), "r.yaml", files.parse_yaml(text, "r.yaml"))


def test_a_visit_with_no_stop_is_refused_with_its_line(tmp_path: Path) -> None:
    scenario = yaml.safe_load((ROOT / "examples/store.yaml").read_text())
    scenario["people"][0]["visits"] = [{"at": 0, "route": []}]
    path = tmp_path / "store.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "route: []" in t)
    with pytest.raises(ScenarioError, match=rf"store.yaml:{line}: .*route: a visit needs at least one stop"):
        load_scenario(path)
