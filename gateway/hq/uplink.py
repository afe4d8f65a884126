"""The uplink: a stage apart that reads the store's new rows by id and publishes them upward.

It never calls into the pipeline: the pipeline writes rows as always; the uplink reads them (its own
sessions, its own thread, its own MQTT connection) and publishes QoS 1 events (gateway/hq/events.py).

**Persist before acknowledge.** Each kind has a high-water mark in the store's database
(``hq_uplink_marks``: the last row id read) advanced only after the broker has sent PUBACK for every event
it covers, so a restart, a broker outage or a WAN outage (the bridge queues) loses nothing: what was not
acknowledged is read and published again, and head office keeps each event once by its id. A row is
published once settled (a visit or stay once ended, a notification once out of ``scheduled``); a row read
while still open is noted in ``hq_uplink_open`` (in the same transaction as the mark) and published when it
settles. A profile whose rows went up and that is gone since (erased, or merged into another) goes up
as an ``erasure``. Footfall counts are counters per (day, zone): the rows of the mark's day and later are
republished when they change, and head office keeps the larger count.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.orm import Session

from gateway.hq.events import Event, event, topic
from gateway.storage.db import Database
from gateway.storage.models import (
    Decision,
    FootfallCount,
    FootfallHour,
    HqUplinkMark,
    HqUplinkOpen,
    HqUplinkProfile,
    Interaction,
    Notification,
    NotificationStatus,
    Profile,
    Visit,
    ZoneStay,
)

if TYPE_CHECKING:
    from devices.mqtt import MqttSettings

log = logging.getLogger("gateway.hq")

STALE_OPEN_S = 86400.0  # a visit or stay open this long (a crash left it) no longer holds the mark back
FOOTFALL = "footfall"  # the mark of both footfall tables: the ordinal of the oldest day still republished


class Delivery(Protocol):
    """What a publish returns (paho's MQTTMessageInfo): done once the broker has sent PUBACK."""

    def is_published(self) -> bool: ...
    def wait_for_publish(self, timeout: float | None = None) -> None: ...


Publish = Callable[[str, bytes], Delivery]


def _visit(v: Visit) -> dict[str, Any]:
    return {"id": v.id, "profile_id": v.profile_id, "started_at": v.started_at, "ended_at": v.ended_at,
            "zones": list(v.zones or [])}


def _stay(z: ZoneStay) -> dict[str, Any]:
    return {"id": z.id, "profile_id": z.profile_id, "visit_id": z.visit_id, "zone": z.zone,
            "entered_at": z.entered_at, "exited_at": z.exited_at}


def _decision(d: Decision) -> dict[str, Any]:
    return {"id": d.id, "at": d.at, "profile_id": d.profile_id, "campaign_id": d.campaign_id,
            "event_kind": d.event_kind, "event_key": d.event_key, "fired": d.fired, "reason": d.reason,
            "detail": d.detail, "variant": d.variant}


def _notification(n: Notification) -> dict[str, Any]:
    return {"id": n.id, "profile_id": n.profile_id, "campaign_id": n.campaign_id, "purpose": n.purpose,
            "dedup_key": n.dedup_key, "created_at": n.created_at, "status": n.status, "deliver_at": n.deliver_at,
            "variant": n.variant, "data": dict(n.data or {})}


def _interaction(i: Interaction) -> dict[str, Any]:
    return {"id": i.id, "notification_id": i.notification_id, "kind": i.kind, "at": i.at}


@dataclass(frozen=True)
class _Kind:
    name: str
    model: Any
    of_store: Callable[[str], list[ColumnElement[bool]]]
    unsettled: Callable[[Any, float], bool]  # a row not to publish yet, as of ``now``
    data: Callable[[Any], dict[str, Any]]


# In the order head office applies them best: a stay's visit and an interaction's notification come first.
KINDS: tuple[_Kind, ...] = (
    _Kind("visit", Visit, lambda s: [Visit.store_id == s],
          lambda r, now: r.ended_at is None and r.started_at > now - STALE_OPEN_S, _visit),
    _Kind("zone_stay", ZoneStay, lambda s: [ZoneStay.store_id == s],
          lambda r, now: r.exited_at is None and r.entered_at > now - STALE_OPEN_S, _stay),
    _Kind("decision", Decision, lambda s: [Decision.store_id == s], lambda r, now: False, _decision),
    _Kind("notification", Notification, lambda s: [Notification.store_id == s],
          lambda r, now: r.status == NotificationStatus.SCHEDULED, _notification),
    _Kind("interaction", Interaction,
          lambda s: [Interaction.notification_id.in_(select(Notification.id).where(Notification.store_id == s))],
          lambda r, now: False, _interaction),
)


@dataclass
class UplinkStats:
    published: int = 0
    cycles: int = 0
    unacknowledged: int = 0  # cycles that ended with an event the broker did not acknowledge in time
    marks: dict[str, int] = field(default_factory=dict)  # kind -> the last row id published (or noted open)


class Uplink:
    """Publishes the store's settled rows above each mark, then advances the marks (after PUBACK)."""

    def __init__(self, db: Database, store_id: str, prefix: str, publish: Publish, *, batch: int = 500,
                 ack_timeout_s: float = 10.0, now: Callable[[], float] | None = None) -> None:
        self.db, self.store_id, self.prefix, self.publish = db, store_id, prefix, publish
        self.batch, self.ack_timeout_s = batch, ack_timeout_s
        self._now = now
        self._footfall_sent: dict[tuple[str, str, int | None, str], tuple[Any, ...]] = {}
        self.stats = UplinkStats()

    def run_once(self) -> int:
        """One cycle: the open rows noted before that have settled since, then the new rows above each mark
        (an open one is noted, in ``hq_uplink_open``, to be published once it settles); the marks and notes
        written only after the broker acknowledged every event. Returns how many events were published."""
        self.stats.cycles += 1
        now = self._now() if self._now is not None else dt.datetime.now(dt.UTC).timestamp()
        plans: list[tuple[_Kind, int, list[int], list[int], list[Event]]] = []
        with self.db.session() as s:
            marks = {m.kind: m.last_id for m in s.scalars(select(HqUplinkMark))}
            noted: dict[str, set[int]] = {}
            for o in s.scalars(select(HqUplinkOpen)):
                noted.setdefault(o.kind, set()).add(o.row_id)
            for k in KINDS:
                mark = marks.get(k.name, 0)
                settled_now, events = [], []
                was_open = sorted(noted.get(k.name, ()))
                if was_open:  # still there and settled now (gone rows, erased or purged, are dropped too)
                    still = {r.id: r for r in s.scalars(select(k.model).where(k.model.id.in_(was_open)))}
                    for rid in was_open:
                        r = still.get(rid)
                        if r is None or not _is_open(k, r, now):
                            settled_now.append(rid)
                            if r is not None:
                                events.append(event(self.store_id, k.name, r.id, k.data(r)))
                rows = s.scalars(select(k.model).where(k.model.id > mark, *k.of_store(self.store_id))
                                 .order_by(k.model.id).limit(self.batch)).all()
                opened = []
                for r in rows:
                    if _is_open(k, r, now):
                        opened.append(r.id)
                    else:
                        events.append(event(self.store_id, k.name, r.id, k.data(r)))
                if k.name == "notification" and events:  # the customer the stores share, for cross-store limits
                    pids = {e.data["profile_id"] for e in events}
                    shared = {pid: ext for pid, ext in s.execute(
                        select(Profile.id, Profile.external_id).where(Profile.id.in_(pids)))}
                    for e in events:
                        e.data["customer"] = shared.get(e.data["profile_id"])
                plans.append((k, rows[-1].id if rows else mark, settled_now, opened, events))
            footfall_mark = marks.get(FOOTFALL, 0)
            foot = self._footfall(s, footfall_mark)
            known = set(s.scalars(select(HqUplinkProfile.profile_id)))
            gone = sorted(s.scalars(select(HqUplinkProfile.profile_id).where(
                HqUplinkProfile.profile_id.not_in(select(Profile.id)))))
        erasures = [event(self.store_id, "erasure", pid, {"profile_id": pid}) for pid in gone]
        profiles = {e.data["profile_id"] for *_, events in plans for e in events if "profile_id" in e.data} - known
        if not self._send([e for *_, events in plans for e in events] + [e for _, e in foot] + erasures):
            self.stats.unacknowledged += 1
            return 0
        n = len(foot)
        with self.db.session() as s:
            for k, top, settled_now, opened, events in plans:
                if settled_now:
                    s.execute(delete(HqUplinkOpen).where(HqUplinkOpen.kind == k.name,
                                                         HqUplinkOpen.row_id.in_(settled_now)))
                s.add_all(HqUplinkOpen(kind=k.name, row_id=rid) for rid in opened)
                self._set_mark(s, k.name, top, now)
                self.stats.marks[k.name] = top
                n += len(events)
            s.add_all(HqUplinkProfile(profile_id=pid) for pid in sorted(profiles))
            if gone:
                s.execute(delete(HqUplinkProfile).where(HqUplinkProfile.profile_id.in_(gone)))
            n += len(erasures)
            for key, e in foot:
                self._footfall_sent[key] = tuple(sorted(e.data.items()))
            if foot:
                newest = max(dt.date.fromisoformat(e.data["day"]).toordinal() for _, e in foot)
                kept = max(footfall_mark, newest - 1)
                self._set_mark(s, FOOTFALL, kept, now)
                since = dt.date.fromordinal(kept).isoformat()
                for key in [k for k in self._footfall_sent if k[1] < since]:  # bounded: the days still republished
                    del self._footfall_sent[key]
        self.stats.published += n
        return n

    def _footfall(self, s: Session, mark: int) -> list[tuple[tuple[str, str, int | None, str], Event]]:
        since = dt.date.fromordinal(mark).isoformat() if mark > 0 else ""
        out: list[tuple[tuple[str, str, int | None, str], Event]] = []
        for c in s.scalars(select(FootfallCount).where(FootfallCount.store_id == self.store_id,
                                                        FootfallCount.day >= since)):
            data = {"day": c.day, "zone": c.zone, "anonymous_visits": c.anonymous_visits,
                    "anonymous_dwell_s": c.anonymous_dwell_s, "anonymous_ended": c.anonymous_ended,
                    "anonymous_bounces": c.anonymous_bounces}
            out.append((("day", c.day, None, c.zone), event(self.store_id, "footfall_day", f"{c.day}:{c.zone}", data)))
        for h in s.scalars(select(FootfallHour).where(FootfallHour.store_id == self.store_id,
                                                       FootfallHour.day >= since)):
            data = {"day": h.day, "hour": h.hour, "zone": h.zone, "anonymous_visits": h.anonymous_visits}
            out.append((("hour", h.day, h.hour, h.zone),
                        event(self.store_id, "footfall_hour", f"{h.day}:{h.hour}:{h.zone}", data)))
        return [(k, e) for k, e in out if self._footfall_sent.get(k) != tuple(sorted(e.data.items()))]

    def _send(self, events: Sequence[Event]) -> bool:
        """Every event published; True once the broker acknowledged them all within the timeout."""
        pending = [self.publish(topic(self.prefix, self.store_id, e.kind), e.body()) for e in events]
        for d in pending:
            try:
                d.wait_for_publish(self.ack_timeout_s)
            except (RuntimeError, ValueError):  # paho: not connected, or the queue refused it
                return False
            if not d.is_published():
                return False
        return True

    def _set_mark(self, s: Session, kind: str, last_id: int, now: float) -> None:
        m = s.get(HqUplinkMark, kind)
        if m is None:
            s.add(HqUplinkMark(kind=kind, last_id=last_id, updated_at=now))
        elif last_id > m.last_id:
            m.last_id, m.updated_at = last_id, now


def _is_open(k: _Kind, row: Any, now: float) -> bool:
    return bool(k.unsettled(row, now))


class UplinkThread:
    """The uplink on its own thread with its own paho connection to the store's broker (QoS 1)."""

    def __init__(self, uplink_of: Callable[[Publish], Uplink], host: str, port: int, client_id: str,
                 interval_s: float = 5.0, broker: MqttSettings | None = None) -> None:
        import paho.mqtt.client as mqtt

        self._client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=mqtt.MQTTv5)
        if broker is not None:  # [mqtt]'s credentials and TLS, set as the intake sets them
            from devices.mqtt import secure_client

            secure_client(self._client, broker)
        self._client.reconnect_delay_set(1, 30)
        self._host, self._port, self.interval_s = host, port, interval_s
        self.uplink = uplink_of(self._publish)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hq-uplink", daemon=True)

    def _publish(self, t: str, payload: bytes) -> Delivery:
        if not self._client.is_connected():
            raise_not_connected = _NotSent()
            return raise_not_connected
        info: Delivery = self._client.publish(t, payload, qos=1)
        return info

    def connect(self) -> None:
        """The connection alone (its own paho thread): ``uplink.run_once`` can be driven by hand (tests)."""
        self._client.connect_async(self._host, self._port, 30)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        done = threading.Event()
        for _ in range(int(timeout * 20)):
            if self._client.is_connected():
                return True
            done.wait(0.05)
        return self._client.is_connected()

    def start(self) -> None:
        self.connect()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                while self.uplink.run_once() and not self._stop.is_set():
                    pass  # a full batch: the next one at once
            except Exception:  # a database or broker hiccup: try again next cycle, the marks are intact
                log.exception("hq uplink: a cycle failed; trying again in %.0f s", self.interval_s)
            self._stop.wait(self.interval_s)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._client.disconnect()
        self._client.loop_stop()


class _NotSent:
    """A publish refused because the broker is not connected: never acknowledged."""

    def is_published(self) -> bool:
        return False

    def wait_for_publish(self, timeout: float | None = None) -> None:
        return None
