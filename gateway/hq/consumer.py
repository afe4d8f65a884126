"""Head office's consumer: every store's upward events into one database, each once.

``apply`` is the writer (pure database work, no MQTT): in one transaction, each event's id goes into the
ledger (``hq_events``) with ``INSERT ... ON CONFLICT DO NOTHING``; only an id new to the ledger writes its
row, into the same tables a store uses, with the store's id, so the figures work across stores. Store row
ids become head office's own (a store's profile ``p`` is head office's profile ``<store>:<p>``); a stay's
visit and an interaction's notification are found through the ledger. An interaction that arrives before
its notification waits in the ledger with its payload and is written when the notification comes.
Footfall counters keep the larger count (they only grow), so a republished row changes nothing. An
``erasure`` removes the store's profile and, by the database's cascades, every row of it.

``HqConsumer`` is the MQTT side, as the store's telemetry intake (devices/mqtt.py): one paho connection,
a persistent session (MQTT 5, ``clean_start`` false, a session expiry), QoS 1, ``manual_ack``: a message
is acknowledged only after the transaction that holds it has committed, so a crash redelivers it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from gateway.hq.downlink import Send, sends_topic
from gateway.hq.events import Event, EventError, parse, subscription
from gateway.storage.db import Database, describe, is_transient
from gateway.storage.models import (
    Decision,
    FootfallCount,
    FootfallHour,
    HqEvent,
    Interaction,
    Notification,
    Profile,
    Visit,
    ZoneStay,
)

if TYPE_CHECKING:
    from devices.mqtt import MqttSettings

log = logging.getLogger("gateway.hq")


def _insert(s: Session, model: Any) -> Any:
    return (postgresql.insert if s.get_bind().dialect.name == "postgresql" else sqlite.insert)(model)


class Applier:
    """Writes events into head office's database; keeps the store-profile -> profile map it has made."""

    def __init__(self) -> None:
        self._profiles: dict[str, int] = {}

    def apply(self, s: Session, events: Sequence[Event], now: float) -> int:
        """Every event of the batch, in order, in the caller's transaction; returns how many were new."""
        new = 0
        for e in events:
            if e.kind.startswith("footfall"):
                self._footfall(s, e)
                continue
            taken = s.execute(_insert(s, HqEvent).values(event_id=e.id, store_id=e.store, kind=e.kind,
                                                         received_at=now)
                              .on_conflict_do_nothing(index_elements=["event_id"])
                              .returning(HqEvent.event_id)).first()
            if taken is None:
                continue  # seen before: a redelivery or a republish
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
            s.execute(delete(Profile).where(Profile.external_id == key))
            self._profiles.pop(key, None)
            return True
        if "profile_id" in d and self._row_exists(s, f"{e.store}:erasure:{d['profile_id']}"):
            return True  # an event of a profile erased at the store, arriving late: nothing of it is kept
        if e.kind == "interaction":
            parent = self._row(s, f"{e.store}:notification:{d['notification_id']}")
            if parent is None:
                s.execute(update(HqEvent).where(HqEvent.event_id == e.id).values(payload=d))
                return False
            if s.get(Notification, parent) is None:  # its profile was erased since: nothing of it is kept
                return True
            row = Interaction(notification_id=parent, kind=d["kind"], at=d["at"])
        else:
            pid = self._profile(s, e.store, d["profile_id"], now=float(d.get("at") or d.get("created_at")
                                                                         or d.get("started_at")
                                                                         or d.get("entered_at") or 0.0))
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
        if pid is None:
            pid = s.scalar(select(Profile.id).where(Profile.external_id == key))
            if pid is None:
                p = Profile(external_id=key, attributes={}, created_at=now)
                s.add(p)
                s.flush()
                pid = p.id
            self._profiles[key] = pid
        return pid

    def forget_cache(self) -> None:
        """After a rolled-back transaction the map may name profiles that were never committed."""
        self._profiles.clear()

    @staticmethod
    def _footfall(s: Session, e: Event) -> None:
        d = e.data
        if e.kind == "footfall_day":
            cols: tuple[str, ...] = ("anonymous_visits", "anonymous_dwell_s", "anonymous_ended", "anonymous_bounces")
            stmt = _insert(s, FootfallCount).values(store_id=e.store, day=d["day"], zone=d["zone"],
                                                    **{c: d[c] for c in cols})
            keys = ["store_id", "day", "zone"]
            model: Any = FootfallCount
        else:
            cols = ("anonymous_visits",)
            stmt = _insert(s, FootfallHour).values(store_id=e.store, day=d["day"], hour=d["hour"], zone=d["zone"],
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
