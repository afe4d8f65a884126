"""Store and head office on real parts: two stores' pipelines (virtual time) write visits, stays, decisions,
notifications, interactions and footfall into their own SQLite; each store's uplink publishes them to the
store's Mosquitto, which bridges them (cleansession false, MQTT 5, QoS 1 out) to a central Mosquitto;
head office's consumer writes them into a fresh PostgreSQL. Head office's figures per store equal each
store's own, across stores they add up, and every event is there once: after a consumer restart mid-stream,
a republish of everything, and an hour of WAN down (the central broker stopped) while the stores go on; a
customer erased at a store is erased at head office too."""

from __future__ import annotations

import datetime as dt
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import delete, func, select

from gateway.app.config import Settings, StoreSettings
from gateway.app.pipeline import Pipeline
from gateway.campaigns.model import CampaignIndex, parse_campaign
from gateway.clock import VirtualClock
from gateway.engine.figures import figures
from gateway.hq.consumer import HqConsumer
from gateway.hq.events import event, topic
from gateway.hq.uplink import Uplink, UplinkThread
from gateway.presence.tracker import PresenceEvent
from gateway.profiles.service import GatewayService, NewProfile, ServiceOptions
from gateway.storage.db import Database
from gateway.storage.models import (
    Decision,
    HqEvent,
    HqUplinkMark,
    HqUplinkOpen,
    Interaction,
    Notification,
    Profile,
    Visit,
    ZoneStay,
)
from tests.conftest import MosquittoServer, _mosquitto_binary, fresh_pg_database
from tests.fixtures import make_service, migrated_copy

TZ = "Europe/Paris"
DAY = "2026-06-01"
PREFIX = "stores"
WAIT_S = 20.0


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

    def __init__(self, store_id: str, db: Database, broker: MosquittoServer, clock: VirtualClock) -> None:
        self.id, self.db, self.clock = store_id, db, clock
        self.svc: GatewayService = make_service(db, clock, options=ServiceOptions(timezone=TZ, store_id=store_id))
        offer = parse_campaign({"id": "shoes-offer", "purpose": "offers", "trigger": {"type": "enter", "zone": "shoes"},
                                "action": {"title": "10 % off", "body": "today"}})
        self.pipeline = Pipeline(Settings(store=StoreSettings(id=store_id, timezone=TZ)), db, CampaignIndex([offer]),
                                 self.svc.identities)
        self.link = UplinkThread(lambda publish: Uplink(db, store_id, PREFIX, publish, now=clock.now),
                                 broker.host, broker.port, f"uplink-{store_id}-{secrets.token_hex(3)}")
        self.link.connect()
        assert self.link.wait_connected(WAIT_S)

    def enrol(self, name: str) -> None:
        self.svc.create_profile(NewProfile(external_id=f"{self.id}-{name}", consents={"offers": True},
                                           identifiers=[("beacon", tag(name))]))

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


EXAMPLE = Path(__file__).resolve().parents[1] / "examples/mosquitto-bridge.conf"
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
    a.svc.erase_profile(alice)
    assert a.link.uplink.run_once() >= 1
    assert wait_until(lambda: hq_counts(hq_db, "a") == a.counts()), (hq_counts(hq_db, "a"), a.counts())
    with hq_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Profile).where(Profile.external_id == f"a:{alice}")) == 0
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
