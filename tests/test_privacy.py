"""Privacy and explanations: export everything, erase everywhere, purge by retention, say why."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from gateway.campaigns.model import CampaignIndex, parse_campaign
from gateway.engine.engine import Engine, EngineEvent
from gateway.engine.explain import dry_run, why
from gateway.profiles.identity import IdentityIndex
from gateway.profiles.privacy import erase_profile, export_profile, purge_presence
from gateway.profiles.service import GatewayService, NewProfile
from gateway.storage.db import Database
from gateway.storage.models import Base, Decision, Device, Notification, Visit

T0 = 1_780_300_800.0
OFFER = {"id": "offer", "purpose": "offers", "trigger": {"type": "enter", "zone": "shoes"},
         "action": {"title": "t", "body": "b"}, "limits": {"cooldown_s": 3600}}


@pytest.fixture
def db(any_db: Database) -> Database:
    """Every test here runs on both engines."""
    return any_db


@pytest.fixture
def world(service: GatewayService):
    db, svc = service.db, service
    ann = svc.create_profile(NewProfile(external_id="ann", name="Ann", consents={"offers": True},
                                        identifiers=[("beacon", "ibeacon:aa:1:1"), ("email_sha256", "a@x.io")]))["id"]
    bob = svc.create_profile(NewProfile(external_id="bob", name="Bob", consents={"offers": True}))["id"]
    svc.register_device("mower-1", "robot_mower", ann)
    svc.upsert_cart("cart-1", profile_id=ann, external_id=None, items=[{"sku": "A"}], updated_at=T0)
    engine = Engine(CampaignIndex([parse_campaign(OFFER)]))
    with db.session() as s:
        for pid in (ann, bob):
            s.add(Visit(profile_id=pid, started_at=T0 - 90 * 86400, ended_at=T0 - 90 * 86400 + 600, zones=["shoes"]))
            engine.handle(s, EngineEvent("enter", pid, T0, "stay:1", "shoes"))
    yield db, svc, ann, bob


def _count(db, model, **where) -> int:
    with db.session() as s:
        q = select(func.count()).select_from(model)
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return s.scalar(q) or 0


def test_export_holds_every_table_of_the_profile(world):
    db, _, ann, _ = world
    with db.session() as s:
        data = export_profile(s, ann)
    assert data is not None and data["profile"]["external_id"] == "ann"
    assert {i["kind"] for i in data["identifiers"]} == {"beacon", "email_sha256"}
    assert len(data["notifications"]) == 1 and len(data["decisions"]) == 1 and len(data["visits"]) == 1
    assert data["carts"][0]["id"] == "cart-1" and data["devices"][0]["id"] == "mower-1"
    referencing = {t.name for t in Base.metadata.sorted_tables if "profile_id" in t.c}
    assert referencing <= set(data)  # a new table with profile data cannot be forgotten by export


def test_erase_removes_the_profile_everywhere_and_nothing_else(world):
    db, svc, ann, bob = world
    with db.session() as s:
        assert erase_profile(s, ann)
    svc.identities.remove_profile(ann)
    for table in Base.metadata.sorted_tables:
        if "profile_id" in table.c and table.name != "devices":
            with db.session() as s:
                left = s.scalar(select(func.count()).select_from(table).where(table.c.profile_id == ann))
            assert left == 0, table.name
    with db.session() as s:
        assert s.get(Device, "mower-1").profile_id is None  # the product stays, unowned
    assert svc.identities.beacon("ibeacon:aa:1:1") is None  # now an anonymous sighting
    assert _count(db, Notification, profile_id=bob) == 1 and _count(db, Decision, profile_id=bob) == 1
    with db.session() as s:
        assert not erase_profile(s, ann)  # erasing twice is harmless


def test_retention_purges_old_presence_but_keeps_receipts(world):
    db = world[0]
    with db.session() as s:
        purged = purge_presence(s, T0 - 30 * 86400)
    assert purged == {"visits": 2, "zone_stays": 0, "decisions": 0}
    assert _count(db, Visit) == 0 and _count(db, Notification) == 2


def test_retention_runs_by_default_in_the_pipeline(world, tmp_path):
    from gateway.app.config import Settings
    from gateway.app.pipeline import Pipeline
    from gateway.storage.models import ZoneStay

    db = world[0]
    with db.session() as s:
        s.add(ZoneStay(profile_id=world[2], zone="shoes", entered_at=T0 - 500 * 86400,
                       exited_at=T0 - 500 * 86400 + 60))
        s.add(Visit(profile_id=world[2], started_at=T0 - 500 * 86400, ended_at=T0 - 500 * 86400 + 60, zones=[]))
    settings = Settings()
    settings.device_rules.dir = ""
    assert settings.privacy.presence_retention_days > 0  # on unless turned off
    Pipeline(settings, db, CampaignIndex([]), IdentityIndex()).telemetry_timers(T0)
    assert _count(db, ZoneStay) == 0
    assert _count(db, Visit) == 2  # the 90-day-old ones are inside the default retention


def test_why_explains_and_dry_run_changes_nothing(world):
    db, _, ann, bob = world
    with db.session() as s:
        [d] = why(s, ann, "offer")
    assert d["fired"] and d["reason"] == "fired"
    before = (_count(db, Notification), _count(db, Decision))
    with db.session() as s:
        [outcome] = dry_run(s, EngineEvent("enter", ann, T0 + 60, "x", "shoes"),
                            campaigns=CampaignIndex([parse_campaign(OFFER)]), abandon_after_s=1800,
                            timezone="UTC", caps=[])
    assert outcome["reason"] == "cooldown" and not outcome["fired"]
    with db.session() as s:
        [would] = dry_run(s, EngineEvent("enter", bob, T0 + 7200, "y", "shoes"),
                          campaigns=CampaignIndex([parse_campaign(OFFER)]), abandon_after_s=1800,
                          timezone="UTC", caps=[])
    assert would["fired"]
    assert (_count(db, Notification), _count(db, Decision)) == before
