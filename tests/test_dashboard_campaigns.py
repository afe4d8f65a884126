"""The campaigns page beyond toggling and editing: deleting an API campaign (confirmed, scoped, file
campaigns refused) and a dry run with the extra facts a telemetry or alarm campaign reads.

Plain HTTP with the session a one-time link opens (the forms' CSRF token and Origin, as a browser sends
them), against a live gateway.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.dashboard.routes import event_facts
from gateway.profiles.service import NewProfile
from tests.live_gateway import ADMIN_KEY, base_url, live_settings, running

ALARM = {"name": "Chain service", "purpose": "maintenance", "enabled": True, "trigger": {"type": "alarm"},
         "conditions": {"all": [{"fact": "alarm.rule", "op": "eq", "value": "ebike-chain"}]},
         "action": {"title": "Your chain is due", "body": "Book a service."}}


def csrf_of(html: str, form_id: str) -> str:
    form = html.split(f'id="{form_id}"', 1)[1]
    return re.search(r'name="csrf" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]


def admin_api(rt: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url(rt), headers={"X-API-Key": ADMIN_KEY}, timeout=10)


@asynccontextmanager
async def signed_in(rt: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url(rt), timeout=10, headers={"Origin": base_url(rt)}) as c:
        assert (await c.get(rt.dashboard.login_link(base_url(rt)))).status_code == 303
        yield c


async def test_an_api_campaign_is_deleted_only_when_confirmed(tmp_path: Path) -> None:
    async with running(live_settings(tmp_path)) as rt, admin_api(rt) as api:
        assert (await api.put("/v1/campaigns/chain", json=ALARM)).status_code in (200, 201)
        async with signed_in(rt) as c:
            page = (await c.get("/dashboard/campaigns/chain")).text
            csrf = csrf_of(page, "delete")
            unconfirmed = await c.post("/dashboard/campaigns/chain/delete", data={"csrf": csrf})
            assert unconfirmed.status_code == 303
            assert (await api.get("/v1/campaigns/chain")).status_code == 200  # a stray tap deletes nothing
            assert "Not deleted" in (await c.get("/dashboard/campaigns/chain")).text
            assert (await c.post("/dashboard/campaigns/chain/delete", data={"confirm": "chain"})).status_code == 403
            done = await c.post("/dashboard/campaigns/chain/delete", data={"csrf": csrf, "confirm": "chain"})
            assert done.status_code == 303 and done.headers["location"] == "/dashboard/campaigns"
            assert (await api.get("/v1/campaigns/chain")).status_code == 404
            assert "Deleted chain." in (await c.get("/dashboard/campaigns")).text
            # a file campaign offers no delete, and a forged one is refused with the reason
            assert 'id="delete"' not in (await c.get("/dashboard/campaigns/welcome")).text
            await c.post("/dashboard/campaigns/welcome/delete", data={"csrf": csrf, "confirm": "welcome"})
            assert "defined in a file" in (await c.get("/dashboard/campaigns")).text
            assert (await api.get("/v1/campaigns/welcome")).status_code == 200


async def test_a_read_key_gets_no_delete_and_its_post_changes_nothing(tmp_path: Path) -> None:
    async with running(live_settings(tmp_path)) as rt, admin_api(rt) as api:
        assert (await api.put("/v1/campaigns/chain", json=ALARM)).status_code in (200, 201)
        key = (await api.post("/v1/keys", json={"name": "desk", "scopes": ["read"]})).json()["key"]
        async with httpx.AsyncClient(base_url=base_url(rt), timeout=10, headers={"Origin": base_url(rt)}) as c:
            form = (await c.get("/dashboard")).text
            login = re.search(r'name="csrf" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
            assert (await c.post("/dashboard/login", data={"key": key, "csrf": login})).status_code == 303
            page = (await c.get("/dashboard/campaigns/chain")).text
            assert 'id="delete"' not in page
            csrf = csrf_of(page, "editor")
            r = await c.post("/dashboard/campaigns/chain/delete", data={"csrf": csrf, "confirm": "chain"})
            assert r.status_code == 403
        assert (await api.get("/v1/campaigns/chain")).status_code == 200


async def test_the_dry_run_takes_the_facts_an_alarm_campaign_reads(tmp_path: Path) -> None:
    async with running(live_settings(tmp_path)) as rt:
        pid = rt.service.create_profile(NewProfile(external_id="rider", name="Rider One",
                                                   consents={"maintenance": True}))["id"]
        async with httpx.AsyncClient(base_url=base_url(rt), headers={"X-API-Key": ADMIN_KEY}, timeout=10) as api:
            assert (await api.put("/v1/campaigns/chain", json=ALARM)).status_code in (200, 201)
            async with signed_in(rt) as c:
                def outcome(html: str) -> str:
                    row = html.split('data-campaign="chain"', 1)[1].split("</tr>", 1)[0]
                    return re.sub(r"<[^>]+>", "", row)

                bare = await c.get("/dashboard/campaigns/dry-run", params={"profile": pid, "kind": "alarm"})
                assert "condition_false" in outcome(bare.text)
                facts = "alarm: {rule: ebike-chain}\ndevice: {id: bike-7}"
                given = await c.get("/dashboard/campaigns/dry-run", params={"profile": pid, "kind": "alarm",
                                                                           "facts": facts})
                assert "would fire" in outcome(given.text)
                assert "ebike-chain" in given.text  # the facts stay in the form
                served = (await api.post("/v1/decisions/dry-run", json={
                    "profile_id": pid, "event": {"kind": "alarm", "facts": event_facts(facts)}})).json()
                assert [o["fired"] for o in served if o["campaign_id"] == "chain"] == [True]
                broken = await c.get("/dashboard/campaigns/dry-run", params={"profile": pid, "kind": "alarm",
                                                                            "facts": "alarm: [unclosed"})
                assert "facts: line" in broken.text and 'data-campaign="chain"' not in broken.text
            assert not (await api.get(f"/v1/profiles/{pid}/decisions")).json()  # a dry run stores nothing


@pytest.mark.parametrize(("text", "words"), [("- a\n- b", "expected a mapping"), ("a: [", "line 1"),
                                             ("{1: x}", "expected a mapping")])
def test_facts_that_are_not_a_mapping_are_refused_with_why(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        event_facts(text)
