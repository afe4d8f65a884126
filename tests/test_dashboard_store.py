"""The store page's options: it names customers only when the shop turned it on, and then only those who
consented; a picture of the floor goes under the plan, to signed-in staff only.

A live gateway (Runtime, uvicorn on loopback, virtual time); the page and its live stream read over HTTP
with the session a one-time link opens, as a browser would.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.dashboard.plan import load_floor_image, plan
from gateway.app.config import DashboardSettings
from gateway.errors import ConfigError
from gateway.presence.settings import FloorZone, ReceiverSettings, ZoneBand
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
    made = rt.service.create_profile(NewProfile(external_id=name, name=name, identifiers=[("beacon", beacon(minor))],
                                                consents={"offers": True, **consents}))
    return int(made["id"])


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


def png(width: int = 4, height: int = 3) -> bytes:
    """A real (tiny, grey) PNG, as a shop's exported floor plan would be."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


ZONES = [FloorZone("shop", [[0, 0], [6, 0], [6, 4], [0, 4]]), FloorZone("till", [[6, 0], [9, 0], [9, 4], [6, 4]])]


def test_the_picture_goes_on_the_floor_rectangle_it_was_given(tmp_path: Path) -> None:
    f = tmp_path / "floor.png"
    f.write_bytes(png())
    spanning = load_floor_image(str(f), [], ZONES)  # no bounds: the zones' outline
    assert spanning.bounds == (0.0, 0.0, 9.0, 4.0) and spanning.media_type == "image/png"
    drawn = plan(ZONES, [], spanning.bounds)
    assert drawn.image is not None
    assert (drawn.image.x, drawn.image.y, drawn.image.width, drawn.image.height) == (0.6, 0.6, 9.0, 4.0)
    wider = plan(ZONES, [], load_floor_image(str(f), [-2, -1, 11, 6], ZONES).bounds)  # the box grows to hold it
    assert wider.view_box == "0 0 14.2 8.2"
    assert wider.image is not None and (wider.image.x, wider.image.y) == (0.6, 0.6)
    # y is flipped as the zones are: the picture's top edge is the floor's far side (y = 6)
    assert wider.zones[0].points.split()[3] == "2.6,2.6"  # shop's corner (0, 4): 2 m right of and 2 m below the top


@pytest.mark.parametrize(("body", "bounds", "words"), [
    (b"<svg onload='alert(1)'/>", [], "not a PNG or JPEG"),
    (b"", [], "not a PNG or JPEG"),
    (None, [], "cannot be read"),
    (png(), [0, 0, 0, 4], "floor_image_bounds"),
    (png(), [1, 2, 3], "floor_image_bounds"),
])
def test_a_wrong_picture_stops_the_start_with_the_setting_named(tmp_path: Path, body: bytes | None,
                                                                bounds: list[float], words: str) -> None:
    f = tmp_path / "floor.img"
    if body is not None:
        f.write_bytes(body)
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_floor_image(str(f), bounds, ZONES)


async def test_the_floor_picture_is_drawn_under_the_plan_for_signed_in_staff_only(tmp_path: Path) -> None:
    picture = png()
    (tmp_path / "floor.png").write_bytes(picture)
    s = live_settings(tmp_path)
    s.zones = ZONES
    s.receivers = [ReceiverSettings("rx", [ZoneBand("shop", 50.0)], measured_power=-59, position=[2.0, 2.0])]
    s.dashboard = DashboardSettings(floor_image=str(tmp_path / "floor.png"))
    async with running(s) as rt:
        async with httpx.AsyncClient(base_url=base_url(rt), timeout=10) as stranger:
            assert (await stranger.get("/dashboard/floor-image")).status_code == 401
        async with signed_in(rt) as c:
            page = (await c.get("/dashboard")).text
            [src] = re.findall(r'<image href="([^"]+)"', page)
            got = await c.get(src)
            assert got.status_code == 200 and got.content == picture
            assert got.headers["content-type"] == "image/png" and got.headers["x-content-type-options"] == "nosniff"
            again = await c.get(src, headers={"If-None-Match": got.headers["etag"]})
            assert again.status_code == 304


async def test_without_a_picture_the_plan_has_none(tmp_path: Path) -> None:
    s = live_settings(tmp_path)
    s.zones = ZONES
    async with running(s) as rt, signed_in(rt) as c:
        assert "<image" not in (await c.get("/dashboard")).text
        assert (await c.get("/dashboard/floor-image")).status_code == 404
