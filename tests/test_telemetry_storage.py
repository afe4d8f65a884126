"""Telemetry storage on SQLite and PostgreSQL: exactly-once readings, rollups, profiles, the unknown-device
policy, online/offline, dead letters, retention, and an owner's readings going with the owner."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, func, select, text

from devices.payloads import DeviceEvent, DeviceStatus, Reading, Rejected, TelemetryBatch
from devices.profiles import OUT_OF_RANGE, UNKNOWN_METRIC, parse_profiles
from gateway.storage.db import Database
from gateway.storage.models import (
    DeadLetter,
    Device,
    DeviceEventRecord,
    Profile,
    ReadingRecord,
    ReadingRollup,
)
from gateway.telemetry.store import QUARANTINED, UNKNOWN_DEVICE, TelemetrySettings, TelemetryStore

T0 = 1_767_261_600.0  # 2026-01-01 10:00:00 UTC, on a minute and an hour boundary
PROFILES = parse_profiles([{
    "id": "robot_mower", "reporting_interval_s": 60, "offline_after_intervals": 3,
    "metrics": {"blade_hours": {"unit": "h", "min": 0, "max": 100000},
                "battery_pct": {"unit": "%", "min": 0, "max": 100}}}])


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.upgrade()
    yield database
    database.dispose()


def store(**settings: Any) -> TelemetryStore:
    return TelemetryStore(TelemetrySettings(**settings), PROFILES)


def mower(device_id: str = "mower-1", kind: str = "robot_mower") -> Device:
    return Device(id=device_id, kind=kind, state={}, quarantined=False)


def reading(t: float, seq: int | None = None, device: str = "mower-1", **metrics: float) -> Reading:
    return Reading(device, "s1", t, {k: float(v) for k, v in (metrics or {"blade_hours": 1.0}).items()}, seq)


def write(db: Database, ts: TelemetryStore, batch: TelemetryBatch, now: float = T0 + 3600) -> list[Reading]:
    with db.session() as s:
        return ts.write(s, batch, now)


def add(db: Database, *rows: Any) -> None:
    with db.session() as s:
        s.add_all(rows)


def count(db: Database, model: Any) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_a_batch_is_stored_once_and_a_redelivery_is_a_counted_duplicate(db: Database) -> None:
    add(db, mower())
    ts = store()
    batch = TelemetryBatch(readings=[reading(T0 + i, seq=i, blade_hours=10 + i) for i in range(50)])
    fresh = write(db, ts, batch)
    assert [r.seq for r in fresh] == list(range(50))

    # The broker redelivers the same messages (no ack reached it) plus two new ones.
    again = TelemetryBatch(readings=[*batch.readings, reading(T0 + 50, seq=50), reading(T0 + 50, seq=51)])
    fresh = write(db, ts, again)
    assert [r.seq for r in fresh] == [50, 51]  # same ts, different seq: two readings
    assert ts.stats()["accepted"] == 52 and ts.stats()["duplicates"] == 50
    with db.session() as s:
        keys = s.scalars(select(ReadingRecord.key).order_by(ReadingRecord.id)).all()
        assert keys == [f"s{i}" for i in range(52)]
        d = s.get(Device, "mower-1")
        assert d is not None and d.last_seen == T0 + 50 and d.online is True and d.state == {"blade_hours": 1.0}

    # Without a seq the timestamp is the key.
    write(db, ts, TelemetryBatch(readings=[reading(T0 + 100), reading(T0 + 100)]))
    assert count(db, ReadingRecord) == 53


def test_a_large_batch_with_redeliveries_scattered_through_it_stores_each_reading_once(db: Database) -> None:
    """Thousands of readings go in several multi-row INSERTs: the stored ones come back from each, so the
    redeliveries among them (anywhere in the batch) are counted and reach neither rollups nor rules."""
    add(db, mower("mower-1"), mower("mower-2"))
    ts = store()
    first = [reading(T0 + i, seq=i, device=f"mower-{1 + i % 2}", blade_hours=i) for i in range(0, 2400, 3)]
    assert len(write(db, ts, TelemetryBatch(readings=first))) == 800
    batch = [reading(T0 + i, seq=i, device=f"mower-{1 + i % 2}", blade_hours=i) for i in range(2400)]
    fresh = write(db, ts, TelemetryBatch(readings=batch))
    assert sorted(r.seq for r in fresh if r.seq is not None) == [i for i in range(2400) if i % 3]
    assert ts.stats()["accepted"] == 2400 and ts.stats()["duplicates"] == 800
    assert count(db, ReadingRecord) == 2400
    with db.session() as s:
        minutes = s.execute(select(func.sum(ReadingRollup.count), func.sum(ReadingRollup.sum))
                            .where(ReadingRollup.period == 60)).one()
        assert minutes == (2400, sum(range(2400)))  # every reading once, redeliveries not folded again
        stored = s.scalars(select(ReadingRecord.metrics).where(ReadingRecord.key == "s1234")).one()
        assert stored == {"blade_hours": 1234.0}


def test_a_redelivery_inside_the_same_batch_counts_once(db: Database) -> None:
    add(db, mower())
    ts = store()
    r = reading(T0, seq=7, battery_pct=40)
    fresh = write(db, ts, TelemetryBatch(readings=[r, reading(T0 + 1, seq=8), r]))
    assert [x.seq for x in fresh] == [7, 8]  # the rules see it once
    assert ts.stats()["accepted"] == 2 and ts.stats()["duplicates"] == 1
    with db.session() as s:
        [minute] = s.scalars(select(ReadingRollup).where(ReadingRollup.metric == "battery_pct",
                                                         ReadingRollup.period == 60)).all()
        assert minute.count == 1 and minute.sum == 40


def test_one_batch_is_one_transaction(db: Database) -> None:
    add(db, mower(), mower("mower-2"))
    ts = store()
    commits: list[int] = []
    event.listen(db.engine, "commit", lambda conn: commits.append(1))
    readings = [reading(T0 + i, seq=i, device=f"mower-{1 + i % 2}") for i in range(200)]
    write(db, ts, TelemetryBatch(readings=readings, rejects=[Rejected("t", "not_json", "x", b"{", T0)]))
    assert len(commits) == 1
    assert count(db, ReadingRecord) == 200 and count(db, DeadLetter) == 1


def test_rollups_fold_count_min_max_mean_last_per_minute_and_hour_across_batches(db: Database) -> None:
    add(db, mower())
    ts = store()
    values = [5.0, 9.0, 1.0, 7.0]  # at T0, +20 s, +40 s (minute 0) and +70 s (minute 1)
    times = [T0, T0 + 20, T0 + 40, T0 + 70]
    write(db, ts, TelemetryBatch(readings=[reading(t, seq=i, battery_pct=v) for i, (t, v) in
                                           enumerate(zip(times[:2], values[:2], strict=True))]))
    write(db, ts, TelemetryBatch(readings=[reading(t, seq=i + 2, battery_pct=v) for i, (t, v) in
                                           enumerate(zip(times[2:], values[2:], strict=True))]))
    with db.session() as s:
        rows = {(r.period, r.start): (r.count, r.sum, r.min, r.max, r.last)
                for r in s.scalars(select(ReadingRollup).where(ReadingRollup.metric == "battery_pct"))}
    assert rows == {(60, T0): (3, 15.0, 1.0, 9.0, 1.0), (60, T0 + 60): (1, 7.0, 7.0, 7.0, 7.0),
                    (3600, T0): (4, 22.0, 1.0, 9.0, 7.0)}


def test_out_of_profile_messages_are_dead_lettered_with_the_reason_and_the_rest_is_stored(db: Database) -> None:
    add(db, mower())
    ts = store()
    fresh = write(db, ts, TelemetryBatch(prefix="acme/stores", readings=[
        reading(T0, seq=1, battery_pct=50), reading(T0 + 1, seq=2, battery_pct=140),
        reading(T0 + 2, seq=3, rpm=1200), reading(T0 + 3, seq=4, battery_pct=60)]))
    assert [r.seq for r in fresh] == [1, 4]
    with db.session() as s:
        dead = s.scalars(select(DeadLetter).order_by(DeadLetter.id)).all()
        assert [(d.reason, d.topic, d.device_id) for d in dead] == [
            (OUT_OF_RANGE, "acme/stores/s1/devices/mower-1/telemetry", "mower-1"),
            (UNKNOWN_METRIC, "acme/stores/s1/devices/mower-1/telemetry", "mower-1")]
        assert "battery_pct=140" in (dead[0].detail or "") and b'"battery_pct":140.0' in (dead[0].payload or b"")
    assert ts.stats()["dead_lettered"] == {OUT_OF_RANGE: 1, UNKNOWN_METRIC: 1}


@pytest.mark.parametrize("policy", ["reject", "quarantine", "accept"])
def test_the_unknown_device_policy(db: Database, policy: str) -> None:
    ts = store(unknown_policy=policy)
    fresh = write(db, ts, TelemetryBatch(readings=[reading(T0, seq=1, device="stranger")],
                                         statuses=[DeviceStatus("stranger", "s1", T0, True, "1.0")]))
    with db.session() as s:
        d = s.get(Device, "stranger")
        reasons = s.scalars(select(DeadLetter.reason)).all()
        if policy == "reject":
            assert d is None and fresh == [] and reasons == [UNKNOWN_DEVICE, UNKNOWN_DEVICE]
        elif policy == "quarantine":
            assert d is not None and d.quarantined and fresh == [] and reasons == [QUARANTINED, QUARANTINED]
            assert s.scalar(select(func.count()).select_from(ReadingRecord)) == 0
        else:
            assert d is not None and not d.quarantined and len(fresh) == 1 and reasons == []
            assert d.firmware == "1.0" and d.store_id == "s1" and d.registered_at == T0 + 3600


def test_status_messages_and_missed_intervals_make_a_device_online_or_offline(db: Database) -> None:
    add(db, mower(), Device(id="hub-1", kind="hub", state={}, quarantined=False))
    ts = store(offline_after_s=600)
    write(db, ts, TelemetryBatch(statuses=[DeviceStatus("mower-1", "s1", T0, False, "2.4.1")]))
    with db.session() as s:
        d = s.get(Device, "mower-1")
        assert d is not None and d.online is False and d.firmware == "2.4.1" and d.status_at == T0
    write(db, ts, TelemetryBatch(readings=[reading(T0 + 10, seq=1), reading(T0 + 10, seq=1, device="hub-1")]))
    with db.session() as s:
        assert s.get(Device, "mower-1").online is True  # type: ignore[union-attr]
        # The mower's profile: 3 x 60 s; the hub has none: offline_after_s (600 s).
        assert ts.sweep_offline(s, T0 + 10 + 179) == []
        assert ts.sweep_offline(s, T0 + 10 + 181) == ["mower-1"]
    with db.session() as s:
        assert ts.sweep_offline(s, T0 + 10 + 601) == ["hub-1"]
        assert [d.online for d in s.scalars(select(Device).order_by(Device.id))] == [False, False]


def test_events_are_stored_once(db: Database) -> None:
    add(db, mower())
    ts = store()
    e = DeviceEvent("mower-1", "s1", T0, "error", "E42", {"blade": "stuck"})
    write(db, ts, TelemetryBatch(events=[e]))
    write(db, ts, TelemetryBatch(events=[e]))
    with db.session() as s:
        rows = s.scalars(select(DeviceEventRecord)).all()
        assert [(r.type, r.code, r.data) for r in rows] == [("error", "E42", {"blade": "stuck"})]
    assert ts.stats()["duplicates"] == 1


def test_retention_purges_raw_readings_rollups_and_dead_letters(db: Database) -> None:
    add(db, mower())
    day = 86400.0
    ts = store(raw_retention_s=2 * day, minute_retention_s=1 * day, hour_retention_s=5 * day,
               dead_letter_retention_s=1 * day)
    write(db, ts, TelemetryBatch(readings=[reading(T0, seq=1), reading(T0 + 3 * day, seq=2)],
                                 rejects=[Rejected("t", "not_json", "", b"", T0)]), now=T0)
    with db.session() as s:
        ts.purge(s, T0 + 3 * day + 1)
    with db.session() as s:
        assert s.scalars(select(ReadingRecord.key)).all() == ["s2"]
        assert sorted((r.period, r.start) for r in s.scalars(select(ReadingRollup))) == [
            (60, T0 + 3 * day), (3600, T0), (3600, T0 + 3 * day)]
        assert s.scalar(select(func.count()).select_from(DeadLetter)) == 0


def test_a_new_device_gets_its_enrolled_owner_and_erasure_takes_its_readings(db: Database) -> None:
    add(db, Profile(id=7, created_at=T0), Profile(id=8, created_at=T0))
    ts = TelemetryStore(TelemetrySettings(), PROFILES, owner_of={"watch-7": 7, "watch-8": 8}.get)
    write(db, ts, TelemetryBatch(
        readings=[reading(T0, seq=1, device="watch-7", steps=10), reading(T0, seq=1, device="watch-8", steps=5)],
        events=[DeviceEvent("watch-7", "s1", T0, "button"), DeviceEvent("watch-8", "s1", T0, "button")]))
    with db.session() as s:
        assert {d.id: d.profile_id for d in s.scalars(select(Device))} == {"watch-7": 7, "watch-8": 8}
    with db.engine.begin() as conn:
        conn.execute(text("DELETE FROM profiles WHERE id = 7"))
    with db.session() as s:
        for model in (ReadingRecord, ReadingRollup, DeviceEventRecord):
            assert set(s.scalars(select(model.device_id)).all()) == {"watch-8"}, model.__tablename__
        assert s.get(Device, "watch-7").profile_id is None  # type: ignore[union-attr]  # kept, nobody's


class Boom(Exception):
    """Raised inside the session to roll it back, as a failed commit or a failing rule would."""


def test_counters_move_only_when_the_batch_commits(db: Database) -> None:
    """A batch whose transaction rolls back counts nothing (accepted, duplicates, dead letters...); its retry
    counts once. Counted before the commit, every retry of a held batch would add to them again."""
    add(db, mower())
    ts = store()
    batch = TelemetryBatch(readings=[reading(T0, seq=1), reading(T0 + 1, seq=2, battery_pct=140)],
                           statuses=[DeviceStatus("new-1", "s1", T0, True)],
                           events=[DeviceEvent("mower-1", "s1", T0, "error", "E1")],
                           rejects=[Rejected("t", "not_json", "x", b"{", T0)])
    for _ in range(3):
        with pytest.raises(Boom), db.session() as s:
            ts.write(s, batch, T0 + 60)
            raise Boom
    assert ts.stats() == store().stats()  # all zero, as a store that never wrote
    assert count(db, DeadLetter) == 0 and count(db, ReadingRecord) == 0
    write(db, ts, batch)
    stats = ts.stats()
    assert stats["dead_lettered"] == {"not_json": 1, OUT_OF_RANGE: 1} and stats["dead_lettered_total"] == 2
    assert {k: stats[k] for k in ("accepted", "duplicates", "statuses", "events", "registered")} == {
        "accepted": 1, "duplicates": 0, "statuses": 1, "events": 1, "registered": 1}
    assert count(db, DeadLetter) == 2 and count(db, ReadingRecord) == 1

    with pytest.raises(Boom), db.session() as s:  # the timers' counts wait for their commit too
        assert ts.sweep_offline(s, T0 + 10_000) == ["mower-1"]
        assert ts.purge(s, T0 + 400 * 86400.0) > 0
        raise Boom
    assert (ts.stats()["went_offline"], ts.stats()["purged"]) == (0, 0)
    with db.session() as s:
        assert ts.sweep_offline(s, T0 + 10_000) == ["mower-1"]
    assert ts.stats()["went_offline"] == 1


def test_a_dead_letter_holding_anything_is_stored(db: Database) -> None:
    """Whatever a reject carries (NUL, lone surrogates, control characters, an over-long topic or device id,
    binary payload), its row commits: escaped and cut to the columns, the payload kept as bytes."""
    topic = "stores/s\x00/devices/\ud800" + "x" * 600 + "/telemetry"
    payload = b"\x00\xff\xfe" * 1000
    ts = store()
    write(db, ts, TelemetryBatch(rejects=[Rejected(topic, "internal_error", "boom \x00 \ud800 \x1b[2J", payload, T0,
                                                   "d\x00" + "x" * 200)]))
    with db.session() as s:
        [row] = s.scalars(select(DeadLetter)).all()
    assert row.topic == ("stores/s\\x00/devices/\\ud800" + "x" * 600)[:512]
    assert row.detail == "boom \\x00 \\ud800 \\x1b[2J"
    assert row.device_id == ("d\\x00" + "x" * 200)[:128]
    assert row.payload == payload[:1024]
    assert ts.stats()["dead_lettered"] == {"internal_error": 1}
