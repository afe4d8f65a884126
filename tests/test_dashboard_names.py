"""The store page names customers only when the shop turned it on, and then only those who consented.

A live gateway (Runtime, uvicorn on loopback, virtual time); the page and its live stream read over HTTP
with the session a one-time link opens, as a browser would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from gateway.app.config import DashboardSettings
from gateway.errors import ConfigError
from gateway.profiles.service import NewProfile
from tests.live_gateway import base_url, beacon, live_settings, running, walk_in
from tests.sse import SseReader


@asynccontextmanager
async def signed_in(rt: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url(rt), timeout=10) as c:
        r = await c.get(rt.dashboard.login_link(base_url(rt)))
        assert r.status_code == 303, r.text
        yield c


def person(rt: Any, name: str, minor: int, **consents: bool) -> int:
    return int(rt.service.create_profile(NewProfile(external_id=name, name=name, identifiers=[("beacon", beacon(minor))],
                                                    consents={"offers": True, **consents}))["id"])


def lives(reader: SseReader) -> list[dict[str, Any]]:
    return [e.json() for e in reader.events if e.event == "live"]


async def test_with_the_setting_on_only_consenting_customers_are_named_live(tmp_path: Path) -> None:
    s = live_settings(tmp_path)
    s.dashboard = DashboardSettings(show_customers=True, show_purpose="analytics")
    async with running(s) as rt, signed_in(rt) as c:
        rt.dashboard.stream_every_s = 0.05
        bob = person(rt, "Bob Stone", 1, analytics=True)
        person(rt, "Alice Green", 2)  # offers only: counted, never named
        now = rt.clock.now()
        rt.inject([*walk_in(1, now), *walk_in(2, now)])
        await rt.flush()
        page = await c.get("/dashboard")
        assert page.status_code == 200
        assert "Customers shown" in page.text and ">Bob</td>" in page.text
        assert "Alice" not in page.text and "Stone" not in page.text  # first names only
        reader = await SseReader(c, "/dashboard/stream").start()
        try:
            assert await reader.wait(lambda r: lives(r))
            view = lives(reader)[-1]
            assert view["people"] == {"shop": ["Bob"]}
            assert [(z["zone"], z["enrolled"]) for z in view["zones"]] == [("shop", 2)]
            rt.service.set_consents(bob, {"analytics": False})  # withdrawn: gone from the page at the next look
            assert await reader.wait(lambda r: lives(r)[-1]["people"] == {"shop": []})
        finally:
            await reader.close()


async def test_by_default_the_page_names_nobody(tmp_path: Path) -> None:
    async with running(live_settings(tmp_path)) as rt, signed_in(rt) as c:
        rt.dashboard.stream_every_s = 0.05
        person(rt, "Bob Stone", 1, analytics=True)  # consented, yet the shop did not turn naming on
        rt.inject(walk_in(1, rt.clock.now()))
        await rt.flush()
        page = await c.get("/dashboard")
        assert "Bob" not in page.text and "Customers shown" not in page.text
        reader = await SseReader(c, "/dashboard/stream").start()
        try:
            assert await reader.wait(lambda r: lives(r))
            assert "people" not in lives(reader)[-1] and "Bob" not in reader.events[-1].data
        finally:
            await reader.close()


def test_an_unknown_purpose_is_refused() -> None:
    try:
        DashboardSettings(show_customers=True, show_purpose="gossip")
    except ConfigError as e:
        assert "dashboard.show_purpose" in str(e) and "gossip" in str(e)
    else:
        raise AssertionError("an unknown consent purpose was accepted")
