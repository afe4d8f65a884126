"""A store day in virtual time with the demo's scenario: figures and decisions checked."""

from __future__ import annotations

from pathlib import Path

from gateway.simulate import parse_duration, simulate
from simulators.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]


def test_duration_parsing():
    assert parse_duration("8h") == 28800 and parse_duration("1h30m") == 5400 and parse_duration("45") == 45


def test_a_store_day_in_virtual_time():
    scenario = load_scenario(ROOT / "examples/store.yaml")
    s = simulate(scenario, 5 * 3600, campaigns_dir=str(ROOT / "examples/campaigns"), seed=0)
    enrolled_visits = sum(1 for p in scenario.people for v in p.visits if v.at < 5 * 3600)
    assert s.visits_enrolled_new == len({p.id for p in scenario.people if any(v.at < 5 * 3600 for v in p.visits)})
    assert s.visits_enrolled_returning >= 1  # Alice comes back at 14,400 s
    assert s.visits_enrolled_new + s.visits_enrolled_returning <= enrolled_visits
    assert s.visits_anonymous >= scenario.crowd.first_wave
    # Every campaign fired for someone, and nobody without consent got anything.
    assert set(s.notifications) == {"shoes-dwell-offer", "abandoned-cart-reminder", "mower-blade-service"}
    no_marketing = {p.id for p in scenario.people if not {"offers", "cart_reminders", "maintenance"} & set(p.consents)}
    assert no_marketing == {"ivan", "julia", "karl", "lena"}
    assert not [d for d in s.decisions if d[0] in no_marketing and d[2] == "fired"]
    assert s.suppressions["no_consent"] >= 2
    # The cart reminder reaches only the owners of abandoned carts who consented: Alice and Hugo.
    fired_cart = {who for who, campaign, reason in s.decisions
                  if campaign == "abandoned-cart-reminder" and reason == "fired"}
    assert fired_cart == {"alice", "hugo"}
