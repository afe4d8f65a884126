"""Storage on both engines: migrations, connection settings, erasure, uniqueness, the outbox.

Every test takes ``db_url`` and so runs once on SQLite and once on a fresh PostgreSQL database.
Profiles, carts, devices and acks go through GatewayService, the door every caller uses; rows
nothing but the engine writes (visits, decisions, notifications) are added with the ORM.
"""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from gateway.clock import VirtualClock
from gateway.delivery.hub import StreamHub
from gateway.delivery.outbox import Dispatcher
from gateway.errors import Conflict, NotFound
from gateway.profiles.service import GatewayService, NewProfile
from gateway.storage.db import MIGRATIONS, Database
from gateway.storage.models import (
    Alarm,
    Base,
    Cart,
    Consent,
    DeadLetter,
    Decision,
    Delivery,
    DeliveryState,
    Device,
    DeviceEventRecord,
    IdempotencyKey,
    Identifier,
    Interaction,
    Notification,
    Profile,
    PushSubscription,
    ReadingRecord,
    ReadingRollup,
    RevokedToken,
    RotatingIdentity,
    RuleStateRecord,
    SegmentMembership,
    TokenGeneration,
    Visit,
    ZoneStay,
)

T0 = 1_767_261_600.0


@pytest.fixture
def db(any_db: Database) -> Database:
    """Every test here runs on both engines (the shared ``service`` too)."""
    return any_db


def _notification(profile_id: int, key: str, *, at: float = T0, status: str = "pending",
                  id: int | None = None) -> Notification:
    return Notification(id=id, profile_id=profile_id, campaign_id="c1", purpose="offers", dedup_key=key,
                        title=f"title {key}", body=f"body {key}", data={"k": key}, created_at=at,
                        status=status)


def _add(db: Database, *rows: Any) -> list[int]:
    with db.session() as s:
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def _head_revisions() -> set[str]:
    """Every head: parallel branches (0002, 0003 from 0001) are all applied by ``upgrade heads``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    heads = set(ScriptDirectory.from_config(cfg).get_heads())
    assert heads
    return heads


def _schema(db: Database) -> dict[str, Any]:
    insp = inspect(db.engine)
    return {t: (sorted(c["name"] for c in insp.get_columns(t)),
                sorted(str(i["name"]) for i in insp.get_indexes(t)),
                sorted(str(u["name"]) for u in insp.get_unique_constraints(t)),
                sorted(str(f["referred_table"]) for f in insp.get_foreign_keys(t)))
            for t in insp.get_table_names()}


# ------------------------------------------------------------------ migrations and connections


def test_migrations_build_the_model_schema_and_a_second_upgrade_is_a_no_op(db_url: str) -> None:
    database = Database(db_url)
    try:
        assert inspect(database.engine).get_table_names() == []  # really empty to begin with
        database.upgrade()

        tables = set(inspect(database.engine).get_table_names())
        assert tables == set(Base.metadata.tables) | {"alembic_version"}
        with database.engine.connect() as conn:
            assert set(conn.scalars(text("SELECT version_num FROM alembic_version"))) == _head_revisions()
            # The migrations and the models agree: autogenerate would find nothing to do.
            diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diffs == []

        with database.session() as s:
            s.add(Profile(external_id="kept", created_at=T0))
        before = _schema(database)
        database.upgrade()  # every start runs this: it must neither fail nor touch anything

        assert _schema(database) == before
        with database.engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM alembic_version")) == len(_head_revisions())
            assert set(conn.scalars(text("SELECT version_num FROM alembic_version"))) == _head_revisions()
        with database.session() as s:
            assert s.scalars(select(Profile.external_id)).all() == ["kept"]
    finally:
        database.dispose()


def test_connections_enforce_foreign_keys_and_sqlite_runs_in_wal(db: Database) -> None:
    if db.engine.dialect.name == "sqlite":
        # Every pooled connection gets the pragmas, not only the first one.
        conns = [db.engine.connect() for _ in range(3)]
        try:
            for conn in conns:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        finally:
            for conn in conns:
                conn.close()
    # An identifier, a cart or a notification for a profile that does not exist is refused.
    for orphan in (Identifier(profile_id=424242, kind="beacon", value="x", created_at=T0),
                   Cart(id="c-orphan", profile_id=424242, items=[], updated_at=T0),
                   _notification(424242, "orphan")):
        with pytest.raises(IntegrityError), db.session() as s:
            s.add(orphan)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Identifier)) == 0
        assert s.scalar(select(func.count()).select_from(Cart)) == 0
        assert s.scalar(select(func.count()).select_from(Notification)) == 0


# ------------------------------------------------------------------ erasure


def _everything(service: GatewayService, db: Database, clock: VirtualClock, who: str) -> tuple[int, list[int]]:
    """A profile with one of every kind of row a customer can have. Returns (profile id, notification ids)."""
    p = service.create_profile(NewProfile(
        external_id=who, name=who.title(), attributes={"tier": "gold"},
        identifiers=[("beacon", f"ibeacon:{who}:1:1"), ("email_sha256", f"{who}@example.com"),
                     ("app_install", f"install-{who}")],
        consents={"offers": True, "cart_reminders": True, "maintenance": False}))
    pid = p["id"]
    service.upsert_cart(f"cart-{who}", profile_id=pid, external_id=None,
                        items=[{"sku": "SH-100", "quantity": 1, "price": 89.9}], updated_at=None)
    service.register_device(f"mower-{who}", "mower", pid)
    service.register_device(f"watch-{who}", "wearable", pid)
    nids = _add(db, _notification(pid, f"{who}-1"), _notification(pid, f"{who}-2"))
    (visit,) = _add(db, Visit(profile_id=pid, started_at=T0, ended_at=T0 + 600, zones=["entrance", "shoes"]))
    _add(db,
         ZoneStay(profile_id=pid, visit_id=visit, zone="shoes", entered_at=T0 + 60, exited_at=T0 + 300),
         Decision(at=T0, profile_id=pid, campaign_id="c1", event_kind="dwell", event_key="shoes",
                  fired=True, reason="fired", detail=None),
         Decision(at=T0, profile_id=pid, campaign_id="c2", event_kind="dwell", event_key="shoes",
                  fired=False, reason="capped", detail="1 per day"),
         Delivery(notification_id=nids[0], channel="sse", at=T0, outcome="streamed"),
         Interaction(notification_id=nids[0], kind="opened", at=T0))
    with db.session() as s:  # keyed by (notification, channel), or by URL: no id for _add to return
        s.add(DeliveryState(notification_id=nids[0], channel="sse", state="delivered", attempts=1, updated_at=T0))
        s.add(PushSubscription(profile_id=pid, endpoint=f"https://push.example.com/send/{who}",
                               p256dh="B" * 87, auth="A" * 22, created_at=T0))
        s.add(SegmentMembership(profile_id=pid, segment_id="frequent", entered_at=T0))
        # A rotating identity: its encrypted key is the customer's (whoever holds it can follow them).
        s.add(RotatingIdentity(profile_id=pid, kind="app", secret=b"sealed-" + who.encode(),
                               fingerprint=f"{who:0>64}"[-64:], period_s=900, created_at=T0))
        # Auth: a logged-out app token, a "revoke all", a kept answer to one of their POSTs.
        s.add(RevokedToken(jti=f"jti-{who}", profile_id=pid, expires_at=T0 + 3600, revoked_at=T0))
        s.add(TokenGeneration(profile_id=pid, generation=1, updated_at=T0))
        s.add(IdempotencyKey(principal=f"profile:{pid}", method="POST", path="/v1/me/sightings", key=who,
                             request_hash="0" * 64, profile_id=pid, status=202, body=b"sealed", created_at=T0,
                             expires_at=T0 + 86400))
        # Device rules: a wearable's rule state and an alarm are the owner's data (health, habits).
        s.add(RuleStateRecord(device_id=f"watch-{who}", rule_id="activity", profile_id=pid,
                              state={"counters": {}}, updated_at=T0))
        s.add(Alarm(device_id=f"watch-{who}", profile_id=pid, rule_id="activity", name="Activity",
                    severity="info", status="active", created_at=T0, updated_at=T0, count=1))
    with db.session() as s:  # telemetry of the owned devices: the owner's data too (a wearable's is health data)
        s.add_all([ReadingRecord(device_id=f"watch-{who}", key="s1", ts=T0, metrics={"steps": 10}, received_at=T0,
                                 profile_id=pid),
                   ReadingRollup(device_id=f"watch-{who}", period=60, start=T0, metric="steps", count=1, sum=10,
                                 min=10, max=10, last=10, last_ts=T0, profile_id=pid),
                   DeviceEventRecord(device_id=f"watch-{who}", ts=T0, type="button", received_at=T0, profile_id=pid),
                   DeadLetter(received_at=T0, topic=f"stores/s1/devices/watch-{who}/telemetry", reason="out_of_range",
                              device_id=f"watch-{who}", payload=b"{}", profile_id=pid)])
    clock.advance(1)
    service.ack(pid, nids[0])  # an ack records a 'delivered' interaction
    return pid, nids


def _rows_by_table(db: Database) -> dict[str, int]:
    with db.engine.connect() as conn:
        return {t: conn.scalar(select(func.count()).select_from(Base.metadata.tables[t]))
                for t in Base.metadata.tables}


def _ties_to_a_customer() -> dict[str, tuple[str, str, str]]:
    """Every table whose rows belong to a customer: name -> (column, 'profiles' | 'notifications', ondelete).

    Found from the foreign keys, so a table added later is covered without editing this test.
    """
    found: dict[str, tuple[str, str, str]] = {}
    for name, table in Base.metadata.tables.items():
        for fk in table.foreign_keys:
            target = fk.column.table.name
            if target in ("profiles", "notifications"):
                assert name not in found, f"{name} ties to a customer twice; teach this test about it"
                found[name] = (fk.parent.name, target, (fk.ondelete or "").upper())
    return found


def test_erasing_a_profile_is_one_delete_and_leaves_nothing_of_it(
        db: Database, service: GatewayService, clock: VirtualClock) -> None:
    alice, alice_nids = _everything(service, db, clock, "alice")
    bob, bob_nids = _everything(service, db, clock, "bob")
    service.register_device("hub-shared", "hub", None)
    ties = _ties_to_a_customer()
    assert {"identifiers", "consents", "carts", "visits", "decisions", "notifications", "deliveries",
            "interactions", "devices"} <= set(ties)
    for name, (_, _, ondelete) in ties.items():
        assert ondelete in ("CASCADE", "SET NULL"), f"{name}: ON DELETE {ondelete or 'nothing'} blocks erasure"
    before = _rows_by_table(db)
    # Every table a customer's data lives in holds rows of both, so the checks below mean something.
    empty = sorted(t for t in ties if before[t] < 2)
    assert not empty, f"_everything() puts no row in {empty}: add one, or erasure goes unchecked there"

    with db.engine.begin() as conn:  # one statement, no ORM cascade: the database does the rest
        assert conn.execute(text("DELETE FROM profiles WHERE id = :id"), {"id": alice}).rowcount == 1

    after = _rows_by_table(db)
    with db.engine.connect() as conn:
        for name, (column, target, ondelete) in ties.items():
            col = Base.metadata.tables[name].c[column]
            theirs = col == alice if target == "profiles" else col.in_(alice_nids)
            left = conn.scalar(select(func.count()).select_from(col.table).where(theirs))
            assert left == 0, f"{name} still holds {left} row(s) tied to the erased profile"
            if ondelete == "SET NULL":  # kept, but no longer anybody's
                assert after[name] == before[name], name
            else:  # alice and bob had the same rows: exactly half are gone
                assert after[name] == before[name] // 2, name
        for column, value in ((Identifier.value, "ibeacon:alice:1:1"), (Identifier.value, "install-alice"),
                              (Profile.external_id, "alice"), (Cart.id, "cart-alice")):
            assert conn.scalar(select(func.count()).where(column == value)) == 0
    untouched = {t for t in before if t not in ties and t != "profiles"}
    assert {t: after[t] for t in untouched} == {t: before[t] for t in untouched}
    assert after["profiles"] == 1

    with db.session() as s:
        devices = {d.id: d.profile_id for d in s.scalars(select(Device))}
        assert devices == {"mower-alice": None, "watch-alice": None, "mower-bob": bob, "watch-bob": bob,
                           "hub-shared": None}
        # Bob is untouched, row for row.
        assert service.get_profile(bob)["external_id"] == "bob"
        assert len(s.scalars(select(Identifier).where(Identifier.profile_id == bob)).all()) == 3
        assert len(s.scalars(select(Consent).where(Consent.profile_id == bob)).all()) == 3
        assert s.scalars(select(Cart.id).where(Cart.profile_id == bob)).all() == ["cart-bob"]
        assert s.scalars(select(Notification.id).where(Notification.profile_id == bob)
                         .order_by(Notification.id)).all() == bob_nids
    with pytest.raises(NotFound):
        service.get_profile(alice)


# ------------------------------------------------------------------ uniqueness


def test_a_notification_dedup_key_is_stored_once(db: Database, service: GatewayService) -> None:
    pid = service.create_profile(NewProfile(external_id="alice"))["id"]
    (first,) = _add(db, _notification(pid, "c1:alice:dwell:shoes"))

    with pytest.raises(IntegrityError), db.session() as s:
        dup = _notification(pid, "c1:alice:dwell:shoes", at=T0 + 60)
        dup.title = "a replayed event must not make a second message"
        s.add(dup)

    with db.session() as s:
        rows = s.scalars(select(Notification)).all()
        assert [(n.id, n.title, n.created_at, n.status) for n in rows] == [
            (first, "title c1:alice:dwell:shoes", T0, "pending")]
    _add(db, _notification(pid, "c1:alice:dwell:apparel"))  # another key is fine


def test_an_identifier_belongs_to_one_profile_only(db: Database, service: GatewayService) -> None:
    alice = service.create_profile(NewProfile(external_id="alice",
                                              identifiers=[("beacon", "IBEACON:AAA:1:1")]))["id"]
    bob = service.create_profile(NewProfile(external_id="bob"))["id"]

    # Straight into the table: the constraint itself refuses it.
    with pytest.raises(IntegrityError), db.session() as s:
        s.add(Identifier(profile_id=bob, kind="beacon", value="ibeacon:aaa:1:1", created_at=T0))
    # Through the service, in another spelling of the same key: a clear conflict, and nothing written.
    with pytest.raises(Conflict, match="already belongs"):
        service.create_profile(NewProfile(external_id="carol", identifiers=[("beacon", " ibeacon:AAA:1:1 ")]))
    # The same value under another kind is another identifier.
    _add(db, Identifier(profile_id=bob, kind="app_install", value="ibeacon:aaa:1:1", created_at=T0))

    with db.session() as s:
        owners = sorted((i.kind, i.value, i.profile_id) for i in s.scalars(select(Identifier)))
        assert owners == [("app_install", "ibeacon:aaa:1:1", bob), ("beacon", "ibeacon:aaa:1:1", alice)]
        assert s.scalars(select(Profile.external_id).order_by(Profile.id)).all() == ["alice", "bob"]


# ------------------------------------------------------------------ the outbox


def test_replay_gives_one_profiles_unacked_notifications_after_an_id_in_order(
        db: Database, service: GatewayService) -> None:
    alice = service.create_profile(NewProfile(external_id="alice"))["id"]
    bob = service.create_profile(NewProfile(external_id="bob"))["id"]
    # Explicit ids, inserted out of order and interleaved between the two customers.
    _add(db, _notification(alice, "a9", id=9), _notification(bob, "b4", id=4), _notification(alice, "a2", id=2),
         _notification(alice, "a5", id=5, status="sent"), _notification(bob, "b7", id=7),
         _notification(alice, "a7", id=3, status="acked"), _notification(alice, "a11", id=11))

    assert [m["id"] for m in service.replay(alice, 0)] == [2, 5, 9, 11]
    assert [m["id"] for m in service.replay(alice, 2)] == [5, 9, 11]
    assert [m["id"] for m in service.replay(alice, 9)] == [11]
    assert service.replay(alice, 11) == []
    assert [m["id"] for m in service.replay(bob, 0)] == [4, 7]
    assert service.replay(424242, 0) == []

    msg = service.replay(alice, 4)[0]
    assert msg == {"id": 5, "campaign": "c1", "purpose": "offers", "title": "title a5", "body": "body a5",
                   "data": {"k": "a5"}, "created_at": T0, "status": "sent"}

    service.ack(alice, 9)
    assert [m["id"] for m in service.replay(alice, 0)] == [2, 5, 11]


def test_ack_is_idempotent_and_only_for_the_owner(db: Database, service: GatewayService,
                                                  clock: VirtualClock) -> None:
    alice = service.create_profile(NewProfile(external_id="alice"))["id"]
    bob = service.create_profile(NewProfile(external_id="bob"))["id"]
    nid, other = _add(db, _notification(alice, "a1"), _notification(alice, "a2"))

    clock.advance(30)
    first = service.ack(alice, nid)
    assert first["status"] == "acked"
    clock.advance(30)
    again = service.ack(alice, nid)
    assert again == first

    with pytest.raises(NotFound):
        service.ack(bob, other)
    with pytest.raises(NotFound):
        service.ack(bob, nid)
    with pytest.raises(NotFound):
        service.ack(alice, 999_999)

    with db.session() as s:
        rows = {n.id: (n.status, n.acked_at) for n in s.scalars(select(Notification))}
        assert rows == {nid: ("acked", T0 + 30), other: ("pending", None)}
        interactions = [(i.notification_id, i.kind, i.at) for i in s.scalars(select(Interaction))]
        assert interactions == [(nid, "delivered", T0 + 30)]


class _Broken:
    name = "webhook"

    async def deliver(self, profile_id: int, message: dict[str, Any]) -> str:
        raise ConnectionError("webhook down")


async def test_dispatch_streams_to_listeners_and_leaves_the_rest_pending(
        db: Database, service: GatewayService) -> None:
    alice = service.create_profile(NewProfile(external_id="alice"))["id"]
    bob = service.create_profile(NewProfile(external_id="bob"))["id"]
    a1, b1, a_acked = _add(db, _notification(alice, "a1"), _notification(bob, "b1"),
                           _notification(alice, "a0", status="acked"))
    hub = StreamHub()
    queue = hub.subscribe(alice)
    dispatcher = Dispatcher(db, [hub, _Broken()])

    await dispatcher.dispatch([a1, b1, a_acked], T0 + 5)

    got = {m["id"]: m for m in (queue.get_nowait() for _ in range(queue.qsize()))}
    assert a1 in got and b1 not in got  # Alice's stream has hers, and never Bob's
    assert got[a1]["title"] == "title a1" and got[a1]["data"] == {"k": "a1"}
    with db.session() as s:
        status = {n.id: n.status for n in s.scalars(select(Notification))}
        assert status == {a1: "sent", b1: "pending", a_acked: "acked"}  # an ack is never undone
        deliveries = sorted((d.notification_id, d.channel, d.outcome, d.at) for d in s.scalars(select(Delivery))
                            if d.notification_id in (a1, b1))
    # One attempt per channel each, and the failing webhook stopped neither the stream nor the record.
    assert deliveries == sorted([(a1, "sse", "streamed", T0 + 5), (a1, "webhook", "error", T0 + 5),
                                 (b1, "sse", "no_listener", T0 + 5), (b1, "webhook", "error", T0 + 5)])
    # Bob's pending notification is still there for him when he connects.
    assert [m["id"] for m in service.replay(bob, 0)] == [b1]
    assert dispatcher.outcomes[("sse", "no_listener")] == 1
