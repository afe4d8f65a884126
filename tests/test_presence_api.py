"""Presence evidence through the API: enrolled customers' last zone switches, on a live gateway.

``GET /v1/presence`` lists the newest switches beside the counts; ``GET /v1/presence/profiles/{id}``
one customer's, newest first. Anonymous identities are never listed, and an erasure takes a customer's
switches with it.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.live_gateway import ADMIN_KEY, T0, base_url, enrol, live_settings, running, walk_in

ADMIN = {"X-API-Key": ADMIN_KEY}
STRANGER = "06:AA:BB:CC:DD:EE"


async def test_enrolled_switches_are_served_with_the_counts_and_per_profile(tmp_path: Path) -> None:
    async with running(live_settings(tmp_path)) as rt, httpx.AsyncClient(base_url=base_url(rt), timeout=10) as c:
        pid, _ = enrol(rt, "alice", 1)
        rt.inject([*walk_in(1, T0), *walk_in(900, T0, address=STRANGER)])  # 1:900 is nobody's
        await rt.flush()
        now = await c.get("/v1/presence", headers=ADMIN)
        assert now.status_code == 200, now.text
        [entered] = now.json()["recent"]
        assert (entered["profile_id"], entered["event"], entered["zone"]) == (pid, "enter", "shop")
        assert T0 <= entered["since"] <= entered["time"] <= T0 + 1
        why = entered["why"]  # what the tracker heard and believed when it let her in
        assert [h["receiver"] for h in why["heard"]] == ["rx"] and -60 < why["heard"][0]["rssi"] < -50
        assert why["after"][0]["zone"] == "shop"
        assert why["after"][0]["posterior"] >= rt.settings.presence.enter_posterior
        shop_before = {st["zone"]: st["posterior"] for st in why["before"]}.get("shop", 0.0)
        assert shop_before < why["after"][0]["posterior"]  # this step's evidence is what tipped it
        assert STRANGER not in now.text and ":900" not in now.text  # the unknown tag is only counted

        rt.clock.advance(30)  # silence past exit_after_s: she has left
        rt.tick()
        await rt.flush()
        mine = await c.get(f"/v1/presence/profiles/{pid}", headers=ADMIN)
        assert mine.status_code == 200, mine.text
        assert [(s["event"], s["zone"]) for s in mine.json()] == [("exit", "shop"), ("enter", "shop")]
        assert mine.json()[0]["since"] == entered["since"]  # the exit names the stay it ends
        assert mine.json()[0]["why"] is None  # left on silence: no evidence to show
        assert [s["event"] for s in (await c.get("/v1/presence", headers=ADMIN)).json()["recent"]] == ["exit",
                                                                                                       "enter"]

        assert (await c.get("/v1/presence/profiles/4242", headers=ADMIN)).status_code == 404
        assert (await c.get(f"/v1/presence/profiles/{pid}")).status_code == 401

        assert (await c.delete(f"/v1/profiles/{pid}", headers=ADMIN)).status_code in (200, 204)
        await rt.flush()
        assert (await c.get(f"/v1/presence/profiles/{pid}", headers=ADMIN)).status_code == 404
        assert (await c.get("/v1/presence", headers=ADMIN)).json()["recent"] == []  # erased: gone here too


async def test_the_switches_are_documented_in_openapi(tmp_path: Path) -> None:
    async with running(live_settings(tmp_path)) as rt, httpx.AsyncClient(base_url=base_url(rt), timeout=10) as c:
        doc = (await c.get("/openapi.json")).json()
    route = doc["paths"]["/v1/presence/profiles/{profile_id}"]["get"]
    assert route["responses"]["200"]["content"]["application/json"]["schema"]["items"]["$ref"].endswith(
        "ZoneSwitchOut")
    switch = doc["components"]["schemas"]["ZoneSwitchOut"]["properties"]
    assert {"profile_id", "event", "zone", "time", "since", "why"} <= switch.keys()
    presence = doc["components"]["schemas"]["PresenceOut"]["properties"]
    assert presence["recent"]["items"]["$ref"].endswith("ZoneSwitchOut")
