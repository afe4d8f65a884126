"""A key's scopes apply on the dashboard as over the API: a page shows no more than its key may read there.

Plain HTTP against a live gateway (the sign-in form's double-submit cookie and Origin, as a browser sends
them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.live_gateway import ADMIN_KEY, base_url, live_settings, running


async def make_key(rt: Any, *scopes: str) -> str:
    async with httpx.AsyncClient(base_url=base_url(rt), headers={"X-API-Key": ADMIN_KEY}, timeout=10) as admin:
        r = await admin.post("/v1/keys", json={"name": "-".join(scopes), "scopes": list(scopes)})
        assert r.status_code == 201, r.text
        return str(r.json()["key"])


@asynccontextmanager
async def browser(rt: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url(rt), timeout=10, headers={"Origin": base_url(rt)}) as c:
        yield c


async def sign_in(c: httpx.AsyncClient, key: str) -> httpx.Response:
    form = await c.get("/dashboard")
    csrf = form.text.split('name="csrf" value="')[1].split('"')[0]
    return await c.post("/dashboard/login", data={"key": key, "csrf": csrf})


async def test_a_campaigns_key_sees_the_campaign_pages_and_nothing_else(tmp_path: Path) -> None:
    async with running(live_settings(tmp_path)) as rt:
        key = await make_key(rt, "campaigns")
        async with httpx.AsyncClient(base_url=base_url(rt), headers={"X-API-Key": key}, timeout=10) as api:
            assert (await api.get("/v1/campaigns")).status_code == 200  # what the API lets it read...
            assert (await api.get("/v1/figures")).status_code == 403
        async with browser(rt) as c:
            signed = await sign_in(c, key)
            assert signed.status_code == 303 and signed.headers["location"] == "/dashboard/campaigns"
            assert (await c.get("/dashboard/campaigns")).status_code == 200  # ...is what the pages show
            for path in ("/dashboard", "/dashboard/figures", "/dashboard/devices", "/dashboard/decisions",
                         "/dashboard/health", "/dashboard/stream", "/dashboard/zones/shop",
                         "/dashboard/figures/days.csv", "/dashboard/health/stream", "/dashboard/devices/stream"):
                r = await c.get(path)
                assert r.status_code == 403, path
                assert "needs the read scope" in r.text, path


async def test_a_key_that_reads_nothing_here_cannot_sign_in(tmp_path: Path) -> None:
    async with running(live_settings(tmp_path)) as rt:
        key = await make_key(rt, "privacy")
        async with browser(rt) as c:
            r = await sign_in(c, key)
            assert r.status_code == 403 and "needs the read scope" in r.text
            assert "gw_dash" not in c.cookies
            assert 'id="key"' in (await c.get("/dashboard")).text  # still the sign-in form


async def test_a_read_key_sees_every_page(tmp_path: Path) -> None:
    async with running(live_settings(tmp_path)) as rt:
        key = await make_key(rt, "read")
        async with browser(rt) as c:
            signed = await sign_in(c, key)
            assert signed.status_code == 303 and signed.headers["location"] == "/dashboard"
            for path in ("/dashboard", "/dashboard/campaigns", "/dashboard/figures", "/dashboard/devices",
                         "/dashboard/decisions", "/dashboard/health", "/dashboard/zones/shop"):
                assert (await c.get(path)).status_code == 200, path
