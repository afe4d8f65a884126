"""The devices, alarms and health pages: their pieces (ages, the chart's geometry, reading /metrics), and in
headless Chromium against a real gateway: a device reading raises an alarm that the page shows and acks,
a ``read`` key gets no buttons and a 403, and the health page shows the database up.

The browser part launches Chromium exactly as tests/test_dashboard_browser.py does (its World and launch
arguments are reused), with device rules added to that module's store.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from api.dashboard.devices import (
    CHART_H,
    CHART_PAD,
    CHART_W,
    age_text,
    alarm_rows,
    chart,
    health_view,
    live_alarms,
    samples,
)
from tests.live_gateway import ADMIN_KEY, T0, base_url

# ------------------------------------------------------------------ the pieces


def test_an_age_reads_at_a_glance() -> None:
    assert [age_text(s) for s in (-3, 0, 59, 60, 3599, 3600 + 5 * 60, 2 * 86400 + 4 * 3600 + 59)] == [
        "0 s", "0 s", "59 s", "1 min", "59 min", "1 h 5 min", "2 d 4 h"]


def _alarm(created: float, ack: float | None = None, booked: float | None = None) -> dict[str, Any]:
    return {"id": 1, "created_at": created, "acknowledged_at": ack, "booked_at": booked}


def test_an_alarm_row_has_its_age_and_what_the_owner_did() -> None:
    rows = alarm_rows([_alarm(T0 - 125), _alarm(T0 - 10, ack=T0 - 5), _alarm(T0, ack=T0, booked=T0)], T0)
    assert [(r["age"], r["state"]) for r in rows] == [("2 min", "new"), ("10 s", "acknowledged"), ("0 s", "booked")]
    assert rows[0]["age_s"] == 125


def test_the_live_list_carries_what_the_page_shows_and_changes_with_the_owner() -> None:
    base = {"device_id": "fz", "name": "Freezer too warm", "rule": "r", "severity": "critical", "last_value": 3.5,
            "detail": "temp 3.5 gt 0.0", "profile_id": 9, "count": 1}
    new = alarm_rows([{**base, **_alarm(T0 - 60)}], T0)
    acked = alarm_rows([{**base, **_alarm(T0 - 60, ack=T0)}], T0)
    assert live_alarms(new) != live_alarms(acked)
    assert live_alarms(new) == live_alarms(alarm_rows([{**base, **_alarm(T0 - 60)}], T0))
    assert "profile_id" not in live_alarms(new) and '"age":"1 min"' in live_alarms(new)


def _bucket(start: float, metric: str, mean: float | None) -> dict[str, Any]:
    return {"start": start, "metric": metric, "mean": mean}


def test_a_chart_spans_its_box_with_the_highest_value_at_the_top() -> None:
    rows = [_bucket(T0, "temp", -18.0), _bucket(T0, "door", 1.0), _bucket(T0 + 60, "temp", 2.0),
            _bucket(T0 + 120, "temp", -8.0), _bucket(T0 + 180, "temp", None)]
    c = chart(rows, "temp")
    assert c is not None and (c.low, c.high, c.first, c.last) == (-18.0, 2.0, T0, T0 + 120)
    xy = [tuple(float(n) for n in p.split(",")) for p in c.points.split()]
    assert [x for x, _ in xy] == [CHART_PAD, CHART_W / 2, CHART_W - CHART_PAD]
    assert [y for _, y in xy] == [CHART_H - CHART_PAD, CHART_PAD, CHART_H / 2]  # -18 bottom, 2 top, -8 between
    assert chart(rows, "humidity") is None


def test_a_single_flat_value_is_drawn_in_the_middle() -> None:
    c = chart([_bucket(T0, "temp", 4.0)], "temp")
    assert c is not None and c.points == f"{CHART_W / 2:.1f},{CHART_H / 2:.1f}"


# Shaped like gateway/app/metrics.py's render() output (Prometheus text format 0.0.4).
METRICS = """\
# HELP gateway_queue_depth Items waiting in the gateway's queues
# TYPE gateway_queue_depth gauge
gateway_queue_depth{queue="adverts"} 3
gateway_queue_depth{queue="readings"} 0
gateway_outbox_pending{channel="push"} 7
gateway_adverts_dropped_total 12
gateway_dead_letters_total{channel="push"} 2
gateway_dead_letters_total{channel="webhook"} 1
gateway_database_up 1
"""


def test_the_metrics_text_is_read_by_family_and_label() -> None:
    assert samples(METRICS, "gateway_queue_depth") == [({"queue": "adverts"}, 3.0), ({"queue": "readings"}, 0.0)]
    assert samples(METRICS, "gateway_database_up") == [({}, 1.0)]
    assert samples("gateway_x{a=\"1\"} NaNish\n", "gateway_x") == []


def test_the_health_view_says_what_health_readiness_and_metrics_say() -> None:
    v = health_view({"status": "degraded", "components": {"db": "ok", "mqtt": "connecting", "scanner": "disabled"}},
                    {"status": "ready", "components": {"db": "ok", "migrations": "current"}}, METRICS)
    assert v["status"] == "degraded" and v["ready"] == "ready"
    assert v["components"] == {"db": "ok", "mqtt": "connecting", "scanner": "disabled", "migrations": "current"}
    assert v["queues"] == [("adverts", 3), ("readings", 0)]
    assert v["counters"]["gateway_adverts_dropped_total"] == 12 and v["counters"]["gateway_dead_letters_total"] == 3
    assert health_view({"status": "ok", "components": {}}, None, "")["queues"] == []


# ------------------------------------------------------------------ in the browser

CHROMIUM = "/usr/bin/chromium"
browser_only = [pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="needs Debian's chromium"),
                pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]


def in_browser(test: Any) -> Any:
    for mark in browser_only:
        test = mark(test)
    return test
RULE = """\
id: freezer-warm
name: Freezer too warm
match: {kind: freezer}
create:
  - {severity: critical, when: {metric: temp, op: gt, value: 0}}
clear: {when: {metric: temp, op: lt, value: -16}}
actions: {prompt: false, staff: false}
"""
# The freezer rule of tests/test_alarms.py, reduced to its critical step (no prompt: no campaign needed).


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    pytest.importorskip("playwright.async_api")
    from tests.test_dashboard_browser import open_world, store_settings

    tmp = tmp_path_factory.mktemp("dashboard-devices")
    s = store_settings(tmp)
    (tmp / "rules").mkdir()
    (tmp / "rules" / "freezer.yaml").write_text(RULE)
    s.device_rules.dir = str(tmp / "rules")
    s.devices.profiles_dir = str(tmp / "no-profiles")
    s.devices.unknown_policy = "reject"  # an unregistered device's reading becomes a dead letter
    async with open_world(s, tmp, ("read", "write"), "desk") as w:
        yield w


def _warm_freezer(rt: Any, device: str, owner: str) -> int:
    """An owned freezer whose readings go through the pipeline as the MQTT consumer hands them; the last is warm."""
    from devices.payloads import Reading
    from gateway.profiles.service import NewProfile

    pid: int = rt.service.create_profile(NewProfile(external_id=owner, name=owner))["id"]
    rt.service.register_device(device, "freezer", pid)
    now = rt.clock.now()
    for i, temp in enumerate((-19.0, -18.5, 3.5)):
        rt.pipeline.ingest_readings([Reading(device, "s1", now - 120 + 60 * i, {"temp": temp})], now=now)
    return pid


async def _api_alarms(rt: Any, device: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=base_url(rt), headers={"X-API-Key": ADMIN_KEY}, timeout=10) as c:
        r = await c.get("/v1/alarms", params={"device_id": device})
    assert r.status_code == 200, r.text
    alarms: list[dict[str, Any]] = r.json()
    return alarms


POST = """async ({url, body}) => (await fetch(url, {method: "POST", body,
    headers: {"Content-Type": "application/x-www-form-urlencoded"}, redirect: "manual"})).status"""


@in_browser
async def test_a_warm_reading_raises_an_alarm_the_page_shows_and_acks(world: Any) -> None:
    page = await world.signed_in(world.keys["write"])
    await page.goto(f"{world.base}/dashboard/devices")
    await page.wait_for_selector("#state:text('live')")  # a selector, not a string to eval (the CSP forbids it)
    assert await page.locator("#alarms tr[data-alarm]").count() == 0
    _warm_freezer(world.rt, "fz-1", "ada")  # while the page is open
    [alarm] = await _api_alarms(world.rt, "fz-1")
    assert alarm["status"] == "active" and alarm["severity"] == "critical" and alarm["acknowledged_at"] is None
    row = page.locator(f"#alarms tr[data-alarm='{alarm['id']}']")
    await row.wait_for()  # drawn from the page's stream, without a reload
    assert await row.get_attribute("data-severity") == "critical"
    assert await row.locator("[data-state]").inner_text() == "new"
    await page.reload()  # the devices table is drawn once, when the page is opened
    await page.wait_for_selector("#state:text('live')")  # a selector, not a string to eval (the CSP forbids it)
    assert await page.locator("#devices a:text-is('fz-1')").count() == 1
    await page.screenshot(path=world.shot("dashboard-alarms.png"), full_page=True)
    async with page.expect_navigation():
        await row.locator("button:text-is('Acknowledge')").click()
    assert f"Alarm {alarm['id']} acknowledged." in await page.inner_text(".notice")
    assert await row.locator("[data-state]").inner_text() == "acknowledged"
    [after] = await _api_alarms(world.rt, "fz-1")
    assert after["acknowledged_at"] is not None and after["status"] == "active"
    # The device's chart and table come from the per-minute rollups the API serves.
    await page.click("#alarms a:text-is('fz-1')")
    await page.wait_for_selector("figure.chart[data-metric=temp] polyline")
    await page.screenshot(path=world.shot("dashboard-device.png"), full_page=True)
    async with httpx.AsyncClient(base_url=world.base, headers={"X-API-Key": ADMIN_KEY}, timeout=10) as c:
        rollups = (await c.get("/v1/devices/fz-1/rollups", params={"period": "minute"})).json()
    shown = [float(t) for t in await page.locator("#rollups td[data-mean]").all_inner_texts()]
    assert shown == [round(r["mean"], 3) for r in rollups] and len(shown) == 3
    async with page.expect_navigation():
        await page.click("form.card button:text-is('Serviced')")
    assert "1 alarm(s) resolved" in await page.inner_text(".notice")
    assert (await _api_alarms(world.rt, "fz-1"))[0]["status"] == "resolved"
    csrf = await page.get_attribute(".signout input[name=csrf]", "value")
    assert await page.evaluate(POST, {"url": f"/dashboard/alarms/{alarm['id']}/ack", "body": f"csrf={csrf}"}) == 404


@in_browser
async def test_a_read_key_sees_alarms_without_buttons_and_its_post_is_refused(world: Any) -> None:
    _warm_freezer(world.rt, "fz-2", "bea")
    [alarm] = await _api_alarms(world.rt, "fz-2")
    page = await world.signed_in(world.keys["read"])
    await page.goto(f"{world.base}/dashboard/devices")
    assert await page.locator(f"#alarms tr[data-alarm='{alarm['id']}']").count() == 1
    assert await page.locator("main form, main button").count() == 0
    assert "may only look" in await page.inner_text("main")
    csrf = await page.get_attribute(".signout input[name=csrf]", "value")
    for url in (f"/dashboard/alarms/{alarm['id']}/ack", f"/dashboard/alarms/{alarm['id']}/book",
                "/dashboard/devices/fz-2/service"):
        assert await page.evaluate(POST, {"url": url, "body": f"csrf={csrf}"}) == 403
    [same] = await _api_alarms(world.rt, "fz-2")
    assert same == alarm  # nothing changed
    write = await world.signed_in(world.keys["write"])
    await write.goto(f"{world.base}/dashboard/devices")
    assert await write.evaluate(POST, {"url": f"/dashboard/alarms/{alarm['id']}/ack", "body": "csrf=guess"}) == 403
    assert (await _api_alarms(world.rt, "fz-2"))[0]["acknowledged_at"] is None


@in_browser
async def test_the_health_page_shows_what_health_says(world: Any) -> None:
    from devices.payloads import Reading

    now = world.rt.clock.now()
    world.rt.pipeline.ingest_readings([Reading("ghost-9", "s1", now, {"temp": 1.0})], now=now)  # refused
    async with httpx.AsyncClient(base_url=world.base, timeout=10) as c:
        health = (await c.get("/health")).json()
    page = await world.signed_in(world.keys["read"])
    await page.goto(f"{world.base}/dashboard/health")
    assert await page.inner_text("#components tr[data-component=db] [data-state]") == "ok"
    for name, state in health["components"].items():
        assert await page.inner_text(f"#components tr[data-component={name}] [data-state]") == str(state)
    assert await page.locator("#queues tbody tr").count() >= 3  # adverts, readings, sightings at least
    assert await page.locator("#receivers tbody tr").count() == 2
    async with httpx.AsyncClient(base_url=world.base, headers={"X-API-Key": ADMIN_KEY}, timeout=10) as c:
        [dead] = (await c.get("/v1/dead-letters", params={"device_id": "ghost-9"})).json()
    for path in ("/dashboard/health", "/dashboard/devices"):
        await page.goto(f"{world.base}{path}")
        row = page.locator("#dead-letters tbody tr", has_text="ghost-9")
        assert await row.locator("[data-reason]").inner_text() == dead["reason"] == "unknown_device"
        assert dead["detail"] in await row.inner_text()
    await page.goto(f"{world.base}/dashboard/health")
    await page.wait_for_selector("#state:text('live')")
    await page.evaluate("window.notReloaded = true")
    now = world.rt.clock.now()  # live: a newly refused message shows without a reload
    world.rt.pipeline.ingest_readings([Reading("ghost-10", "s1", now, {"temp": 1.0})], now=now)
    await page.wait_for_selector("#dead-letters tbody tr:has-text('ghost-10') [data-reason]")
    assert await page.evaluate("window.notReloaded") is True
    assert await page.inner_text("#components tr[data-component=db] [data-state]") == "ok"  # redrawn alike
    await page.screenshot(path=world.shot("dashboard-health.png"), full_page=True)


@in_browser
async def test_the_pages_need_no_sideways_scroll_on_an_upright_tablet(world: Any) -> None:
    page = await world.signed_in(world.keys["write"])
    await page.set_viewport_size({"width": 800, "height": 1280})  # a 10" tablet held upright
    for path in ("/dashboard/devices", "/dashboard/devices/fz-1", "/dashboard/health"):
        await page.goto(f"{world.base}{path}")
        assert await page.evaluate("document.scrollingElement.scrollWidth") <= 800, path
