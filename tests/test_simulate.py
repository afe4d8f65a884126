"""A whole store day in virtual time with the demo's scenario: figures and decisions checked."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from gateway.app.simulate import parse_duration, simulate
from gateway.campaigns.model import load_campaigns
from simulators.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
DAY = 8 * 3600


def test_duration_parsing():
    assert parse_duration("8h") == 28800 and parse_duration("1h30m") == 5400 and parse_duration("45") == 45


def test_a_store_day_in_virtual_time():
    scenario = load_scenario(ROOT / "examples/store.yaml")
    s = simulate(scenario, DAY, campaigns_dir=str(ROOT / "examples/campaigns"), seed=0)
    visits = [(p, v) for p in scenario.people for v in p.visits if v.at < DAY]
    visitors = {p.id for p, _ in visits}
    f = s.figures

    # Footfall: every enrolled visit of the scenario, plus the anonymous crowd (counted, never stored).
    assert f["store"] == scenario.store.id and f["enrolled_visits"] == len(visits)
    assert f["footfall"] == f["enrolled_visits"] + f["anonymous_visits"] and f["anonymous_visits"] > 0
    assert f["unique_enrolled_visitors"] == len(visitors) == f["new_visits"]
    assert f["returning_visits"] == len(visits) - len(visitors)  # Alice, Chloé and Hugo come back
    assert f["bounce_rate"] == 0.0  # every route crosses three zones or more
    shoe_visits = [v for _, v in visits if any(z == "shoes" for z, _ in v.route)]
    assert f["zones"]["shoes"]["enrolled"] == len(shoe_visits)
    planned = [secs for _, v in visits for z, secs in v.route if z == "shoes"]
    assert min(planned) - 15 <= f["avg_dwell_s_by_zone"]["shoes"] <= max(planned) + 15
    [today] = f["days"]
    assert today["footfall"] == f["footfall"] and today["notifications"]["notified"] == f["notifications"]["total"][
        "notified"]

    # Decisions: figures and the decision stream agree, and every control held.
    by_campaign = {c: x["notified"] for c, x in f["notifications"]["campaigns"].items()}
    assert by_campaign == dict(s.notifications)
    consents = {p.id: set(p.consents) for p in scenario.people}
    purposes = {c.id: c.purpose for c in load_campaigns(ROOT / "examples/campaigns")}
    fired = [(who, c) for who, c, reason in s.decisions if reason == "fired"]
    assert all(purposes[c] in consents[who] for who, c in fired)  # no targeting without consent
    assert {who for who, c, r in s.decisions if r == "no_consent"} >= {"ivan", "julia", "lena"}
    per_person = Counter(fired)
    assert per_person[("alice", "abandoned-cart-reminder")] == 1  # reminded once, not again on her return
    assert {who for who, c in fired if c.startswith("abandoned-cart")} == {"alice", "hugo"}
    assert all(n == 1 for (who, c), n in per_person.items() if c == "shoes-dwell-offer")  # daily cooldown
    returning_to_shoes = {p.id for p, v in visits if v is not p.visits[0] and any(z == "shoes" for z, _ in v.route)}
    assert returning_to_shoes == {"chloe", "hugo"}
    assert {who for who, c, r in s.decisions if c == "shoes-dwell-offer" and r == "cooldown"} == returning_to_shoes
    maintenance = sum(n for c, n in s.notifications.items() if purposes[c] == "maintenance")
    assert maintenance >= 1 and f["maintenance"]["prompts"] == maintenance
