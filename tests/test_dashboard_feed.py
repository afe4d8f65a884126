"""The decision feed and the campaigns page without a browser: the feed is bounded, keeps the runtime's
hook, forgets an erased profile and names customers by first name only; a campaign's YAML problems name
their lines; the recent decisions and the last 24 h's counts come from the decisions table."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import insert

from api.dashboard.campaigns import Problem, check_yaml, condition_rows, problems_of
from api.dashboard.feed import REASONS, DecisionFeed, first_name, first_names, view
from gateway.campaigns.model import parse_campaign
from gateway.engine.engine import EngineEvent, Outcome, Reason
from gateway.errors import NotFound
from gateway.profiles.service import GatewayService, NewProfile
from gateway.storage.models import Decision

T0 = 1_780_300_800.0  # 2026-06-01 08:00 UTC
GOOD = """\
id: coffee
purpose: offers
trigger: {type: enter, zone: shop}
action: {title: Coffee, body: On us}
"""


def outcome(pid: int, campaign: str = "c", fired: bool = False, reason: str = Reason.COOLDOWN) -> Outcome:
    return Outcome(campaign, pid, fired, reason, "sent 30 s ago, cooldown 600 s")


def event(t: float, key: str = "stay:shop:1") -> EngineEvent:
    return EngineEvent("enter", 1, t, key, "shop")


def test_the_feed_keeps_the_latest_only_and_passes_outcomes_on() -> None:
    feed, seen = DecisionFeed(size=3), []
    hook = feed.hook(lambda o, ev: seen.append(o.profile_id))
    for pid in range(1, 6):
        hook(outcome(pid), event(T0 + pid, f"k{pid}"))
    assert seen == [1, 2, 3, 4, 5]  # the runtime's own hook still gets every one
    assert [i.profile_id for i in feed.after(0)] == [3, 4, 5]
    assert [i.profile_id for i in feed.after(4)] == [5]
    assert feed.after(feed.last_seq) == []


def test_an_erased_profile_leaves_the_feed() -> None:
    feed = DecisionFeed()
    for pid in (1, 2, 1):
        feed.record(outcome(pid), event(T0))
    feed.forget(1)
    assert [i.profile_id for i in feed.after(0)] == [2]


def test_customers_are_named_by_first_name_and_gone_ones_are_not_shown() -> None:
    profiles = {1: {"name": "Alice  Martin"}, 2: {"name": None}}

    def get(pid: int) -> dict[str, str | None]:
        if pid not in profiles:
            raise NotFound(pid)
        return profiles[pid]

    names = first_names(get, [1, 2, 3, 1])
    assert names == {1: "Alice", 2: None}
    row = {"at": T0, "profile_id": 1, "campaign": "c", "event": "enter", "event_key": "k", "fired": False,
           "reason": "cooldown", "detail": "d"}
    shown = view(row, names, "Europe/Paris")
    assert shown is not None and shown["customer"] == "Alice" and shown["time"] == "10:00:00"
    assert shown["reason_text"] == "cooling down" and "profile=1" in shown["explain"]
    assert view({**row, "profile_id": 2}, names, "UTC")["customer"] == "customer #2"  # type: ignore[index]
    assert view({**row, "profile_id": 3}, names, "UTC") is None
    assert first_name("  ") is None


def test_every_engine_reason_has_words() -> None:
    assert set(REASONS) == set(Reason)


def test_a_yaml_problem_names_its_line_and_a_good_one_passes() -> None:
    definition, found = check_yaml(GOOD, "coffee")
    assert found == [] and definition is not None and definition["trigger"]["zone"] == "shop"
    bad = GOOD.replace("type: enter", "type: entre")
    assert check_yaml(bad, "coffee")[0] is None
    [problem] = check_yaml(bad, "coffee")[1]
    assert problem.line == 3 and "trigger" in problem.message
    unparsable = GOOD + "  limits: [\n"
    assert [p.line for p in check_yaml(unparsable, "coffee")[1]] == [5]
    [wrong_id] = check_yaml(GOOD, "tea")[1]
    assert wrong_id.line == 1 and "'tea'" in wrong_id.message
    assert check_yaml("- a list\n", "coffee")[1][0].line == 1


def test_the_validators_message_splits_into_lines() -> None:
    assert problems_of("campaign:3: trigger.type: bad\ncampaign: action: missing") == [
        Problem(3, "trigger.type: bad"), Problem(None, "action: missing")]


def test_the_failing_condition_is_marked_from_the_engines_detail() -> None:
    c = parse_campaign({"id": "x", "purpose": "offers", "trigger": {"type": "enter"},
                        "action": {"title": "t", "body": "b"},
                        "conditions": {"all": [{"fact": "loyalty.points", "op": "gte", "value": 100},
                                               {"not": {"fact": "event.zone", "op": "eq", "value": "till"}}]}})
    rows = condition_rows(c.conditions, "loyalty.points gte 100 (was 20)")
    assert [(r.depth, r.text, r.failed) for r in rows] == [
        (0, "all of", False), (1, "loyalty.points gte 100", True), (1, "not", False),
        (2, "event.zone eq 'till'", False)]
    assert not any(r.failed for r in condition_rows(c.conditions, None))


def test_recent_decisions_and_the_last_days_counts_come_from_the_table(service: GatewayService) -> None:
    pid = service.create_profile(NewProfile(name="Bo"))["id"]
    now = service.clock.now()
    rows = [(now - 90_000, "a", True), (now - 60, "a", True), (now - 50, "a", False), (now - 40, "b", False)]
    with service.db.session() as s:
        s.execute(insert(Decision), [{"at": t, "profile_id": pid, "campaign_id": c, "event_kind": "enter",
                                      "event_key": f"k{t}", "fired": f, "reason": "fired" if f else "cooldown",
                                      "store_id": service.store_id or "default"} for t, c, f in rows])
    assert service.decision_counts(now - 86400) == {"a": {"fired": 1, "suppressed": 1},
                                                    "b": {"fired": 0, "suppressed": 1}}
    latest = service.recent_decisions(2)
    assert [(d["campaign"], d["at"]) for d in latest] == [("b", now - 40), ("a", now - 50)]
    assert latest[0]["profile_id"] == pid


async def test_the_stream_sends_each_decision_once_and_an_erased_customer_leaves_the_feed(tmp_path: Path) -> None:
    import httpx

    from tests.live_gateway import base_url, enrol, live_settings, running, walk_in

    async with running(live_settings(tmp_path)) as rt:
        rt.dashboard.stream_every_s = 0.05
        base = base_url(rt)
        pid, _ = enrol(rt, "Hana Ito", 21)
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            assert (await c.get("/dashboard/stream?after=0")).status_code == 401  # no session, no stream
            assert (await c.get(rt.dashboard.login_link(base))).status_code == 303
            sent: list[dict[str, object]] = []
            async with c.stream("GET", f"/dashboard/stream?after={rt.dashboard.feed.last_seq}") as stream:
                rt.inject(walk_in(21, rt.clock.now()))
                await rt.flush()
                async for line in stream.aiter_lines():
                    if line.startswith("data: ") and line != "data: {}":
                        sent += json.loads(line[6:])
                        rt.dashboard.close()  # the first batch is enough: end the stream
            assert [(d["customer"], d["campaign"], d["reason"]) for d in sent] == [("Hana", "welcome", "fired")]
            assert "Hana" in (await c.get("/dashboard/decisions")).text  # drawn from the table
            rt.service.erase_profile(pid)
            assert rt.dashboard.feed.after(0) == []
            page = await c.get("/dashboard/decisions")
            assert "Hana" not in page.text  # nor from the table: her decisions went with her
