"""Telemetry storage: one MQTT batch -> one transaction (registry, readings, rollups, events, dead letters).

The intake parsed the messages on paho's thread; this is where a reading meets the device registry
(the unknown-device policy, quarantine, the device's profile) and the database. Everything here runs
inside the caller's session, so the batch commits as a whole and the intake acknowledges it to the
broker only afterwards: a crash before the commit means the broker redelivers, and the unique
(device, key) constraint turns a redelivery into a counted duplicate instead of a second row.

Rollups (count/sum/min/max/last per metric per minute and per hour) are folded in Python over the
batch and upserted, one row per (device, period, bucket, metric) and batch, not one per reading.

Counters count what was kept: a batch's counts (accepted, duplicates, dead letters by reason...) are
worked out while it is written and added to the store's counters only when its transaction commits
(a session ``after_commit`` hook), so a rolled-back attempt, retried later, counts nothing.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import CursorResult, Table, bindparam, delete, event, inspect, select, update
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.attributes import set_committed_value

from devices.payloads import LinkState, Reading, TelemetryBatch
from devices.profiles import ProfileSet, validate
from devices.topics import escape_text
from gateway.storage.db import shift_stamps, upsert_insert
from gateway.storage.models import DeadLetter, Device, DeviceEventRecord, ReadingRecord, ReadingRollup

log = logging.getLogger(__name__)

UnknownPolicy = Literal["reject", "quarantine", "accept"]
POLICIES: tuple[str, ...] = ("reject", "quarantine", "accept")
PERIODS = (60, 3600)  # per-minute and per-hour rollups
DEAD_PAYLOAD_BYTES = 1024

# Reason codes decided here (the parser's and the profiles' are in payloads.py and profiles.py).
UNKNOWN_DEVICE = "unknown_device"
QUARANTINED = "quarantined"
NO_PROFILE = "no_profile"


@dataclass
class TelemetrySettings:
    unknown_policy: UnknownPolicy = "accept"
    default_profile: str | None = None  # for devices whose kind names no profile; None: metrics unchecked
    require_profile: bool = False  # True: a device with no profile is dead-lettered (no_profile)
    offline_after_s: float = 300.0  # silence before a device with no profile counts as offline
    raw_retention_s: float = 30 * 86400.0
    minute_retention_s: float = 7 * 86400.0
    hour_retention_s: float = 400 * 86400.0
    dead_letter_retention_s: float = 14 * 86400.0


_ROLLUP_COLUMNS = "device_id, period, start, metric, count, sum, min, max, last, last_ts, profile_id"


def _rollup_conflict(dialect: str) -> str:
    """Add a batch's partial aggregates to the stored ones."""
    t = "reading_rollups"
    lo, hi = ("LEAST", "GREATEST") if dialect == "postgresql" else ("min", "max")
    return (f"ON CONFLICT (device_id, period, start, metric) DO UPDATE SET "
            f"count = {t}.count + excluded.count, sum = {t}.sum + excluded.sum, "
            f"min = {lo}({t}.min, excluded.min), max = {hi}({t}.max, excluded.max), "
            f"last = CASE WHEN excluded.last_ts >= {t}.last_ts THEN excluded.last ELSE {t}.last END, "
            f"last_ts = {hi}({t}.last_ts, excluded.last_ts), profile_id = excluded.profile_id")


def _rollup_upsert(dialect: str) -> str:
    """The upsert of one rollup row (one statement, executemany)."""
    mark = "%s" if dialect == "postgresql" else "?"
    return f"INSERT INTO reading_rollups ({_ROLLUP_COLUMNS}) VALUES ({', '.join([mark] * 11)}) " \
        + _rollup_conflict(dialect)


_DEVICES: Table = Device.__table__  # type: ignore[assignment]  # a declarative model's Table
_UPDATE_DEVICE = update(_DEVICES).where(_DEVICES.c.id == bindparam("k_id")).values(
    state=bindparam("state"), last_seen=bindparam("last_seen"), online=bindparam("online"),
    status_at=bindparam("status_at"), store_id=bindparam("store_id"))


READINGS_PER_INSERT = 500  # rows per multi-row INSERT (6 parameters each, far below SQLite's limit)


@functools.cache
def _readings_insert(dialect: str, rows: int) -> str:
    """One multi-row INSERT of raw readings that skips stored (device, key) pairs and returns the stored ones:
    the dedup of redeliveries. Straight to the driver: the Core's per-row work cost more than SQLite's."""
    if dialect == "postgresql":
        row = "(%s, %s, %s, CAST(%s AS JSON), %s, %s)"
    elif dialect == "sqlite":
        row = "(?, ?, ?, ?, ?, ?)"
    else:
        raise NotImplementedError(f"telemetry storage supports SQLite and PostgreSQL, not {dialect}")
    return (f"INSERT INTO readings (device_id, key, ts, metrics, received_at, profile_id) VALUES "
            f"{', '.join([row] * rows)} ON CONFLICT (device_id, key) DO NOTHING RETURNING device_id, key")


# PostgreSQL: a batch is one statement whatever its size, its rows one JSON array of arrays (json.dumps is
# C; the server takes the rows apart). An executemany is one statement per row on the wire, a multi-row
# VALUES is re-parsed by the driver every time, and the driver's text arrays quote every element in Python:
# each cost more per row than the rest of the pipeline.
def _pg_rows(columns: str) -> str:
    """``(r->>0)::type0, ...`` over ``json_array_elements(%s) AS r``: one JSON parameter, typed columns."""
    cols = [c.strip().split(" ") for c in columns.split(",")]
    picks = ", ".join(f"r->{i}" if t == "json" else f"(r->>{i})::{t}" for i, (_, t) in enumerate(cols))
    return f"SELECT {picks} FROM json_array_elements(%s::json) AS r"


_PG_READINGS = ("INSERT INTO readings (device_id, key, ts, metrics, received_at, profile_id) "
                + _pg_rows("device_id varchar, key varchar, ts float8, metrics json, received_at float8, "
                           "profile_id int")
                + " ON CONFLICT (device_id, key) DO NOTHING RETURNING device_id, key")
_PG_ROLLUPS = (f"INSERT INTO reading_rollups ({_ROLLUP_COLUMNS}) "
               + _pg_rows("device_id varchar, period int, start float8, metric varchar, count int, sum float8, "
                          "min float8, max float8, last float8, last_ts float8, profile_id int")
               + " " + _rollup_conflict("postgresql"))
_PG_DEVICES = ("UPDATE devices AS d SET state = u.state, last_seen = u.last_seen, online = u.online, "
               "status_at = u.status_at, store_id = u.store_id FROM ("
               + _pg_rows("id varchar, state json, last_seen float8, online bool, status_at float8, store_id varchar")
               + ") AS u(id, state, last_seen, online, status_at, store_id) WHERE d.id = u.id")


def _topic_of(batch: TelemetryBatch, item: Any, kind: str) -> str:
    return f"{batch.prefix}/{item.store_id}/devices/{item.device_id}/{kind}"


class TelemetryStore:
    """Writes batches; counts what it accepted, refused (by reason) and recognised as a redelivery."""

    def __init__(self, settings: TelemetrySettings, profiles: ProfileSet,
                 owner_of: Callable[[str], int | None] = lambda _device_id: None) -> None:
        if settings.unknown_policy not in POLICIES:
            raise ValueError(f"unknown_policy must be one of {', '.join(POLICIES)}")
        self.settings = settings
        self.profiles = profiles
        self.owner_of = owner_of
        self.counts: Counter[str] = Counter()
        """Committed work: accepted, duplicates, statuses, events, registered, went_offline, purged."""
        self.dead_letters: Counter[str] = Counter()
        """Committed dead-letter rows by reason."""

    def stats(self) -> dict[str, Any]:
        return {**{k: self.counts[k] for k in ("accepted", "duplicates", "statuses", "events", "registered",
                                                "went_offline", "purged")},
                "dead_lettered": dict(self.dead_letters), "dead_lettered_total": sum(self.dead_letters.values())}

    # ------------------------------------------------------------ one batch

    def write(self, s: Session, batch: TelemetryBatch, now: float,
              devices: dict[str, Device | None] | None = None) -> list[Reading]:
        """Store the batch in ``s``; returns the readings that are new and valid (rules see only those).
        ``devices``, if given, is filled with the registry rows the batch named (None: refused), so the
        rules and the engine in the same transaction need not look them up again.

        The batch's counts reach ``stats()`` only once ``s`` commits."""
        tally: Counter[str] = Counter()
        dead: list[dict[str, Any]] = []
        for j in batch.rejects:
            dead.append(_dead(j.topic, j.reason, j.detail, j.payload, j.received_at, j.device_id, None))
        ids = {r.device_id for r in batch.readings} | {x.device_id for x in batch.statuses} \
            | {e.device_id for e in batch.events}
        if devices is None:
            devices = {}
        devices.update(self._load(s, ids))
        accepted: list[Reading] = []
        for r in sorted(batch.readings, key=lambda x: x.time):
            d = self._admit(s, devices, r.device_id, r.store_id, now, tally)
            problem = self._check(d, r)
            if problem is not None:
                reason, detail = problem
                dead.append(_dead(_topic_of(batch, r, "telemetry"), reason, detail, _echo(r), now,
                                  r.device_id, d.profile_id if d is not None else None))
                continue
            accepted.append(r)
        fresh = self._store_readings(s, devices, accepted, now, tally)
        for st in batch.statuses:
            d = self._admit(s, devices, st.device_id, st.store_id, now, tally)
            if d is None or d.quarantined:
                dead.append(_dead(_topic_of(batch, st, "status"), QUARANTINED if d else UNKNOWN_DEVICE,
                                  "status of a device the registry does not accept",
                                  LinkState.of(st.online).encode(), now, st.device_id, None))
                continue
            tally["statuses"] += 1
            if d.online is not st.online:
                d.online, d.status_at = st.online, st.time
            if st.firmware:
                d.firmware = st.firmware
        self._store_events(s, batch, devices, dead, now, tally)
        if dead:
            s.connection().execute(upsert_insert(s, DeadLetter), dead)
        self._count_on_commit(s, tally, Counter(row["reason"] for row in dead))
        return fresh

    def _count_on_commit(self, s: Session, counts: Counter[str], dead: Counter[str] | None = None) -> None:
        """Add these counts to the store's once ``s``'s transaction commits; drop them if it does not."""
        if not counts and not dead:
            return
        pending: list[tuple[TelemetryStore, Counter[str], Counter[str] | None]] | None = s.info.get(_PENDING)
        if pending is None:
            pending = s.info[_PENDING] = []
        if not s.info.get(_HOOKED):  # once per session, however many batches it writes
            s.info[_HOOKED] = True
            event.listen(s, "after_commit", _apply_pending)
            event.listen(s, "after_transaction_end", _drop_pending)
        pending.append((self, counts, dead))

    def _load(self, s: Session, ids: set[str]) -> dict[str, Device | None]:
        if not ids:
            return {}
        return {d.id: d for d in s.scalars(select(Device).where(Device.id.in_(ids)))}

    def _admit(self, s: Session, devices: dict[str, Device | None], device_id: str, store_id: str,
               now: float, tally: Counter[str]) -> Device | None:
        """The device's registry row, registered now if the policy lets it in; None: rejected."""
        d = devices.get(device_id)
        if d is not None or device_id in devices:
            return d
        policy = self.settings.unknown_policy
        if policy == "reject":
            devices[device_id] = None  # remembered for the rest of the batch
            return None
        d = Device(id=device_id, state={}, store_id=store_id, registered_at=now, quarantined=policy == "quarantine",
                   profile_id=self.owner_of(device_id))
        s.add(d)
        devices[device_id] = d
        tally["registered"] += 1
        return d

    def _check(self, d: Device | None, r: Reading) -> tuple[str, str] | None:
        if d is None:
            return UNKNOWN_DEVICE, f"device {r.device_id[:64]!r} is not registered (unknown_policy=reject)"
        if d.quarantined:
            return QUARANTINED, f"device {r.device_id[:64]!r} is quarantined until an operator accepts it"
        profile = self.profiles.for_device(d.device_profile, d.kind) or self.profiles.get(self.settings.default_profile)
        if profile is None:
            if self.settings.require_profile:
                return NO_PROFILE, f"no device profile for {d.device_profile or d.kind or 'this device'}"
            return None
        v = validate(profile, r)
        return None if v is None else (v.reason, v.detail)

    def _store_readings(self, s: Session, devices: dict[str, Device | None], accepted: Sequence[Reading],
                        now: float, tally: Counter[str]) -> list[Reading]:
        if not accepted:
            return []
        s.flush()  # new registry rows first: readings reference them
        known = {r.device_id: d for r in accepted if (d := devices.get(r.device_id)) is not None}
        seen: set[tuple[str, str]] = set()
        unique: list[Reading] = []  # a redelivery can sit in the same batch as the original: keep the first
        for r in accepted:
            k = (r.device_id, r.key)
            if k not in seen:
                seen.add(k)
                unique.append(r)
        conn = s.connection()
        stored: set[tuple[str, str]] = set()
        dumps = json.dumps  # what the JSON column would store; done here, the driver gets plain values
        if conn.dialect.name == "postgresql":
            rows = dumps([(r.device_id, r.key, r.time, r.metrics, now, known[r.device_id].profile_id)
                          for r in unique])
            stored.update((a, b) for a, b in conn.exec_driver_sql(_PG_READINGS, (rows,)))
            chunks = range(0)
        else:  # SQLite: multi-row INSERTs within its parameter limit
            chunks = range(0, len(unique), READINGS_PER_INSERT)
        for i in chunks:
            chunk = unique[i:i + READINGS_PER_INSERT]
            params: list[Any] = []
            for r in chunk:
                params += (r.device_id, r.key, r.time, dumps(r.metrics), now, known[r.device_id].profile_id)
            result = conn.exec_driver_sql(_readings_insert(conn.dialect.name, len(chunk)), tuple(params))
            stored.update((a, b) for a, b in result)
        fresh = [r for r in unique if (r.device_id, r.key) in stored]
        tally["duplicates"] += len(accepted) - len(fresh)
        tally["accepted"] += len(fresh)
        if not fresh:
            return []
        self._roll_up(s, known, fresh)
        # Each device's row changes once per batch: folded here, written with one executemany UPDATE
        # (the ORM's unit of work costs more than the row). Devices registered in this batch are still
        # pending in the session and get their values the ORM way, in their INSERT.
        changed: dict[str, dict[str, Any]] = {}
        for r in fresh:  # sorted by time: the last reading wins
            row = changed.get(r.device_id)
            if row is None:
                d = known[r.device_id]
                row = changed[r.device_id] = {"state": dict(d.state or {}), "last_seen": d.last_seen,
                                           "online": d.online, "status_at": d.status_at, "store_id": d.store_id}
            row["state"].update(r.metrics)
            if row["last_seen"] is None or r.time >= row["last_seen"]:
                row["last_seen"] = r.time
            if row["online"] is not True:
                row["online"], row["status_at"] = True, r.time
            row["store_id"] = r.store_id
        updates = []
        for device_id, row in changed.items():
            d = known[device_id]
            if inspect(d).pending:  # its INSERT carries the values
                for name, value in row.items():
                    setattr(d, name, value)
                continue
            for name, value in row.items():  # the object matches the row after our UPDATE; not dirty
                set_committed_value(d, name, value)
            updates.append({"k_id": device_id, **row})
        if updates and conn.dialect.name == "postgresql":
            conn.exec_driver_sql(_PG_DEVICES, (json.dumps([
                (u["k_id"], u["state"], u["last_seen"], u["online"], u["status_at"], u["store_id"])
                for u in updates]),))
        elif updates:
            conn.execute(_UPDATE_DEVICE, updates)
        return fresh

    def _roll_up(self, s: Session, devices: dict[str, Device], fresh: Iterable[Reading]) -> None:
        """Fold the batch into one row per (device, period, bucket, metric), already in the upsert's column
        order. ``fresh`` is in time order, so the latest reading of a bucket is simply the last one."""
        owner = {device_id: d.profile_id for device_id, d in devices.items()}
        folds: list[tuple[int, dict[tuple[str, float, str], list[Any]]]] = [(period, {}) for period in PERIODS]
        for r in fresh:
            t, device_id = r.time, r.device_id
            items = r.metrics.items()
            for period, acc in folds:
                start = float(int(t // period) * period)
                for metric, value in items:
                    a = acc.get((device_id, start, metric))
                    if a is None:  # the parser kept metric names within the column's 64 characters
                        acc[(device_id, start, metric)] = [device_id, period, start, metric, 1, value, value,
                                                           value, value, t, owner[device_id]]
                        continue
                    a[4] += 1
                    a[5] += value
                    if value < a[6]:
                        a[6] = value
                    if value > a[7]:
                        a[7] = value
                    a[8], a[9] = value, t
        conn = s.connection()
        if conn.dialect.name == "postgresql":  # one statement, the rows one JSON parameter
            conn.exec_driver_sql(_PG_ROLLUPS, (json.dumps([row for _, acc in folds for row in acc.values()]),))
            return
        conn.exec_driver_sql(_rollup_upsert(conn.dialect.name),  # driver executemany: no per-row Core work
                             [tuple(row) for _, acc in folds for row in acc.values()])

    def _store_events(self, s: Session, batch: TelemetryBatch, devices: dict[str, Device | None],
                      dead: list[dict[str, Any]], now: float, tally: Counter[str]) -> None:
        rows = []
        for e in batch.events:
            d = self._admit(s, devices, e.device_id, e.store_id, now, tally)
            if d is None or d.quarantined:
                dead.append(_dead(_topic_of(batch, e, "events"), QUARANTINED if d else UNKNOWN_DEVICE,
                                  "event of a device the registry does not accept",
                                  e.type.encode("utf-8", "backslashreplace"), now, e.device_id, None))
                continue
            rows.append({"device_id": e.device_id, "ts": e.time, "type": e.type, "code": e.code, "data": e.data,
                         "received_at": now, "profile_id": d.profile_id})
        if rows:
            s.flush()
            stmt = upsert_insert(s, DeviceEventRecord).on_conflict_do_nothing(
                index_elements=["device_id", "ts", "type"])
            stored = len(s.execute(stmt.returning(DeviceEventRecord.id), rows).all())
            tally["events"] += stored
            tally["duplicates"] += len(rows) - stored

    # ------------------------------------------------------------ timers

    def sweep_offline(self, s: Session, now: float) -> list[str]:
        """Devices silent past their profile's missed intervals go offline; returns their ids."""
        gone: list[str] = []
        for d in s.scalars(select(Device).where(Device.online.is_(True), Device.last_seen.is_not(None))
                           .order_by(Device.last_seen).limit(1000)):
            profile = self.profiles.for_device(d.device_profile, d.kind) or \
                self.profiles.get(self.settings.default_profile)
            after = profile.offline_after_s if profile is not None else self.settings.offline_after_s
            if d.last_seen is not None and now - d.last_seen > after:
                d.online, d.status_at = False, now
                gone.append(d.id)
        self._count_on_commit(s, Counter(went_offline=len(gone)))
        return gone

    def wall_stepped(self, s: Session, after: float, upto: float, by: float) -> int:
        """The wall clock stepped by ``by``: online devices last seen in (``after``, ``upto``], on the clock as
        it was, move by the step (their last reading's time on the corrected clock), so the sweep counts their
        silence in time that really passed, not the step forward (nor an hour less after a step back).
        Returns how many."""
        return shift_stamps(s, Device.last_seen, after, upto, by, Device.online.is_(True))

    def purge(self, s: Session, now: float) -> int:
        """Retention: raw readings, minute and hour rollups and dead letters past their age."""
        st = self.settings
        statements = [delete(ReadingRecord).where(ReadingRecord.ts < now - st.raw_retention_s),
                      delete(ReadingRollup).where(ReadingRollup.period == 60,
                                                  ReadingRollup.start < now - st.minute_retention_s),
                      delete(ReadingRollup).where(ReadingRollup.period == 3600,
                                                  ReadingRollup.start < now - st.hour_retention_s),
                      delete(DeadLetter).where(DeadLetter.received_at < now - st.dead_letter_retention_s)]
        n = 0
        for stmt in statements:
            result = s.execute(stmt)
            n += result.rowcount if isinstance(result, CursorResult) else 0
        self._count_on_commit(s, Counter(purged=n))
        return n


_PENDING = "telemetry_counts_pending"
_HOOKED = "telemetry_counts_hooked"


def _apply_pending(s: Session) -> None:
    """after_commit: the work the counts describe is in the database now. A savepoint's commit is not
    the transaction's: those wait for the outer one."""
    if s.in_nested_transaction():
        return
    for store, counts, dead in s.info.pop(_PENDING, ()):
        store.counts.update(counts)
        if dead:
            store.dead_letters.update(dead)


def _drop_pending(s: Session, transaction: SessionTransaction) -> None:
    """after_transaction_end: the outermost transaction ended uncommitted (rolled back, or its connection
    lost): what it would have counted never happened."""
    if transaction.parent is None:
        s.info.pop(_PENDING, None)


def _dead(topic: str, reason: str, detail: str, payload: bytes, received_at: float, device_id: str | None,
          profile_id: int | None) -> dict[str, Any]:
    """A dead_letters row that stores whatever the message held: the payload as bytes, the text fields
    escaped (no NUL, control character or lone surrogate) and cut to their columns."""
    return {"received_at": received_at, "topic": escape_text(topic, 512),
            "device_id": escape_text(device_id, 128) if device_id else None,
            "reason": escape_text(reason, 48), "detail": escape_text(detail, 1000),
            "payload": bytes(payload[:DEAD_PAYLOAD_BYTES]), "profile_id": profile_id}


def _echo(r: Reading) -> bytes:
    """A dead-lettered reading's payload as the parser understood it (the raw bytes stay on paho's side)."""
    body: dict[str, Any] = {"ts": r.time, "metrics": r.metrics}
    if r.seq is not None:
        body["seq"] = r.seq
    return json.dumps(body, separators=(",", ":")).encode()
