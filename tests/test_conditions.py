"""Campaign conditions beyond `all`: `any` and `not` through the engine, each decision naming what did
not hold, and condition shapes that would silently change a campaign's meaning refused at load."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.campaigns.model import CampaignError, CampaignIndex, load_segments, parse_campaign
from gateway.engine.engine import Engine, EngineEvent
from gateway.profiles.service import GatewayService, NewProfile
from gateway.storage.db import Database

T0 = 1_780_300_800.0


def campaign(conditions: Any, cid: str = "c") -> Any:
    return parse_campaign({"id": cid, "purpose": "offers", "trigger": {"type": "enter", "zone": "z"},
                           "conditions": conditions, "action": {"title": "t", "body": "b"}})


@pytest.fixture
def world(service: GatewayService) -> Iterator[tuple[Database, dict[str, int]]]:
    db, svc = service.db, service
    ids = {who: svc.create_profile(NewProfile(external_id=who, attributes=attrs, consents={"offers": True}))["id"]
           for who, attrs in (("gold-en", {"tier": "gold", "language": "en"}),
                              ("bronze-fr", {"tier": "bronze", "language": "fr"}),
                              ("bronze-en", {"tier": "bronze", "language": "en"}))}
    yield db, ids


def judge(db: Database, conditions: Any, pid: int, key: str) -> tuple[str, str | None]:
    engine = Engine(CampaignIndex([campaign(conditions, cid=f"c-{key}")]))
    with db.session() as s:
        [o] = engine.handle(s, EngineEvent("enter", pid, T0, key, "z"))
    return o.reason, o.detail


def test_any_fires_when_one_holds_and_names_every_failure_otherwise(world: tuple[Database, dict[str, int]]) -> None:
    db, ids = world
    cond = {"any": [{"fact": "profile.attributes.tier", "op": "eq", "value": "gold"},
                    {"fact": "profile.attributes.language", "op": "eq", "value": "fr"}]}
    assert judge(db, cond, ids["gold-en"], "a1")[0] == "fired"
    assert judge(db, cond, ids["bronze-fr"], "a2")[0] == "fired"
    reason, detail = judge(db, cond, ids["bronze-en"], "a3")
    assert reason == "condition_false"
    assert detail is not None and "tier eq 'gold' (was 'bronze')" in detail and "language eq 'fr' (was 'en')" in detail


def test_not_inverts_and_says_which_condition_held(world: tuple[Database, dict[str, int]]) -> None:
    db, ids = world
    cond = {"not": {"fact": "profile.attributes.tier", "op": "eq", "value": "gold"}}
    assert judge(db, cond, ids["bronze-en"], "n1")[0] == "fired"
    reason, detail = judge(db, cond, ids["gold-en"], "n2")
    assert reason == "condition_false" and detail == "not(profile.attributes.tier eq 'gold') (it held)"
    nested = {"all": [{"fact": "profile.attributes.language", "op": "eq", "value": "en"},
                      {"not": {"any": [{"fact": "profile.attributes.tier", "op": "eq", "value": "gold"},
                                       {"fact": "profile.attributes.tier", "op": "eq", "value": "silver"}]}}]}
    assert judge(db, nested, ids["bronze-en"], "n3")[0] == "fired"
    assert judge(db, nested, ids["bronze-fr"], "n4") == ("condition_false",
                                                         "profile.attributes.language eq 'en' (was 'fr')")
    assert judge(db, nested, ids["gold-en"], "n5")[1] == (
        "not(any(profile.attributes.tier eq 'gold'; profile.attributes.tier eq 'silver')) (it held)")


@pytest.mark.parametrize("conditions, message", [
    ({"all": [{"fact": "a", "op": "eq", "value": 1}], "any": [{"fact": "b", "op": "eq", "value": 2}]},
     "one of all / any / not"),
    ({"not": {"fact": "a", "op": "eq", "value": 1}, "fact": "b"}, "one of all / any / not"),
    ({"all": [{"fact": "cart.abandoned", "op": "eq", "vaule": True}]}, r"unknown condition field\(s\) vaule"),
    ({"fact": "a", "op": "eq", "value": 1, "values": [2]}, r"unknown condition field\(s\) values"),
])
def test_a_condition_that_would_be_silently_misread_is_refused(conditions: Any, message: str) -> None:
    with pytest.raises(CampaignError, match=message):
        campaign(conditions)


def test_segments_are_checked_the_same_way(tmp_path: Path) -> None:
    (tmp_path / "segments.yaml").write_text(
        "- id: regular\n  conditions: {fact: behaviour.visits_30d, op: gte, valeu: 4}\n")
    with pytest.raises(CampaignError, match="valeu"):
        load_segments(tmp_path)
    examples = Path(__file__).resolve().parents[1] / "examples/campaigns"
    assert {s.id for s in load_segments(examples)} >= {"frequent", "occasional"}
