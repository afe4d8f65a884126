"""Presence events per profile, and what they leave in storage: visits, zone stays, anonymous footfall.

A person may carry several identities (a tag and the shop's app); the tracker follows each identity, this
module turns their events into one visit and one stay per zone per profile, writes those rows, and counts
the identities no profile claims by day, hour and zone only (never by address or key): visits, dwell and
bounces. An anonymous identity's open visit is followed in memory only, for as long as the tracker follows it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Dialect, Engine, Table, bindparam, insert, select, update

from gateway.presence.tracker import PresenceEvent
from gateway.storage.db import upsert_insert
from gateway.storage.models import FootfallCount, FootfallHour, Visit, ZoneStay

_VISITS = cast(Table, Visit.__table__)
_STAYS = cast(Table, ZoneStay.__table__)
_FOOTFALL = cast(Table, FootfallCount.__table__)
_HOURS = cast(Table, FootfallHour.__table__)
# Built once (their cache keys are memoized); values come as bound parameters.
_HAS_VISIT = select(Visit.id).where(Visit.profile_id == bindparam("pid"), Visit.store_id == bindparam("store")).limit(1)
_NEW_VISIT = insert(_VISITS).returning(_VISITS.c.id)
_NEW_STAY = insert(_STAYS).returning(_STAYS.c.id)
_VISIT_ZONES = update(_VISITS).where(_VISITS.c.id == bindparam("vid")).values(zones=bindparam("zones"))
_VISIT_END = update(_VISITS).where(_VISITS.c.id == bindparam("vid")).values(ended_at=bindparam("at"))
_STAY_EXIT = update(_STAYS).where(_STAYS.c.id == bindparam("sid")).values(exited_at=bindparam("at"))
_FOOTFALL_UPSERTS: dict[tuple[str, str], Any] = {}

ProfileOf = Callable[[str], int | None]  # an identity's key -> the profile that enrolled it, if any


def _zero_counts() -> list[float]:
    return [0, 0.0, 0, 0]


def _footfall_upsert(dialect: Dialect, table: str = "footfall_counts") -> Any:
    """INSERT ... ON CONFLICT that adds the counts to the day's row (``footfall_counts``) or the hour's
    (``footfall_hours``), built once per dialect (SQLite and PostgreSQL spell it alike in SQLAlchemy)."""
    name = dialect.name
    stmt = _FOOTFALL_UPSERTS.get((name, table))
    if stmt is None:
        if table == "footfall_hours":
            ins = upsert_insert(name, _HOURS)
            stmt = ins.on_conflict_do_update(index_elements=["store_id", "day", "hour", "zone"], set_={
                "anonymous_visits": _HOURS.c.anonymous_visits + ins.excluded.anonymous_visits})
        else:
            ins = upsert_insert(name, _FOOTFALL)
            stmt = ins.on_conflict_do_update(index_elements=["store_id", "day", "zone"], set_={
                "anonymous_visits": _FOOTFALL.c.anonymous_visits + ins.excluded.anonymous_visits,
                "anonymous_dwell_s": _FOOTFALL.c.anonymous_dwell_s + ins.excluded.anonymous_dwell_s,
                "anonymous_ended": _FOOTFALL.c.anonymous_ended + ins.excluded.anonymous_ended,
                "anonymous_bounces": _FOOTFALL.c.anonymous_bounces + ins.excluded.anonymous_bounces})
        _FOOTFALL_UPSERTS[(name, table)] = stmt
    return stmt


class Visits:
    """The profile view of presence, and its rows. ``figures`` is shared with the caller's counters
    (visits new and returning, anonymous visits). ``bounce_s``: [figures] bounce_s, under which an anonymous
    stay, or a visit that saw at most one zone, is counted a bounce (the rule the figures apply to enrolled
    visits)."""

    def __init__(self, store_id: str, timezone: str, figures: Counter[str] | None = None,
                 bounce_s: float = 60.0) -> None:
        self.store_id = store_id  # written on every visit, stay and footfall row (figures per store)
        self.figures: Counter[str] = Counter() if figures is None else figures
        self.bounce_s = bounce_s
        self._tz = ZoneInfo(timezone)
        # (day, zone) -> [visits, dwell s, ended, bounces]; (day, hour, zone) -> visits. Flushed at each tick.
        self._anonymous: defaultdict[tuple[str, str], list[float]] = defaultdict(_zero_counts)
        self._anonymous_hours: Counter[tuple[str, int, str]] = Counter()
        # An anonymous identity's open visit: its day, and the zones it entered (consecutive repeats once).
        self._anonymous_open: dict[str, tuple[str, list[str]]] = {}
        self._open_stays: dict[tuple[int, str], int] = {}
        self._open_visits: dict[int, int] = {}
        self._visit_zones: dict[int, list[str]] = {}  # the open visit's zones, as written to its row
        # One person may carry several identities: their keys per profile's visit and stay.
        self._visit_keys: dict[int, dict[str, float]] = {}
        self._zone_keys: dict[tuple[int, str | None], dict[str, float]] = {}
        self._visit_began: dict[int, float] = {}

    def per_profile(self, events: Iterable[PresenceEvent], profile_of: ProfileOf) -> list[tuple[PresenceEvent, int]]:
        """The events that are a profile's (merged over its identities), in order; the others are counted as
        anonymous footfall."""
        known: list[tuple[PresenceEvent, int]] = []
        for ev in events:
            pid = profile_of(ev.key)
            if pid is not None:
                if ev.kind == "visit_end":
                    self._anonymous_open.pop(ev.key, None)  # enrolled mid-visit: no anonymous visit to end
                merged = self._merge(ev, pid)
                if merged is not None:
                    known.append((merged, pid))
            elif ev.kind != "dwell":
                self._count_anonymous(ev)  # footfall only: counts per day, hour and zone, no identity
        return known

    def _merge(self, ev: PresenceEvent, pid: int) -> PresenceEvent | None:
        """One visit and one stay per zone per profile, however many identities it is seen by.

        The first identity to start a visit (enter a zone) opens it for the profile, the last one to end
        it closes it; dwell comes from the identity that entered first. None: not an event for the profile.
        """
        if ev.kind in ("visit_start", "visit_end"):
            keys = self._visit_keys.setdefault(pid, {})
            if ev.kind == "visit_start":
                first = not keys or list(keys) == [ev.key]  # the same identity again: its new visit
                keys[ev.key] = ev.visit_since if ev.visit_since is not None else ev.time
                if first:
                    self._visit_began[pid] = keys[ev.key]
                return ev if first else None
            for (p, _), stay in list(self._zone_keys.items()):  # stays this identity never exited
                if p == pid and stay.pop(ev.key, None) is not None and not stay:
                    del self._zone_keys[(p, _)]
            if keys.pop(ev.key, None) is None or keys:
                if not keys:
                    del self._visit_keys[pid]
                return None
            del self._visit_keys[pid]
            since = self._visit_began.pop(pid, None)  # the profile's visit began with its first identity
            if since is None or since == ev.visit_since:
                return ev
            return dataclasses.replace(ev, visit_since=since, dwell_s=max(0.0, ev.time - since))
        if ev.kind == "enter":
            stay = self._zone_keys.setdefault((pid, ev.zone), {})
            first = not stay or ev.key in stay  # the same identity again: its new stay (it missed an exit)
            stay[ev.key] = ev.zone_since if ev.zone_since is not None else ev.time
            return ev if first else None
        stay = self._zone_keys.get((pid, ev.zone), {})
        if ev.kind == "exit":
            if stay.pop(ev.key, None) is None or stay:
                return None
            del self._zone_keys[(pid, ev.zone)]
            return ev
        return ev if next(iter(stay), None) == ev.key else None  # dwell: the identity that entered first

    def record(self, conn: Connection, known: Sequence[tuple[PresenceEvent, int]]) -> None:
        """The profiles' visits and zone stays, as Core statements on ``conn`` (no ORM objects to load or
        flush). The open visit's zones are remembered here, so an enter appends to them without reading the
        row. Written before the engine judges the events: it reads visit history as of each event's time."""
        for ev, pid in known:
            if ev.kind != "dwell":  # a dwell tick writes nothing
                self._record(conn, ev, pid)

    def _record(self, c: Connection, ev: PresenceEvent, pid: int) -> None:
        if ev.kind == "visit_start":
            before = c.scalar(_HAS_VISIT, {"pid": pid, "store": self.store_id}) is not None  # new here, as figures
            self.figures["visits_returning" if before else "visits_new"] += 1
            vid = c.execute(_NEW_VISIT, {"profile_id": pid, "started_at": ev.time, "zones": [],
                                          "store_id": self.store_id}).scalar_one()
            self._open_visits[pid] = vid
            self._visit_zones[pid] = []
        elif ev.kind == "enter":
            open_vid = self._open_visits.get(pid)
            zones = self._visit_zones.get(pid) if open_vid is not None else None
            current = open_vid
            if zones is not None and ev.zone and (not zones or zones[-1] != ev.zone):
                zones.append(ev.zone)
                done = c.execute(_VISIT_ZONES, {"vid": open_vid, "zones": list(zones)})
                if not done.rowcount:
                    current = None  # the visit is gone (erased): the stay belongs to no visit
            if ev.zone:
                self._open_stays[(pid, ev.zone)] = c.execute(_NEW_STAY, {
                    "profile_id": pid, "visit_id": current, "zone": ev.zone, "entered_at": ev.time,
                    "store_id": self.store_id}).scalar_one()
        elif ev.kind == "exit":
            sid = self._open_stays.pop((pid, ev.zone or ""), None)
            if sid is not None:
                c.execute(_STAY_EXIT, {"sid": sid, "at": ev.time})
        elif ev.kind == "visit_end":
            vid = self._open_visits.pop(pid, None)
            self._visit_zones.pop(pid, None)
            if vid is not None:
                c.execute(_VISIT_END, {"vid": vid, "at": ev.time})

    def _day_hour(self, t: float) -> tuple[str, int]:
        """The local day of ``t`` and its hour counted from that day's midnight (FootfallHour.hour)."""
        local = dt.datetime.fromtimestamp(t, self._tz)
        midnight = dt.datetime.combine(local.date(), dt.time(0), self._tz).timestamp()
        return local.date().isoformat(), int((t - midnight) // 3600)

    def _count_anonymous(self, ev: PresenceEvent) -> None:
        """A visit counts in its day and hour when it starts, its bounce (to the day it started) when it
        ends; a zone stay counts, with its dwell and bounce, when it ends."""
        if ev.kind == "visit_start":
            day, hour = self._day_hour(ev.time)
            self.figures["anonymous_visits"] += 1
            self._anonymous[(day, "")][0] += 1
            self._anonymous_hours[(day, hour, "")] += 1
            self._anonymous_open[ev.key] = (day, [])
        elif ev.kind == "enter":
            zones = self._anonymous_open.get(ev.key)
            if zones is not None and ev.zone and (not zones[1] or zones[1][-1] != ev.zone):
                zones[1].append(ev.zone)
        elif ev.kind == "visit_end":
            opened = self._anonymous_open.pop(ev.key, None)  # None: began before this process, not judged
            if opened is not None:
                acc = self._anonymous[(opened[0], "")]
                acc[2] += 1
                if len(opened[1]) <= 1 and ev.dwell_s < self.bounce_s:
                    acc[3] += 1
        elif ev.kind == "exit" and ev.zone:
            day, hour = self._day_hour(ev.time)
            acc = self._anonymous[(day, ev.zone)]
            acc[0] += 1
            acc[1] += ev.dwell_s
            acc[2] += 1
            if ev.dwell_s < self.bounce_s:
                acc[3] += 1
            self._anonymous_hours[(day, hour, ev.zone)] += 1

    def flush_footfall(self, engine: Engine) -> None:
        """Anonymous counts go to the database in one small transaction per tick, not per advert: one upsert
        per table (the counts are added to the day's and the hour's rows) on a bare connection."""
        if not self._anonymous and not self._anonymous_hours:
            return
        pending, self._anonymous = self._anonymous, defaultdict(_zero_counts)
        hours, self._anonymous_hours = self._anonymous_hours, Counter()
        rows = [{"store_id": self.store_id, "day": day, "zone": zone, "anonymous_visits": int(visits),
                 "anonymous_dwell_s": dwell, "anonymous_ended": int(ended), "anonymous_bounces": int(bounces)}
                for (day, zone), (visits, dwell, ended, bounces) in pending.items()]
        hour_rows = [{"store_id": self.store_id, "day": day, "hour": hour, "zone": zone, "anonymous_visits": n}
                     for (day, hour, zone), n in hours.items()]
        with engine.begin() as conn:
            if rows:
                conn.execute(_footfall_upsert(conn.dialect), rows)
            if hour_rows:
                conn.execute(_footfall_upsert(conn.dialect, "footfall_hours"), hour_rows)

    def forget(self, profile_id: int) -> None:
        """An erased (or linked-away) profile: no open visit or stay to write to, no identities to wait for."""
        for per_profile in (self._visit_keys, self._visit_began, self._open_visits, self._visit_zones):
            per_profile.pop(profile_id, None)
        for key in [k for k in self._zone_keys if k[0] == profile_id]:
            del self._zone_keys[key]
        for stay in [k for k in self._open_stays if k[0] == profile_id]:
            del self._open_stays[stay]
