"""The dashboard in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; no browser
download) against a real gateway: the runtime, uvicorn on a loopback port, SQLite, virtual time.

One browser and one gateway for the module; each test gets its own browser context (its own cookies).
The tests take screenshots as they pass through each page; ``DASHBOARD_SCREENSHOTS=docs`` puts them where
docs/dashboard.md shows them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import select

from api.dashboard.walks import labels_csv
from gateway.presence.settings import FloorZone, ReceiverSettings, ZoneBand
from gateway.presence.traces import Label, read_labels
from gateway.storage.models import Notification, Profile
from tests.live_gateway import ADMIN_KEY, base_url, enrol, live_settings, running, walk_in

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 8000
SHOTS_ENV = "DASHBOARD_SCREENSHOTS"
"""A directory for the screenshots (``DASHBOARD_SCREENSHOTS=docs`` refreshes docs/dashboard.md's); unset: a
temporary one, so a test run leaves the checkout as it was."""
TABLET = {"width": 1280, "height": 800}  # a 10" tablet in landscape

pytestmark = [pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="needs Debian's chromium (make test "
                                 "installs it)"),
              pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]
playwright_api = pytest.importorskip("playwright.async_api")


def store_settings(tmp: Path) -> Any:
    s = live_settings(tmp)
    s.zones = [FloorZone("shop", [[0, 0], [6, 0], [6, 4], [0, 4]]), FloorZone("till", [[6, 0], [9, 0], [9, 4], [6, 4]])]
    s.receivers = [ReceiverSettings("rx", [ZoneBand("shop", 50.0)], measured_power=-59, position=[2.0, 2.0]),
                   ReceiverSettings("rx2", [ZoneBand("till", 3.0)], measured_power=-59, position=[8.0, 2.0])]
    return s


class World:
    def __init__(self, rt: Any, browser: Any, keys: dict[str, str], shots: Path) -> None:
        self.rt, self.browser, self.keys, self.shots = rt, browser, keys, shots
        self.base = base_url(rt)

    def shot(self, name: str) -> str:
        return str(self.shots / name)

    async def page(self) -> Any:
        context = await self.browser.new_context(viewport=TABLET, accept_downloads=True)
        context.set_default_timeout(TIMEOUT_MS)
        return await context.new_page()

    async def signed_in(self, key: str) -> Any:
        page = await self.page()
        await page.goto(f"{self.base}/dashboard")
        await page.fill("#key", key)
        async with page.expect_navigation():
            await page.click("button:text-is('Sign in')")
        return page


@contextlib.asynccontextmanager
async def open_world(settings: Any, tmp: Path, scopes: Sequence[str], name: str) -> AsyncIterator[World]:
    """A live gateway whose dashboard streams look often (the tests wait less), an API key per scope, and one
    headless Chromium: what each browser test module runs against."""
    async with running(settings) as rt, playwright_api.async_playwright() as pw:
        rt.dashboard.stream_every_s = 0.05
        keys = {}
        async with httpx.AsyncClient(base_url=base_url(rt), headers={"X-API-Key": ADMIN_KEY}, timeout=10) as c:
            for scope in scopes:  # staff keys: each reads (the pages need it) and holds one more scope
                r = await c.post("/v1/keys", json={"name": f"{name}-{scope}", "scopes": sorted({"read", scope})})
                assert r.status_code == 201, r.text
                keys[scope] = r.json()["key"]
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True, timeout=20000)
        try:
            yield World(rt, browser, keys, Path(os.environ.get(SHOTS_ENV) or tmp))
        finally:
            await browser.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    tmp = tmp_path_factory.mktemp("dashboard")
    async with open_world(store_settings(tmp), tmp, ("read", "write", "campaigns"), "tablet") as w:
        yield w


async def test_the_one_time_link_signs_in_once(world: World) -> None:
    link = world.rt.dashboard.login_link(world.base)
    page = await world.page()
    await page.goto(link)
    assert page.url == f"{world.base}/dashboard"  # redirected, the token out of the address bar
    await page.wait_for_selector("h1:text('The store now')")
    [cookie] = [c for c in await page.context.cookies() if c["name"] == "gw_dash"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
    again = await world.page()
    answer = await again.goto(link)
    assert answer is not None and answer.status == 401
    assert "already used or has expired" in await again.inner_text(".error")
    assert not [c for c in await again.context.cookies() if c["name"] == "gw_dash"]
    async with page.expect_navigation():
        await page.click("button:text-is('Sign out')")
    await page.wait_for_selector("#key")  # signed out: the form again, and the old cookie opens nothing
    assert (await page.goto(f"{world.base}/dashboard/zones/shop")).status == 401  # type: ignore[union-attr]


async def test_a_key_signs_in_and_a_wrong_key_is_refused(world: World) -> None:
    page = await world.page()
    await page.goto(f"{world.base}/dashboard")
    await page.screenshot(path=world.shot("dashboard-signin.png"))
    await page.fill("#key", "gk_000000000000_" + "x" * 43)
    async with page.expect_navigation() as nav:
        await page.click("button:text-is('Sign in')")
    assert (await nav.value).status == 401
    assert "refused" in await page.inner_text(".error")
    await page.fill("#key", world.keys["write"])
    async with page.expect_navigation():
        await page.click("button:text-is('Sign in')")
    await page.wait_for_selector("h1:text('The store now')")


async def test_a_person_walking_in_changes_the_open_pages_count(world: World) -> None:
    rt = world.rt
    pid, _ = enrol(rt, "alice", 1)
    page = await world.signed_in(world.keys["read"])
    await page.wait_for_selector("#state:text('live')")
    assert await page.inner_text('[data-enrolled="shop"]') == "0"
    await page.evaluate("window.notReloaded = true")
    rt.tick()  # a first sample of the receivers' totals, before anyone walks in
    await rt.flush()
    rt.inject([*walk_in(1, rt.clock.now()), *walk_in(900, rt.clock.now(), n=30, address="06:AA:BB:CC:DD:EE")])
    await rt.flush()
    await page.wait_for_selector('[data-enrolled="shop"]:text("1")')
    # the stranger (30 adverts: past the guard's passer-by hold), counted apart
    assert await page.inner_text('[data-anonymous="shop"]') == "1"
    assert await page.text_content('[data-count="shop"]') == "1 + 1"  # on the plan
    rt.clock.advance(5)  # the stranger's last advert was at +2.9 s
    await page.wait_for_selector('[data-ago="rx"]:text-is("2.1 s ago")')
    assert await page.inner_text('[data-tags="rx"]') == "2"
    rt.tick()  # the pipeline's tick samples each receiver's totals at the clock's time: 38 adverts in 5 s
    await rt.flush()
    assert rt.receivers_heard()["rx"]["adverts_per_s"] == 7.6
    await page.wait_for_selector('[data-rate="rx"]:text-is("7.6")')
    assert await page.evaluate("window.notReloaded") is True
    assert "alice" not in (await page.content()).lower()  # counts only: nobody is drawn by default
    async with httpx.AsyncClient(base_url=world.base, headers={"X-API-Key": ADMIN_KEY}, timeout=10) as c:
        served = (await c.get("/v1/presence")).json()
    assert {z["zone"]: (z["enrolled"], z["anonymous"]) for z in served["zones"]} == {"shop": (1, 1)}
    await page.focus('g.zone[data-zone="shop"]')  # keyboard: a zone opens with Enter
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#detail:not([hidden])")
    await page.screenshot(path=world.shot("dashboard-store.png"))
    assert await page.inner_text("#detail-title") == "Zone shop today"
    assert pid > 0


async def test_a_read_key_has_no_buttons_that_change_and_its_post_is_refused(world: World) -> None:
    page = await world.signed_in(world.keys["read"])
    await page.goto(f"{world.base}/dashboard/calibrate")
    assert await page.locator("main form, main button").count() == 0
    assert "may only look" in await page.inner_text("main")
    csrf = await page.get_attribute(".signout input[name=csrf]", "value")
    status = await page.evaluate(POST, {"url": "/dashboard/calibrate/start", "body": f"csrf={csrf}&tag=ibeacon:r:1:1"})
    assert status == 403
    assert world.rt.dashboard.walks.of("ibeacon:r:1:1") is None


POST = """async ({url, body}) => (await fetch(url, {method: "POST", body,
    headers: {"Content-Type": "application/x-www-form-urlencoded"}, redirect: "manual"})).status"""


async def test_a_post_without_the_csrf_token_or_from_elsewhere_is_refused(world: World) -> None:
    page = await world.signed_in(world.keys["write"])
    await page.goto(f"{world.base}/dashboard/calibrate")
    assert await page.evaluate(POST, {"url": "/dashboard/calibrate/start", "body": "tag=ibeacon:c:1:1"}) == 403
    assert await page.evaluate(POST, {"url": "/dashboard/calibrate/start",
                                      "body": "csrf=guess&tag=ibeacon:c:1:1"}) == 403
    [cookie] = [c for c in await page.context.cookies() if c["name"] == "gw_dash"]
    csrf = await page.get_attribute("input[name=csrf]", "value")
    async with httpx.AsyncClient(base_url=world.base, timeout=10, cookies={"gw_dash": cookie["value"]}) as c:
        r = await c.post("/dashboard/calibrate/start", content=f"csrf={csrf}&tag=ibeacon:c:1:1",  # another site
                         headers={"Origin": "http://evil.example", "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 403 and "Origin" in r.text
    assert world.rt.dashboard.walks.of("ibeacon:c:1:1") is None


async def test_the_walks_taps_give_the_labels_csv(world: World) -> None:
    rt, tag = world.rt, "ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:1:7"
    page = await world.signed_in(world.keys["write"])
    await page.goto(f"{world.base}/dashboard/calibrate")
    await page.fill("#tag", "not,a,key")
    async with page.expect_navigation():
        await page.click("button:text-is('Start')")
    assert "no commas" in await page.inner_text(".error")  # refused, said once, nothing started
    assert rt.dashboard.walks.of("not,a,key") is None
    await page.reload()
    assert await page.locator(".error").count() == 0
    await page.fill("#tag", tag)
    t0 = rt.clock.now()

    async def press(name: str, after_s: float) -> None:
        rt.clock.advance(after_s)
        async with page.expect_navigation():
            await page.click(f"button:text-is('{name}')")

    await press("Start", 0)
    await press("shop", 5)
    await press("till", 40)
    await page.reload()  # a reload loses nothing: the taps are the server's
    assert "2 tap(s)" in await page.inner_text("main")
    await page.screenshot(path=world.shot("dashboard-walk.png"))
    await press("No zone", 20)
    await press("Stop the walk", 10)
    async with page.expect_download() as download:
        await page.click("#download")
    text = Path(await (await download.value).path()).read_text()
    expected = [Label(tag, t0 + 5, t0 + 45, "shop"), Label(tag, t0 + 45, t0 + 65, "till"),
                Label(tag, t0 + 65, t0 + 75, None)]
    assert text == labels_csv(expected)
    labels, errors = read_labels(text.splitlines())
    assert labels == expected and errors.count == 0
    assert "gateway calibrate" in await page.inner_text("#command")


async def test_revoking_a_key_ends_its_sessions(world: World) -> None:
    """Plain HTTP (the form's double-submit cookie and Origin, as a browser sends them); no page needed."""
    async with httpx.AsyncClient(base_url=world.base, headers={"X-API-Key": ADMIN_KEY}, timeout=10) as admin:
        made = (await admin.post("/v1/keys", json={"name": "soon-gone", "scopes": ["read"]})).json()
    async with httpx.AsyncClient(base_url=world.base, timeout=10, headers={"Origin": world.base}) as c:
        form = await c.get("/dashboard")
        csrf = form.text.split('name="csrf" value="')[1].split('"')[0]
        assert (await c.post("/dashboard/login", data={"key": made["key"]})).status_code == 403  # no token
        signed = await c.post("/dashboard/login", data={"key": made["key"], "csrf": csrf})
        assert signed.status_code == 303, signed.text
        assert "The store now" in (await c.get("/dashboard")).text
        async with httpx.AsyncClient(base_url=world.base, headers={"X-API-Key": ADMIN_KEY}, timeout=10) as admin:
            assert (await admin.delete(f"/v1/keys/{made['id']}")).status_code in (200, 204)
        assert 'id="key"' in (await c.get("/dashboard")).text  # back to the sign-in form
        assert (await c.get("/dashboard/stream")).status_code == 401


async def test_a_tablet_in_portrait_needs_no_sideways_scroll_and_tab_reaches_the_zones(world: World) -> None:
    page = await world.signed_in(world.keys["write"])
    await page.set_viewport_size({"width": 800, "height": 1280})  # a 10" tablet held upright
    for path in ("/dashboard", "/dashboard/calibrate"):
        await page.goto(f"{world.base}{path}")
        assert await page.evaluate("document.scrollingElement.scrollWidth") <= 800, path
    await page.goto(f"{world.base}/dashboard")
    focused = []
    for _ in range(12):  # skip link, nav, sign-out, then the plan's zones
        await page.keyboard.press("Tab")
        focused.append(await page.evaluate("document.activeElement.getAttribute('data-zone')"))
        if focused[-1]:
            break
    assert focused[-1] == "shop", focused
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#detail-title:text-is('Zone shop today')")


# ------------------------------------------------------------------ the decision feed and campaigns

def api_campaign(cid: str, priority: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": cid, "name": cid, "purpose": "offers", "trigger": {"type": "enter", "zone": "shop"},
            "action": {"title": "Hello", "body": "A treat at the till."}, "priority": priority, **extra}


async def put_campaign(world: World, definition: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=world.base, headers={"X-API-Key": ADMIN_KEY}, timeout=10) as c:
        r = await c.put(f"/v1/campaigns/{definition['id']}", json=definition)
    assert r.status_code in (200, 201), r.text


def sent_to(world: World, profile_id: int, campaign: str) -> int:
    with world.rt.db.session() as s:
        return len(s.scalars(select(Notification.id).where(Notification.profile_id == profile_id,
                                                          Notification.campaign_id == campaign)).all())


VIP = {"conditions": {"all": [{"fact": "loyalty.points", "op": "gte", "value": 100}]}}


async def test_a_decision_appears_in_the_open_feed_with_its_reason(world: World) -> None:
    rt = world.rt
    await put_campaign(world, api_campaign("vip-only", **VIP))
    pid, _ = enrol(rt, "Dana Smith", 11)
    page = await world.signed_in(world.keys["read"])
    await page.goto(f"{world.base}/dashboard/decisions")
    await page.wait_for_selector("#state:text('live')")
    await page.evaluate("window.notReloaded = true")
    rt.tick()  # a first sample of the receivers' totals, before anyone walks in
    await rt.flush()
    rt.inject(walk_in(11, rt.clock.now()))
    await rt.flush()
    mine = f'#feed tbody tr[data-key^="vip-only|{pid}|"]'
    row = page.locator(mine)
    await row.wait_for()
    text = await row.inner_text()
    assert "Dana" in text and "Smith" not in text and "a condition did not hold" in text
    assert await row.locator("[data-reason]").inner_text() == "condition_false"
    with rt.db.session() as s:  # what the engine saw: the points the visit left her with
        points = s.scalar(select(Profile.points).where(Profile.id == pid))
    assert f"loyalty.points gte 100 (was {points})" in text
    assert await page.evaluate("window.notReloaded") is True  # live, over the stream
    assert "02:00:00:00:00:0B" not in await page.content()  # never the tag's address
    await page.screenshot(path=world.shot("dashboard-decisions.png"))
    await page.reload()  # the table keeps them
    assert await page.locator(mine).count() == 1
    async with page.expect_navigation():
        await page.locator(f"{mine} a").click()
    assert "did not fire for Dana" in await page.inner_text("h1")
    assert await page.inner_text("#conditions li.failed code") == "loyalty.points gte 100"
    assert f"(was {points})" in await page.inner_text("#detail")
    await page.screenshot(path=world.shot("dashboard-explain.png"), full_page=True)


async def test_a_campaign_toggled_off_on_the_page_stops_firing(world: World) -> None:
    rt = world.rt
    await put_campaign(world, api_campaign("toggle-me", priority=10))
    first, _ = enrol(rt, "Erin", 12)
    rt.inject(walk_in(12, rt.clock.now()))
    await rt.flush()
    assert sent_to(world, first, "toggle-me") == 1  # on: it fires
    page = await world.signed_in(world.keys["campaigns"])
    await page.goto(f"{world.base}/dashboard/campaigns")
    row = page.locator('tr[data-campaign="toggle-me"]')
    assert await row.locator("[data-state]").inner_text() == "on"
    assert int(await row.locator("[data-fired]").inner_text()) >= 1
    assert "read-only" in await page.locator('tr[data-campaign="welcome"]').inner_text()  # a file's
    async with page.expect_navigation():
        await row.locator("button:text-is('Turn off')").click()
    assert await row.locator("[data-state]").inner_text() == "off"
    assert "toggle-me is off" in await page.inner_text(".notice")
    await page.screenshot(path=world.shot("dashboard-campaigns.png"), full_page=True)
    second, _ = enrol(rt, "Fay", 13)
    rt.inject(walk_in(13, rt.clock.now()))
    await rt.flush()
    assert sent_to(world, second, "toggle-me") == 0  # off: the next qualifying event sends nothing
    assert sent_to(world, second, "welcome") == 1  # and the event did qualify: the file's campaign fired


async def test_a_read_key_cannot_toggle_a_campaign(world: World) -> None:
    await put_campaign(world, api_campaign("kept-on"))
    page = await world.signed_in(world.keys["read"])
    await page.goto(f"{world.base}/dashboard/campaigns")
    assert await page.locator('tr[data-campaign="kept-on"]').count() == 1
    assert await page.locator("main form, main button").count() == 0
    assert "may only look" in await page.inner_text("main")
    csrf = await page.get_attribute(".signout input[name=csrf]", "value")
    status = await page.evaluate(POST, {"url": "/dashboard/campaigns/kept-on/disable", "body": f"csrf={csrf}"})
    assert status == 403
    assert world.rt.service.get_campaign("kept-on")["definition"]["priority"] == 0
    assert world.rt.service.get_campaign("kept-on")["definition"].get("enabled", True) is True


async def test_a_yaml_error_is_shown_before_saving_naming_its_line(world: World) -> None:
    await put_campaign(world, api_campaign("edit-me"))
    page = await world.signed_in(world.keys["campaigns"])
    await page.goto(f"{world.base}/dashboard/campaigns/edit-me")
    text = await page.input_value("#yaml")
    assert "type: enter" in text
    line = next(n for n, t in enumerate(text.splitlines(), 1) if "type: enter" in t)
    await page.fill("#yaml", text.replace("type: enter", "type: entre"))
    problem = page.locator("#problems li.error")
    await problem.wait_for()
    assert (await problem.inner_text()).startswith(f"line {line}: trigger")
    await page.screenshot(path=world.shot("dashboard-campaign-yaml.png"), full_page=True)
    assert world.rt.service.get_campaign("edit-me")["definition"]["trigger"]["type"] == "enter"  # not saved
    async with page.expect_navigation() as nav:  # saving anyway is refused the same way
        await page.click("#save")
    assert (await nav.value).status == 422
    assert (await page.inner_text("#problems")).startswith(f"line {line}:")
    assert world.rt.service.get_campaign("edit-me")["definition"]["trigger"]["type"] == "enter"
    await page.fill("#yaml", text.replace("priority: 0", "priority: 4"))
    await page.wait_for_selector("#check-state:text('no problems found')")
    async with page.expect_navigation():
        await page.click("#save")
    assert "Saved edit-me" in await page.inner_text(".notice")
    assert world.rt.service.get_campaign("edit-me")["definition"]["priority"] == 4
    await page.goto(f"{world.base}/dashboard/campaigns/welcome")  # a file's campaign: shown, not editable
    assert "campaign.yaml" in await page.inner_text("#read-only")
    assert await page.locator("#save").count() == 0 and await page.get_attribute("#yaml", "readonly") is not None


async def test_a_dry_run_says_what_would_fire_and_why_not(world: World) -> None:
    rt = world.rt
    await put_campaign(world, api_campaign("vip-only", **VIP))
    pid, _ = enrol(rt, "Gil", 14)
    page = await world.signed_in(world.keys["read"])  # a dry run is a read
    await page.goto(f"{world.base}/dashboard/campaigns/dry-run?q=Gil")
    await page.select_option("#kind", "enter")
    await page.select_option("#zone", "shop")
    async with page.expect_navigation():
        await page.click("button:text-is('Dry run')")
    async with httpx.AsyncClient(base_url=world.base, headers={"X-API-Key": ADMIN_KEY}, timeout=10) as c:
        api = (await c.post("/v1/decisions/dry-run", json={"profile_id": pid,
                                                            "event": {"kind": "enter", "zone": "shop"}})).json()
    shown = {await r.get_attribute("data-campaign"): await r.inner_text()
             for r in await page.locator("#outcomes tbody tr").all()}
    assert set(shown) == {o["campaign_id"] for o in api}
    for o in api:
        assert o["reason"] in shown[o["campaign_id"]]
    assert "condition_false" in shown["vip-only"]
    assert sent_to(world, pid, "vip-only") == 0 and sent_to(world, pid, "welcome") == 0  # nothing sent


async def test_the_new_pages_need_no_sideways_scroll_on_an_upright_tablet(world: World) -> None:
    page = await world.signed_in(world.keys["campaigns"])
    await page.set_viewport_size({"width": 800, "height": 1280})
    for path in ("/dashboard/decisions", "/dashboard/campaigns", "/dashboard/campaigns/welcome",
                 "/dashboard/campaigns/dry-run"):
        await page.goto(f"{world.base}{path}")
        assert await page.evaluate("document.scrollingElement.scrollWidth") <= 800, path


async def test_a_new_campaign_starts_from_a_starter_and_exists_once_saved(world: World) -> None:
    page = await world.signed_in(world.keys["campaigns"])
    await page.goto(f"{world.base}/dashboard/campaigns")
    await page.fill("#new-id", "brand-new")
    async with page.expect_navigation():
        await page.click("button:text-is('New campaign')")
    assert "New campaign brand-new" in await page.inner_text("h1")
    assert "brand-new" not in {c["id"] for c in world.rt.service.list_campaigns()}  # nothing yet
    async with page.expect_navigation():
        await page.click("#save")
    assert "Saved brand-new" in await page.inner_text(".notice")
    saved = world.rt.service.get_campaign("brand-new")["definition"]
    assert saved["enabled"] is False and saved["trigger"] == {"type": "enter", "zone": "shop"}
    read = await world.signed_in(world.keys["read"])  # a read key cannot start one
    answer = await read.goto(f"{world.base}/dashboard/campaigns/not-there")
    assert answer is not None and answer.status == 404
