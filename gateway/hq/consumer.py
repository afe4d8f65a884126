"""Head office's consumer: every store's upward events into one database, each once.

``apply`` is the writer (pure database work, no MQTT): in one transaction, each event's id goes into the
ledger (``hq_events``) with ``INSERT ... ON CONFLICT DO NOTHING``; only an id new to the ledger writes its
row, into the same tables a store uses, with the store's id, so the figures work across stores. Store row
ids become head office's own (a store's profile ``p`` is head office's profile ``<store>:<p>``); a stay's
visit and an interaction's notification are found through the ledger. An interaction that arrives before
its notification waits in the ledger with its payload and is written when the notification comes.
Footfall counters and hourly rollups keep the larger count (they only grow), so a republished row changes
nothing. Rows that change at the store come again under the same id: an alarm, a cart or a notification's
status is taken only when it is later in its kind's order (gateway/hq/events.py), so a redelivered older
version changes nothing; a device's row is the store's latest (it has no order: last write wins, and the
uplink sends each change once more whenever it differs). Devices and carts keep the store's id with the
store's in front (``<store>:<id>``: ids of two stores may collide). An ``erasure`` removes the store's
profile and, by the database's cascades, every row of it (carts, alarms, rollups; devices lose their owner).
The store-profile -> profile map is an LRU of ``PROFILE_CACHE`` entries (a miss reads the database), so
months of customers do not grow it without bound.

``HqConsumer`` is the MQTT side, as the store's telemetry intake (devices/mqtt.py): one paho connection,
a persistent session (MQTT 5, ``clean_start`` false, a session expiry), QoS 1, ``manual_ack``: a message
is acknowledged only after the transaction that holds it has committed, so a crash redelivers it.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from gateway.hq.downlink import Send, sends_topic
from gateway.hq.events import (
    NOTIFICATION_ORDER,
    Event,
    EventError,
    alarm_version,
    cart_version,
    parse,
    subscription,
)
from gateway.storage.db import Database, describe, is_transient, upsert_insert
from gateway.storage.models import (
    Alarm,
    Cart,
    Decision,
    Device,
    FootfallCount,
    FootfallHour,
    HqEvent,
    Interaction,
    Notification,
    Profile,
    ReadingRollup,
    Visit,
    ZoneStay,
)

if TYPE_CHECKING:
    from devices.mqtt import MqttSettings

log = logging.getLogger("gateway.hq")

PROFILE_CACHE = 10_000  # store profiles whose head-office id is kept in memory (the most recently used)
_ALARM_FIELDS = ("rule_id", "name", "severity", "status", "created_at", "updated_at", "count", "last_value",
                 "cleared_at", "prompted_at", "acknowledged_at", "booked_at", "booked_for", "resolved_at")
_CART_TIMES = ("updated_at", "abandoned_at", "checked_out_at", "purchase_handled_at")
_DEVICE_FIELDS = ("kind", "device_profile", "firmware", "registered_at")


def hq_key(store: str, key: str) -> str:
    """Head office's id of a store's device or cart: ``<store>:<id>``; one too long for the column (128)
    becomes ``<store>:#`` and a digest of it, the same every time."""
    whole = f"{store}:{key}"
    return whole if len(whole) <= 128 else f"{store}:#{hashlib.sha256(key.encode()).hexdigest()[:40]}"


_ROLLUP = ("count", "sum", "min", "max", "last", "last_ts")
_UPSERTS: dict[str, Any] = {}


def _rollup_upsert(dialect: str) -> Any:
    """An hour's rollup, inserted or taking the larger count (counts only grow); returns a row if it wrote.
    Built once per dialect: a statement made per event costs more than the database's work."""
    stmt = _UPSERTS.get(dialect)
    if stmt is None:
        table: Any = ReadingRollup.__table__
        ins = upsert_insert(dialect, table)
        stmt = _UPSERTS[dialect] = ins.on_conflict_do_update(
            index_elements=["device_id", "period", "start", "metric"],
            set_={c: ins.excluded[c] for c in (*_ROLLUP, "profile_id")},
            where=table.c.count < ins.excluded.count).returning(table.c.count)
    return stmt


def _when(d: dict[str, Any]) -> float:
    for name in ("at", "created_at", "started_at", "entered_at", "updated_at", "start", "registered_at"):
        if isinstance(d.get(name), int | float):
            return float(d[name])
    return 0.0


class Applier:
    """Writes events into head office's database; keeps the store-profile -> profile map it has made."""

    def __init__(self, max_profiles: int = PROFILE_CACHE) -> None:
        self._profiles: OrderedDict[str, int] = OrderedDict()
        self.max_profiles = max_profiles
        self._devices: OrderedDict[str, None] = OrderedDict()  # head-office device rows known to exist
        self._asked: set[str] = set()  # the batch's erasure ids looked up, and those found (or applied since)
        self._gone: set[str] = set()

    def apply(self, s: Session, events: Sequence[Event], now: float) -> int:
        """Every event of the batch, in order, in the caller's transaction; returns how many wrote or
        changed something."""
        new = 0
        # The batch's profiles erased at their store, read at once (each event asks; a batch holds up to 1,000).
        self._asked = {f"{e.store}:erasure:{pid}" for e in events if isinstance(pid := e.data.get("profile_id"), int)}
        self._gone = set(s.scalars(select(HqEvent.event_id).where(HqEvent.event_id.in_(sorted(self._asked))))
                         ) if self._asked else set()
        for e in events:
            if e.kind.startswith("footfall"):
                self._footfall(s, e)
                continue
            if e.kind in ("device", "cart", "reading_hour"):  # keyed by the store's own key: no ledger
                new += self._keyed(s, e)
                continue
            taken = s.execute(upsert_insert(s, HqEvent).values(event_id=e.id, store_id=e.store, kind=e.kind,
                                                         received_at=now)
                              .on_conflict_do_nothing(index_elements=["event_id"])
                              .returning(HqEvent.event_id)).first()
            if taken is None:  # seen before: a redelivery, a republish, or a later version of a row that changes
                if e.kind in ("alarm", "notification"):
                    new += self._later(s, e)
                continue
            new += 1
            self._write(s, e)
        self._parked(s)
        return new

    def _write(self, s: Session, e: Event) -> bool:
        """The event's row; False (and its payload kept in the ledger) when its parent has not come yet."""
        d = e.data
        row: Any
        if e.kind == "erasure":  # the profile's rows go (the database cascades); its ledger ids stay, so
            key = f"{e.store}:{d['profile_id']}"  # a late or redelivered event of it is still dropped
            self._asked.add(e.id)
            self._gone.add(e.id)
            s.execute(delete(Profile).where(Profile.external_id == key))
            s.expunge_all()  # rows of it read earlier in this batch are gone: none is updated as if it were there
            self._profiles.pop(key, None)
            return True
        if self._erased(s, e):
            return True  # an event of a profile erased at the store, arriving late: nothing of it is kept
        if e.kind == "alarm":
            row = Alarm()
            self._alarm(s, e, row)
        elif e.kind == "interaction":
            parent = self._row(s, f"{e.store}:notification:{d['notification_id']}")
            if parent is None:
                s.execute(update(HqEvent).where(HqEvent.event_id == e.id).values(payload=d))
                return False
            if s.get(Notification, parent) is None:  # its profile was erased since: nothing of it is kept
                return True
            row = Interaction(notification_id=parent, kind=d["kind"], at=d["at"])
        else:
            pid = self._profile(s, e.store, d["profile_id"], now=_when(d))
            if e.kind == "visit":
                row = Visit(profile_id=pid, started_at=d["started_at"], ended_at=d["ended_at"],
                            zones=d["zones"], store_id=e.store)
            elif e.kind == "zone_stay":
                visit = self._row(s, f"{e.store}:visit:{d['visit_id']}") if d["visit_id"] is not None else None
                row = ZoneStay(profile_id=pid, visit_id=visit, zone=d["zone"], entered_at=d["entered_at"],
                               exited_at=d["exited_at"], store_id=e.store)
            elif e.kind == "decision":
                row = Decision(at=d["at"], profile_id=pid, campaign_id=d["campaign_id"], event_kind=d["event_kind"],
                               event_key=d["event_key"], fired=d["fired"], reason=d["reason"], detail=d["detail"],
                               variant=d["variant"], store_id=e.store)
            else:  # notification: the text stays in the store; the dedup key is the store's, prefixed
                row = Notification(profile_id=pid, campaign_id=d["campaign_id"], purpose=d["purpose"],
                                   dedup_key=f"{e.store}:{d['dedup_key']}", title="", body="", data=d["data"],
                                   created_at=d["created_at"], status=d["status"], deliver_at=d["deliver_at"],
                                   variant=d["variant"], store_id=e.store)
        s.add(row)
        s.flush()
        s.execute(update(HqEvent).where(HqEvent.event_id == e.id).values(row_id=row.id, payload=None))
        return True

    def _erased(self, s: Session, e: Event) -> bool:
        pid = e.data.get("profile_id")
        if not isinstance(pid, int):
            return False
        key = f"{e.store}:erasure:{pid}"
        return key in self._gone if key in self._asked else self._row_exists(s, key)

    def _owner(self, s: Session, e: Event) -> int | None:
        """The head-office profile of the row's store profile; None when it has none (or it was erased)."""
        pid = e.data.get("profile_id")
        if pid is None or self._erased(s, e):
            return None
        return self._profile(s, e.store, pid, now=_when(e.data))

    def _device(self, s: Session, store: str, device_id: str) -> str:
        """Head office's row of a store's device, made bare if its own event has not come yet (rows refer to it).
        The ones known to be there are remembered (an LRU as the profiles'): a device's rollups come in dozens."""
        key = hq_key(store, device_id)
        if key in self._devices:
            self._devices.move_to_end(key)
            return key
        if s.get(Device, key) is None:
            s.add(Device(id=key, store_id=store, state={}))
            s.flush()
        self._devices[key] = None
        while len(self._devices) > self.max_profiles:
            self._devices.popitem(last=False)
        return key

    def _alarm(self, s: Session, e: Event, row: Alarm) -> None:
        d = e.data
        row.device_id = self._device(s, e.store, d["device_id"])
        row.profile_id = self._owner(s, e)
        for name in _ALARM_FIELDS:
            setattr(row, name, d[name])
        prompt = d["notification_id"]  # the store's notification: head office's own id, through the ledger
        row.notification_id = self._row(s, f"{e.store}:notification:{prompt}") if prompt is not None else None

    def _later(self, s: Session, e: Event) -> int:
        """An alarm or notification seen before: its row takes this version if it is later; 1 if it did."""
        if self._erased(s, e):
            return 0
        rid = self._row(s, e.id)
        if e.kind == "notification":
            n = s.get(Notification, rid) if rid is not None else None
            if n is None or NOTIFICATION_ORDER.get(e.data["status"], -1) <= NOTIFICATION_ORDER.get(n.status, -1):
                return 0
            n.status, n.deliver_at = e.data["status"], e.data["deliver_at"]
            return 1
        a = s.get(Alarm, rid) if rid is not None else None
        if a is None:  # its row went (a merge at the store dropped its old owner's): written again
            return int(self._write(s, e))
        if alarm_version(e.data) <= alarm_version({n: getattr(a, n) for n in _ALARM_FIELDS}):
            return 0
        self._alarm(s, e, a)
        return 1

    def _keyed(self, s: Session, e: Event) -> int:
        """A device, a cart or an hour's rollup, under its store key; 1 if it wrote or changed the row."""
        d = e.data
        if e.kind == "device":
            key = hq_key(e.store, d["id"])
            values = {**{n: d[n] for n in _DEVICE_FIELDS}, "profile_id": self._owner(s, e)}
            dev = s.get(Device, key)
            if dev is None:
                dev = Device(id=key, store_id=e.store, state={})
                s.add(dev)
            elif all(getattr(dev, n) == v for n, v in values.items()):
                return 0
            for n, v in values.items():
                setattr(dev, n, v)
            s.flush()
            return 1
        if self._erased(s, e):
            return 0  # a row of a profile erased at the store, arriving late: nothing of it is kept
        if e.kind == "cart":
            key = hq_key(e.store, d["id"])
            cart = s.get(Cart, key)
            if cart is not None and cart_version(d) <= cart_version({n: getattr(cart, n) for n in (
                    "status", *_CART_TIMES)}):
                return 0
            pid = self._profile(s, e.store, d["profile_id"], now=_when(d))  # before the row: it may flush
            if cart is None:
                cart = Cart(id=key, profile_id=pid)
                s.add(cart)
            cart.profile_id = pid
            cart.status = d["status"]
            cart.items = [{"sku": i["sku"], "quantity": i["qty"], "price": i["price"]} for i in d["items"]]
            for n in _CART_TIMES:
                setattr(cart, n, d[n])
            s.flush()
            return 1
        row = {"device_id": self._device(s, e.store, d["device_id"]), "period": 3600, "start": d["start"],
               "metric": d["metric"], "profile_id": self._owner(s, e), **{c: d[c] for c in _ROLLUP}}
        return int(s.connection().execute(_rollup_upsert(s.get_bind().dialect.name), row).first() is not None)

    def _parked(self, s: Session) -> None:
        """Events that waited for a parent which may have come in this batch."""
        for h in s.scalars(select(HqEvent).where(HqEvent.row_id.is_(None), HqEvent.payload.is_not(None))).all():
            assert h.payload is not None
            self._write(s, Event(h.event_id, h.store_id, h.kind, dict(h.payload)))

    @staticmethod
    def _row_exists(s: Session, event_id: str) -> bool:
        return s.scalar(select(HqEvent.event_id).where(HqEvent.event_id == event_id)) is not None

    @staticmethod
    def _row(s: Session, event_id: str) -> int | None:
        return s.scalar(select(HqEvent.row_id).where(HqEvent.event_id == event_id))

    def _profile(self, s: Session, store: str, store_pid: int, now: float) -> int:
        key = f"{store}:{store_pid}"
        pid = self._profiles.get(key)
        if pid is not None:
            self._profiles.move_to_end(key)
            return pid
        pid = s.scalar(select(Profile.id).where(Profile.external_id == key))
        if pid is None:
            p = Profile(external_id=key, attributes={}, created_at=now)
            s.add(p)
            s.flush()
            pid = p.id
        self._profiles[key] = pid
        while len(self._profiles) > self.max_profiles:  # the least recently used goes; a miss reads it again
            self._profiles.popitem(last=False)
        return pid

    def forget_cache(self) -> None:
        """After a rolled-back transaction the maps may name profiles or devices that were never committed."""
        self._profiles.clear()
        self._devices.clear()

    @staticmethod
    def _footfall(s: Session, e: Event) -> None:
        d = e.data
        if e.kind == "footfall_day":
            cols: tuple[str, ...] = ("anonymous_visits", "anonymous_dwell_s", "anonymous_ended", "anonymous_bounces")
            stmt = upsert_insert(s, FootfallCount).values(store_id=e.store, day=d["day"], zone=d["zone"],
                                                    **{c: d[c] for c in cols})
            keys = ["store_id", "day", "zone"]
            model: Any = FootfallCount
        else:
            cols = ("anonymous_visits",)
            stmt = upsert_insert(s, FootfallHour).values(store_id=e.store, day=d["day"], hour=d["hour"], zone=d["zone"],
                                                   anonymous_visits=d["anonymous_visits"])
            keys = ["store_id", "day", "hour", "zone"]
            model = FootfallHour
        big = func.greatest if s.get_bind().dialect.name == "postgresql" else func.max
        s.execute(stmt.on_conflict_do_update(index_elements=keys, set_={
            c: big(getattr(model, c), getattr(stmt.excluded, c)) for c in cols}))


@dataclass
class ConsumerStats:
    received: int = 0
    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    rejects: dict[str, int] = field(default_factory=dict)


class HqConsumer:
    """Subscribes to every store's events on the central broker and writes them, acking after commit."""

    def __init__(self, db: Database, host: str, port: int, prefix: str, client_id: str, *,
                 session_expiry: int = 7 * 86400, max_batch: int = 1000, broker: MqttSettings | None = None,
                 now: Callable[[], float] | None = None) -> None:
        import time

        import paho.mqtt.client as mqtt

        self.db, self.prefix = db, prefix
        self._now = now or time.time
        self._max_batch = max_batch
        self._client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=mqtt.MQTTv5, manual_ack=True)
        if broker is not None:  # [mqtt]'s credentials and TLS, set as the store's intake sets them
            from devices.mqtt import secure_client

            secure_client(self._client, broker)
        self._client.reconnect_delay_set(1, 30)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._host, self._port, self._expiry = host, port, session_expiry
        self._inbox: queue.Queue[tuple[int, int, str, bytes] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="hq-consumer", daemon=True)
        self.applier = Applier()
        self.stats = ConsumerStats()
        self.subscribed = threading.Event()

    def start(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._expiry
        self._worker.start()
        self._client.connect_async(self._host, self._port, 30, clean_start=False, properties=props)
        self._client.loop_start()

    def stop(self, timeout: float = 5.0) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._inbox.put(None)
        self._worker.join(timeout)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("hq: the central broker refused the connection: %s", reason)
            return
        client.subscribe(subscription(self.prefix), qos=1)
        self.subscribed.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._inbox.put((message.mid, message.qos, message.topic, bytes(message.payload)))

    def _run(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    more = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._inbox.put(None)
                    break
                batch.append(more)
            self._handle(batch)

    def _commit(self, events: list[Event]) -> int:
        """The batch in one transaction; while the database is away, again (nothing is acked meanwhile: a
        crash redelivers). An event the database refuses for its data is written alone, and one that still
        fails is logged with its id, counted and dropped, so it cannot hold back every store's events."""
        pause = threading.Event()
        delay = 0.5
        while True:
            try:
                with self.db.session() as s:
                    return self.applier.apply(s, events, self._now())
            except Exception as exc:
                self.applier.forget_cache()
                if not is_transient(exc):
                    break
                log.warning("hq: the database is away (%s); %d event(s) wait", describe(exc), len(events))
                pause.wait(delay)
                delay = min(delay * 2, 10.0)
        new = 0
        for e in events:
            try:
                with self.db.session() as s:
                    new += self.applier.apply(s, [e], self._now())
            except Exception as exc:
                self.applier.forget_cache()
                if is_transient(exc):
                    return new + self._commit([e])
                self.stats.rejected += 1
                self.stats.rejects["unwritable"] = self.stats.rejects.get("unwritable", 0) + 1
                log.warning("hq: dropped event %s: the database refused it (%s)", e.id, describe(exc))
        return new

    def _handle(self, batch: list[tuple[int, int, str, bytes]]) -> None:
        events: list[Event] = []
        for _, _, t, payload in batch:
            try:
                events.append(parse(t, payload))
            except EventError as exc:  # counted and logged with its topic, then acked: it never will parse
                self.stats.rejected += 1
                reason = str(exc).split(":", 1)[0]
                self.stats.rejects[reason] = self.stats.rejects.get(reason, 0) + 1
                log.warning("hq: dropped an event on %s: %s", t, exc)
        new = self._commit(events)
        self.stats.received += len(batch)
        self.stats.applied += new
        self.stats.duplicates += len(events) - new - sum(1 for e in events if e.kind.startswith("footfall"))
        self.stats.batches += 1
        for e in events:  # cross-store limits: every store hears of a send (again on a redelivery: idempotent)
            customer = e.data.get("customer") if e.kind == "notification" else None
            if isinstance(customer, str) and customer and e.data.get("status") != "scheduled":
                send = Send(e.id, e.store, customer, e.data["campaign_id"], e.data["purpose"],
                            float(e.data["deliver_at"] or e.data["created_at"]))
                self._client.publish(sends_topic(self.prefix), send.body(), qos=1)
        for mid, qos, _, _ in batch:  # after the commit: persist before acknowledge
            if qos > 0:
                self._client.ack(mid, qos)
