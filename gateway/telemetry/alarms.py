"""Device rules at work: durable rule state, alarms, their actions, and the maintenance loop.

``DeviceRules`` runs inside the pipeline's transactions. For each accepted reading (or device event)
it loads the rule's state row, lets the pure evaluator (devices/rules.py) decide, and writes back
the state with ``due_at``, the time its next timer fires, so ``tick`` finds due timers in the
database after a restart as well as before. An alarm row is created once and then updated (count,
last value, severity); a partial unique index keeps it to one active alarm per device and rule.

Actions: the owner's prompt is an ``alarm`` event to the campaign engine, so consent, caps and
quiet hours apply and the notification is unique per alarm; staff alerts and commands to the
device go out only after the transaction commits (nothing is announced that was rolled back).

``AlarmDesk`` is what the API calls: staff alarm lists, the owner's acknowledgement or booking,
service events (counters reset, alarms resolved) and the time-to-resolution figures.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Table, bindparam, event, func, insert, select, update
from sqlalchemy.orm import Session

from devices.payloads import DeviceEvent, Reading
from devices.rules import (
    Change,
    Rule,
    RuleState,
    Sample,
    due,
    next_due,
    observe_into,
    reset_for_service,
    sample_from_metrics,
    wall_stepped,
)
from gateway.clock import Clock
from gateway.engine.engine import EngineEvent
from gateway.errors import Conflict, Invalid, NotFound
from gateway.storage.db import Database
from gateway.storage.models import Alarm, AlarmStatus, Device, Notification, RuleStateRecord, ServiceEvent

log = logging.getLogger("gateway.telemetry.alarms")

_EFFECTS = "device_rules_effects"
DUE_BATCH = 500  # due timers handled per tick; the rest wait for the next one

Decide = Callable[[Session, EngineEvent], list[int]]
CommandSender = Callable[..., Any]  # (device_id, payload dict, store_id=...): MqttIntake.publish_command
AlertSender = Callable[[Mapping[str, Any]], Any]


def alarm_view(a: Alarm) -> dict[str, Any]:
    return {
        "id": a.id, "device_id": a.device_id, "profile_id": a.profile_id, "rule": a.rule_id, "name": a.name,
        "severity": a.severity, "status": a.status, "created_at": a.created_at, "updated_at": a.updated_at,
        "count": a.count, "last_value": a.last_value, "detail": a.detail, "cleared_at": a.cleared_at,
        "clear_reason": a.clear_reason, "prompted_at": a.prompted_at, "notification_id": a.notification_id,
        "acknowledged_at": a.acknowledged_at, "booked_at": a.booked_at, "booked_for": a.booked_for,
        "resolved_at": a.resolved_at, "service_event_id": a.service_event_id,
    }


def after_commit(session: Session, effect: Callable[[], None]) -> None:
    """Run ``effect`` once this session's transaction has committed; never if it rolls back."""
    pending: list[Callable[[], None]] | None = session.info.get(_EFFECTS)
    if pending is None:
        pending = session.info[_EFFECTS] = []

        def run(sess: Session) -> None:
            for fn in sess.info.pop(_EFFECTS, []):
                try:
                    fn()
                except Exception:
                    log.exception("an alarm action failed after commit")

        def drop(sess: Session) -> None:
            sess.info.pop(_EFFECTS, None)

        event.listen(session, "after_commit", run, once=True)
        event.listen(session, "after_rollback", drop, once=True)
    pending.append(effect)


_RULE_STATES: Table = RuleStateRecord.__table__  # type: ignore[assignment]  # a declarative model's Table
_UPDATE_STATE = update(_RULE_STATES).where(
    _RULE_STATES.c.device_id == bindparam("k_device"), _RULE_STATES.c.rule_id == bindparam("k_rule")
).values(profile_id=bindparam("profile_id"), state=bindparam("state"), due_at=bindparam("due_at"),
         updated_at=bindparam("updated_at"))
# PostgreSQL: a batch's changed states in one UPDATE, the rows one JSON parameter (as the telemetry store does).
_PG_UPDATE_STATES = (
    f"UPDATE {_RULE_STATES.name} AS t SET profile_id = u.profile_id, state = u.state, due_at = u.due_at, "
    "updated_at = u.updated_at FROM (SELECT r->>0, r->>1, (r->>2)::int, r->3, (r->>4)::float8, (r->>5)::float8 "
    "FROM json_array_elements(%s::json) AS r) AS u(device_id, rule_id, profile_id, state, due_at, updated_at) "
    "WHERE t.device_id = u.device_id AND t.rule_id = u.rule_id")


def _latest_service(s: Session, device_ids: Iterable[str]) -> dict[str, int]:
    ids = list(set(device_ids))
    if not ids:
        return {}
    rows = s.execute(select(ServiceEvent.device_id, func.max(ServiceEvent.id))
                     .where(ServiceEvent.device_id.in_(ids)).group_by(ServiceEvent.device_id)).all()
    return {d: int(m) for d, m in rows}


class DeviceRules:
    """The rules layer of the pipeline: evaluation with durable state, alarm rows, actions."""

    def __init__(self, rules: Sequence[Rule], *, timezone: str = "UTC", decide: Decide | None = None,
                 publish_command: CommandSender | None = None, publish_alert: AlertSender | None = None) -> None:
        self.rules = tuple(rules)
        self.by_id = {r.id: r for r in self.rules}
        self.tz = ZoneInfo(timezone)
        self.decide = decide
        # Given when MQTT runs: a command to a device, and the retained staff alert.
        self.publish_command = publish_command
        self.publish_alert = publish_alert
        self.figures: Counter[str] = Counter()
        # The earliest due_at this gateway knows of, so a tick with nothing due costs no query. Starts
        # unknown (-inf): the first tick asks the database, which is what makes timers restart-proof.
        self._earliest_due = -math.inf
        self._for_kind: dict[tuple[str, str | None], tuple[Rule, ...]] = {}

    def rules_for(self, device_id: str, kind: str | None) -> tuple[Rule, ...]:
        key = (device_id, kind) if any(r.devices for r in self.rules) else ("", kind)
        found = self._for_kind.get(key)
        if found is None:
            found = self._for_kind[key] = tuple(r for r in self.rules if r.applies_to(device_id, kind))
        return found

    # ------------------------------------------------------------ inputs

    def on_batch(self, s: Session, readings: Iterable[Reading], events: Iterable[DeviceEvent] = (),
                 devices: Mapping[str, Device] | None = None) -> list[int]:
        """A telemetry batch's accepted readings and device events, merged in time order."""
        if not self.rules:
            return []
        samples = [(r.device_id, sample_from_metrics(r.time, r.metrics)) for r in readings]
        samples += [(e.device_id, Sample(e.time, {}, frozenset({e.code}) if e.code else frozenset()))
                    for e in events]
        samples.sort(key=lambda x: x[1].time)
        return self._run(s, samples, devices)

    def _run(self, s: Session, samples: list[tuple[str, Sample]], devices: Mapping[str, Device] | None) -> list[int]:
        devs: dict[str, Device] = dict(devices or {})
        wanted: dict[str, tuple[Rule, ...]] = {}
        for device_id, _ in samples:
            if device_id in wanted:
                continue
            d = devs.get(device_id)
            if d is None:
                d = s.get(Device, device_id)
                if d is None:
                    wanted[device_id] = ()
                    continue
                devs[device_id] = d
            if getattr(d, "quarantined", False):  # not trusted yet: no alarms, no commands
                wanted[device_id] = ()
                continue
            wanted[device_id] = self.rules_for(device_id, d.kind)
        ids = [d for d, rules in wanted.items() if rules]
        if not ids:
            return []
        # Plain rows, not ORM objects: this is the hot path (one state per device and rule per batch).
        rows: dict[tuple[str, str], tuple[dict[str, Any], int | None, float | None]] = {
            (d, r): (state, pid, due) for d, r, state, pid, due in s.execute(
                select(RuleStateRecord.device_id, RuleStateRecord.rule_id, RuleStateRecord.state,
                       RuleStateRecord.profile_id, RuleStateRecord.due_at).where(RuleStateRecord.device_id.in_(ids)))}
        serviced = _latest_service(s, ids)
        states: dict[tuple[str, str], RuleState] = {}
        # The batch's active alarms in one query (a sample over a threshold updates its alarm: most batches
        # touch several), instead of one query per device and rule.
        alarms: dict[tuple[str, str], Alarm | None] = {(d, r.id): None for d in ids for r in wanted[d]}
        for a in s.scalars(select(Alarm).where(Alarm.device_id.in_(ids), Alarm.status == AlarmStatus.ACTIVE)):
            if (a.device_id, a.rule_id) in alarms:
                alarms[(a.device_id, a.rule_id)] = a
        last_time: dict[str, float] = {}
        created: list[int] = []
        for device_id, sample in samples:
            rules = wanted.get(device_id, ())
            if not rules:
                continue
            d = devs[device_id]
            last_time[device_id] = sample.time
            for rule in rules:
                key = (device_id, rule.id)
                st = states.get(key)
                if st is None:
                    st = RuleState.from_dict(rows[key][0] if key in rows else None)
                    st = self.serviced(rule, st, serviced.get(device_id, 0))
                    states[key] = st
                changes = observe_into(rule, st, sample, self.tz)  # st is this batch's own copy
                for ch in changes:
                    created += self._apply(s, d, rule, st, ch, sample.metrics, alarms)
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        for (device_id, rule_id), st in states.items():
            due_at = next_due(self.by_id[rule_id], st)
            if due_at is not None:  # a rollback leaves this too early: one needless query, never a missed timer
                self._earliest_due = min(self._earliest_due, due_at)
            state, owner = st.as_dict(), devs[device_id].profile_id
            before = rows.get((device_id, rule_id))
            if before == (state, owner, due_at):
                continue  # nothing changed (no counter moved, no timer started): no write
            rec = {"device_id": device_id, "rule_id": rule_id, "profile_id": owner, "state": state,
                   "due_at": due_at, "updated_at": last_time[device_id]}
            (updates if before is not None else inserts).append(rec)
        # Two executemany statements, straight to the table: the session's objects are left alone.
        if inserts:
            if any(d in s.new for d in devs.values()):
                s.flush()  # a device new in this batch goes in first (the foreign key)
            s.execute(insert(_RULE_STATES), inserts)
        if updates and s.get_bind().dialect.name == "postgresql":  # one statement, not one per row
            s.connection().exec_driver_sql(_PG_UPDATE_STATES, (json.dumps([
                (u["device_id"], u["rule_id"], u["profile_id"], u["state"], u["due_at"], u["updated_at"])
                for u in updates]),))
        elif updates:
            s.execute(_UPDATE_STATE, [{**u, "k_device": u["device_id"], "k_rule": u["rule_id"]} for u in updates])
        self.figures["rule_samples"] += len(samples)
        return created

    def tick(self, s: Session, now: float) -> list[int]:
        """Timers due by ``now`` (``for`` durations, "did not recur" clears), from the database: restart-proof."""
        if not self.rules or now < self._earliest_due:
            return []
        rows = list(s.scalars(select(RuleStateRecord).where(RuleStateRecord.due_at <= now)
                              .order_by(RuleStateRecord.due_at).limit(DUE_BATCH)))
        if not rows:
            self._earliest_due = s.scalar(select(func.min(RuleStateRecord.due_at))) or math.inf
            return []
        serviced = _latest_service(s, (r.device_id for r in rows))
        alarms: dict[tuple[str, str], Alarm | None] = {}
        created: list[int] = []
        for row in rows:
            rule = self.by_id.get(row.rule_id)
            d = s.get(Device, row.device_id)
            if rule is None or d is None:  # a rule removed from the files since: nothing to wait for
                row.due_at = None
                continue
            st = self.serviced(rule, RuleState.from_dict(row.state), serviced.get(row.device_id, 0))
            st, changes = due(rule, st, now)
            for ch in changes:
                created += self._apply(s, d, rule, st, ch, dict(d.state or {}), alarms)
            self._save(s, row, d, rule, st, now)
        s.flush()
        self._earliest_due = -math.inf if len(rows) == DUE_BATCH else (
            s.scalar(select(func.min(RuleStateRecord.due_at))) or math.inf)
        return created

    def wall_stepped(self, s: Session, after: float, upto: float, by: float) -> int:
        """The wall clock stepped by ``by``: every rule state's times in (``after``, ``upto``] move by the
        step, so ``for`` durations and "did not recur" clears count time that really passed. Returns the
        states changed."""
        if not self.rules:
            return 0
        n = 0
        for row in s.scalars(select(RuleStateRecord)):
            rule = self.by_id.get(row.rule_id)
            if rule is None:
                continue
            st = wall_stepped(RuleState.from_dict(row.state), after, upto, by)
            data = st.as_dict()
            if data != row.state:
                row.state, row.due_at = data, next_due(rule, st)
                n += 1
        self._earliest_due = -math.inf  # timers moved: the next tick asks the database
        return n

    # ------------------------------------------------------------ state and alarms

    @staticmethod
    def serviced(rule: Rule, st: RuleState, latest: int) -> RuleState:
        """A service event newer than the state: its counters restart and its alarm is over."""
        return reset_for_service(rule, st, latest) if latest > st.service_seq else st

    def _save(self, s: Session, row: RuleStateRecord | None, d: Device, rule: Rule, st: RuleState, at: float
              ) -> None:
        data = st.as_dict()
        due_at = next_due(rule, st)
        if due_at is not None:  # a rollback leaves this too early: one needless query, never a missed timer
            self._earliest_due = min(self._earliest_due, due_at)
        if row is None:
            s.add(RuleStateRecord(device_id=d.id, rule_id=rule.id, profile_id=d.profile_id, state=data,
                                  due_at=due_at, updated_at=at))
            return
        row.state = data
        row.due_at = due_at
        row.profile_id = d.profile_id
        row.updated_at = at

    def _active(self, s: Session, d: Device, rule: Rule, cache: dict[tuple[str, str], Alarm | None]) -> Alarm | None:
        key = (d.id, rule.id)
        if key not in cache:
            cache[key] = s.scalars(select(Alarm).where(Alarm.device_id == d.id, Alarm.rule_id == rule.id,
                                                       Alarm.status == AlarmStatus.ACTIVE)).first()
        return cache[key]

    def _apply(self, s: Session, d: Device, rule: Rule, st: RuleState, ch: Change, metrics: Mapping[str, Any],
               cache: dict[tuple[str, str], Alarm | None]) -> list[int]:
        alarm = self._active(s, d, rule, cache)
        created: list[int] = []
        if ch.kind == "cleared":
            if alarm is None:
                return []
            alarm.status, alarm.cleared_at, alarm.clear_reason = AlarmStatus.CLEARED, ch.time, ch.detail
            alarm.updated_at = ch.time
            cache[(d.id, rule.id)] = None
            self.figures["alarms_cleared"] += 1
            self.announce(s, d, rule, alarm, rule.actions.clear_command)
            if d.profile_id is not None and self.decide is not None:
                ev = self._event("alarm_cleared", d, alarm, st, metrics, f"alarm:{alarm.id}:cleared")
                created += self.decide(s, ev)
            return created
        if ch.kind == "updated" and alarm is not None:
            alarm.count, alarm.last_value, alarm.updated_at = ch.count, ch.value, ch.time
            alarm.detail = ch.detail or alarm.detail
            self.figures["alarms_updated"] += 1
            return []
        key = f"alarm:{{id}}:{ch.severity}" if ch.kind == "escalated" else "alarm:{id}"
        if alarm is None:  # created (or the state outlived its row: raise it again, once)
            alarm = Alarm(device_id=d.id, profile_id=d.profile_id, rule_id=rule.id, name=rule.name,
                          severity=ch.severity, status=AlarmStatus.ACTIVE, created_at=ch.time, updated_at=ch.time,
                          count=ch.count, last_value=ch.value, detail=ch.detail)
            s.add(alarm)
            s.flush()  # its id names the occurrence for the engine's dedup key
            cache[(d.id, rule.id)] = alarm
            key = "alarm:{id}"
            self.figures["alarms_created"] += 1
        else:  # escalated
            alarm.severity, alarm.count, alarm.last_value, alarm.updated_at = ch.severity, ch.count, ch.value, ch.time
            alarm.detail = ch.detail
            self.figures["alarms_escalated"] += 1
        self.announce(s, d, rule, alarm, rule.actions.command)
        if rule.actions.prompt and d.profile_id is not None and self.decide is not None:
            ev = self._event("alarm", d, alarm, st, metrics, key.format(id=alarm.id))
            created += self.decide(s, ev)
            if alarm.prompted_at is None:
                n = s.execute(select(Notification.id, Notification.created_at).where(
                    Notification.profile_id == d.profile_id,
                    Notification.dedup_key.endswith(f":{d.profile_id}:{ev.key}"))).first()
                if n is not None:
                    alarm.prompted_at, alarm.notification_id = n.created_at, n.id
                    self.figures["prompts"] += 1
        return created

    @staticmethod
    def _event(kind: str, d: Device, alarm: Alarm, st: RuleState, metrics: Mapping[str, Any], key: str) -> EngineEvent:
        assert d.profile_id is not None
        value = None if alarm.last_value is None else round(alarm.last_value, 2)
        # Plain text in the facts: a decision's detail shows a fact's repr(), not an enum member's.
        facts = {
            "alarm": {"id": alarm.id, "rule": alarm.rule_id, "name": alarm.name, "severity": alarm.severity,
                      "status": str(alarm.status), "value": value, "count": alarm.count, "detail": alarm.detail,
                      "since": alarm.created_at, "counters": {k: round(v, 2) for k, v in st.counters.items()}},
            "device": {"id": d.id, "kind": d.kind},
            "reading": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
        }
        return EngineEvent(kind, d.profile_id, alarm.updated_at, key, facts=facts)

    def announce(self, s: Session, d: Device, rule: Rule, alarm: Alarm, command: Mapping[str, Any] | None) -> None:
        """Staff alert and device command, after the commit: what was rolled back is never announced."""
        if rule.actions.staff:
            view = alarm_view(alarm)

            def alert() -> None:
                if self.publish_alert is None:
                    self.figures["alerts_unsent"] += 1
                    return
                self.publish_alert(view)
                self.figures["alerts_sent"] += 1

            after_commit(s, alert)
        if command is not None:
            payload = {**command, "alarm": alarm.id, "rule": rule.id, "severity": alarm.severity,
                       "status": alarm.status}
            device_id, store = d.id, getattr(d, "store_id", None)

            def send() -> None:
                if self.publish_command is None:
                    self.figures["commands_unsent"] += 1
                    return
                if store:
                    self.publish_command(device_id, payload, store_id=store)
                else:
                    self.publish_command(device_id, payload)
                self.figures["commands_sent"] += 1

            after_commit(s, send)


def alert_topic(prefix: str, store_id: str, device_id: str, rule_id: str) -> str:
    """``<prefix>/<store>/alerts/<device>/<rule>``: retained while the alarm lasts, so staff see it on connect."""
    return f"{prefix}/{store_id}/alerts/{device_id}/{rule_id}"


def mqtt_alert_sender(publish: Callable[..., Any], prefix: str, store_id: str) -> AlertSender:
    """Staff alerts as retained MQTT messages; an ended alarm publishes an empty retained message (removed)."""

    def send(view: Mapping[str, Any]) -> None:
        topic = alert_topic(prefix, store_id, str(view["device_id"]), str(view["rule"]))
        body = b"" if view["status"] != AlarmStatus.ACTIVE else json.dumps(dict(view), separators=(",", ":")).encode()
        publish(topic, body, qos=1, retain=True)

    return send


# ---------------------------------------------------------------- the API's side

def _p90(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]  # nearest rank


class AlarmDesk:
    """Staff alarms, the owner's acknowledgement and booking, service events and resolution figures."""

    def __init__(self, db: Database, clock: Clock, rules: DeviceRules) -> None:
        self.db = db
        self.clock = clock
        self.rules = rules

    def list_alarms(self, status: str | None = None, device_id: str | None = None, limit: int = 100
                    ) -> list[dict[str, Any]]:
        with self.db.session() as s:
            q = select(Alarm)
            if status is not None:
                q = q.where(Alarm.status == status)
            if device_id is not None:
                q = q.where(Alarm.device_id == device_id)
            return [alarm_view(a) for a in s.scalars(q.order_by(Alarm.id.desc()).limit(limit))]

    def my_alarms(self, profile_id: int) -> list[dict[str, Any]]:
        with self.db.session() as s:
            rows = s.scalars(select(Alarm).where(Alarm.profile_id == profile_id).order_by(Alarm.id.desc()).limit(200))
            return [alarm_view(a) for a in rows]

    def _mine(self, s: Session, profile_id: int, alarm_id: int) -> Alarm:
        a = s.get(Alarm, alarm_id)
        if a is None or a.profile_id != profile_id:  # someone else's alarm does not exist, as far as you know
            raise NotFound(f"alarm {alarm_id} not found")
        return a

    def acknowledge(self, profile_id: int, alarm_id: int) -> dict[str, Any]:
        """The owner has seen it; repeating it keeps the first time."""
        with self.db.session() as s:
            a = self._mine(s, profile_id, alarm_id)
            if a.acknowledged_at is None:
                a.acknowledged_at = self.clock.now()
            return alarm_view(a)

    def book(self, profile_id: int, alarm_id: int, slot: float | None) -> dict[str, Any]:
        """The owner asks for a service (at ``slot``, if given). Booking implies acknowledging."""
        now = self.clock.now()
        if slot is not None and slot < now:
            raise Invalid("the requested service slot is in the past")
        with self.db.session() as s:
            a = self._mine(s, profile_id, alarm_id)
            if a.status == AlarmStatus.RESOLVED:
                raise Conflict(f"alarm {alarm_id} is already resolved by a service")
            a.acknowledged_at = a.acknowledged_at or now
            a.booked_at, a.booked_for = now, slot
            return alarm_view(a)

    def record_service(self, device_id: str, note: str | None = None) -> dict[str, Any]:
        """A service done: the device's counters restart from zero and its open alarms are resolved.

        The counters are reset where they are read (a state older than the newest service event starts
        over), so this never races the telemetry batch that is updating the same state right now.
        """
        now = self.clock.now()
        with self.db.session() as s:
            d = s.get(Device, device_id)
            if d is None:
                raise NotFound(f"device {device_id} not found")
            rules = {r.id: r for r in self.rules.rules_for(d.id, d.kind)}
            latest = _latest_service(s, [d.id]).get(d.id, 0)
            before = {}  # what was reset, as of the last service (a state older than it already counts from 0)
            for row in s.scalars(select(RuleStateRecord).where(RuleStateRecord.device_id == d.id)):
                rule = rules.get(row.rule_id)
                if rule is not None and rule.service_resets:
                    st = DeviceRules.serviced(rule, RuleState.from_dict(row.state), latest)
                    before[row.rule_id] = {k: round(v, 3) for k, v in st.counters.items()}
            ev = ServiceEvent(device_id=d.id, at=now, note=note, counters=before)
            s.add(ev)
            s.flush()
            resolved = []
            for a in s.scalars(select(Alarm).where(Alarm.device_id == d.id, Alarm.status == AlarmStatus.ACTIVE)):
                rule = self.rules.by_id.get(a.rule_id)
                if rule is not None and not rule.service_resets:
                    continue
                a.status, a.resolved_at, a.updated_at, a.service_event_id = AlarmStatus.RESOLVED, now, now, ev.id
                resolved.append(alarm_view(a))
                if rule is not None:
                    self.rules.announce(s, d, rule, a, None)  # withdraws the staff alert
            return {"id": ev.id, "device_id": d.id, "at": now, "note": note, "counters_reset": before,
                    "alarms_resolved": [a["id"] for a in resolved]}

    def device_rules(self, device_id: str) -> list[dict[str, Any]]:
        """Each rule's live state for a device: counters (as of the last service), pending timers, alarm."""
        with self.db.session() as s:
            d = s.get(Device, device_id)
            if d is None:
                raise NotFound(f"device {device_id} not found")
            latest = _latest_service(s, [d.id]).get(d.id, 0)
            rows = {r.rule_id: r for r in s.scalars(select(RuleStateRecord).where(RuleStateRecord.device_id == d.id))}
            out = []
            for rule in self.rules.rules_for(d.id, d.kind):
                row = rows.get(rule.id)
                st = DeviceRules.serviced(rule, RuleState.from_dict(row.state if row else None), latest)
                out.append({"rule": rule.id, "name": rule.name, "active": st.active, "counters": st.counters,
                            "pending": st.pending, "due_at": next_due(rule, st)})
            return out

    def figures(self, since: float | None = None) -> dict[str, Any]:
        """The maintenance loop in numbers: how many alarms, prompted, acknowledged, booked and resolved,
        and how long from the owner's prompt to the service that resolved it (mean and p90, seconds)."""
        with self.db.session() as s:
            q = select(Alarm.status, Alarm.prompted_at, Alarm.acknowledged_at, Alarm.booked_at, Alarm.resolved_at,
                       Alarm.created_at)
            if since is not None:
                q = q.where(Alarm.created_at >= since)
            rows = s.execute(q).all()
        by_status = Counter(r.status for r in rows)
        to_resolution = [r.resolved_at - r.prompted_at for r in rows
                         if r.resolved_at is not None and r.prompted_at is not None]
        to_ack = [r.acknowledged_at - r.prompted_at for r in rows
                  if r.acknowledged_at is not None and r.prompted_at is not None]
        return {
            "alarms": len(rows), "active": by_status[AlarmStatus.ACTIVE],
            "cleared": by_status[AlarmStatus.CLEARED], "resolved": by_status[AlarmStatus.RESOLVED],
            "prompted": sum(1 for r in rows if r.prompted_at is not None),
            "acknowledged": sum(1 for r in rows if r.acknowledged_at is not None),
            "booked": sum(1 for r in rows if r.booked_at is not None),
            "prompt_to_resolution_s": {
                "count": len(to_resolution),
                "mean": round(sum(to_resolution) / len(to_resolution), 1) if to_resolution else None,
                "p90": _p90(to_resolution)},
            "prompt_to_ack_s": {
                "count": len(to_ack), "mean": round(sum(to_ack) / len(to_ack), 1) if to_ack else None,
                "p90": _p90(to_ack)},
        }
