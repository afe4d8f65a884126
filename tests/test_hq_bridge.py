"""Store and head office on real parts: two stores' pipelines (virtual time) write visits, stays, decisions,
notifications, interactions and footfall into their own SQLite; each store's uplink publishes them to the
store's Mosquitto, which bridges them (cleansession false, MQTT 5, QoS 1 out) to a central Mosquitto;
head office's consumer writes them into a fresh PostgreSQL. Head office's figures per store equal each
store's own, across stores they add up, and every event is there once: after a consumer restart mid-stream,
a republish of everything, and an hour of WAN down (the central broker stopped) while the stores go on; a
customer erased at a store is erased at head office too. The rows that change (devices, hourly rollups,
alarms, carts, a notification's later status) reach head office as the store has them, each version once,
and wait in the store while its broker does not acknowledge."""

from __future__ import annotations

import datetime as dt
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from sqlalchemy import delete, func, select

from devices.payloads import Reading
from gateway.app.config import Settings, StoreSettings
from gateway.app.pipeline import Pipeline
from gateway.campaigns.model import CampaignIndex, parse_campaign
from gateway.clock import VirtualClock
from gateway.engine.figures import figures
from gateway.hq.consumer import HqConsumer
from gateway.hq.events import event, topic
from gateway.hq.uplink import Uplink, UplinkThread, _alarm, _cart, _notification, _NotSent
from gateway.presence.tracker import PresenceEvent
from gateway.profiles.service import GatewayService, NewProfile, ServiceOptions
from gateway.storage.db import Database
from gateway.storage.models import (
    Alarm,
    Cart,
    Decision,
    Device,
    HqEvent,
    HqUplinkMark,
    HqUplinkOpen,
    Interaction,
    Notification,
    Profile,
    ReadingRollup,
    Visit,
    ZoneStay,
)
from gateway.telemetry.alarms import AlarmDesk
from tests.conftest import MosquittoServer, _mosquitto_binary, fresh_pg_database
from tests.fixtures import make_service, migrated_copy

TZ = "Europe/Paris"
DAY = "2026-06-01"
PREFIX = "stores"
WAIT_S = 20.0
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def at(hour: int, minute: int, second: int = 0) -> float:
    return dt.datetime(2026, 6, 1, hour, minute, second, tzinfo=ZoneInfo(TZ)).timestamp()


def tag(name: str) -> str:
    return f"ibeacon:8f3c0a52-6d1e-4b7a-9c2d-5e4f3a2b1c00:7:{sum(map(ord, name))}"


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    """Polls a condition, bounded: the brokers and the consumer run on their own threads."""
    pause = threading.Event()
    for _ in range(int(timeout * 20)):
        if predicate():
            return True
        pause.wait(0.05)
    return predicate()


class Store:
    """One store: its database, service, pipeline (an enter-shoes offer) and uplink on its own broker."""

    def __init__(self, store_id: str, db: Database, broker: MosquittoServer, clock: VirtualClock, *,
                 devices: bool = False) -> None:
        """``devices``: the example e-bike profile and rules, and their owner's prompt campaign, too."""
        self.id, self.db, self.clock = store_id, db, clock
        self.svc: GatewayService = make_service(db, clock, options=ServiceOptions(timezone=TZ, store_id=store_id))
        offer = parse_campaign({"id": "shoes-offer", "purpose": "offers", "trigger": {"type": "enter", "zone": "shoes"},
                                "action": {"title": "10 % off", "body": "today"}})
        settings = Settings(store=StoreSettings(id=store_id, timezone=TZ))
        campaigns = [offer]
        if devices:
            settings.device_rules.dir = str(EXAMPLES / "device-rules")
            settings.devices.profiles_dir = str(EXAMPLES / "device-profiles")
            campaigns.append(parse_campaign(yaml.safe_load((EXAMPLES / "campaigns/ebike-chain-service.yaml")
                                                           .read_text())))
        self.pipeline = Pipeline(settings, db, CampaignIndex(campaigns), self.svc.identities)
        self.link = UplinkThread(lambda publish: Uplink(db, store_id, PREFIX, publish, now=clock.now),
                                 broker.host, broker.port, f"uplink-{store_id}-{secrets.token_hex(3)}")
        self.link.connect()
        assert self.link.wait_connected(WAIT_S)

    def enrol(self, name: str) -> int:
        pid: int = self.svc.create_profile(NewProfile(
            external_id=f"{self.id}-{name}", consents={"offers": True, "maintenance": True},
            identifiers=[("beacon", tag(name))]))["id"]
        return pid

    def walk(self, name: str, zones: list[tuple[str, float]], start: float) -> None:
        """One visit through the pipeline (as test_figures_zones walks them), then a tick's footfall flush."""
        key, t = tag(name), start
        for i, (zone, stay_s) in enumerate(zones):
            first = [PresenceEvent("visit_start", key, t, zone, t, t)] if i == 0 else []
            self.pipeline.handle_presence([*first, PresenceEvent("enter", key, t, zone, t, start)])
            self.pipeline.handle_presence([PresenceEvent("exit", key, t + stay_s, zone, t, start, stay_s)])
            t += stay_s
        self.pipeline.handle_presence([PresenceEvent("visit_end", key, t + 5, None, None, start, t + 5 - start)])
        self.pipeline.flush_footfall()
        self.clock.set(max(self.clock.now(), t + 10))

    def interact(self, kind: str) -> None:
        """The customer acted on the store's last notification (the app's POST /v1/me/notifications/.../...)."""
        with self.db.session() as s:
            nid = s.scalar(select(func.max(Notification.id)))
            s.add(Interaction(notification_id=nid, kind=kind, at=self.clock.now()))

    def figures(self) -> dict[str, Any]:
        with self.db.session() as s:
            return figures(s, DAY, DAY, TZ, store=self.id)

    def counts(self) -> dict[str, int]:
        with self.db.session() as s:
            return {m.__tablename__: int(s.scalar(select(func.count()).select_from(m)) or 0)
                    for m in (Visit, ZoneStay, Decision, Notification, Interaction)}


def hq_counts(db: Database, store: str) -> dict[str, int]:
    with db.session() as s:
        out = {m.__tablename__: int(s.scalar(select(func.count()).select_from(m).where(m.store_id == store)) or 0)
               for m in (Visit, ZoneStay, Decision, Notification)}
        out["interactions"] = int(s.scalar(select(func.count()).select_from(Interaction).join(
            Notification, Notification.id == Interaction.notification_id).where(Notification.store_id == store)) or 0)
        return out


@pytest.fixture
def hq_db(pg_url: str) -> Iterator[Database]:
    """Head office's PostgreSQL: a fresh database per test, migrated."""
    with fresh_pg_database(pg_url, "gw_hq") as url:
        database = Database(url)
        database.upgrade()
        try:
            yield database
        finally:
            database.dispose()


EXAMPLE = EXAMPLES / "mosquitto-bridge.conf"
# The example's lines that name its site: here a loopback broker, no TLS, no accounts, a quick retry.
SITE = {"listener": None, "allow_anonymous": None, "password_file": None, "remote_username": None,
        "remote_password": None, "bridge_cafile": None, "restart_timeout": "1"}


def bridge_config(store: str, central: MosquittoServer, workdir: Path) -> str:
    """examples/mosquitto-bridge.conf as a store broker runs it, with this test's addresses and paths."""
    site = {**SITE, "address": f"{central.host}:{central.port}", "remote_clientid": f"bridge-{store}",
            "connection": f"hq-{store}", "persistence_location": f"{workdir}/"}
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key in site:
            if site[key] is None:
                continue
            value = str(site[key])
        lines.append(f"{key} {value}")
    assert "cleansession false" in lines and f"topic {PREFIX}/+/hq/# out 1" in lines
    return "\n".join(lines)


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[MosquittoServer, list[MosquittoServer]]]:
    """A central broker (persistent, so head office's session outlives its restart) and two store brokers
    bridged to it by examples/mosquitto-bridge.conf."""
    binary = _mosquitto_binary()
    (tmp_path / "central").mkdir()
    central = MosquittoServer(binary=binary, workdir=tmp_path / "central",
                              extra=f"persistence true\npersistence_location {tmp_path / 'central'}/\n"
                                    "autosave_interval 1\n")
    central.start()
    stores = []
    for sid in ("a", "b"):
        (tmp_path / sid).mkdir()
        broker = MosquittoServer(binary=binary, workdir=tmp_path / sid, extra=bridge_config(
            sid, central, tmp_path / sid))
        broker.start()
        stores.append(broker)
    try:
        yield central, stores
    finally:
        for b in (*stores, central):
            b.stop()


def test_head_office_gets_each_event_once_and_the_same_figures_through_bridges_restarts_and_wan_down(
        tmp_path: Path, migrated_sqlite: Path, hq_db: Database,
        brokers: tuple[MosquittoServer, list[MosquittoServer]]) -> None:
    central, (broker_a, broker_b) = brokers
    clock_a, clock_b = VirtualClock(at(9, 0)), VirtualClock(at(9, 0))
    a = Store("a", migrated_copy(migrated_sqlite, tmp_path / "a.db"), broker_a, clock_a)
    b = Store("b", migrated_copy(migrated_sqlite, tmp_path / "b.db"), broker_b, clock_b)
    for name in ("alice", "bob"):
        a.enrol(name)
    b.enrol("carol")

    def consumer() -> HqConsumer:
        c = HqConsumer(hq_db, central.host, central.port, PREFIX, "hq-test", now=clock_a.now)
        c.start()
        assert c.subscribed.wait(WAIT_S)
        return c

    def converged() -> bool:
        return all(hq_counts(hq_db, st.id) == st.counts() for st in (a, b))

    hq = consumer()
    # Morning: both stores, enrolled and anonymous people; Alice and Carol get the shoes offer and act on it.
    a.walk("alice", [("entrance", 20), ("shoes", 120)], at(10, 0))
    a.interact("opened")
    a.walk("x1", [("shoes", 30)], at(10, 5))
    b.walk("carol", [("shoes", 200)], at(10, 10))
    b.interact("clicked")
    a.link.uplink.run_once()
    b.link.uplink.run_once()
    # The consumer stops mid-stream (its session stays on the central broker) and comes back.
    a.walk("bob", [("shoes", 50), ("apparel", 300)], at(11, 0))
    hq.stop()
    a.link.uplink.run_once()
    hq = consumer()
    assert wait_until(converged), (hq_counts(hq_db, "a"), a.counts(), hq_counts(hq_db, "b"), b.counts())

    # The WAN goes down for an hour: the central broker is away; the stores go on and their brokers queue.
    central.stop()
    for i, t in enumerate((at(12, 0), at(12, 20), at(12, 40))):
        a.walk(f"y{i}", [("shoes", 40 + i)], t)
        b.walk(f"z{i}", [("apparel", 90)], t)
    a.walk("alice", [("shoes", 70)], at(12, 50))  # Alice's second visit: a returning visit
    assert a.link.uplink.run_once() > 0 and b.link.uplink.run_once() > 0  # the store's broker acknowledged
    clock_a.set(at(13, 0))
    central.start()  # the line is back: the bridges reconnect and forward what they queued
    assert wait_until(converged), (hq_counts(hq_db, "a"), a.counts(), hq_counts(hq_db, "b"), b.counts())

    # Every event republished (the uplink's marks lost): nothing is counted twice.
    with a.db.session() as s:
        s.execute(delete(HqUplinkMark))
        s.execute(delete(HqUplinkOpen))
    again = Uplink(a.db, "a", PREFIX, a.link.uplink.publish, now=clock_a.now)
    republished = again.run_once()
    assert republished >= sum(a.counts().values())
    with hq_db.session() as s:
        ledger = int(s.scalar(select(func.count()).select_from(HqEvent).where(HqEvent.store_id == "a")) or 0)
    assert wait_until(lambda: hq.stats.duplicates >= sum(a.counts().values()))
    assert hq_counts(hq_db, "a") == a.counts() and converged()
    with hq_db.session() as s:
        assert int(s.scalar(select(func.count()).select_from(HqEvent).where(HqEvent.store_id == "a")) or 0) == ledger
        assert s.scalar(select(func.count()).select_from(HqEvent).where(HqEvent.row_id.is_(None))) == 0

    # The figures: head office's per store equal the store's own; across both they add up.
    with hq_db.session() as s:
        at_hq = {sid: figures(s, DAY, DAY, TZ, store=sid) for sid in ("a", "b")}
        both = figures(s, DAY, DAY, TZ, store="a,b")
        every = figures(s, DAY, DAY, TZ, store=None)
    own = {"a": a.figures(), "b": b.figures()}
    for sid in ("a", "b"):
        assert at_hq[sid] == own[sid], sid
    assert own["a"]["footfall"] == 7 and own["b"]["footfall"] == 4  # a: 3 enrolled + 4 anonymous visits
    assert own["a"]["notifications"]["total"]["notified"] >= 2
    assert both["footfall"] == every["footfall"] == own["a"]["footfall"] + own["b"]["footfall"]
    assert both["notifications"]["total"]["notified"] == sum(own[s]["notifications"]["total"]["notified"]
                                                             for s in own)
    assert [h["footfall"] for h in both["hours"]] == [x + y for x, y in zip(
        [h["footfall"] for h in own["a"]["hours"]], [h["footfall"] for h in own["b"]["hours"]], strict=True)]

    # Alice is erased at store a: her rows go there (the database's cascades) and, after an uplink cycle, at
    # head office too; a late redelivery of one of her events brings nothing back.
    with a.db.session() as s:
        v = s.scalars(select(Visit).order_by(Visit.id).limit(1)).one()
        # One of her events still on its way when she is erased (an id head office has not seen yet).
        alice, late = v.profile_id, event("a", "visit", 10**6, {"id": 10**6, "profile_id": v.profile_id,
                                                               "started_at": v.started_at, "ended_at": v.ended_at,
                                                               "zones": list(v.zones)})
    # Her online cart and her watch's hour of readings went up too (head office: a:<id>, of her profile there).
    a.svc.upsert_cart("cart-alice", profile_id=alice, external_id=None, updated_at=clock_a.now(),
                      items=[{"sku": "run-42", "quantity": 1, "price": 80.0}])
    a.svc.register_device("watch-alice", "fitness_watch", alice)
    a.pipeline.ingest_readings([Reading("watch-alice", "a", at(11, 30), {"heart_rate": 80.0})], now=at(13, 0))
    assert a.link.uplink.run_once() >= 3
    assert wait_until(lambda: carts(hq_db, "a:").keys() == {"cart-alice"} and len(rollups(hq_db)) == 1)
    a.svc.erase_profile(alice)
    assert a.link.uplink.run_once() >= 1
    assert wait_until(lambda: hq_counts(hq_db, "a") == a.counts()), (hq_counts(hq_db, "a"), a.counts())
    with hq_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Profile).where(Profile.external_id == f"a:{alice}")) == 0
    assert carts(hq_db) == {} and rollups(hq_db) == {}  # gone with her, by the cascades
    assert wait_until(lambda: devices(hq_db, "a:")["watch-alice"][3] is False)  # the watch stays, unowned
    received = hq.stats.received
    a.link.uplink.publish(topic(PREFIX, "a", "visit"), late.body()).wait_for_publish(WAIT_S)
    assert wait_until(lambda: hq.stats.received > received)
    assert hq_counts(hq_db, "a") == a.counts()
    with hq_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Profile).where(Profile.external_id == f"a:{alice}")) == 0
        assert figures(s, DAY, DAY, TZ, store="a") == a.figures()
    hq.stop()
    for st in (a, b):
        st.link.stop()
        st.db.dispose()


def rollups(db: Database, prefix: str = "") -> dict[tuple[str, float, str], tuple[int, float, float, float]]:
    """The hourly rollups per device (the store's id: head office's without ``prefix``) and metric."""
    with db.session() as s:
        return {(r.device_id.removeprefix(prefix), r.start, r.metric): (r.count, r.sum, r.min, r.max)
                for r in s.scalars(select(ReadingRollup).where(ReadingRollup.period == 3600))}


def alarms(db: Database) -> list[tuple[Any, ...]]:
    with db.session() as s:
        return sorted((a.rule_id, a.status, a.severity, a.count, a.created_at, a.updated_at, a.cleared_at,
                       a.prompted_at, a.acknowledged_at, a.booked_at, a.resolved_at, a.notification_id is not None)
                      for a in s.scalars(select(Alarm)))


def carts(db: Database, prefix: str = "") -> dict[str, tuple[Any, ...]]:
    with db.session() as s:
        return {c.id.removeprefix(prefix): (c.status, c.updated_at, c.abandoned_at, c.checked_out_at,
                                            c.purchase_handled_at,
                                            [(i["sku"], i["quantity"], i["price"]) for i in c.items])
                for c in s.scalars(select(Cart))}


def statuses(db: Database, store: str) -> list[tuple[str, float, str]]:
    with db.session() as s:
        rows = s.execute(select(Notification.campaign_id, Notification.created_at, Notification.status)
                         .where(Notification.store_id == store))
        return sorted((c, t, st) for c, t, st in rows)


def devices(db: Database, prefix: str = "") -> dict[str, tuple[Any, ...]]:
    with db.session() as s:
        owners = {pid: ext for pid, ext in s.execute(select(Profile.id, Profile.external_id))}
        return {d.id.removeprefix(prefix): (d.kind, d.firmware, d.registered_at, d.profile_id is not None,
                                            owners.get(d.profile_id or 0) if prefix else None)
                for d in s.scalars(select(Device))}


def test_head_office_gets_devices_hourly_rollups_alarms_carts_and_later_statuses_as_the_store_has_them(
        tmp_path: Path, migrated_sqlite: Path, hq_db: Database,
        brokers: tuple[MosquittoServer, list[MosquittoServer]]) -> None:
    central, (broker_a, _) = brokers
    clock = VirtualClock(at(9, 0))
    a = Store("a", migrated_copy(migrated_sqlite, tmp_path / "a.db"), broker_a, clock, devices=True)
    alice, bob = a.enrol("alice"), a.enrol("bob")
    a.svc.register_device("bike-alice", "ebike", alice)
    a.svc.register_device("bike-bob", "ebike", bob)
    a.svc.register_device("bike-spare", "ebike", None)
    desk = AlarmDesk(a.db, clock, a.pipeline.rules)
    hq = HqConsumer(hq_db, central.host, central.port, PREFIX, "hq-devices-test", now=clock.now)
    hq.start()
    assert hq.subscribed.wait(WAIT_S)

    def ride(start: float, steps: int, first: int = 0) -> None:
        """Every bike reports every 5 minutes; Alice rides 25 km between readings, Bob 2, the spare none."""
        for i in range(first, first + steps):
            t = start + 300 * (i - first)
            clock.set(max(clock.now(), t))
            a.pipeline.ingest_readings([
                Reading("bike-alice", "a", t, {"chain_km": 2000.0 + 25 * i, "battery_pct": 80.0 - i * 0.1}),
                Reading("bike-bob", "a", t, {"chain_km": 500.0 + 2 * i, "battery_pct": 90.0}),
                Reading("bike-spare", "a", t, {"chain_km": 100.0, "battery_pct": 50.0 + i % 3})], now=t)

    def same() -> bool:
        return (rollups(hq_db, "a:") == rollups(a.db) and alarms(hq_db) == alarms(a.db)
                and carts(hq_db, "a:") == carts(a.db) and statuses(hq_db, "a") == statuses(a.db, "a"))

    # 09:00-10:00 of readings; at 10:02 the hour is over but within its grace: nothing of it goes up yet.
    ride(at(9, 0), 12)
    a.svc.upsert_cart("c-alice", profile_id=alice, external_id=None, updated_at=clock.now(),
                      items=[{"sku": "run-42", "name": "Runner 42 (typed by the shop)", "quantity": 1, "price": 80.0}])
    a.svc.upsert_cart("c-bob", profile_id=bob, external_id=None, updated_at=clock.now(),
                      items=[{"sku": "sock-1", "quantity": 2, "price": 4.5}])
    clock.set(at(10, 2))
    a.link.uplink.run_once()
    assert wait_until(lambda: devices(hq_db, "a:").keys() == {"bike-alice", "bike-bob", "bike-spare"}
                      and set(carts(hq_db, "a:")) == {"c-alice", "c-bob"})
    assert rollups(hq_db, "a:") == {}
    assert devices(hq_db, "a:")["bike-alice"][4] == f"a:{alice}"  # the owner: head office's profile of hers
    clock.set(at(10, 6))
    a.link.uplink.run_once()
    assert wait_until(lambda: rollups(hq_db, "a:") == rollups(a.db) != {})

    # Alice walks into shoes and gets the offer; she rides on until her chain is due (1000 km), is prompted,
    # acknowledges, and buys her cart; Bob's is abandoned. The spare's buffered 09:xx readings come late.
    a.walk("alice", [("shoes", 120)], at(10, 10))
    ride(at(10, 15), 30, first=12)
    with a.db.session() as s:
        (alarm_id,) = s.scalars(select(Alarm.id)).all()  # Alice's chain: prompted
        offer_id = s.scalar(select(Notification.id).where(Notification.campaign_id == "shoes-offer"))
    assert offer_id is not None
    a.link.uplink.run_once()
    clock.set(at(12, 50))
    desk.acknowledge(alice, alarm_id)
    a.svc.ack(alice, offer_id)  # the app confirms the offer: its status goes on after it went up
    a.svc.upsert_cart("c-alice", profile_id=alice, external_id=None, updated_at=clock.now(), status="checked_out",
                      items=[{"sku": "run-42", "name": "Runner 42", "quantity": 1, "price": 80.0}])
    a.pipeline.cart_events(clock.now())  # Alice's purchase handled; Bob's idle cart abandoned
    a.pipeline.ingest_readings([Reading("bike-spare", "a", at(9, 2, 30), {"chain_km": 100.0, "battery_pct": 51.0})],
                               now=clock.now())
    a.link.uplink.run_once()
    clock.set(at(13, 10))
    desk.record_service("bike-alice", "new chain")  # resolved
    ride(at(13, 10), 1, first=42)
    clock.set(at(14, 10))
    a.link.uplink.run_once()
    assert wait_until(same), (alarms(hq_db), alarms(a.db), carts(hq_db, "a:"), carts(a.db))

    own = a.figures()
    assert own["notifications"]["total"]["conversions"] == 1 and own["notifications"]["total"]["delivered"] >= 1
    assert own["maintenance"]["prompts"] == 1 and own["maintenance"]["resolved"] == 1
    (store_alarm,) = alarms(a.db)
    assert store_alarm[1] == "resolved" and store_alarm[8] is not None  # acknowledged, then resolved
    assert {c[2] is not None for c in carts(a.db).values()} == {True, False}  # one abandoned, one bought
    with hq_db.session() as s:
        assert figures(s, DAY, DAY, TZ, store="a") == own
        items = s.scalars(select(Cart.items).where(Cart.id == "a:c-alice")).one()
    assert items == [{"sku": "run-42", "quantity": 1, "price": 80.0}]  # no text the feed or customer typed
    assert rollups(hq_db, "a:")[("bike-spare", at(9, 0), "battery_pct")][0] == 13  # the late reading counted

    # Everything republished from scratch changes nothing; so does a redelivered older version of each.
    before = (rollups(hq_db), alarms(hq_db), carts(hq_db), statuses(hq_db, "a"), devices(hq_db, "a:"))
    with a.db.session() as s:
        s.execute(delete(HqUplinkMark))
        s.execute(delete(HqUplinkOpen))
    received = hq.stats.received
    again = Uplink(a.db, "a", PREFIX, a.link.uplink.publish, now=clock.now)
    republished = again.run_once()
    assert republished >= 3 + len(before[0]) + 1 + 2
    assert wait_until(lambda: hq.stats.received >= received + republished)
    assert (rollups(hq_db), alarms(hq_db), carts(hq_db), statuses(hq_db, "a"), devices(hq_db, "a:")) == before
    with a.db.session() as s:
        alarm = s.get(Alarm, alarm_id)
        cart = s.get(Cart, "c-alice")
        note = s.get(Notification, offer_id)
        assert alarm is not None and cart is not None and note is not None
        older = [event("a", "alarm", alarm_id, {**_alarm(alarm), "status": "active", "resolved_at": None,
                                                 "acknowledged_at": None}),
                 event("a", "cart", "c-alice", {**_cart(cart), "status": "open", "checked_out_at": None,
                                                 "purchase_handled_at": None}),
                 event("a", "notification", offer_id, {**_notification(note), "status": "pending",
                                                       "customer": None}),
                 event("a", "reading_hour", "bike-spare:x:battery_pct", {
                     "device_id": "bike-spare", "start": at(9, 0), "metric": "battery_pct", "count": 12, "sum": 0.0,
                     "min": 0.0, "max": 0.0, "last": 0.0, "last_ts": at(9, 55), "profile_id": None})]
    received = hq.stats.received
    for e in older:
        a.link.uplink.publish(topic(PREFIX, "a", e.kind), e.body()).wait_for_publish(WAIT_S)
    assert wait_until(lambda: hq.stats.received >= received + len(older))
    assert (rollups(hq_db), alarms(hq_db), carts(hq_db), statuses(hq_db, "a"), devices(hq_db, "a:")) == before

    # Bob's profile is merged into Alice's (the same customer): his cart, bike and its rollups move to her. At
    # head office his profile goes (an erasure) and what moved comes back under hers.
    a.svc.link_profiles(alice, bob)
    a.link.uplink.run_once()
    assert wait_until(lambda: carts(hq_db, "a:") == carts(a.db) and rollups(hq_db, "a:") == rollups(a.db)
                      and devices(hq_db, "a:")["bike-bob"][4] == f"a:{alice}"), (carts(hq_db, "a:"), carts(a.db))
    with hq_db.session() as s:
        assert s.scalar(select(Profile.external_id).join(Cart, Cart.profile_id == Profile.id)
                        .where(Cart.id == "a:c-bob")) == f"a:{alice}"
        assert s.scalar(select(func.count()).select_from(Profile).where(Profile.external_id == f"a:{bob}")) == 0
        assert s.scalar(select(func.count()).select_from(ReadingRollup).join(
            Profile, Profile.id == ReadingRollup.profile_id).where(Profile.external_id == f"a:{alice}")) == sum(
            1 for k in rollups(a.db) if k[0] in ("bike-alice", "bike-bob"))

    # Alice is erased at the store: her cart, alarm and her bike's rollups go at head office too; her bike
    # stays, without an owner, as at the store; a late event of her cart brings nothing back.
    a.svc.erase_profile(alice)
    a.link.uplink.run_once()
    assert wait_until(lambda: carts(hq_db, "a:") == carts(a.db) and alarms(hq_db) == alarms(a.db) == [])
    assert rollups(hq_db, "a:") == rollups(a.db) and not any(k[0] in ("bike-alice", "bike-bob") for k in rollups(a.db))
    assert devices(hq_db, "a:")["bike-alice"][3] is False
    received = hq.stats.received
    a.link.uplink.publish(topic(PREFIX, "a", "cart"), older[1].body()).wait_for_publish(WAIT_S)
    assert wait_until(lambda: hq.stats.received > received)
    assert carts(hq_db, "a:") == carts(a.db)
    with hq_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Profile).where(Profile.external_id == f"a:{alice}")) == 0
    hq.stop()
    a.link.stop()
    a.db.dispose()


def test_the_rows_that_change_wait_in_the_store_while_its_broker_does_not_acknowledge(
        tmp_path: Path, migrated_sqlite: Path, mosquitto: MosquittoServer) -> None:
    """Persist before acknowledge for the new kinds: a cycle the broker does not acknowledge moves no mark
    and no fingerprint, so the next one sends the same rows; one acknowledged sends each once."""
    clock = VirtualClock(at(9, 0))
    a = Store("a", migrated_copy(migrated_sqlite, tmp_path / "a.db"), mosquitto, clock, devices=True)
    dana = a.enrol("dana")
    a.svc.register_device("bike-dana", "ebike", dana)
    for i in range(12):
        a.pipeline.ingest_readings([Reading("bike-dana", "a", at(9, 5 * i), {"chain_km": 10.0 * i})], now=at(9, 5 * i))
    clock.set(at(10, 6))
    a.svc.upsert_cart("c-dana", profile_id=dana, external_id=None, updated_at=at(9, 30),
                      items=[{"sku": "run-42", "quantity": 1, "price": 80.0}])
    sent: list[str] = []

    def refused(t: str, body: bytes) -> Any:
        sent.append(t.rsplit("/", 1)[1])
        return _NotSent()  # as the uplink's own publish when the broker is away: never acknowledged

    def recorded(t: str, body: bytes) -> Any:
        sent.append(t.rsplit("/", 1)[1])
        return a.link.uplink.publish(t, body)

    up = Uplink(a.db, "a", PREFIX, refused, now=clock.now, ack_timeout_s=0.1)
    for _ in range(2):  # the broker away twice: the same rows offered each time, nothing marked
        sent.clear()
        assert up.run_once() == 0
        assert sorted(set(sent)) == ["cart", "device", "reading_hour"] and sent.count("reading_hour") == 1
        with a.db.session() as s:
            assert s.get(HqUplinkMark, "reading_hour") is None
    assert up.stats.unacknowledged == 2
    up.publish = recorded  # the broker is back
    sent.clear()
    assert up.run_once() > 0
    assert sorted(sent) == ["cart", "device", "reading_hour"]  # the hour once, chain_km (its only metric)
    with a.db.session() as s:
        mark = s.get(HqUplinkMark, "reading_hour")
        assert mark is not None and mark.last_id == 12
    sent.clear()
    assert up.run_once() == 0 and sent == []  # acknowledged: nothing changed, nothing sent again
    a.link.stop()
    a.db.dispose()
