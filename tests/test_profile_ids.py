"""An erased customer's profile id is never given to anyone else (SQLite and PostgreSQL).

SQLite gives the highest rowid + 1 to a new row, so erasing the newest profile used to hand its id
to the next customer enrolled; everything still keyed by that id (a webhook receiver's records, the
runtime's per-profile presence state, an old token) then met the newcomer. The last test is that
case end to end: the erased customer was in the shop, and the newcomer must still be seen."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from gateway.app.config import Settings
from gateway.app.pipeline import Pipeline
from gateway.campaigns.model import CampaignIndex
from gateway.clock import VirtualClock
from gateway.presence.settings import ReceiverSettings, ZoneBand
from gateway.presence.tracker import PresenceEvent
from gateway.profiles.service import GatewayService, NewProfile
from gateway.storage.db import Database
from gateway.storage.models import Visit, ZoneStay
from tests.fixtures import make_service

T0 = 1_780_300_800.0


def test_the_newest_profiles_id_stays_retired_after_erasure_and_a_restart(any_db: Database, db_url: str,
                                                                           clock: VirtualClock) -> None:
    svc = make_service(any_db, clock)
    ids = [svc.create_profile(NewProfile(external_id=f"p{i}"))["id"] for i in range(3)]
    svc.erase_profile(ids[-1])
    after = svc.create_profile(NewProfile(external_id="newcomer"))["id"]
    assert after not in ids and after > ids[-1]
    svc.erase_profile(after)
    again = Database(db_url)  # a restart: a fresh engine on the same database
    try:
        again.upgrade()
        later = make_service(again, clock).create_profile(NewProfile(external_id="later"))["id"]
    finally:
        again.dispose()
    assert later > after


def test_the_mark_starts_from_the_profiles_already_there(tmp_path: Path, clock: VirtualClock) -> None:
    """A database migrated while it held profiles (the migration seeds the mark with their highest id)."""
    from gateway.storage.db import upgrade

    old = Database(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        upgrade(old.engine, "0010")  # the schema before the mark, holding two profiles
        with old.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO profiles (id, external_id, attributes, created_at, points) "
                                 "VALUES (1, 'p0', '{}', 0, 0), (2, 'p1', '{}', 0, 0)")
        first = [1, 2]
        old.upgrade()  # to the head: the mark is seeded from them
        svc = make_service(old, clock)  # an old schema made by hand, not the migrated fixture
        svc.erase_profile(first[-1])
        assert svc.create_profile(NewProfile(external_id="new"))["id"] > first[-1]
    finally:
        old.dispose()


def test_a_customer_enrolled_after_an_erasure_mid_visit_is_seen(service: GatewayService,
                                                                  clock: VirtualClock) -> None:
    s = Settings()
    s.receivers = [ReceiverSettings("rx", [ZoneBand("z", 5.0)])]
    s.device_rules.dir = ""
    svc, db = service, service.db
    pipe = Pipeline(s, db, CampaignIndex([]), svc.identities)
    ann = svc.create_profile(NewProfile(external_id="ann", identifiers=[("beacon", "ibeacon:aa:1:1")]))["id"]
    pipe.handle_presence([PresenceEvent("visit_start", "ibeacon:aa:1:1", T0, "z", T0, T0),
                          PresenceEvent("enter", "ibeacon:aa:1:1", T0, "z", T0, T0)])
    svc.erase_profile(ann)  # while she is in the shop
    clock.set(T0 + 100)
    bea = svc.create_profile(NewProfile(external_id="bea", identifiers=[("beacon", "ibeacon:bb:1:2")]))["id"]
    assert bea != ann
    t = T0 + 200
    pipe.handle_presence([PresenceEvent("visit_start", "ibeacon:bb:1:2", t, "z", t, t),
                          PresenceEvent("enter", "ibeacon:bb:1:2", t, "z", t, t)])
    with db.session() as sess:
        visits = sess.scalar(select(func.count()).select_from(Visit).where(Visit.profile_id == bea))
        stays = sess.scalar(select(func.count()).select_from(ZoneStay).where(ZoneStay.profile_id == bea))
    assert (visits, stays) == (1, 1)
