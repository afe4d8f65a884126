"""The engine's reads and writes: one object per batch of events, and the few statements outside a batch.

A batch's profiles, consents, dedup keys and send history are read in a few statements for all of its
events; what the batch fires is kept in step in memory, so a later event of the same profile sees it as it
would see it in the database, and is written at the end in one INSERT (earlier, only where a read of
notifications must see it). Reads go on the session's connection: the engine makes no ORM objects, and the
session's own pending changes are flushed when the batch begins.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    CompoundSelect,
    Connection,
    Table,
    bindparam,
    delete,
    func,
    insert,
    literal,
    null,
    select,
    union_all,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from gateway.engine.limits import SendRow
from gateway.storage.models import (
    Cart,
    CartStatus,
    CatalogItem,
    Consent,
    Decision,
    Interaction,
    InteractionKind,
    Notification,
    NotificationStatus,
    Profile,
    Purpose,
    SegmentMembership,
    Visit,
    ZoneStay,
)

SCHEDULED, CANCELLED = NotificationStatus.SCHEDULED, NotificationStatus.CANCELLED
# Statuses that never reached (and never will reach) the customer: not counted.
NOT_SENT = (CANCELLED, NotificationStatus.EXPIRED)

_sent_at = func.coalesce(Notification.deliver_at, Notification.created_at)
# Built once (their cache keys are memoized); values come as bound parameters.
_PROFILES_OF = select(Profile.id, Profile.external_id, Profile.name, Profile.attributes, Profile.points).where(
    Profile.id.in_(bindparam("ids", expanding=True)))
_CONSENTS_OF = select(Consent.profile_id, Consent.purpose).where(
    Consent.profile_id.in_(bindparam("ids", expanding=True)), Consent.granted.is_(True))
_SENDS_OF = select(Notification.profile_id, Notification.campaign_id, _sent_at, Notification.purpose,
                   Notification.data, Notification.id, Notification.status != SCHEDULED).where(
    Notification.profile_id.in_(bindparam("ids", expanding=True)), Notification.status.not_in(NOT_SENT),
    _sent_at > bindparam("lo")).order_by(Notification.id)
_DEDUP_KEYS = select(Notification.dedup_key).where(Notification.dedup_key.in_(bindparam("keys", expanding=True)))
# A batch's open carts, newest first per profile (the first row of each profile is its open cart).
_OPEN_CARTS = (select(Cart.profile_id, Cart.id, Cart.items, Cart.updated_at)
               .where(Cart.profile_id.in_(bindparam("ids", expanding=True)), Cart.status == CartStatus.OPEN)
               .order_by(Cart.profile_id, Cart.updated_at.desc()))
_CATALOGUE_ITEMS = select(CatalogItem.sku, CatalogItem.name, CatalogItem.zone, CatalogItem.aisle).where(
    CatalogItem.sku.in_(bindparam("skus", expanding=True)))
_REMINDED = select(Notification.id).where(
    Notification.profile_id == bindparam("pid"), Notification.purpose == Purpose.CART_REMINDERS,
    Notification.created_at >= bindparam("since"), Notification.status.not_in(NOT_SENT)).limit(1)
# (kind, a, b, zone) as of the event's time: "v" visits (started, ended) of the last year, "z" zone stays
# (entered, exited) finished by then, of the last 90 days, "c" purchases (checked out) up to then: one round trip.
_BEHAVIOUR: CompoundSelect = union_all(
    select(literal("v").label("kind"), Visit.started_at.label("a"), Visit.ended_at.label("b"),
           null().label("zone")).where(Visit.profile_id == bindparam("pid"),
                                       Visit.started_at >= bindparam("year_ago"), Visit.started_at <= bindparam("now")),
    select(literal("z"), ZoneStay.entered_at, ZoneStay.exited_at, ZoneStay.zone).where(
        ZoneStay.profile_id == bindparam("pid"), ZoneStay.entered_at >= bindparam("days90_ago"),
        ZoneStay.exited_at.is_not(None), ZoneStay.exited_at <= bindparam("now")),
    select(literal("c"), Cart.checked_out_at, null(), null()).where(
        Cart.profile_id == bindparam("pid"), Cart.checked_out_at.is_not(None), Cart.checked_out_at <= bindparam("now")))
_MEMBERSHIPS = select(SegmentMembership.segment_id).where(SegmentMembership.profile_id == bindparam("pid"))
_MEMBERSHIP_TABLE = cast(Table, SegmentMembership.__table__)
_NEW_MEMBERSHIP = insert(_MEMBERSHIP_TABLE)
_PROFILE_TABLE = cast(Table, Profile.__table__)
_ADD_POINTS = update(_PROFILE_TABLE).where(_PROFILE_TABLE.c.id == bindparam("pid")).values(
    points=_PROFILE_TABLE.c.points + bindparam("n"))
_PROFILE_SENT = select(func.count()).select_from(Notification).where(
    Notification.campaign_id == bindparam("cid"), Notification.profile_id == bindparam("pid"),
    Notification.status.not_in(NOT_SENT))
_CAMPAIGN_SENT = select(func.count()).select_from(Notification).where(
    Notification.campaign_id == bindparam("cid"), Notification.status.not_in(NOT_SENT))
_CAMPAIGN_REDEEMED = select(func.count()).select_from(Interaction).join(
    Notification, Notification.id == Interaction.notification_id).where(
    Notification.campaign_id == bindparam("cid"), Interaction.kind == InteractionKind.REDEEMED)
_DECISIONS = insert(cast(Table, Decision.__table__))
DECISION_COLUMNS = ("at", "profile_id", "campaign_id", "event_kind", "event_key", "fired", "reason", "detail",
                    "variant", "store_id")
_DECISIONS_SQL: dict[str, tuple[str, tuple[int, ...]] | None] = {}  # dialect -> (INSERT, value order) or None
_NOTIFICATIONS = cast(Table, Notification.__table__)
_NEW_NOTIFICATIONS = insert(_NOTIFICATIONS).returning(_NOTIFICATIONS.c.id, sort_by_parameter_order=True)
# SQLite: asked to sort by parameter order, SQLAlchemy sends one INSERT per row; unsorted it is one INSERT, whose
# rows SQLite numbers in VALUES order (ids ascend in fire order), each matched back by its unique dedup key.
_NEW_NOTIFICATIONS_KEYED = insert(_NOTIFICATIONS).returning(_NOTIFICATIONS.c.id, _NOTIFICATIONS.c.dedup_key)
CHUNK = 900  # ids per IN list


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(values), CHUNK):
        yield values[i:i + CHUNK]


def insert_decisions(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """Decisions as one executemany. On a positional driver (SQLite) the compiled INSERT goes to the driver
    with the value tuples: they are plain floats, ints, strings and booleans no column type converts, so
    SQLAlchemy's per-row parameter processing (most of the INSERT's Python time) is skipped. Elsewhere
    (PostgreSQL: named parameters, batched by SQLAlchemy's insertmanyvalues) the usual Core executemany."""
    name = conn.dialect.name
    if name not in _DECISIONS_SQL:
        compiled = _DECISIONS.compile(dialect=conn.dialect, column_keys=list(DECISION_COLUMNS))
        _DECISIONS_SQL[name] = ((str(compiled), tuple(DECISION_COLUMNS.index(k) for k in compiled.positiontup or ()))
                                if compiled.positional and not compiled.effective_returning else None)
    known = _DECISIONS_SQL[name]
    if known is None:
        conn.execute(_DECISIONS, [dict(zip(DECISION_COLUMNS, r, strict=True)) for r in rows])
        return
    sql, order = known
    conn.exec_driver_sql(sql, rows if order == tuple(range(len(DECISION_COLUMNS)))
                         else [tuple(r[i] for i in order) for r in rows])


@dataclass(slots=True)
class ProfileRow:
    """A profile as the engine reads it: its columns, no ORM object (the engine never writes it; the points
    a visit earns meanwhile are added by ``EngineStore.add_points``)."""

    id: int
    external_id: str | None
    name: str | None
    attributes: dict[str, Any] | None
    points: int | None


class EngineStore:
    """One batch's reads and writes (see the module's docstring)."""

    def __init__(self, session: Session) -> None:
        session.flush()  # what the caller left pending is in the database before reads skip the autoflush
        self.session = session
        self.conn = session.connection()
        self._profiles: dict[int, ProfileRow | None] = {}  # None: erased
        self._consents: dict[int, set[str]] = {}
        self._keys: set[str] = set()  # dedup keys that exist
        self._asked: set[str] = set()  # dedup keys whose existence is known
        self._history: dict[int, list[SendRow]] = {}
        self._history_from: dict[int, float] = {}  # each profile's history is complete after this time
        self._batch: list[int] = []  # the batch's profiles: their carts are read together on first need
        self._carts: dict[int, Any] = {}
        self._carts_read: set[int] = set()
        self._catalogue: dict[str, Any] = {}
        self.outbox: list[dict[str, Any]] = []  # the batch's sends, as rows, in the order they fired
        self._written = 0
        self._unwritten: set[int] = set()  # profiles with a send in outbox[_written:]
        self._decisions: list[tuple[Any, ...]] = []  # values in DECISION_COLUMNS order

    # ------------------------------------------------------------ reads

    def preload(self, profile_ids: Iterable[int], keys: Iterable[str], history_from: float) -> None:
        """What the batch's events will ask for, read in a few statements: their profiles, consents, send
        history after ``history_from`` and which of ``keys`` exist."""
        wanted = sorted(set(keys) - self._asked)
        for chunk in _chunks(wanted):
            self._keys.update(self.conn.execute(_DEDUP_KEYS, {"keys": chunk}).scalars())
        self._asked.update(wanted)
        pids = sorted(set(profile_ids) - self._profiles.keys())
        self._batch.extend(pids)
        self._read_profiles(pids, history_from)

    def _read_profiles(self, pids: Sequence[int], history_from: float) -> None:
        for pid in pids:
            self._profiles[pid] = None
            self._history[pid] = []
            self._history_from[pid] = history_from
        for chunk in _chunks(pids):
            self._profiles.update((r[0], ProfileRow(*r)) for r in self.conn.execute(_PROFILES_OF, {"ids": chunk}))
            for pid, purpose in self.conn.execute(_CONSENTS_OF, {"ids": chunk}):
                self._consents.setdefault(pid, set()).add(purpose)
            for pid, cid, at, purpose, data, nid, out in self.conn.execute(_SENDS_OF,
                                                                           {"ids": chunk, "lo": history_from}):
                self._history[pid].append((cid, at, purpose, data, nid, bool(out)))

    def profile(self, profile_id: int) -> ProfileRow | None:
        """The profile's columns (None: erased), read with the batch or now."""
        if profile_id not in self._profiles:
            self._read_profiles([profile_id], math.inf)  # its history is read when a check asks for it
        return self._profiles[profile_id]

    def consents(self, profile_id: int) -> set[str]:
        return self._consents.get(profile_id, set())

    def duplicate(self, key: str) -> bool:
        """A notification with this dedup key exists (or the batch fired one)."""
        if key not in self._asked:
            self._asked.add(key)
            if self.conn.execute(_DEDUP_KEYS, {"keys": [key]}).first() is not None:
                self._keys.add(key)
        return key in self._keys

    def history(self, profile_id: int, since: float) -> list[SendRow]:
        """The profile's counted sends (not cancelled or expired) from at least ``since``; may hold earlier
        ones (the checks filter by their own windows)."""
        if self._history_from.get(profile_id, math.inf) > since:
            self.write_sends()
            self._history[profile_id] = [(cid, at, purpose, data, nid, bool(out))
                                         for _, cid, at, purpose, data, nid, out in
                                         self.conn.execute(_SENDS_OF, {"ids": [profile_id], "lo": since})]
            self._history_from[profile_id] = since
        return self._history[profile_id]

    def sends_of(self, campaign_id: str, profile_id: int) -> int:
        """How many of the campaign's counted sends the profile has had, ever."""
        if profile_id in self._unwritten:
            self.write_sends()
        return self.conn.scalar(_PROFILE_SENT, {"cid": campaign_id, "pid": profile_id}) or 0

    def campaign_sends(self, campaign_id: str) -> int:
        self.write_sends()  # campaign-wide counts: every send so far is in the database
        return self.conn.scalar(_CAMPAIGN_SENT, {"cid": campaign_id}) or 0

    def campaign_redemptions(self, campaign_id: str) -> int:
        return self.conn.scalar(_CAMPAIGN_REDEEMED, {"cid": campaign_id}) or 0

    def open_cart(self, profile_id: int) -> tuple[Any, dict[str, Any]]:
        """The profile's open cart (or None) and catalogue rows of cart items by sku. The batch's profiles'
        carts are read together, on the first need (two statements for the batch instead of two per event)."""
        if profile_id not in self._carts_read:
            pids = [p for p in self._batch if p not in self._carts_read] if profile_id in self._batch else []
            if profile_id not in pids:
                pids.append(profile_id)
            self._carts_read.update(pids)
            carts: dict[int, Any] = {}
            for chunk in _chunks(sorted(pids)):
                for row in self.conn.execute(_OPEN_CARTS, {"ids": chunk}):
                    carts.setdefault(row.profile_id, row)
            self._carts.update(carts)
            skus = sorted({str(it.get("sku")) for row in carts.values() for it in row.items} - self._catalogue.keys())
            for chunk in _chunks(skus):
                self._catalogue.update((c.sku, c) for c in self.conn.execute(_CATALOGUE_ITEMS, {"skus": chunk}))
        return self._carts.get(profile_id), self._catalogue

    def reminded(self, profile_id: int, since: float) -> bool:
        """A cart reminder went out (or waits) for the profile since ``since``."""
        if profile_id in self._unwritten:
            self.write_sends()
        return self.conn.scalar(_REMINDED, {"pid": profile_id, "since": since}) is not None

    def behaviour(self, profile_id: int, now: float) -> list[tuple[str, float, float | None, str | None]]:
        """Visit, stay and purchase rows as of ``now``: a visit that ended later counts as still open."""
        rows = self.conn.execute(_BEHAVIOUR, {"pid": profile_id, "now": now, "year_ago": now - 365 * 86400,
                                              "days90_ago": now - 90 * 86400})
        return [(k, a, None if k == "v" and b is not None and b > now else b, z) for k, a, b, z in rows]

    # ------------------------------------------------------------ writes

    def set_memberships(self, profile_id: int, now_in: Sequence[str], t: float) -> list[str]:
        """Store which segments the profile is in; returns those it has just joined."""
        before = set(self.conn.execute(_MEMBERSHIPS, {"pid": profile_id}).scalars())
        left = before - set(now_in)
        if left:
            self.conn.execute(delete(_MEMBERSHIP_TABLE).where(_MEMBERSHIP_TABLE.c.profile_id == profile_id,
                                                              _MEMBERSHIP_TABLE.c.segment_id.in_(sorted(left))))
        joined = [seg for seg in now_in if seg not in before]
        if joined:
            self.conn.execute(_NEW_MEMBERSHIP, [{"profile_id": profile_id, "segment_id": seg, "entered_at": t}
                                                for seg in joined])
        return joined

    def add_points(self, profile_id: int, points: int) -> None:
        """Loyalty points earned: one UPDATE, and the profile as the batch holds it (or an object in the
        session) kept in step, as the ORM's synchronising UPDATE would."""
        self.conn.execute(_ADD_POINTS, {"pid": profile_id, "n": points})
        held = self._profiles.get(profile_id)
        if held is not None and held.points is not None:
            held.points += points
        obj = self.session.identity_map.get(identity_key(Profile, profile_id))
        if obj is not None and "points" in obj.__dict__:
            set_committed_value(obj, "points", None if obj.points is None else obj.points + points)

    def cancel_scheduled(self, profile_id: int, campaign_ids: Sequence[str]) -> list[Notification]:
        """The profile's scheduled sends of these campaigns are cancelled (and no longer count as sent)."""
        if profile_id in self._unwritten:
            self.write_sends()
        with self.session.no_autoflush:
            rows = list(self.session.scalars(select(Notification).where(
                Notification.profile_id == profile_id, Notification.status == SCHEDULED,
                Notification.campaign_id.in_(campaign_ids))))
        if rows:
            for n in rows:
                n.status = CANCELLED
            self.session.flush()
            gone = {n.id for n in rows}
            if profile_id in self._history:
                self._history[profile_id] = [r for r in self._history[profile_id] if r[4] not in gone]
        return rows

    def fired(self, row: dict[str, Any], sent_at: float) -> None:
        """A send fired: written with the batch's others, seen meanwhile by the profile's later checks."""
        pid = row["profile_id"]
        self.outbox.append(row)
        self._unwritten.add(pid)
        self._keys.add(row["dedup_key"])
        self._asked.add(row["dedup_key"])
        if pid in self._history:
            self._history[pid].append((row["campaign_id"], sent_at, row["purpose"], row["data"], None,
                                       row["status"] != SCHEDULED))

    def decided(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Decisions (values in DECISION_COLUMNS order), written with the batch's others."""
        self._decisions.extend(rows)

    def write_sends(self) -> None:
        """The sends fired since the last write, as one INSERT ... RETURNING in the order they fired (so their
        ids ascend in that order); each row gets its id."""
        todo = self.outbox[self._written:]
        if not todo:
            return
        self._written = len(self.outbox)
        self._unwritten.clear()
        if self.conn.dialect.name == "sqlite":
            ids = dict((key, nid) for nid, key in self.conn.execute(_NEW_NOTIFICATIONS_KEYED, todo))
            for row in todo:
                row["id"] = ids[row["dedup_key"]]
            return
        for row, nid in zip(todo, self.conn.execute(_NEW_NOTIFICATIONS, todo).scalars().all(), strict=True):
            row["id"] = nid

    def finish(self) -> list[int]:
        """Everything the batch wrote is in the transaction; the ids of its sends, in the order they fired."""
        self.write_sends()
        if self._decisions:
            insert_decisions(self.conn, self._decisions)
            self._decisions = []
        return [row["id"] for row in self.outbox]


# ------------------------------------------------------------ outside a batch

def consents_of(session: Session, profile_id: int) -> set[str]:
    return {purpose for _, purpose in session.execute(_CONSENTS_OF, {"ids": [profile_id]})}


def schedule_ran(session: Session, campaign_id: str, key: str) -> bool:
    """The occurrence has decisions: it ran already (remembered durably, so a restart does not run it again)."""
    return session.scalar(select(Decision.id).where(Decision.campaign_id == campaign_id, Decision.event_key == key)
                          .limit(1)) is not None


def audience(session: Session, purpose: str) -> list[int]:
    """Every profile that consented to ``purpose``."""
    return list(session.scalars(select(Consent.profile_id).where(
        Consent.purpose == purpose, Consent.granted.is_(True)).order_by(Consent.profile_id)))


def first_scheduled(session: Session) -> float | None:
    return session.scalar(select(func.min(Notification.deliver_at)).where(Notification.status == SCHEDULED))


def due_scheduled(session: Session, now: float) -> tuple[list[Notification], int | None]:
    """Scheduled sends due by ``now``, and the highest notification id so far (their stream position)."""
    due = list(session.scalars(select(Notification).where(
        Notification.status == SCHEDULED, Notification.deliver_at <= now).order_by(Notification.id)))
    return due, session.scalar(select(func.max(Notification.id))) if due else None
