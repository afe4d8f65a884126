"""Stores sharing one database (SQLite and PostgreSQL): each gateway writes its [store] id on its visits, zone
stays, footfall, decisions and notifications, and its figures count only its own rows; other stores' figures
are asked for with ``store=``; the stores' figures add up to what the database saw. Rows older than the store
columns get the store id the upgrade is told. Erasing or linking a profile drops the runtime's in-memory
state keyed by its id."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

from beacons.remote import app_key
from beacons.types import Sighting
from gateway.app.config import Settings
from gateway.app.runtime import Runtime
from gateway.presence.settings import ReceiverSettings, ZoneBand
from gateway.presence.tracker import PresenceEvent
from gateway.profiles.service import NewProfile
from gateway.storage.db import Database, upgrade
from gateway.storage.models import Decision, FootfallCount, Notification, Visit, ZoneStay
from tests.fixtures import RuntimeFactory, runtime_settings

DAY = "2026-06-01"
T0 = dt.datetime(2026, 6, 1, 10, 0, tzinfo=dt.UTC).timestamp()
ADMIN = {"X-API-Key": "admin-key-for-the-stores-test"}
CAMPAIGN = """id: shoes-hello
purpose: offers
trigger: {type: enter, zone: shoes}
action: {title: "Hello in shoes", body: "b"}
"""


def _settings(tmp: Path, store: str, db_url: str, campaigns: Path) -> Settings:
    s = runtime_settings(tmp / store)
    s.store.id = store
    s.database.url = db_url
    s.api.admin_key = ADMIN["X-API-Key"]
    s.campaigns.dir = str(campaigns)
    s.receivers = [ReceiverSettings("rx", [ZoneBand("shoes", 5.0)])]
    return s


@pytest.fixture
async def stores(tmp_path: Path, db_url: str, runtime_factory: RuntimeFactory) -> tuple[Runtime, Runtime, str]:
    """Two gateways on one database: north serves the API, south writes beside it."""
    campaigns = tmp_path / "campaigns"
    campaigns.mkdir()
    (campaigns / "shoes-hello.yaml").write_text(CAMPAIGN)
    north = await runtime_factory(_settings(tmp_path, "north", db_url, campaigns))
    south = await runtime_factory(_settings(tmp_path, "south", db_url, campaigns), serve_api=False)
    return north, south, f"http://127.0.0.1:{north.settings.api.port}"


def _enrol(rt: Runtime, name: str, key: str) -> int:
    pid: int = rt.service.create_profile(NewProfile(external_id=name, consents={"offers": True},
                                                    identifiers=[("beacon", key)]))["id"]
    return pid


def _visit(rt: Runtime, key: str, t: float, *, end: bool = True) -> list[int]:
    """Walk in, into the shoes and out of them, and leave (unless ``end`` is False)."""
    sent = rt.pipeline.handle_presence([PresenceEvent("visit_start", key, t, visit_since=t),
                                        PresenceEvent("enter", key, t + 1, "shoes", zone_since=t + 1, visit_since=t)])
    if end:
        sent += rt.pipeline.handle_presence([
            PresenceEvent("exit", key, t + 31, "shoes", zone_since=t + 1, visit_since=t, dwell_s=30),
            PresenceEvent("visit_end", key, t + 40, visit_since=t, dwell_s=40)])
    return sent


def _passer_by(rt: Runtime, n: int, t: float) -> None:
    key = f"ibeacon:0a1b2c3d-0000-4000-8000-00000000abcd:{len(rt.settings.store.id)}:{n}"
    rt.pipeline.handle_presence([PresenceEvent("visit_start", key, t, visit_since=t),
                                 PresenceEvent("exit", key, t + 5, "shoes", zone_since=t, visit_since=t, dwell_s=5)])


def _store_rows(db: Database) -> dict[str, set[str]]:
    with db.session() as s:
        return {m.__tablename__: set(s.scalars(select(m.store_id)))
                for m in (Visit, ZoneStay, FootfallCount, Decision, Notification)}


def _main(f: dict[str, Any]) -> tuple[Any, ...]:
    return (f["footfall"], f["enrolled_visits"], f["anonymous_visits"], f["new_visits"], f["returning_visits"],
            f["unique_enrolled_visitors"], f["zones"].get("shoes", {}).get("footfall"),
            f["notifications"]["total"]["notified"], f["store"])


async def test_two_stores_on_one_database_keep_their_figures_apart(stores: tuple[Runtime, Runtime, str]) -> None:
    north, south, base = stores
    ann = _enrol(north, "ann", "ibeacon:aa:1:1")
    bob = _enrol(north, "bob", "ibeacon:bb:1:1")
    with south.db.session() as s:  # south learns the customers enrolled over north's API, as at its start
        south.identities.load(s)

    _visit(north, "ibeacon:aa:1:1", T0)  # Ann at north: her first visit anywhere
    _passer_by(north, 1, T0 + 100)
    _visit(south, "ibeacon:aa:1:1", T0 + 3600)  # Ann at south: new there, though she has been to north
    _visit(south, "ibeacon:bb:1:1", T0 + 3700)
    _visit(south, "ibeacon:bb:1:1", T0 + 7200)  # Bob again: returning
    _passer_by(south, 1, T0 + 3800)
    _passer_by(south, 2, T0 + 3900)
    north.pipeline.flush_footfall()
    south.pipeline.flush_footfall()

    assert _store_rows(north.db) == {t: {"north", "south"} for t in
                                     ("visits", "zone_stays", "footfall_counts", "decisions", "notifications")}
    with north.db.session() as s:
        notes = {(n.profile_id, n.store_id) for n in s.scalars(select(Notification))}
    assert notes == {(ann, "north"), (ann, "south"), (bob, "south")}

    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        here = (await c.get("/v1/figures", params={"from": DAY}, headers=ADMIN)).json()
        there = (await c.get("/v1/figures", params={"from": DAY, "store": "south"}, headers=ADMIN)).json()
        nowhere = await c.get("/v1/figures", params={"from": DAY, "store": "west"}, headers=ADMIN)
        zone = (await c.get("/v1/figures", params={"from": DAY, "store": "south", "zone": "shoes",
                                                   "campaign": "shoes-hello"}, headers=ADMIN)).json()
    #                 footfall enrolled anon new returning unique shoes notified store
    assert _main(here) == (2, 1, 1, 1, 0, 1, 2, 1, "north")
    assert _main(there) == (5, 3, 2, 2, 1, 2, 5, 3, "south")
    assert [d["footfall"] for d in here["days"]] == [2] and [d["footfall"] for d in there["days"]] == [5]
    assert zone["notifications"]["campaigns"]["shoes-hello"]["notified"] == 3
    assert zone["zones"]["shoes"]["enrolled"] == 3 and zone["avg_dwell_s_by_zone"] == {"shoes": 30.0}
    assert nowhere.status_code == 200
    assert _main(nowhere.json()) == (0, 0, 0, 0, 0, 0, None, 0, "west")

    everywhere = north.service.figures(DAY, DAY, "UTC", store=None)  # the whole database
    for key in ("footfall", "enrolled_visits", "anonymous_visits"):
        assert here[key] + there[key] == everywhere[key]
    assert here["zones"]["shoes"]["footfall"] + there["zones"]["shoes"]["footfall"] == \
        everywhere["zones"]["shoes"]["footfall"]
    assert here["notifications"]["total"]["notified"] + there["notifications"]["total"]["notified"] == \
        everywhere["notifications"]["total"]["notified"] == 4
    assert everywhere["new_visits"] == 2  # across the database, Ann's south visit is not her first


async def test_erasing_or_linking_a_profile_leaves_nothing_keyed_by_its_id_in_memory(
        stores: tuple[Runtime, Runtime, str]) -> None:
    north, _, base = stores
    ann = _enrol(north, "ann", "ibeacon:aa:1:1")
    bob = _enrol(north, "bob", "ibeacon:bb:1:1")
    cat = _enrol(north, "cat", "ibeacon:cc:1:1")
    for key, t in (("ibeacon:aa:1:1", T0), ("ibeacon:bb:1:1", T0 + 10), ("ibeacon:cc:1:1", T0 + 20)):
        assert _visit(north, key, t, end=False)  # in the shoes now, each with a notification sent
    p = north.pipeline
    north.identities.allow_app(ann)  # Ann's app reports her too
    p.ingest_sightings([Sighting(app_key(ann), "rx", -60, T0 + 25, -59)])

    def held(pid: int) -> list[str]:
        """The per-profile maps that still hold ``pid``."""
        v = p.visits
        maps: dict[str, Any] = {"_visit_keys": v._visit_keys, "_visit_began": v._visit_began,
                                "_open_visits": v._open_visits, "_visit_zones": v._visit_zones,
                                "_zone_keys": {k[0] for k in v._zone_keys},
                                "_open_stays": {k[0] for k in v._open_stays}, "_judged": p.engine._judged,
                                "presence.tracks": {int(k[4:]) for k in p.presence.tracks if k.startswith("app:")}}
        return [name for name, m in maps.items() if pid in m]

    mapped = ["_visit_keys", "_visit_began", "_open_visits", "_visit_zones", "_zone_keys", "_open_stays", "_judged"]
    assert held(ann) == [*mapped, "presence.tracks"] and held(bob) == held(cat) == mapped
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        assert (await c.delete(f"/v1/profiles/{ann}", headers=ADMIN)).status_code == 204
        linked = await c.post(f"/v1/profiles/{cat}/link", json={"profile_id": bob}, headers=ADMIN)
        assert linked.status_code == 200
    await asyncio.sleep(0)  # the runtime forgets on its loop
    await north.flush()
    assert held(ann) == [] and held(bob) == []
    assert held(cat) == mapped  # the profile kept is still in the shop
    # Ann's tag walks on: anonymous now, so nothing about her comes back, and the visit ends cleanly.
    north.pipeline.handle_presence([PresenceEvent("exit", "ibeacon:aa:1:1", T0 + 31, "shoes", zone_since=T0 + 1,
                                                  visit_since=T0, dwell_s=30),
                                    PresenceEvent("visit_end", "ibeacon:aa:1:1", T0 + 40, visit_since=T0,
                                                  dwell_s=40)])
    assert held(ann) == []


def test_rows_older_than_the_store_columns_get_the_store_the_upgrade_is_told(db_url: str) -> None:
    db = Database(db_url)
    try:
        upgrade(db.engine, "0011")  # the schema before stores
        with db.engine.begin() as conn:
            conn.execute(text("INSERT INTO profiles (id, attributes, created_at, points) VALUES (1, '{}', 0, 0)"))
            conn.execute(text("INSERT INTO visits (profile_id, started_at, zones) VALUES (1, 1.0, '[]')"))
            conn.execute(text("INSERT INTO footfall_counts (day, zone, anonymous_visits, anonymous_dwell_s) "
                              "VALUES ('2026-06-01', '', 4, 0.0)"))
        db.upgrade("east")
        with db.session() as s:
            assert set(s.scalars(select(Visit.store_id))) == {"east"}
            assert [(f.store_id, f.anonymous_visits) for f in s.scalars(select(FootfallCount))] == [("east", 4)]
            s.add(Visit(profile_id=1, started_at=2.0, zones=[]))  # written without a store: the default's
            s.flush()
            assert sorted(s.scalars(select(Visit.store_id))) == ["east", "store-001"]
    finally:
        db.dispose()
