"""Campaigns managed over the API take effect live; carts raise abandonment and purchase events once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from gateway.presence.settings import ReceiverSettings, ZoneBand
from gateway.presence.tracker import PresenceEvent
from gateway.profiles.service import NewProfile
from gateway.storage.models import Decision, Notification
from tests.fixtures import runtime_settings

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_780_300_800.0
ADMIN = {"X-API-Key": "admin-key-for-campaigns-test"}
KEY = "ibeacon:aa:1:1"


@pytest.fixture
async def gw(tmp_path, clock, runtime_factory):
    s = runtime_settings(tmp_path)
    s.api.admin_key = ADMIN["X-API-Key"]
    s.campaigns.dir = str(ROOT / "examples/campaigns")
    s.receivers = [ReceiverSettings("rx", [ZoneBand("garden", 5.0)])]
    rt = await runtime_factory(s)
    pid = rt.service.create_profile(NewProfile(external_id="ann", name="Ann", identifiers=[("beacon", KEY)],
                                               consents={"offers": True, "cart_reminders": True}))["id"]
    return rt, clock, pid, httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.api.port}", headers=ADMIN, timeout=10)


def enter(rt, t: float, stay: str = "1"):
    return rt.pipeline.handle_presence([PresenceEvent("enter", KEY, t, "garden", t, t)])


GARDEN = {"purpose": "offers", "trigger": {"type": "enter", "zone": "garden"},
          "action": {"title": "Seeds", "body": "2 for 1 on seeds"}}


async def test_campaign_lifecycle_over_the_api_takes_effect_live(gw):
    rt, clock, _pid, c = gw
    async with c:
        listed = (await c.get("/v1/campaigns")).json()
        assert {x["id"] for x in listed if x["source"] == "file"} >= {"shoes-dwell-offer", "mower-blade-service"}
        assert enter(rt, T0) == []  # no campaign for the garden yet

        bad = await c.put("/v1/campaigns/garden", json={**GARDEN, "purpose": "spam"})
        assert bad.status_code == 422 and "purpose" in bad.json()["detail"]
        assert (await c.post("/v1/campaigns/validate", json={**GARDEN, "trigger": {"type": "x"}})).status_code == 422
        assert (await c.post("/v1/campaigns/validate", json=GARDEN)).json()["valid"] is True
        assert (await c.put("/v1/campaigns/shoes-dwell-offer", json=GARDEN)).status_code == 409

        created = await c.put("/v1/campaigns/garden", json=GARDEN)
        assert created.status_code == 201 and created.json()["source"] == "api"
        assert len(enter(rt, T0 + 1, "2")) == 1  # live at once

        assert (await c.post("/v1/campaigns/garden/disable")).json()["definition"]["enabled"] is False
        clock.set(T0 + 10)
        assert enter(rt, T0 + 10, "3") == []
        assert (await c.post("/v1/campaigns/garden/enable")).status_code == 200
        replaced = await c.put("/v1/campaigns/garden", json={**GARDEN, "limits": {"cooldown_s": 3600}})
        assert replaced.status_code == 200
        with rt.db.session() as s:  # the cooldown counts the earlier send: durable state survived the reload
            enter(rt, T0 + 20, "4")
            assert [d.reason for d in s.scalars(select(Decision).where(Decision.campaign_id == "garden")
                                                .order_by(Decision.id))] == ["fired", "cooldown"]
        assert (await c.delete("/v1/campaigns/garden")).status_code == 204
        assert (await c.get("/v1/campaigns/garden")).status_code == 404
        assert (await c.delete("/v1/campaigns/shoes-dwell-offer")).status_code == 409

        # Survives a restart: API campaigns are in the database.
        assert (await c.put("/v1/campaigns/garden2", json=GARDEN)).status_code == 201
    rt.service.file_campaigns.pop("nothing", None)
    rt.reload_campaigns()
    assert "garden2" in rt.campaigns.by_id


async def test_cart_abandonment_and_purchase_are_raised_once(gw):
    rt, clock, pid, c = gw
    reminder = {"purpose": "cart_reminders", "trigger": {"type": "cart_abandoned"},
                "action": {"title": "Your cart", "body": "{cart.items_where}", "delay_s": 600},
                "cancel_on": ["purchase"]}
    async with c:
        assert (await c.put("/v1/campaigns/cart-nudge", json=reminder)).status_code == 201
        r = await c.put("/v1/carts/c1", json={"profile_id": pid, "items": [{"sku": "X", "name": "Rake"}],
                                              "updated_at": T0 - 3600})
        assert r.status_code == 200
        created = rt.pipeline.cart_events(T0)
        assert created == []  # delayed: scheduled, not yet released
        assert rt.pipeline.cart_events(T0 + 5) == []  # raised once only
        with rt.db.session() as s:
            [n] = s.scalars(select(Notification).where(Notification.campaign_id == "cart-nudge")).all()
            assert n.status == "scheduled" and n.body == "Rake"

        # They buy before the reminder goes: the purchase withdraws it.
        done = await c.put("/v1/carts/c1", json={"profile_id": pid, "items": [{"sku": "X"}], "status": "checked_out",
                                                 "updated_at": T0 + 60})
        assert done.status_code == 200
        rt.pipeline.cart_events(T0 + 120)
        clock.set(T0 + 700)
        assert rt.pipeline.tick(T0 + 700) == []
        with rt.db.session() as s:
            assert s.get(Notification, n.id).status == "cancelled"
            reasons = [d.reason for d in s.scalars(select(Decision).where(Decision.campaign_id == "cart-nudge"))]
        assert reasons == ["fired", "cancelled"]
        reopen = await c.put("/v1/carts/c1", json={"profile_id": pid, "items": [{"sku": "X"}]})
        assert reopen.status_code == 409


def test_catalogue_csv_import_all_or_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'data_dir = "{tmp_path}"\n')
    argv = [sys.executable, "-m", "gateway.app.cli", "catalogue", "import", str(ROOT / "examples/catalogue.csv")]
    ok = subprocess.run([*argv, "--url", url, "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "imported 5 product(s)" in ok.stdout, ok.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("sku,name,price\nA,Apple,1.0\nB,Banana,cheap\n")
    r = subprocess.run([sys.executable, "-m", "gateway.app.cli", "catalogue", "import", str(bad), "--url", url,
                        "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "line 3: price 'cheap' is not a number" in r.stderr and "Traceback" not in r.stderr
    import sqlite3

    skus = {row[0] for row in sqlite3.connect(tmp_path / "c.db").execute("SELECT sku FROM catalogue")}
    assert "A" not in skus and "SH-100" in skus
