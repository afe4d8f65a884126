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

Rows that change after they went up are found by a bounded scan and a fingerprint in memory of what went up
(republishing everything in scope after a restart is harmless: head office keeps the later version):
devices (every device: a registry, one row each), notifications' later status, alarms and carts (those
whose store-clock times fall within ``CHANGE_WINDOW_S``: the active alarms and any touched, abandoned or
bought cart), and the hourly rollups, found through the readings' ids (mark ``reading_hour``: the last
reading whose hour is over and went up; an hour goes up ``HOUR_GRACE_S`` after it ends, and again
whenever a late reading changes it). The fingerprints change only after PUBACK, as the marks do.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import ColumnElement, delete, or_, select, tuple_
from sqlalchemy.orm import Session

from gateway.hq.events import Event, event, topic
from gateway.storage.db import Database
from gateway.storage.models import (
    Alarm,
    AlarmStatus,
    Cart,
    Decision,
    Device,
    FootfallCount,
    FootfallHour,
    HqUplinkMark,
    HqUplinkOpen,
    HqUplinkProfile,
    Interaction,
    Notification,
    NotificationStatus,
    Profile,
    ReadingRecord,
    ReadingRollup,
    Visit,
    ZoneStay,
)

if TYPE_CHECKING:
    from devices.mqtt import MqttSettings

log = logging.getLogger("gateway.hq")

STALE_OPEN_S = 86400.0  # a visit or stay open this long (a crash left it) no longer holds the mark back
FOOTFALL = "footfall"  # the mark of both footfall tables: the ordinal of the oldest day still republished
READING_HOUR = "reading_hour"  # the mark of the hourly rollups: the last reading id whose hour went up
CHANGE_WINDOW_S = 7 * 86400.0  # notifications, alarms, carts changed within this go up again
HOUR_GRACE_S = 300.0  # an hour's rollup goes up this long after the hour ends (readings a little late)
ALARM_REFRESH_S = 3600.0  # an active alarm's count and last value go up again at most this often
READINGS_SCAN = 20_000  # readings read per cycle to find the hours they changed
CHANGED = ("device", "notification", "alarm", "cart", "reading_hour")  # the kinds fingerprinted in memory


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


def _device(d: Device) -> dict[str, Any]:
    return {"id": d.id, "kind": d.kind, "device_profile": d.device_profile, "profile_id": d.profile_id,
            "firmware": d.firmware, "registered_at": d.registered_at}


def _alarm(a: Alarm) -> dict[str, Any]:
    """The lifecycle, not the texts (``detail``, ``clear_reason``) nor the service's note."""
    return {"id": a.id, "device_id": a.device_id, "profile_id": a.profile_id, "rule_id": a.rule_id, "name": a.name,
            "severity": a.severity, "status": str(a.status), "created_at": a.created_at, "updated_at": a.updated_at,
            "count": a.count, "last_value": a.last_value, "cleared_at": a.cleared_at, "prompted_at": a.prompted_at,
            "notification_id": a.notification_id, "acknowledged_at": a.acknowledged_at, "booked_at": a.booked_at,
            "booked_for": a.booked_for, "resolved_at": a.resolved_at}


def _number(v: Any) -> float | int | None:
    return v if isinstance(v, int | float) and not isinstance(v, bool) else None


def _cart(c: Cart) -> dict[str, Any]:
    """Status, times and items as sku, quantity and price: nothing a customer or a feed typed (names)."""
    items = [{"sku": str(i.get("sku", "")), "qty": _number(i.get("quantity", 1)) or 1, "price": _number(i.get("price"))}
             for i in (c.items or []) if isinstance(i, dict)]
    return {"id": c.id, "profile_id": c.profile_id, "status": str(c.status), "items": items,
            "updated_at": c.updated_at, "abandoned_at": c.abandoned_at, "checked_out_at": c.checked_out_at,
            "purchase_handled_at": c.purchase_handled_at}


def _rollup(r: ReadingRollup) -> dict[str, Any]:
    return {"device_id": r.device_id, "start": r.start, "metric": r.metric, "count": r.count, "sum": r.sum,
            "min": r.min, "max": r.max, "last": r.last, "last_ts": r.last_ts, "profile_id": r.profile_id}


def _print(data: dict[str, Any]) -> tuple[Any, ...]:
    """A row's fingerprint: what went up, to tell whether it changed since. A digest of it, not the row (a
    week's alarms held as their 18 fields each grew the store's memory by 2.4 kB an alarm: the soak), with
    the owner in clear (a device's change of owner moves its rollups)."""
    body = repr(sorted((k, repr(v)) for k, v in data.items())).encode()
    return (("profile_id", repr(data.get("profile_id"))), ("digest", hashlib.blake2b(body, digest_size=16).digest()))


def _alarm_version(data: dict[str, Any]) -> dict[str, Any]:
    """What makes an alarm worth sending again: its lifecycle, and its running figures (``count``,
    ``last_value``, ``updated_at``: every reading of an active alarm's device moves them) at most once per
    ``ALARM_REFRESH_S`` of its own time. Sent on every change, a day's active alarms were two thirds of
    all the store's upward events (the soak); head office's count lags by at most that, and is exact
    once the alarm clears or is resolved."""
    running = ("count", "last_value", "updated_at")
    return {**{k: v for k, v in data.items() if k not in running},
            "refresh": int(data["updated_at"] // ALARM_REFRESH_S) if data["updated_at"] is not None else None}


Scan = dict[Any, tuple[Any, ...]]  # a kind's rows in scope now, by key: their fingerprints


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
        # What went up of the rows that change later, by kind and key: bounded by each kind's scan.
        self._sent: dict[str, dict[Any, tuple[Any, ...]]] = {k: {} for k in CHANGED}
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
            scans: dict[str, Scan] = {}
            devices, moved = self._devices(s, scans)
            _, top_note, settled_note, opened_note, main_notes = next(p for p in plans if p[0].name == "notification")
            later = self._statuses(s, top_note, {e.data["id"] for e in main_notes}, now, scans)
            still_open = (noted.get("notification", set()) - set(settled_note)) | set(opened_note)
            alarms = self._alarms(s, top_note, still_open, now, scans)
            carts = self._carts(s, now, scans)
            hour_top, hours = self._hours(s, marks.get(READING_HOUR, 0), now, scans, moved)
            known = set(s.scalars(select(HqUplinkProfile.profile_id)))
            gone = sorted(s.scalars(select(HqUplinkProfile.profile_id).where(
                HqUplinkProfile.profile_id.not_in(select(Profile.id)))))
        erasures = [event(self.store_id, "erasure", pid, {"profile_id": pid}) for pid in gone]
        changed = [*later, *alarms, *carts, *hours]
        # Erasures first: a profile merged into another is gone, and the rows that moved to the survivor
        # (its alarms and carts, changed) follow under their new owner. Devices next: rows refer to them.
        out = devices + [e for *_, events in plans for e in events] + changed + [e for _, e in foot]
        profiles = {pid for e in out if isinstance(pid := e.data.get("profile_id"), int)} - known - set(gone)
        if not self._send(erasures + out):
            self.stats.unacknowledged += 1
            return 0
        n = len(foot) + len(devices) + len(changed)
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
            self._remember(scans, main_notes)
            self._set_mark(s, READING_HOUR, hour_top, now)
            self.stats.marks[READING_HOUR] = hour_top
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

    def _devices(self, s: Session, scans: dict[str, Scan]) -> tuple[list[Event], set[str]]:
        """Every device of the database whose row differs from what went up (new, or its owner changed...),
        and those of them whose owner changed since it went up (a merge moves its rollups to the survivor)."""
        scan = scans["device"] = {}
        out, moved = [], set()
        for d in s.scalars(select(Device)):
            data = _device(d)
            scan[d.id] = _print(data)
            before = self._sent["device"].get(d.id)
            if before != scan[d.id]:
                out.append(event(self.store_id, "device", d.id, data))
                if before is not None and dict(before).get("profile_id") != repr(d.profile_id):
                    moved.add(d.id)
        return out, moved

    def _statuses(self, s: Session, top: int, main: set[int], now: float, scans: dict[str, Scan]) -> list[Event]:
        """Notifications already up (at or below the mark, out of ``scheduled``, of the window) whose status
        changed since they went up; after a restart, all of them once."""
        rows = s.execute(select(Notification.id, Notification.status).where(
            Notification.store_id == self.store_id, Notification.created_at >= now - CHANGE_WINDOW_S,
            Notification.id <= top, Notification.status != NotificationStatus.SCHEDULED)).all()
        scan = scans["notification"] = {nid: (status,) for nid, status in rows}
        stale = [nid for nid in scan if nid not in main and self._sent["notification"].get(nid) != scan[nid]]
        out = []
        for i in range(0, len(stale), 500):
            notes = list(s.scalars(select(Notification).where(Notification.id.in_(stale[i:i + 500]))))
            shared = {pid: ext for pid, ext in s.execute(select(Profile.id, Profile.external_id).where(
                Profile.id.in_({n.profile_id for n in notes})))}
            for n in notes:
                scan[n.id] = (n.status,)
                data = {**_notification(n), "customer": shared.get(n.profile_id)}
                out.append(event(self.store_id, "notification", n.id, data))
        return out

    def _alarms(self, s: Session, top_note: int, open_notes: set[int], now: float,
                scans: dict[str, Scan]) -> list[Event]:
        """Alarms active or touched within the window (by the store's clock: prompted, acknowledged, booked,
        resolved...) that differ from what went up. One whose prompt has not gone up yet waits for it, so
        head office can tie the two (the maintenance figures count a store's alarms by their prompt)."""
        since = now - CHANGE_WINDOW_S
        rows = s.scalars(select(Alarm).where(or_(
            Alarm.status == AlarmStatus.ACTIVE, Alarm.created_at >= since, Alarm.updated_at >= since,
            Alarm.acknowledged_at >= since, Alarm.booked_at >= since, Alarm.resolved_at >= since))).all()
        scan = scans["alarm"] = {}
        out = []
        for a in rows:
            if a.notification_id is not None and (a.notification_id > top_note or a.notification_id in open_notes):
                continue  # its prompt is not up yet: a later cycle
            data = _alarm(a)
            scan[a.id] = _print(_alarm_version(data))
            if self._sent["alarm"].get(a.id) != scan[a.id]:
                out.append(event(self.store_id, "alarm", a.id, data))
        return out

    def _carts(self, s: Session, now: float, scans: dict[str, Scan]) -> list[Event]:
        """Carts touched, abandoned, checked out or bought within the window that differ from what went up
        (a feed's touch with an old ``updated_at`` is found when the cart is abandoned or bought)."""
        since = now - CHANGE_WINDOW_S
        rows = s.scalars(select(Cart).where(or_(
            Cart.updated_at >= since, Cart.abandoned_at >= since, Cart.checked_out_at >= since,
            Cart.purchase_handled_at >= since))).all()
        scan = scans["cart"] = {}
        out = []
        for c in rows:
            data = _cart(c)
            scan[c.id] = _print(data)
            if self._sent["cart"].get(c.id) != scan[c.id]:
                out.append(event(self.store_id, "cart", c.id, data))
        return out

    def _hours(self, s: Session, mark: int, now: float, scans: dict[str, Scan],
               moved: set[str]) -> tuple[int, list[Event]]:
        """The hourly rollups of the hours the readings above the mark fall in, once each hour is over (and
        its grace): each that differs from what went up. The new mark stops before the first reading of an
        hour not over yet, so the readings after it are read again (and their hours found in the map).
        Every hour of a device whose owner changed goes up again (a merge moved them to the survivor, and
        head office dropped them with the merged profile)."""
        rows = s.execute(select(ReadingRecord.id, ReadingRecord.device_id, ReadingRecord.ts).where(
            ReadingRecord.id > mark).order_by(ReadingRecord.id).limit(READINGS_SCAN)).all()
        top, held, touched = mark, False, set()
        for rid, device_id, ts in rows:
            start = float(int(ts // 3600) * 3600)
            if start + 3600 + HOUR_GRACE_S > now:
                held = True
                continue
            touched.add((device_id, start))
            if not held:
                top = rid
        scan = scans["reading_hour"] = {}
        out = []
        pairs = sorted(touched)
        queries = [select(ReadingRollup).where(
            ReadingRollup.period == 3600, tuple_(ReadingRollup.device_id, ReadingRollup.start).in_(pairs[i:i + 300]))
            for i in range(0, len(pairs), 300)]
        queries += [select(ReadingRollup).where(ReadingRollup.period == 3600, ReadingRollup.device_id == d)
                    for d in sorted(moved)]
        for q in queries:
            for r in s.scalars(q):
                data = _rollup(r)
                key = (r.device_id, r.start, r.metric)
                if key in scan:
                    continue  # both an hour the readings touched and one of a moved device
                scan[key] = _print(data)
                if r.device_id in moved or self._sent["reading_hour"].get(key) != scan[key]:
                    out.append(event(self.store_id, "reading_hour", f"{r.device_id}:{int(r.start)}:{r.metric}", data))
        return top, out

    def _remember(self, scans: dict[str, Scan], main_notes: list[Event]) -> None:
        """After PUBACK: each kind's map becomes its scan's (what is in scope now, all of it up), so it holds
        what its scan covers and no more."""
        self._sent.update(scans)
        for e in main_notes:  # the ones that went up by the mark this cycle
            self._sent["notification"][e.data["id"]] = (e.data["status"],)

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
