"""The campaign engine: one event for one profile in, decisions and outbox notifications out.

Every campaign the event's trigger can fire is evaluated and leaves a Decision with a reason,
so the API can always say why something did or did not happen. Only the highest-priority
campaign that passes every check sends (arbitration). The notification is unique per
(campaign, profile, triggering occurrence), so a replayed event never sends twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import secrets
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, cast
from zoneinfo import ZoneInfo

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
from sqlalchemy.orm import Session, lazyload
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from gateway.campaigns.model import (
    CHANNELS,
    Campaign,
    CampaignIndex,
    Segment,
    Variant,
    assign_variant,
    evaluate,
    render,
)
from gateway.storage.models import (
    DEFAULT_STORE_ID,
    Cart,
    CatalogItem,
    Consent,
    Decision,
    Interaction,
    Notification,
    Profile,
    SegmentMembership,
    Visit,
    ZoneStay,
)

# The profile row alone: its identifiers and consents (selectin relationships) are not read by the engine.
_PROFILE_ONLY = (lazyload(Profile.identifiers), lazyload(Profile.consents))

FIRED = "fired"
NO_CONSENT = "no_consent"
CONDITION_FALSE = "condition_false"
COOLDOWN = "cooldown"
LOST_ARBITRATION = "lost_arbitration"
DUPLICATE = "duplicate"
CAPPED = "capped"
QUIET_HOURS = "quiet_hours"
HOLDOUT = "holdout"
BUDGET_EXHAUSTED = "budget_exhausted"
NOT_REELIGIBLE = "not_reeligible"
EXPIRED = "expired"
CANCELLED = "cancelled"

SCHEDULED = "scheduled"
RELEASE_RESCAN_S = 5.0  # at least this often (clock time) the outbox is asked for due scheduled sends
NOT_SENT = (CANCELLED, EXPIRED)  # statuses that never reached (and never will reach) the customer: not counted
# Events after which a profile's live segments are evaluated again (a dwell tick changes nothing).
REFRESH_SEGMENTS_ON = frozenset({"visit_start", "visit_end", "purchase", "cart_abandoned", "profile_updated"})


@dataclass(frozen=True, slots=True)
class FrequencyCap:
    """At most ``max`` notifications per profile in any rolling ``window_s``, across campaigns; with a
    ``channel``, at most ``max`` over that channel (a full channel is left out, the others still carry it)."""

    window_s: float
    max: int
    purposes: tuple[str, ...] = ("offers", "cart_reminders")  # service messages are not capped
    channel: str | None = None


@dataclass(frozen=True, slots=True)
class EngineEvent:
    kind: str  # a trigger type: visit_start, enter, dwell, exit, visit_end, telemetry, cart_abandoned
    profile_id: int
    time: float
    key: str  # identifies the occurrence (a zone stay, a visit, a reading), part of the dedup key
    zone: str | None = None
    dwell_s: float = 0.0
    facts: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    campaign_id: str
    profile_id: int
    fired: bool
    reason: str
    detail: str | None = None
    notification_id: int | None = None
    who: str = ""  # the profile's external id, for logs
    variant: str | None = None
    deliver_at: float | None = None  # set when the send is scheduled (delay, quiet hours)

    @property
    def sends_now(self) -> bool:
        """A committed notification that should go to the channels right away."""
        return self.fired and self.notification_id is not None and self.deliver_at is None


# Hot statements, built once (their cache keys are memoized); values come as bound parameters.
_OPEN_CART = (select(Cart.id, Cart.items, Cart.updated_at).where(Cart.profile_id == bindparam("pid"),
                                                                  Cart.status == "open")
              .order_by(Cart.updated_at.desc()).limit(1))
# A batch's open carts, newest first per profile (the first row of each profile is what _OPEN_CART reads).
_OPEN_CARTS = (select(Cart.profile_id, Cart.id, Cart.items, Cart.updated_at)
               .where(Cart.profile_id.in_(bindparam("ids", expanding=True)), Cart.status == "open")
               .order_by(Cart.profile_id, Cart.updated_at.desc()))
_CATALOGUE_ITEMS = select(CatalogItem.sku, CatalogItem.name, CatalogItem.zone, CatalogItem.aisle).where(
    CatalogItem.sku.in_(bindparam("skus", expanding=True)))
_REMINDED = select(Notification.id).where(
    Notification.profile_id == bindparam("pid"), Notification.purpose == "cart_reminders",
    Notification.created_at >= bindparam("since"), Notification.status.not_in(NOT_SENT)).limit(1)
# (kind, a, b, zone): "v" visits (started, ended) of the last year, "z" finished zone stays (entered, exited)
# of the last 90 days, "c" purchases (checked out) up to now: one round trip, not three.
_BEHAVIOUR: CompoundSelect = union_all(
    select(literal("v").label("kind"), Visit.started_at.label("a"), Visit.ended_at.label("b"),
           null().label("zone")).where(Visit.profile_id == bindparam("pid"),
                                       Visit.started_at >= bindparam("year_ago"), Visit.started_at <= bindparam("now")),
    select(literal("z"), ZoneStay.entered_at, ZoneStay.exited_at, ZoneStay.zone).where(
        ZoneStay.profile_id == bindparam("pid"), ZoneStay.entered_at >= bindparam("days90_ago"),
        ZoneStay.exited_at.is_not(None)),
    select(literal("c"), Cart.checked_out_at, null(), null()).where(
        Cart.profile_id == bindparam("pid"), Cart.checked_out_at.is_not(None), Cart.checked_out_at <= bindparam("now")))
_sent_at = func.coalesce(Notification.deliver_at, Notification.created_at)
_DEDUP_KEYS = select(Notification.dedup_key).where(Notification.dedup_key.in_(bindparam("keys", expanding=True)))
_PROFILE_SENDS = select(Notification.campaign_id, _sent_at, Notification.purpose, Notification.data).where(
    Notification.profile_id == bindparam("pid"), Notification.status.not_in(NOT_SENT),
    _sent_at > bindparam("lo"), _sent_at < bindparam("hi")).order_by(Notification.id)
_BULK_PROFILES = select(Profile.id, Profile.external_id, Profile.name, Profile.attributes, Profile.points).where(
    Profile.id.in_(bindparam("ids", expanding=True)))
_BULK_CONSENTS = select(Consent.profile_id, Consent.purpose).where(
    Consent.profile_id.in_(bindparam("ids", expanding=True)), Consent.granted.is_(True))
_BULK_SENDS = select(Notification.profile_id, Notification.campaign_id, _sent_at, Notification.purpose,
                     Notification.data).where(Notification.profile_id.in_(bindparam("ids", expanding=True)),
                                              Notification.status.not_in(NOT_SENT), _sent_at > bindparam("lo")
                                              ).order_by(Notification.id)
_CONSENTS = select(Consent.purpose).where(Consent.profile_id == bindparam("pid"), Consent.granted.is_(True))
_MEMBERSHIPS = select(SegmentMembership.segment_id).where(SegmentMembership.profile_id == bindparam("pid"))
_PROFILES = cast(Table, Profile.__table__)
_ADD_POINTS = update(_PROFILES).where(_PROFILES.c.id == bindparam("pid")).values(
    points=_PROFILES.c.points + bindparam("n"))
_DECISIONS = insert(cast(Table, Decision.__table__))
_DECISION_COLUMNS = ("at", "profile_id", "campaign_id", "event_kind", "event_key", "fired", "reason", "detail",
                     "variant", "store_id")
_DECISIONS_SQL: dict[str, tuple[str, tuple[int, ...]] | None] = {}  # dialect -> (INSERT, value order) or None


def _insert_decisions(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """A batch's decisions as one executemany. On a positional driver (SQLite) the compiled INSERT goes to the
    driver with the value tuples: they are plain floats, ints, strings and booleans no column type converts,
    so SQLAlchemy's per-row parameter processing (most of the INSERT's Python time) is skipped. Elsewhere
    (PostgreSQL: named parameters, batched by SQLAlchemy's insertmanyvalues) the usual Core executemany."""
    name = conn.dialect.name
    if name not in _DECISIONS_SQL:
        compiled = _DECISIONS.compile(dialect=conn.dialect, column_keys=list(_DECISION_COLUMNS))
        _DECISIONS_SQL[name] = ((str(compiled), tuple(_DECISION_COLUMNS.index(k) for k in compiled.positiontup or ()))
                                if compiled.positional and not compiled.effective_returning else None)
    known = _DECISIONS_SQL[name]
    if known is None:
        conn.execute(_DECISIONS, [dict(zip(_DECISION_COLUMNS, r, strict=True)) for r in rows])
        return
    sql, order = known
    conn.exec_driver_sql(sql, rows if order == tuple(range(len(_DECISION_COLUMNS)))
                         else [tuple(r[i] for i in order) for r in rows])


_NOTIFICATIONS = cast(Table, Notification.__table__)
_NEW_NOTIFICATIONS = insert(_NOTIFICATIONS).returning(_NOTIFICATIONS.c.id, sort_by_parameter_order=True)
# SQLite: asked to sort by parameter order, SQLAlchemy sends one INSERT per row; unsorted it is one INSERT, whose
# rows SQLite numbers in VALUES order (ids ascend in fire order), each matched back by its unique dedup key.
_NEW_NOTIFICATIONS_KEYED = insert(_NOTIFICATIONS).returning(_NOTIFICATIONS.c.id, _NOTIFICATIONS.c.dedup_key)
_MEMBERSHIP_TABLE = cast(Table, SegmentMembership.__table__)
_NEW_MEMBERSHIP = insert(_MEMBERSHIP_TABLE)
# Where a read may bypass the session: a Connection skips the ORM's per-statement work (and its autoflush, so
# only reads of tables the session holds no pending objects of go there).
Reader = Session | Connection


def cart_facts(session: Session, profile_id: int, now: float, abandon_after_s: float,
               reader: Reader | None = None, known: tuple[Any, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The profile's most recent open cart, with where each item is in the shop. ``reader``: where the cart
    and catalogue are read (the engine passes its drain's connection); ``known``: (the open cart row or None,
    catalogue rows by sku) already read for a batch. The reminder check reads notifications, which the session
    may hold unflushed, so it goes through the session."""
    read = session if reader is None else reader
    # Columns only: no ORM object to build.
    cart = read.execute(_OPEN_CART, {"pid": profile_id}).first() if known is None else known[0]
    if cart is None:
        return {"abandoned": False, "reminded": False, "item_count": 0, "items": [], "zones": []}
    skus = [str(i.get("sku")) for i in cart.items]
    if known is not None:
        where: Mapping[str, Any] = known[1]
    else:
        where = {c.sku: c for c in read.execute(_CATALOGUE_ITEMS, {"skus": skus})} if skus else {}
    items = []
    for it in cart.items:
        cat = where.get(str(it.get("sku")))
        items.append({
            "sku": it.get("sku"), "name": it.get("name") or (cat.name if cat else it.get("sku")),
            "quantity": it.get("quantity", 1), "price": it.get("price"),
            "zone": cat.zone if cat else None, "aisle": cat.aisle if cat else None,
        })

    def describe(i: dict[str, Any]) -> str:
        qty = f" x{i['quantity']}" if i["quantity"] and i["quantity"] != 1 else ""
        place = ", ".join(p for p in (i["zone"], f"aisle {i['aisle']}" if i["aisle"] else None) if p)
        return f"{i['name']}{qty} ({place})" if place else f"{i['name']}{qty}"

    # Reminded already: a cart reminder went out (or waits) since the cart was last touched.
    reminded = session.scalar(_REMINDED, {"pid": profile_id, "since": cart.updated_at}) is not None
    return {
        "id": cart.id,
        "reminded": reminded,
        "abandoned": now - cart.updated_at >= abandon_after_s,
        "idle_s": now - cart.updated_at,
        "item_count": sum(int(i["quantity"] or 1) for i in items),
        "items": items,
        "items_where": "; ".join(describe(i) for i in items),
        "zones": sorted({i["zone"] for i in items if i["zone"]}),
    }


class VisitsWithin(Mapping[str, int]):
    """``behaviour.visits_in_days.N``: visits that began in the last N days, for any N from 1 to 365."""

    def __init__(self, starts: Sequence[float], now: float) -> None:
        self._ages = sorted(now - t for t in starts)

    def _days(self, key: object) -> int | None:
        try:
            n = int(str(key))
        except ValueError:
            return None
        return n if 1 <= n <= 365 else None

    def __contains__(self, key: object) -> bool:
        return self._days(key) is not None

    def __getitem__(self, key: str) -> int:
        n = self._days(key)
        if n is None:
            raise KeyError(key)
        return sum(1 for age in self._ages if age <= n * 86400)

    def __iter__(self) -> Any:
        return iter(("7", "30", "90", "365"))

    def __len__(self) -> int:
        return 4


def behaviour_facts(session: Reader, profile_id: int, now: float) -> dict[str, Any]:
    """Visit, dwell and purchase history as facts: what segments like "frequent" or "occasional" are made of."""
    # Visits, zone stays and purchases in one round trip (one UNION ALL, not three statements).
    rows: list[tuple[float, float | None]] = []
    by_zone: dict[str, list[float]] = {}
    bought_at: list[float] = []
    for kind, a, b, zone in session.execute(_BEHAVIOUR, {"pid": profile_id, "now": now, "year_ago": now - 365 * 86400,
                                                          "days90_ago": now - 90 * 86400}):
        if kind == "v":
            rows.append((a, b))
        elif kind == "z":
            by_zone.setdefault(zone, []).append(b - a)
        elif a is not None:
            bought_at.append(float(a))
    past = [r for r in rows if r[0] < now - 1]  # the visit that just began is not history
    ended = [b - a for a, b in rows if b is not None and a >= now - 90 * 86400]
    last = max((r[0] for r in past), default=None)
    dwell = [d for ds in by_zone.values() for d in ds]
    bought = sorted(bought_at)
    within = VisitsWithin([r[0] for r in rows], now)
    return {
        "visits_7d": within["7"], "visits_30d": within["30"], "visits_90d": within["90"],
        "visits_365d": len(rows), "visits_in_days": within,
        "days_since_last_visit": None if last is None else round((now - last) / 86400, 2),
        "avg_visit_s": round(sum(ended) / len(ended), 1) if ended else None,
        "avg_dwell_s": round(sum(dwell) / len(dwell), 1) if dwell else None,
        "avg_dwell_s_by_zone": {z: round(sum(d) / len(d), 1) for z, d in sorted(by_zone.items())},
        "purchases_365d": sum(1 for t in bought if t >= now - 365 * 86400),
        "last_purchase_at": bought[-1] if bought else None,
        "days_since_last_purchase": round((now - bought[-1]) / 86400, 2) if bought else None,
    }


def redemption_code() -> str:
    """Short, unguessable, unambiguous (no 0/O, 1/I): read out or scanned at the till."""
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # 32 letters: a byte mod 32 is uniform
    return "".join(alphabet[b & 31] for b in secrets.token_bytes(8))


def tier_for(points: int, tiers: Sequence[tuple[str, int]]) -> str | None:
    best = None
    for name, min_points in sorted(tiers, key=lambda t: t[1]):
        if points >= min_points:
            best = name
    return best


@dataclass(slots=True)
class _ProfileRow:
    """A profile as the engine reads it in bulk: its columns, no ORM object (the engine never writes it; the
    points a visit earns meanwhile are added by ``Engine.add_points``)."""

    id: int
    external_id: str | None
    name: str | None
    attributes: dict[str, Any] | None
    points: int | None


def profile_facts(profile: Profile | _ProfileRow, consents: set[str]) -> dict[str, Any]:
    name = profile.name or ""
    return {
        "id": profile.id, "external_id": profile.external_id, "name": name,
        "first_name": name.split()[0] if name else "there",
        "attributes": dict(profile.attributes or {}), "consents": sorted(consents),
    }


def _notifications_of(engine: Engine, session: Session, profile_id: int) -> AbstractContextManager[Any]:
    """Around a read of one profile's notifications (its dedup keys are its own too). A batch's sends not yet
    written are written first when one is the profile's (all of them, so ids keep the order they fired in);
    the autoflush is skipped unless the session holds an unflushed change to one of them (a cancellation),
    which the read must see. Other profiles' sends wait for their batch's one INSERT."""
    bulk = engine._bulk
    if bulk is not None and profile_id in bulk.unwritten:
        bulk.write_sends()
    for obj in (*session.new, *session.dirty):
        if isinstance(obj, Notification) and obj.profile_id == profile_id:
            return contextlib.nullcontext()
    return session.no_autoflush


class _Sends:
    """One profile's sends around one event, read once for all its candidates: the dedup keys and the
    notifications cooldowns and caps count (instead of up to three queries per candidate). Read lazily,
    after the event's earlier writes are flushed; sends fired while the event is judged are added, as the
    queries would have seen them."""

    __slots__ = ("_candidates", "_engine", "_event", "_keys", "_rows", "_session", "shared")

    def __init__(self, engine: Engine, session: Session, event: EngineEvent, candidates: Sequence[Campaign]) -> None:
        self._engine, self._session, self._event, self._candidates = engine, session, event, candidates
        self._keys: set[str] | None = None
        self._rows: list[tuple[str, float, str, Any]] | None = None  # (campaign, sent at, purpose, data)
        self.shared = False  # True: the keys and rows are a _Bulk's, read once for many profiles

    def duplicate(self, key: str) -> bool:
        if self._keys is None:
            wanted = [Engine.dedup_key(c, self._event) for c in self._candidates]
            self._keys = set()
            with _notifications_of(self._engine, self._session, self._event.profile_id):
                for i in range(0, len(wanted), 500):
                    self._keys.update(self._session.scalars(_DEDUP_KEYS, {"keys": wanted[i:i + 500]}))
        return key in self._keys

    def rows(self) -> list[tuple[str, float, str, Any]]:
        """The profile's counted sends (not cancelled or expired) within reach of any candidate's window."""
        if self._rows is None:
            eng, t = self._engine, self._event.time
            widest = max((cap.window_s for cap in eng.caps), default=0.0)
            lo, hi = math.inf, -math.inf
            for c in self._candidates:
                at, reach = eng.send_time(c, t), max(c.cooldown_s, widest)
                lo, hi = min(lo, at - reach), max(hi, at + reach)
            with _notifications_of(self._engine, self._session, self._event.profile_id):
                self._rows = [(r[0], r[1], r[2], r[3]) for r in self._session.execute(
                    _PROFILE_SENDS, {"pid": self._event.profile_id, "lo": lo, "hi": hi})]
        return self._rows

    def fired(self, key: str, sent: tuple[str, float, str, Any]) -> None:
        """A send just fired: its dedup key and (campaign, sent at, purpose, data)."""
        if self._keys is not None:
            self._keys.add(key)
        if self._rows is not None:
            self._rows.append(sent)


class _Bulk:
    """What ``Engine.handle_many`` read once for all its events: consents per profile, the existing dedup keys
    among those its events can make, and each profile's counted sends from the earliest window any check can
    reach (a superset: the checks filter by their own windows). Sends fired meanwhile are added, so a later
    event of the same profile sees them, as it would see them in the database."""

    CHUNK = 900  # ids per IN list

    def __init__(self, conn: Connection) -> None:
        self.conn = conn  # the session's connection: reads that need no autoflush, the decisions INSERT
        self.profiles: set[int] = set()
        self.loaded: dict[int, _ProfileRow] = {}
        self.consents: dict[int, set[str]] = {}
        self.wanted: set[str] = set()
        # id(event) -> its candidates, worked out here for the events handed in (alive while the batch runs).
        self.candidates: dict[int, list[Campaign]] = {}
        self.keys: set[str] = set()
        self.rows: dict[int, list[tuple[str, float, str, Any]]] = {}
        self.decisions: list[tuple[Any, ...]] = []  # values in _DECISION_COLUMNS order
        self.carts: dict[int, Any] | None = None  # open cart per profile, read on first need (cart())
        self.catalogue: dict[str, Any] = {}
        # Sends fired, as rows (Core: no ORM objects to build and flush), written by write_sends: at the end,
        # or before a read of notifications that must see them.
        self.outbox: list[dict[str, Any]] = []
        self.written = 0
        self.unwritten: set[int] = set()  # profiles with a send in outbox[written:]
        self.pending: dict[int, dict[str, Any]] = {}  # id(Outcome) -> its row, which has its id once written

    @classmethod
    def load(cls, engine: Engine, session: Session, events: Sequence[EngineEvent],
             only: Sequence[Campaign] | None) -> _Bulk:
        session.flush()  # what the caller left pending is in the database before the reads below skip autoflush
        b = cls(session.connection())
        conn = b.conn
        reach = max((cap.window_s for cap in engine.caps), default=0.0)
        refresh = frozenset(REFRESH_SEGMENTS_ON) if engine.segments else frozenset()
        earliest = math.inf
        wanted_keys = b.wanted
        for ev in events:
            judged = engine._judged.get(ev.profile_id)
            key = ev.key
            cands = b.candidates[id(ev)] = engine._candidates(ev, only)  # handle takes them from here
            if judged:  # handle skips those (a dwell tick judges few): no key to read
                cands = [c for c in cands if (c.id, key) not in judged]
            needed = ev.kind in refresh
            if cands:
                needed = True
                tail = Engine.dedup_tail(ev)
                wanted_keys.update([c.id + tail for c in cands])
                reach = max(reach, max(c.cooldown_s for c in cands))
            if needed:  # handle reads this profile; an event with nothing left to judge reads nothing
                b.profiles.add(ev.profile_id)
                earliest = min(earliest, ev.time)
        if not b.profiles:
            return b
        pids = sorted(b.profiles)
        lo = earliest - reach
        wanted = sorted(b.wanted)
        for i in range(0, len(wanted), cls.CHUNK):
            b.keys.update(conn.execute(_DEDUP_KEYS, {"keys": wanted[i:i + cls.CHUNK]}).scalars())
        for i in range(0, len(pids), cls.CHUNK):
            chunk = pids[i:i + cls.CHUNK]
            b.loaded.update((r[0], _ProfileRow(*r)) for r in conn.execute(_BULK_PROFILES, {"ids": chunk}))
            for pid, purpose in conn.execute(_BULK_CONSENTS, {"ids": chunk}):
                b.consents.setdefault(pid, set()).add(purpose)
            for pid, cid, at, purpose, data in conn.execute(_BULK_SENDS, {"ids": chunk, "lo": lo}):
                b.rows.setdefault(pid, []).append((cid, at, purpose, data))
        return b

    def sends(self, engine: Engine, session: Session, event: EngineEvent, candidates: Sequence[Campaign]) -> _Sends:
        """The event's sends, from what was read in bulk when it covers the event (an event raised while
        judging, such as segment_entered, is not covered: it reads the database, which has the batch's sends)."""
        sends = _Sends(engine, session, event, candidates)
        tail = Engine.dedup_tail(event)
        if event.profile_id in self.profiles and all(c.id + tail in self.wanted for c in candidates):
            sends._keys, sends._rows, sends.shared = self.keys, self.rows.setdefault(event.profile_id, []), True
        return sends

    def cart(self, profile_id: int) -> tuple[Any, Mapping[str, Any]] | None:
        """The profile's open cart (or None) and the catalogue rows of its items, when it is one of the batch's
        profiles: on the first call, every batch profile's open cart and their items' catalogue rows are read
        (two statements for the batch instead of two per event; the engine never writes carts). None: read
        it alone."""
        if profile_id not in self.profiles:
            return None
        if self.carts is None:
            self.carts = {}
            pids = sorted(self.profiles)
            for i in range(0, len(pids), self.CHUNK):
                for row in self.conn.execute(_OPEN_CARTS, {"ids": pids[i:i + self.CHUNK]}):
                    self.carts.setdefault(row.profile_id, row)
            skus = sorted({str(it.get("sku")) for row in self.carts.values() for it in row.items})
            for i in range(0, len(skus), self.CHUNK):
                self.catalogue.update((c.sku, c) for c in self.conn.execute(
                    _CATALOGUE_ITEMS, {"skus": skus[i:i + self.CHUNK]}))
        return self.carts.get(profile_id), self.catalogue

    def fired(self, profile_id: int, key: str, sent: tuple[str, float, str, Any]) -> None:
        self.keys.add(key)
        self.rows.setdefault(profile_id, []).append(sent)

    def write_sends(self) -> None:
        """The sends fired since the last write, as one INSERT ... RETURNING in the order they fired (so their
        ids ascend in that order, as the ORM's flush gave them); each row gets its id."""
        todo = self.outbox[self.written:]
        if not todo:
            return
        self.written = len(self.outbox)
        self.unwritten.clear()
        if self.conn.dialect.name == "sqlite":
            ids = dict((key, nid) for nid, key in self.conn.execute(_NEW_NOTIFICATIONS_KEYED, todo))
            for row in todo:
                row["id"] = ids[row["dedup_key"]]
            return
        for row, nid in zip(todo, self.conn.execute(_NEW_NOTIFICATIONS, todo).scalars().all(), strict=True):
            row["id"] = nid


class Engine:
    """Decides, explains, and writes the outbox. All durable state (cooldowns, caps, budgets, pending
    sends, segment memberships) is read from the database, so it survives a restart; the in-memory
    state only avoids repeating work and is safe to lose."""

    def __init__(self, campaigns: CampaignIndex, *, abandon_after_s: float = 1800.0, timezone: str = "UTC",
                 caps: Sequence[FrequencyCap] = (), segments: Sequence[Segment] = (),
                 tiers: Sequence[tuple[str, int]] = (), channels: Sequence[str] = CHANNELS,
                 store_id: str = DEFAULT_STORE_ID) -> None:
        self.campaigns = campaigns
        self.store_id = store_id  # written on each decision and notification: figures per store
        self.segments = tuple(segments)
        self._segments_read_cart = any(seg.conditions.reads_from("cart") for seg in self.segments)
        self.tiers = tuple(tiers)
        self.abandon_after_s = abandon_after_s
        self.timezone = timezone
        self.tz = ZoneInfo(timezone)
        # Worked out once (until caps or channels are set again): a campaign's channels by its channels setting,
        # the caps that count a purpose.
        self._channels_of: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._caps_of: dict[str, list[FrequencyCap]] = {}
        self.caps = tuple(caps)
        self.channels = tuple(channels)  # the configured channels a notification can go out on
        self.counts: Counter[str] = Counter()  # decisions by reason, for /metrics and summaries
        self.fired_by_campaign: Counter[str] = Counter()
        self.evaluations = 0  # campaign evaluations (one per candidate and event): the engine's work
        self._last_value: dict[tuple[str, str], float] = {}  # (device, metric) -> previous reading
        # Occurrences already judged, per profile: a zone stay gets one verdict per campaign, not one
        # per dwell tick. Forgotten when the visit ends; the outbox's dedup key is the durable guard.
        self._judged: dict[int, set[tuple[str, str]]] = {}
        self._cancellers: dict[str, list[str]] = {}
        self._schedules_done: set[str] = set()
        self._bulk: _Bulk | None = None  # set while handle_many runs
        # Scheduled sends: none is due before _release_from (sends this engine schedules lower it; a rollback
        # leaves it too early, which costs one query). Others' (another worker's) are seen at the rescan.
        self._release_from = -math.inf
        self._release_scan = -math.inf
        self.set_campaigns(campaigns)

    @property
    def caps(self) -> tuple[FrequencyCap, ...]:
        return self._caps

    @caps.setter
    def caps(self, caps: Sequence[FrequencyCap]) -> None:
        self._caps = tuple(caps)
        self._caps_of.clear()

    @property
    def channels(self) -> tuple[str, ...]:
        return self._channels

    @channels.setter
    def channels(self, channels: Sequence[str]) -> None:
        self._channels = tuple(channels)
        self._channels_of.clear()

    def forget_profile(self, profile_id: int) -> None:
        """An erased or linked-away profile: what was judged for it goes (the next profile never gets its id,
        but memory should not keep what erasure removed from the database)."""
        self._judged.pop(profile_id, None)

    def clone(self) -> Engine:
        """The same configuration and campaigns, no in-memory history (dry runs)."""
        return Engine(self.campaigns, abandon_after_s=self.abandon_after_s, timezone=self.timezone, caps=self.caps,
                      segments=self.segments, tiers=self.tiers, channels=self.channels, store_id=self.store_id)

    def set_campaigns(self, campaigns: CampaignIndex) -> None:
        """Swap the live campaign set (API edits); durable state is in the database, so nothing is lost."""
        self.campaigns = campaigns
        cancellers: dict[str, list[str]] = {}
        for c in campaigns.by_id.values():
            for kind in c.cancel_on:
                cancellers.setdefault(kind, []).append(c.id)
        self._cancellers = cancellers

    # ------------------------------------------------------------ triggers

    def _crossed(self, c: Campaign, event: EngineEvent) -> bool:
        """Thresholds fire on the crossing, not on every reading past it (no re-sends, no noise)."""
        t = c.trigger
        if t.metric is None or (t.above is None and t.below is None):
            return True
        value = event.facts.get("reading", {}).get(t.metric)
        if value is None:
            return False
        prev = self._last_value.get((str(event.facts.get("device", {}).get("id")), t.metric))
        if t.above is not None and value >= t.above and (prev is None or prev < t.above):
            return True
        return t.below is not None and value <= t.below and (prev is None or prev > t.below)

    def _remember_readings(self, event: EngineEvent) -> None:
        device = str(event.facts.get("device", {}).get("id"))
        for metric, value in event.facts.get("reading", {}).items():
            self._last_value[(device, metric)] = value

    # ------------------------------------------------------------ one event

    def handle(self, session: Session, event: EngineEvent, only: Sequence[Campaign] | None = None) -> list[Outcome]:
        """Judge ``event`` against every campaign its trigger can fire (or just ``only``)."""
        outcomes = self._cancel_pending(session, event) if event.kind in self._cancellers else []
        candidates = self._candidates(event, only)
        if event.kind == "telemetry":
            candidates = [c for c in candidates if self._crossed(c, event)]
            self._remember_readings(event)
        judged = self._judged.setdefault(event.profile_id, set())
        candidates = [c for c in candidates if (c.id, event.key) not in judged]
        if event.kind == "visit_end":
            self._judged.pop(event.profile_id, None)
        refresh = bool(self.segments) and event.kind in REFRESH_SEGMENTS_ON
        if not candidates and not refresh:
            return self._record(session, event, outcomes)
        bulk = self._bulk
        # Visits, stays, carts and memberships: the session holds none of them pending while a batch is judged.
        reader: Reader = bulk.conn if bulk is not None else session
        profile: Profile | _ProfileRow | None
        if bulk is not None and event.profile_id in bulk.profiles:  # read with the drain (None: erased)
            profile = bulk.loaded.get(event.profile_id)
            consents = bulk.consents.get(event.profile_id, set())
        else:  # identifiers and consents are selectin relationships the engine never reads: not loaded
            profile = session.get(Profile, event.profile_id, options=_PROFILE_ONLY)
            consents = self._consents(session, event.profile_id) if profile is not None else set()
        if profile is None:
            return outcomes
        facts: dict[str, Any] = dict(event.facts)
        facts["profile"] = profile_facts(profile, consents)
        facts["event"] = {"kind": event.kind, "zone": event.zone, "dwell_s": round(event.dwell_s, 1),
                          "time": event.time}
        reads = [self._condition_reads(c) for c in candidates]
        cart_now = any(c.purpose == "cart_reminders" for c in candidates) or any(r[0] for r in reads) or (
            refresh and self._segments_read_cart)
        if cart_now:
            facts["cart"] = self._cart_facts(session, reader, profile.id, event.time)
        # A refresh reads the cart for a send's data and templates only: read when one fires (same answer).
        cart_later = refresh and not cart_now
        facts["loyalty"] = {"points": profile.points or 0, "tier": tier_for(profile.points or 0, self.tiers)}
        entered: list[str] = []
        if refresh or any(r[1] for r in reads):
            facts["behaviour"] = behaviour_facts(reader, profile.id, event.time)
            facts["segments"] = [seg.id for seg in self.segments if evaluate(seg.conditions, facts) is None]
            if refresh:
                entered = self._update_memberships(session, reader, profile.id, facts["segments"], event.time)

        who = profile.external_id or f"#{profile.id}"
        winner: Campaign | None = None
        sends = (bulk.sends(self, session, event, candidates) if bulk is not None
                 else _Sends(self, session, event, candidates))
        for c in candidates:  # highest priority first
            self.evaluations += 1
            variant = assign_variant(c.experiment, c.id, profile.id) if c.experiment else None
            arm = (variant.name if variant else "holdout") if c.experiment else None
            send_at, channels, reason, detail = self._check(session, c, event, facts, consents, variant, sends)
            if reason is None and winner is not None:
                reason, detail = LOST_ARBITRATION, f"{winner.id} has higher priority"
            if reason == HOLDOUT and winner is None:
                winner = c  # the holdout takes the event too, so lift is measured against no message
            if reason is not None:
                outcomes.append(Outcome(c.id, profile.id, False, reason, detail, None, who, arm))
                continue
            winner = c
            if cart_later and "cart" not in facts:
                facts["cart"] = self._cart_facts(session, reader, profile.id, event.time)
            outcomes.append(self._fire(session, c, event, facts, who, variant, send_at, channels, detail, sends))
        if event.kind != "schedule":  # a schedule's key is per day: its dedup key is guard enough
            judged.update((o.campaign_id, event.key) for o in outcomes)
        self._record(session, event, outcomes)
        for seg in entered:  # joining a segment is an event of its own, after the one that caused it
            outcomes += self.handle(session, EngineEvent("segment_entered", profile.id, event.time,
                                                         f"segment:{seg}:{event.time:.3f}",
                                                         facts={"segment": {"id": seg}}))
        return outcomes

    def _candidates(self, event: EngineEvent, only: Sequence[Campaign] | None) -> list[Campaign]:
        bulk = self._bulk
        if bulk is not None:
            known = bulk.candidates.pop(id(event), None)  # popped: an id is only the batch's event once
            if known is not None:
                return known
        if only is not None:
            return list(only)
        metrics = event.facts.get("reading", {}).keys() if event.kind == "telemetry" else ()
        segment = event.facts.get("segment", {}).get("id") if event.kind == "segment_entered" else None
        return self.campaigns.candidates(event.kind, event.zone, event.dwell_s, metrics, segment)

    def handle_many(self, session: Session, events: Sequence[EngineEvent],
                    only: Sequence[Campaign] | None = None,
                    before: Callable[[int], None] | None = None) -> list[list[Outcome]]:
        """Many profiles' events at once (a schedule's audience, a scanner drain): each judged exactly as by
        ``handle``, but profiles, consents, dedup keys and the sends cooldowns and caps count are read in a
        few queries for all of them, and the notifications and decisions are written in one flush at the
        end instead of one per event. ``before(i)`` runs just before event ``i`` is judged (the runtime
        records its visit there, so the event sees the database as one-by-one judging would). Returns the
        outcomes per event, in order."""

        def one(i: int, ev: EngineEvent) -> list[Outcome]:
            if before is not None:
                before(i)
            return self.handle(session, ev, only)

        if not events or self._bulk is not None:  # one event too: its reads and writes skip the ORM
            return [one(i, ev) for i, ev in enumerate(events)]
        self._bulk = bulk = _Bulk.load(self, session, events, only)
        try:
            per_event = [one(i, ev) for i, ev in enumerate(events)]
            bulk.write_sends()  # the notifications: one INSERT, their ids assigned in order
            session.flush()  # cancellations of scheduled sends
            if bulk.decisions:
                _insert_decisions(bulk.conn, bulk.decisions)
        finally:
            self._bulk = None
        pending = bulk.pending
        return [[dataclasses.replace(o, notification_id=pending[id(o)]["id"]) if id(o) in pending else o for o in outs]
                for outs in per_event]

    @staticmethod
    def _condition_reads(c: Campaign) -> tuple[bool, bool]:
        """Whether the conditions read cart facts, and behaviour facts or segments (the parsed tree knows)."""
        cond = c.conditions
        if cond is None:
            return False, False
        return cond.reads_from("cart"), cond.reads_from("behaviour", "segments")

    def _update_memberships(self, session: Session, reader: Reader, profile_id: int, now_in: Sequence[str],
                            t: float) -> list[str]:
        """Store which segments the profile is in; returns those it has just joined. Core statements (the
        engine makes no membership objects), through ``reader``: the batch's connection, or the session."""
        before = set(reader.execute(_MEMBERSHIPS, {"pid": profile_id}).scalars())
        current = set(now_in)
        left = before - current
        if left:
            reader.execute(delete(_MEMBERSHIP_TABLE).where(_MEMBERSHIP_TABLE.c.profile_id == profile_id,
                                                           _MEMBERSHIP_TABLE.c.segment_id.in_(sorted(left))))
        joined = [seg for seg in now_in if seg not in before]
        if joined:
            reader.execute(_NEW_MEMBERSHIP, [{"profile_id": profile_id, "segment_id": seg, "entered_at": t}
                                             for seg in joined])
        return joined

    def _record(self, session: Session, event: EngineEvent, outcomes: list[Outcome]) -> list[Outcome]:
        """One multi-row INSERT per event: an event leaves a decision per candidate (dozens at visit start)."""
        if outcomes:
            t, kind, key, store = event.time, event.kind, event.key, self.store_id
            if self._bulk is not None:  # written with the batch's others (an INSERT now would flush each send)
                self._bulk.decisions.extend((t, o.profile_id, o.campaign_id, kind, key, o.fired, o.reason, o.detail,
                                             o.variant, store) for o in outcomes)
            else:
                session.execute(_DECISIONS, [dict(zip(_DECISION_COLUMNS, (
                    t, o.profile_id, o.campaign_id, kind, key, o.fired, o.reason, o.detail, o.variant, store),
                    strict=True)) for o in outcomes])
        for o in outcomes:
            self.counts[o.reason] += 1
            if o.fired:
                self.fired_by_campaign[o.campaign_id] += 1
        return outcomes

    def _cart_facts(self, session: Session, reader: Reader, profile_id: int, now: float) -> dict[str, Any]:
        bulk = self._bulk
        known = bulk.cart(profile_id) if bulk is not None else None
        with _notifications_of(self, session, profile_id):  # its reminder check reads the profile's notifications
            return cart_facts(session, profile_id, now, self.abandon_after_s, reader, known)

    def add_points(self, session: Session, profile_id: int, points: int) -> None:
        """Loyalty points earned (a visit): one Core UPDATE, and the profile as the engine holds it (a batch's
        bulk read, or an object in the session) kept in step, as the ORM's synchronising UPDATE would."""
        session.connection().execute(_ADD_POINTS, {"pid": profile_id, "n": points})
        held = self._bulk.loaded.get(profile_id) if self._bulk is not None else None
        if held is not None and held.points is not None:
            held.points += points
        obj = session.identity_map.get(identity_key(Profile, profile_id))
        if obj is not None and "points" in obj.__dict__:
            set_committed_value(obj, "points", None if obj.points is None else obj.points + points)

    @staticmethod
    def _consents(session: Session, profile_id: int) -> set[str]:
        return set(session.scalars(_CONSENTS, {"pid": profile_id}))

    def send_time(self, c: Campaign, t: float) -> float:
        """When a send decided at ``t`` reaches the customer: after the delay, and after quiet hours (hold)."""
        at = t + c.delay_s
        if c.quiet_hours is not None and c.quiet_hours.mode == "hold" and self._quiet(c, at):
            at = self._quiet_end(c, at)
        return at

    def _check(self, session: Session, c: Campaign, event: EngineEvent, facts: Mapping[str, Any],
               consents: set[str], variant: Variant | None, sends: _Sends | None = None
               ) -> tuple[float, tuple[str, ...], str | None, str | None]:
        """(send time, channels, reason, detail): reason None means it may fire.

        Cooldowns and caps are judged at the time the customer would get it (after a delay or held quiet
        hours), against sends on both sides of that time, so neither late events nor held sends released
        together can break them. Consent and conditions come first: most candidates stop there, before the
        send time is worked out (the event's time and no channels are returned for them)."""
        if c.purpose not in consents:
            return event.time, (), NO_CONSENT, f"no consent for {c.purpose}"
        failed = evaluate(c.conditions, facts)
        if failed is not None:
            return event.time, (), CONDITION_FALSE, failed
        send_at = self.send_time(c, event.time)
        channels = self._channels_of.get(c.channels)
        if channels is None:
            channels = self._channels_of[c.channels] = tuple(ch for ch in (c.channels or self.channels)
                                                             if ch in self.channels)
        if sends is None:
            sends = _Sends(self, session, event, [c])
        if sends.duplicate(self.dedup_key(c, event)):
            return send_at, channels, DUPLICATE, "already sent for this occurrence"
        if c.cooldown_s > 0:
            lo, hi = send_at - c.cooldown_s, send_at + c.cooldown_s
            near = [at for cid, at, _, _ in sends.rows() if cid == c.id and lo < at < hi]
            if near:
                gap = min(near, key=lambda x: abs(send_at - x))
                when = (f"one is due at {dt.datetime.fromtimestamp(gap, self.tz):%H:%M}" if gap > event.time
                        else f"sent {event.time - gap:.0f} s ago")
                return send_at, channels, COOLDOWN, f"{when}, cooldown {c.cooldown_s:.0f} s"
        if c.max_per_profile:
            with _notifications_of(self, session, event.profile_id):
                sent = session.scalar(select(func.count()).select_from(Notification).where(
                    Notification.campaign_id == c.id, Notification.profile_id == event.profile_id,
                    Notification.status.not_in(NOT_SENT))) or 0
            if sent >= c.max_per_profile:
                return send_at, channels, NOT_REELIGIBLE, f"already sent {sent} time(s), at most {c.max_per_profile}"
        if (c.budget_sends or c.budget_redemptions) and self._bulk is not None:
            self._bulk.write_sends()  # campaign-wide counts: every send so far is in the database
        if c.budget_sends:
            used = session.scalar(select(func.count()).select_from(Notification).where(
                Notification.campaign_id == c.id, Notification.status.not_in(NOT_SENT))) or 0
            if used >= c.budget_sends:
                return send_at, channels, BUDGET_EXHAUSTED, f"{used} of {c.budget_sends} sends used"
        if c.budget_redemptions:
            redeemed = session.scalar(select(func.count()).select_from(Interaction).join(
                Notification, Notification.id == Interaction.notification_id).where(
                Notification.campaign_id == c.id, Interaction.kind == "redeemed")) or 0
            if redeemed >= c.budget_redemptions:
                return send_at, channels, BUDGET_EXHAUSTED, f"{redeemed} of {c.budget_redemptions} redemptions used"
        caps = self._caps_of.get(c.purpose)
        if caps is None:
            caps = self._caps_of[c.purpose] = [cap for cap in self.caps if c.purpose in cap.purposes]
        if caps:
            widest = max(cap.window_s for cap in caps)
            lo, hi = send_at - widest, send_at + widest
            recent = [(at, purpose, data) for _, at, purpose, data in sends.rows() if lo < at < hi]
            for cap in caps:
                if cap.channel is not None and cap.channel not in channels:
                    continue
                n = sum(1 for at, purpose, data in recent if purpose in cap.purposes
                        and abs(at - send_at) < cap.window_s
                        and (cap.channel is None or cap.channel in ((data or {}).get("channels") or self.channels)))
                if n < cap.max:
                    continue
                where = f" on {cap.channel}" if cap.channel else ""
                detail = f"{n} sent{where} within {cap.window_s:.0f} s, cap {cap.max}"
                if cap.channel is None:
                    return send_at, channels, CAPPED, detail
                channels = tuple(ch for ch in channels if ch != cap.channel)
                if not channels:
                    return send_at, channels, CAPPED, detail
        if not channels:
            return send_at, channels, CAPPED, "none of its channels is configured"
        if c.experiment is not None and variant is None:
            return send_at, channels, HOLDOUT, f"in the {c.experiment.holdout:.0%} holdout"
        if c.quiet_hours is not None and c.quiet_hours.mode == "drop" and self._quiet(c, send_at):
            return send_at, channels, QUIET_HOURS, "inside quiet hours (drop)"
        left_out = [ch for ch in (c.channels or self.channels) if ch in self.channels and ch not in channels]
        return send_at, channels, None, f"not on {', '.join(left_out)} (channel cap)" if left_out else None

    def _quiet(self, c: Campaign, t: float) -> bool:
        assert c.quiet_hours is not None
        return c.quiet_hours.contains(dt.datetime.fromtimestamp(t, self.tz).time())

    def _quiet_end(self, c: Campaign, t: float) -> float:
        """The first moment after ``t`` outside the campaign's quiet hours, in the store's timezone."""
        assert c.quiet_hours is not None
        local = dt.datetime.fromtimestamp(t, self.tz)
        end = dt.datetime.combine(local.date(), c.quiet_hours.end, self.tz)
        if end <= local:
            end = dt.datetime.combine(local.date() + dt.timedelta(days=1), c.quiet_hours.end, self.tz)
        return end.timestamp()

    @staticmethod
    def dedup_key(c: Campaign, event: EngineEvent) -> str:
        return c.id + Engine.dedup_tail(event)

    @staticmethod
    def dedup_tail(event: EngineEvent) -> str:
        """What follows the campaign id in ``dedup_key``: made once per event when many campaigns are checked."""
        return f":{event.profile_id}:{event.key}"

    def _fire(self, session: Session, c: Campaign, event: EngineEvent, facts: dict[str, Any],
              who: str, variant: Variant | None, send_at: float, channels: Sequence[str],
              note: str | None, sends: _Sends | None = None) -> Outcome:
        action = variant.action if variant is not None and variant.action is not None else c.action
        scope = {**facts, **action.data}
        data: dict[str, Any] = {"campaign": c.id, "purpose": c.purpose, "trigger": event.kind,
                                "zone": event.zone, **action.data}
        if variant is not None:
            data["variant"] = variant.name
        if tuple(channels) != self.channels:
            data["channels"] = list(channels)  # the dispatcher leaves the others out
        if "cart" in facts and facts["cart"].get("abandoned"):
            data["cart"] = {k: facts["cart"][k] for k in ("id", "items", "zones")}
        if "device" in facts:
            data["device"] = facts["device"]
        if "alarm" in facts:  # the app acks or books the alarm by this id (POST /v1/me/alarms/{id}/...)
            data["alarm"] = {k: facts["alarm"].get(k) for k in ("id", "rule", "severity")}
        deliver_at = send_at if send_at > event.time else None
        detail = f"delayed {c.delay_s:.0f} s" if c.delay_s else None
        if deliver_at is not None and deliver_at > event.time + c.delay_s:
            detail = f"held for quiet hours until {dt.datetime.fromtimestamp(deliver_at, self.tz):%H:%M}"
        if note:
            detail = f"{detail}; {note}" if detail else note
        code = redemption_code() if c.purpose == "offers" else None
        row: dict[str, Any] = {
            "profile_id": event.profile_id, "campaign_id": c.id, "purpose": c.purpose,
            "dedup_key": self.dedup_key(c, event), "title": render(action.title, scope)[:300],
            "body": render(action.body, scope), "data": {**data, "redemption_code": code} if code else data,
            "created_at": event.time, "status": SCHEDULED if deliver_at is not None else "pending",
            "deliver_at": deliver_at, "expires_at": event.time + c.ttl_s if c.ttl_s else None,
            "variant": variant.name if variant is not None else None, "redemption_code": code,
            "store_id": self.store_id}
        if deliver_at is not None:
            self._release_from = min(self._release_from, deliver_at)
        bulk = self._bulk
        nid: int | None = None
        if bulk is None:
            n = Notification(**row)
            session.add(n)
            session.flush()  # assigns the monotonic id the stream uses
            nid = n.id
        else:  # written with the batch's others (write_sends), its id filled in by handle_many
            bulk.outbox.append(row)
            bulk.unwritten.add(event.profile_id)
        sent = (c.id, deliver_at if deliver_at is not None else event.time, c.purpose, row["data"])
        if sends is not None:
            sends.fired(row["dedup_key"], sent)
        if bulk is not None and (sends is None or not sends.shared):
            bulk.fired(event.profile_id, row["dedup_key"], sent)
        out = Outcome(c.id, event.profile_id, True, FIRED, detail, nid, who,
                      variant.name if variant is not None else None, deliver_at)
        if bulk is not None:
            bulk.pending[id(out)] = row
        return out

    # ------------------------------------------------------------ schedules

    def due_schedules(self, now: float) -> list[tuple[Campaign, str, float]]:
        """(campaign, occurrence key, occurrence time) for schedule times passed within their window."""
        out = []
        local = dt.datetime.fromtimestamp(now, self.tz)
        for c in self.campaigns.by_trigger.get("schedule", ()):
            t = c.trigger
            for back in (1, 0):
                day = local.date() - dt.timedelta(days=back)
                if day.weekday() not in t.days:
                    continue
                for at in t.at:
                    occ = dt.datetime.combine(day, at, self.tz).timestamp()
                    if occ <= now < occ + t.within_s:
                        out.append((c, f"schedule:{day.isoformat()}T{at:%H:%M}", occ))
        return out

    def schedule_events(self, session: Session, now: float) -> Iterator[tuple[EngineEvent, Campaign]]:
        """One event per audience profile for each due schedule, each schedule once per occurrence
        (remembered durably by its decisions, so a restart inside the window does not run it again).
        The audience is every profile that consented to the campaign's purpose; conditions
        (segments, tiers...) and limits then apply as for any event."""
        for c, key, _occ in self.due_schedules(now):
            done = f"{c.id}:{key}"
            if done in self._schedules_done:
                continue
            if session.scalar(select(Decision.id).where(Decision.campaign_id == c.id, Decision.event_key == key)
                              .limit(1)) is not None:
                self._schedules_done.add(done)
                continue
            audience = list(session.scalars(select(Consent.profile_id).where(
                Consent.purpose == c.purpose, Consent.granted.is_(True)).order_by(Consent.profile_id)))
            for pid in audience:
                yield EngineEvent("schedule", pid, now, key), c
            self._schedules_done.add(done)

    def run_schedules(self, session: Session, now: float) -> list[Outcome]:
        """Each due schedule's whole audience judged in bulk (handle_many)."""
        audiences: dict[str, tuple[Campaign, list[EngineEvent]]] = {}
        for ev, c in self.schedule_events(session, now):
            audiences.setdefault(c.id, (c, []))[1].append(ev)
        return [o for c, evs in audiences.values() for outs in self.handle_many(session, evs, [c]) for o in outs]

    # ------------------------------------------------------------ pending sends

    def _cancel_pending(self, session: Session, event: EngineEvent) -> list[Outcome]:
        """An event named in a campaign's ``cancel_on`` withdraws that campaign's scheduled sends."""
        with _notifications_of(self, session, event.profile_id):
            rows = list(session.scalars(select(Notification).where(
                Notification.profile_id == event.profile_id, Notification.status == SCHEDULED,
                Notification.campaign_id.in_(self._cancellers[event.kind]))))
        out = []
        for n in rows:
            n.status = CANCELLED
            out.append(Outcome(n.campaign_id, n.profile_id, False, CANCELLED,
                               f"{event.kind} cancels notification {n.id}", n.id, "", n.variant))
        return out

    def release_due(self, session: Session, now: float) -> list[int]:
        """Scheduled sends whose time has come: expired ones are dropped, consent is checked again.

        The outbox is asked only when a send this engine scheduled may be due, or every RELEASE_RESCAN_S
        (sends scheduled by another process), not on every tick."""
        if now < self._release_from and now < self._release_scan + RELEASE_RESCAN_S:
            return []
        self._release_scan = now
        first = session.scalar(select(func.min(Notification.deliver_at)).where(Notification.status == SCHEDULED))
        if first is None or first > now:
            self._release_from = math.inf if first is None else first
            return []
        self._release_from = -math.inf  # asked again at the next tick, after these are released
        due = list(session.scalars(select(Notification).where(
            Notification.status == SCHEDULED, Notification.deliver_at <= now).order_by(Notification.id)))
        released: list[int] = []
        # Its stream position: it goes live after every id committed so far, so replay must not skip it.
        top = session.scalar(select(func.max(Notification.id))) if due else None
        for n in due:
            reason: str | None = None
            if n.expires_at is not None and now > n.expires_at:
                n.status, reason = EXPIRED, EXPIRED
            elif n.purpose not in self._consents(session, n.profile_id):
                n.status, reason = CANCELLED, NO_CONSENT  # consent withdrawn while it waited
            else:
                n.status = "pending"
                n.released_after = top
                released.append(n.id)
                continue
            session.add(Decision(at=now, profile_id=n.profile_id, campaign_id=n.campaign_id,
                                 event_kind="release", event_key=f"notification:{n.id}", fired=False,
                                 reason=reason, detail=f"notification {n.id} not sent", variant=n.variant,
                                 store_id=self.store_id))
            self.counts[reason] += 1
        return released
