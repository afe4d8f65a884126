"""The parsed condition tree: each node checks itself, says why it failed and which facts it reads."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.campaigns.conditions import ConditionError, parse_condition
from gateway.campaigns.model import parse_campaign

FACTS: dict[str, Any] = {"profile": {"attributes": {"tier": "gold"}}, "cart": {"zones": ["shoes"], "items": 2},
                         "event": {"zone": "shoes"}, "behaviour": {"visits_30d": 3}}


def test_a_tree_checks_itself_and_names_the_failing_leaf() -> None:
    tree = parse_condition({"all": [{"fact": "profile.attributes.tier", "op": "in", "value": ["gold", "silver"]},
                                    {"any": [{"fact": "behaviour.visits_30d", "op": "gte", "value": 5},
                                             {"fact": "cart.zones", "op": "contains", "value_fact": "event.zone"}]},
                                    {"not": {"fact": "profile.attributes.banned", "op": "exists", "value": True}}]})
    assert tree.check(FACTS) is None
    assert tree.check({**FACTS, "cart": {"zones": []}}) == (
        "any(behaviour.visits_30d gte 5 (was 3); cart.zones contains 'shoes' (was []))")
    assert parse_condition({"fact": "cart.items", "op": "gt", "value": "x"}).check(FACTS) == \
        "cart.items gt 'x' (was 2)"  # values that cannot be ordered do not hold, they do not raise
    assert parse_condition({"fact": "nowhere.at.all", "op": "eq", "value": 1}).check(FACTS) == \
        "nowhere.at.all eq 1 (was missing)"
    assert parse_condition({"not": {"fact": "cart.items", "op": "eq", "value": 2}}).check(FACTS) == \
        "not(cart.items eq 2) (it held)"


def test_a_tree_knows_what_it_reads_not_what_its_values_say() -> None:
    tree = parse_condition({"any": [{"fact": "profile.attributes.note", "op": "eq", "value": "cart.items"},
                                    {"fact": "event.zone", "op": "in", "value_fact": "behaviour.zones"}]})
    assert tree.reads == {"profile.attributes.note", "event.zone", "behaviour.zones"}
    assert tree.reads_from("behaviour") and not tree.reads_from("cart")  # a value naming a fact reads nothing
    assert not parse_condition({"fact": "cartography", "op": "eq", "value": 1}).reads_from("cart")


def test_a_campaign_keeps_its_parsed_tree() -> None:
    c = parse_campaign({"id": "c", "purpose": "offers", "trigger": {"type": "enter", "zone": "z"},
                        "action": {"title": "t", "body": "b"},
                        "conditions": {"fact": "cart.items", "op": "gte", "value": 1}})
    assert c.conditions is not None and c.conditions.reads_from("cart") and c.conditions.check(FACTS) is None


@pytest.mark.parametrize(("cond", "where"), [
    ({"all": [{"fact": "a", "op": "eq", "value": 1}, {"fact": "b", "op": "like", "value": 1}]}, "conditions.all[1]"),
    ({"not": {"fact": "a", "op": "in", "value": 3}}, "conditions.not"),
    ({"any": []}, "conditions.any"),
    ({"fact": "a", "op": "eq", "vaule": 1}, "conditions"),
])
def test_a_malformed_condition_is_refused_at_parse_naming_where(cond: Any, where: str) -> None:
    with pytest.raises(ConditionError) as refused:
        parse_condition(cond)
    assert str(refused.value).startswith(f"{where}: ")
