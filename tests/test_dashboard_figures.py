"""The figures page: its tables, charts and CSV from the figures of GET /v1/figures, and in a browser the
chart, the table, the CSV and the API agreeing for the same range after a visit and a fired campaign."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.dashboard.figures import as_csv, chart, charts, evaluated_between, hour_edges, lift_interval, stacked, tables
from tests.live_gateway import ADMIN_KEY, enrol, walk_in

ARM = {"notified": 40, "converted_within_window": 10, "converted_rate": 25.0, "lift_vs_holdout": 15.0}


def figures_of(campaigns: dict[str, Any], days: list[dict[str, Any]] | None = None,
               hours: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The shape GET /v1/figures answers with (gateway.engine.figures.figures), the fields the page reads."""
    fig = {"from": "2026-06-01", "to": "2026-06-01", "timezone": "UTC", "footfall": 5, "unique_visitors": 4,
           "enrolled_visits": 3, "anonymous_visits": 2, "new_visits": 2, "returning_visits": 1,
           "avg_visit_s": 80.0, "bounce_rate": 33.33, "anonymous_bounces": 1, "bounce_rate_all": 40.0,
           "zones": {"shop": {"footfall": 4, "enrolled": 3, "anonymous": 1, "unique_enrolled_visitors": 2,
                              "avg_dwell_s_all": 42.5, "bounce_rate": 25.0}},
           "notifications": {"campaigns": campaigns}, "days": days or []}
    return fig | ({"hours": hours} if hours is not None else {})


def test_the_lift_interval_is_the_difference_of_two_proportions_with_its_standard_error() -> None:
    low, high = lift_interval(10, 40, 10.0, 50) or (0.0, 0.0)
    # Wald interval: (p1 - p0) +- 1.96 * sqrt(p1 q1 / n1 + p0 q0 / n0), p1 = 0.25 (n 40), p0 = 0.10 (n 50)
    half = 1.959964 * math.sqrt(0.25 * 0.75 / 40 + 0.1 * 0.9 / 50)
    assert (low, high) == (round(100 * (0.15 - half), 2), round(100 * (0.15 + half), 2))
    assert low < 15.0 < high
    assert lift_interval(10, 40, None, 0) is None  # no holdout: no interval, not a made-up one
    assert lift_interval(0, 0, 10.0, 50) is None


def test_a_funnel_row_joins_the_decisions_to_the_notifications_of_its_campaign() -> None:
    note = {"notified": 3, "delivered": 2, "opened": 2, "clicked": 1, "redeemed": 1, "conversions": 1,
            "experiment": {"holdout": {"profiles": 50, "conversion_rate": 10.0}, "variants": {"a": ARM}}}
    decided = evaluated_between({"offer": {"fired": 5, "suppressed": 4}, "quiet": {"fired": 0, "suppressed": 2}},
                                {"offer": {"fired": 1, "suppressed": 1}})
    assert decided == {"offer": {"evaluated": 7, "fired": 4}, "quiet": {"evaluated": 2, "fired": 0}}
    found = {t.name: t for t in tables(figures_of({"offer": note}), decided)}
    assert found["funnel"].rows == [("offer", 7, 4, 3, 2, 2, 1, 1, 1), ("quiet", 2, 0, 0, 0, 0, 0, 0, 0)]
    [arm] = found["experiments"].rows
    assert arm[:8] == ("offer", "a", 40, 10, 25.0, 50, 10.0, 15.0)
    assert (arm[8], arm[9]) == lift_interval(10, 40, 10.0, 50)
    assert "hours" not in found  # a range of one day only has hours


def test_the_charts_are_drawn_from_the_tables_cells_scaled_to_the_largest() -> None:
    days = [{"day": d, "footfall": f, "enrolled_visits": f, "anonymous_visits": 0, "unique_enrolled_visitors": f,
             "new_visits": f, "returning_visits": 0, "bounce_rate": None} for d, f in (("2026-06-01", 2),
                                                                                      ("2026-06-02", 8))]
    hours = [{"hour": f"{h:02d}:00", "footfall": 5 if h == 9 else 0, "enrolled_visits": 3 if h == 9 else 0,
              "anonymous_visits": 2 if h == 9 else 0} for h in range(24)]
    found = {t.name: t for t in tables(figures_of({}, days, hours), {})}
    drawn = charts(found)
    [per_day] = drawn["days"]
    assert [(b.label, b.value) for b in per_day.bars] == [("2026-06-01", 2.0), ("2026-06-02", 8.0)]
    assert per_day.bars[1].width == 4 * per_day.bars[0].width  # widths in proportion
    [per_hour] = drawn["hours"]
    assert [(b.label, b.value) for b in per_hour.bars if b.value] == [("09:00", 5.0)]  # enrolled + anonymous
    [nine] = [b for b in per_hour.bars if b.value]
    enrolled, anonymous = nine.parts
    assert (enrolled.name, enrolled.value, anonymous.name, anonymous.value) == ("enrolled", 3.0, "anonymous", 2.0)
    assert anonymous.x == enrolled.x + enrolled.width and enrolled.width + anonymous.width == nine.width
    assert found["hours"].rows[9] == ("09:00", 5, 3, 2)
    [_, _, bounce] = drawn["zones"]
    assert found["zones"].rows == [("shop", 4, 3, 1, 2, 42.5, 25.0)]
    assert [(b.label, b.value) for b in bounce.bars] == [("shop", 25.0)]
    tall = stacked("t", "two", ("a", "b"), [("x", (1.0, 1.0)), ("y", (4.0, None))])
    assert tall.bars[1].width == 2 * tall.bars[0].width and tall.bars[1].parts[1].width == 0.0
    assert chart("t", "empty", [("a", None)]).bars[0].width == 0.0  # a missing figure draws as nothing


def test_the_hours_of_a_day_the_clocks_change_are_labelled_as_the_shops_clock_shows() -> None:
    # Europe/London: clocks go forward at 01:00 on 2026-03-29 and back at 02:00 on 2026-10-25 (UK law, last Sundays)
    spring = hour_edges("2026-03-29", "Europe/London")
    assert len(spring) == 23 and [h[0] for h in spring[:3]] == ["00:00", "02:00", "03:00"]
    autumn = hour_edges("2026-10-25", "Europe/London")
    assert len(autumn) == 25 and [h[0] for h in autumn[:3]] == ["00:00", "01:00", "01:00"]
    assert all(b - a == 3600.0 for _, a, b in spring + autumn)
    assert len(hour_edges("2026-06-01", "UTC")) == 24


def test_the_csv_is_the_table_with_an_empty_cell_for_a_missing_figure() -> None:
    [totals] = [t for t in tables(figures_of({}), {}) if t.name == "totals"]
    rows = list(csv.reader(io.StringIO(as_csv(totals))))
    assert rows[0] == ["figure", "value"]
    assert ["bounce rate, enrolled (%)", "33.33"] in rows and len(rows) == len(totals.rows) + 1
    assert ["bounce rate, everyone (%)", "40.0"] in rows
    no_bounce = figures_of({}) | {"bounce_rate": None}
    [t] = [t for t in tables(no_bounce, {}) if t.name == "totals"]
    assert ["bounce rate, enrolled (%)", ""] in list(csv.reader(io.StringIO(as_csv(t))))
    hours = [{"hour": "10:00", "footfall": 3, "enrolled_visits": 1, "anonymous_visits": 2}]
    [h] = [t for t in tables(figures_of({}, hours=hours), {}) if t.name == "hours"]
    assert list(csv.reader(io.StringIO(as_csv(h)))) == [["hour", "footfall", "enrolled", "anonymous"],
                                                        ["10:00", "3", "1", "2"]]


# ------------------------------------------------------------------ in a browser, against a real gateway

browser = pytest.importorskip("tests.test_dashboard_browser")
World = browser.World
world = browser.world  # the module's gateway and Chromium, launched and bounded as the other browser tests


def cells(rows: list[list[str]]) -> list[list[str]]:
    return [[c.strip() for c in r] for r in rows]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.timeout(90)
@pytest.mark.skipif(not browser.os.access(browser.CHROMIUM, browser.os.X_OK), reason="needs Debian's chromium")
async def test_the_charts_tables_and_csv_agree_with_the_api_after_a_visit_and_a_fired_campaign(world: World
                                                                                               ) -> None:
    rt = world.rt
    await browser.put_campaign(world, browser.api_campaign("fig-offer", priority=20))
    pid, _ = enrol(rt, "Gail", 31)
    # Gail and a stranger (30 adverts: past the guard's passer-by hold) walk in, and both go quiet: their
    # short stays end on silence (bounces), the stranger's visit counted anonymously in its hour.
    rt.inject([*walk_in(31, rt.clock.now()), *walk_in(931, rt.clock.now(), n=30, address="06:AA:BB:CC:DD:31")])
    await rt.flush()
    assert browser.sent_to(world, pid, "fig-offer") == 1  # the campaign fired
    rt.clock.advance(60)
    rt.tick()
    await rt.flush()
    async with httpx.AsyncClient(base_url=world.base, headers={"X-API-Key": ADMIN_KEY}, timeout=10) as c:
        api = (await c.get("/v1/figures")).json()
    page = await world.signed_in(world.keys["read"])
    await page.goto(f"{world.base}/dashboard/figures")
    assert await page.input_value("#from") == api["from"]  # today, in store time

    async def table(name: str) -> list[list[str]]:
        return cells(await page.eval_on_selector_all(
            f'table[data-table="{name}"] tbody tr', "rows => rows.map(r => [...r.cells].map(c => c.textContent))"))

    days = await table("days")
    [today] = api["days"]
    assert days == [[today["day"], str(today["footfall"]), str(today["enrolled_visits"]),
                     str(today["anonymous_visits"]), str(today["unique_enrolled_visitors"]), str(today["new_visits"]),
                     str(today["returning_visits"]), "" if today["bounce_rate"] is None else str(today["bounce_rate"]),
                     "" if today["bounce_rate_all"] is None else str(today["bounce_rate_all"])]]
    assert today["enrolled_visits"] >= 1
    bar = page.locator(f'svg[data-chart="days"] g[data-label="{today["day"]}"]')
    assert float(await bar.get_attribute("data-value") or "nan") == today["footfall"]
    offer = api["notifications"]["campaigns"]["fig-offer"]
    [row] = [r for r in await table("funnel") if r[0] == "fig-offer"]
    assert row[3:] == [str(offer[k]) for k in ("notified", "delivered", "opened", "clicked", "redeemed",
                                                "conversions")]
    assert int(row[2]) >= 1 and int(row[1]) >= int(row[2])  # fired, and evaluated at least as often
    funnel_bars = page.locator('svg[data-chart="funnel"][aria-label="Funnel of fig-offer"] g')
    assert [await g.get_attribute("data-value") for g in await funnel_bars.all()] == \
        [str(float(c)) for c in row[1:]]
    zones = {r[0]: r for r in await table("zones")}
    assert api["zones"]["shop"]["bounce_rate"] is not None and api["zones"]["shop"]["anonymous"] >= 1
    for zone, f in api["zones"].items():
        assert zones[zone][1:4] == [str(f["footfall"]), str(f["enrolled"]), str(f["anonymous"])]
        assert zones[zone][6] == ("" if f["bounce_rate"] is None else str(f["bounce_rate"]))
        bounce = page.locator(f'svg[data-chart="zones"][aria-label="Bounce rate per zone (%)"] '
                              f'g[data-label="{zone}"]')
        assert float(await bounce.get_attribute("data-value") or "nan") == (f["bounce_rate"] or 0.0)
    hours = await table("hours")
    assert hours == [[h["hour"], str(h["footfall"]), str(h["enrolled_visits"]), str(h["anonymous_visits"])]
                     for h in api["hours"]]
    assert sum(int(r[1]) for r in hours) == api["footfall"] and sum(int(r[3]) for r in hours) >= 1
    assert sum(int(r[2]) for r in hours) == api["enrolled_visits"]
    for h in api["hours"]:  # each hour's bar: enrolled then anonymous, adding up to the footfall
        bar = page.locator(f'svg[data-chart="hours"] g[data-label="{h["hour"]}"]').first
        assert float(await bar.get_attribute("data-value") or "nan") == h["footfall"]
        parts = await bar.locator("rect").evaluate_all("rs => rs.map(r => [r.dataset.part, +r.dataset.value])")
        assert parts == [["enrolled", h["enrolled_visits"]], ["anonymous", h["anonymous_visits"]]]
    await page.screenshot(path=world.shot("dashboard-figures.png"), full_page=True)
    async with page.expect_download() as dl:
        await page.click("a:text-is('Download funnel.csv')")
    saved = Path(await (await dl.value).path())
    got = list(csv.reader(io.StringIO(saved.read_text())))
    assert got[0][0] == "campaign" and cells(got[1:]) == await table("funnel")
    for name, first in (("hours", "hour"), ("zones", "zone")):  # the new columns go to the CSV too
        async with page.expect_download() as dl:
            await page.click(f"a:text-is('Download {name}.csv')")
        got = list(csv.reader(io.StringIO(Path(await (await dl.value).path()).read_text())))
        assert got[0][0] == first and cells(got[1:]) == await table(name)
    assert await page.locator("main form[method=post], main button:not([type=submit])").count() == 0


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.timeout(90)
@pytest.mark.skipif(not browser.os.access(browser.CHROMIUM, browser.os.X_OK), reason="needs Debian's chromium")
async def test_another_stores_figures_are_chosen_apart_and_a_bad_range_is_refused(world: World) -> None:
    from gateway.storage.models import Visit

    rt = world.rt
    pid, _ = enrol(rt, "Hana", 32)
    with rt.db.session() as s:  # a second store's gateway writing to the same database
        s.add(Visit(profile_id=pid, started_at=rt.clock.now(), ended_at=rt.clock.now() + 30, zones=["shop"],
                    store_id="store-elsewhere"))
        s.commit()
    async with httpx.AsyncClient(base_url=world.base, headers={"X-API-Key": ADMIN_KEY}, timeout=10) as c:
        api = (await c.get("/v1/figures", params={"store": "store-elsewhere"})).json()
    page = await world.signed_in(world.keys["read"])
    await page.goto(f"{world.base}/dashboard/figures")
    options = await page.eval_on_selector_all("#store option", "os => os.map(o => o.value)")
    assert "store-elsewhere" in options and rt.service.store_id in options
    async with page.expect_navigation():
        await page.select_option("#store", "store-elsewhere")
        await page.click("button:text-is('Show')")
    assert "store=store-elsewhere" in page.url
    footfall = page.locator('table[data-table="totals"] tr:has(th:text-is("footfall")) td')
    assert await footfall.inner_text() == str(api["footfall"]) == "1"
    answer = await page.goto(f"{world.base}/dashboard/figures?from=2026-06-02&to=2026-06-01")
    assert answer is not None and answer.status == 422
    assert "ends before it starts" in await page.inner_text(".error")
    assert await page.locator("table[data-table]").count() == 0  # nothing shown for a range that is not one
    csv_answer = await page.request.get(f"{world.base}/dashboard/figures/nope.csv")
    assert csv_answer.status == 404
    anonymous = await world.page()
    assert (await anonymous.request.get(f"{world.base}/dashboard/figures/days.csv")).status == 401


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.timeout(90)
@pytest.mark.skipif(not browser.os.access(browser.CHROMIUM, browser.os.X_OK), reason="needs Debian's chromium")
async def test_the_figures_page_needs_no_sideways_scroll_on_an_upright_tablet(world: World) -> None:
    page = await world.signed_in(world.keys["read"])
    await page.set_viewport_size({"width": 800, "height": 1280})  # a 10" tablet held upright
    await page.goto(f"{world.base}/dashboard/figures")
    assert await page.locator('table[data-table="experiments"]').count() == 1  # the widest table is there
    assert await page.evaluate("document.scrollingElement.scrollWidth") <= 800
    # and no table is cut off: each fits its box, or its box scrolls sideways by itself
    boxes = await page.evaluate("""[...document.querySelectorAll('.tablebox')].map(b => ({
        fits: b.scrollWidth <= b.clientWidth + 1, scrolls: getComputedStyle(b).overflowX === 'auto'}))""")
    assert boxes and all(b["fits"] or b["scrolls"] for b in boxes)
    await page.set_viewport_size({"width": 1280, "height": 900})  # landscape: the wide tables go under their charts
    for name in ("days", "funnel"):
        box = page.locator(f'#fig-{name} .tablebox')
        assert await box.evaluate("b => b.scrollWidth <= b.clientWidth + 1"), name
