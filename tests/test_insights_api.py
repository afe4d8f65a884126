"""Staff and customer endpoints over the wire: why, dry-run, interactions, redemption, figures, erasure."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from gateway.presence.settings import ReceiverSettings, ZoneBand
from gateway.presence.tracker import PresenceEvent
from gateway.profiles.service import NewProfile
from tests.fixtures import runtime_settings

ROOT = Path(__file__).resolve().parents[1]
TZ = "Europe/Paris"
T0 = dt.datetime(2026, 6, 1, 11, 0, tzinfo=ZoneInfo(TZ)).timestamp()
ADMIN = {"X-API-Key": "admin-key-for-insights-test"}


@pytest.fixture
async def gw(tmp_path, clock, runtime_factory):
    s = runtime_settings(tmp_path)
    s.api.admin_key = ADMIN["X-API-Key"]
    s.store.timezone = TZ
    s.campaigns.dir = str(ROOT / "examples/campaigns")
    s.receivers = [ReceiverSettings("rx", [ZoneBand("shoes", 5.0)])]
    return await runtime_factory(s), clock, f"http://127.0.0.1:{s.api.port}"


async def test_why_dry_run_interactions_redemption_figures_and_erasure(gw):
    rt, clock, base = gw
    ann = rt.service.create_profile(NewProfile(external_id="ann", name="Ann Lee", attributes={"tier": "gold"},
                                               identifiers=[("beacon", "ibeacon:aa:1:1")],
                                               consents={"offers": True}))["id"]
    # Ann walks in and lingers in shoes; an anonymous tag walks in too.
    key, anon = "ibeacon:aa:1:1", "ibeacon:ff:9:9"
    events = [PresenceEvent("visit_start", key, T0, "shoes", T0, T0), PresenceEvent("enter", key, T0, "shoes", T0, T0),
              PresenceEvent("dwell", key, T0 + 25, "shoes", T0, T0, 25.0),
              PresenceEvent("visit_start", anon, T0, "shoes", T0, T0)]
    [nid] = rt.pipeline.handle_presence(events)
    rt.pipeline.handle_presence([PresenceEvent("exit", key, T0 + 40, "shoes", T0, T0, 40.0),
                                 PresenceEvent("visit_end", key, T0 + 50, None, None, T0, 50.0)])
    rt.pipeline.flush_footfall()
    clock.set(T0 + 60)

    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        why = (await c.get(f"/v1/profiles/{ann}/decisions", params={"campaign": "shoes-dwell-offer"},
                           headers=ADMIN)).json()
        assert [(d["reason"], d["event"]) for d in why] == [("fired", "dwell")]

        before = len((await c.get(f"/v1/profiles/{ann}/decisions", headers=ADMIN)).json())
        dry = await c.post("/v1/decisions/dry-run", headers=ADMIN,
                           json={"profile_id": ann, "event": {"kind": "dwell", "zone": "shoes", "dwell_s": 30}})
        assert dry.status_code == 200 and dry.json()[0]["reason"] == "cooldown"
        assert len((await c.get(f"/v1/profiles/{ann}/decisions", headers=ADMIN)).json()) == before  # stored nothing
        bad = await c.post("/v1/decisions/dry-run", headers=ADMIN, json={"profile_id": ann, "event": {"kind": "fly"}})
        assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"

        token = (await c.post(f"/v1/profiles/{ann}/tokens", headers=ADMIN)).json()["token"]
        me = {"Authorization": f"Bearer {token}"}
        [note] = (await c.get("/v1/me/notifications", headers=me)).json()
        assert note["id"] == nid
        code = note["data"]["redemption_code"]
        assert len(code) == 8 and code.isalnum()
        for kind in ("opened", "clicked", "clicked"):
            r = await c.post(f"/v1/me/notifications/{nid}/interactions", headers=me, json={"kind": kind})
            assert r.status_code == 200
        assert (await c.post(f"/v1/me/notifications/{nid}/interactions", headers=me,
                             json={"kind": "redeemed"})).status_code == 422  # only staff confirm redemptions
        await c.post(f"/v1/me/notifications/{nid}/ack", headers=me)

        r = await c.post("/v1/redemptions", headers=ADMIN, json={"code": code.lower()})
        assert r.status_code == 200 and r.json()["offer"]["code"] == "SHOES10"
        again = await c.post("/v1/redemptions", headers=ADMIN, json={"code": code})
        assert again.status_code == 409 and "already redeemed" in again.json()["detail"]
        assert (await c.post("/v1/redemptions", headers=ADMIN, json={"code": "NOPE2345"})).status_code == 404
        assert (await c.post("/v1/redemptions", headers=me, json={"code": code})).status_code in (401, 403)

        day = dt.datetime.fromtimestamp(T0, ZoneInfo(TZ)).date().isoformat()
        f = (await c.get("/v1/figures", params={"from": day}, headers=ADMIN)).json()
        assert f["footfall"] == 2 and f["anonymous_visits"] == 1 and f["new_visits"] == 1
        assert f["avg_dwell_s_by_zone"] == {"shoes": 40.0}
        offer = f["notifications"]["campaigns"]["shoes-dwell-offer"]
        assert offer["notified"] == 1 and offer["delivered"] == 1 and offer["clicked"] == 1
        assert offer["ctr"] == 100.0 and offer["redemption_rate"] == 100.0 and offer["engagement_rate"] == 100.0
        assert (await c.get("/v1/figures", params={"from": day, "to": "2020-01-01"},
                            headers=ADMIN)).status_code == 422

        export = (await c.get(f"/v1/profiles/{ann}/export", headers=ADMIN)).json()
        assert export["profile"]["external_id"] == "ann" and len(export["notifications"]) == 1
        assert len(export["zone_stays"]) == 1
        assert (await c.delete(f"/v1/profiles/{ann}", headers=ADMIN)).status_code == 204
        assert (await c.get(f"/v1/profiles/{ann}", headers=ADMIN)).status_code == 404
        assert (await c.get("/v1/me/notifications", headers=me)).status_code == 401  # the token died with it
        assert (await c.delete(f"/v1/profiles/{ann}", headers=ADMIN)).status_code == 404
    assert rt.identities.beacon(key) is None


async def test_figures_without_dates_are_today_in_the_store_timezone(gw):
    _, clock, base = gw
    clock.set(dt.datetime(2026, 6, 2, 23, 30, tzinfo=ZoneInfo(TZ)).timestamp())  # 21:30 UTC: Paris is on the 2nd
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.get("/v1/figures", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert (r.json()["from"], r.json()["to"]) == ("2026-06-02", "2026-06-02")
        clock.set(dt.datetime(2026, 6, 3, 0, 30, tzinfo=ZoneInfo(TZ)).timestamp())  # 22:30 UTC on the 2nd
        assert (await c.get("/v1/figures", headers=ADMIN)).json()["from"] == "2026-06-03"
