"""Recording sightings: hourly files readable by replay, unknown identities only as a per-file salted hash."""

from __future__ import annotations

import calendar
import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from beacons.encode import ibeacon_payload
from beacons.remote import AppReport, store_beacon_receiver
from beacons.types import Advertisement, Sighting
from gateway.app.cli import main as cli_main
from gateway.app.config import Settings
from gateway.app.runtime import Runtime
from gateway.clock import VirtualClock
from gateway.presence.record import ANON, TraceRecorder, hour_name
from gateway.presence.settings import ReceiverSettings, ZoneBand
from gateway.presence.traces import open_trace
from gateway.presence.tracker import PresenceEvent
from tests.fixtures import RuntimeFactory
from tests.live_gateway import UUID, beacon, enrol, live_settings

T0 = calendar.timegm((2026, 12, 7, 9, 59, 0, 0, 0, 0))  # 09:59 UTC
KNOWN = "ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:1:7"
STRANGER = "aa:bb:cc:dd:ee:ff"


def rows(path: Path) -> list[Sighting]:
    f, reader = open_trace(path)
    with f:
        out = list(reader)
    assert reader.errors.count == 0
    return out


def test_each_hour_is_its_own_file_and_replay_reads_it_back(tmp_path: Path) -> None:
    rec = TraceRecorder(tmp_path, known=lambda k: k == KNOWN)
    rec.write([Sighting(KNOWN, "hci0", -60, T0 + 10.5, -59), Sighting(KNOWN, "hci0", -61, T0 + 70.25, None)])
    rec.write([Sighting(KNOWN, "esp-1", -70, T0 + 30.0)])  # late, from the hour before: stays in 10:00's file
    rec.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace-20261207T09.csv", "trace-20261207T10.csv"]
    assert rows(tmp_path / "trace-20261207T09.csv") == [Sighting(KNOWN, "hci0", -60, T0 + 10.5, -59)]
    assert rows(tmp_path / "trace-20261207T10.csv") == [Sighting(KNOWN, "hci0", -61, T0 + 70.25, None),
                                                        Sighting(KNOWN, "esp-1", -70, T0 + 30.0, None)]


def test_unknown_identities_are_a_salted_hash_stable_in_a_file_and_unlinkable_across_files(tmp_path: Path) -> None:
    rec = TraceRecorder(tmp_path, known=lambda k: k == KNOWN)
    rec.write([Sighting(STRANGER, "hci0", -80, T0 + 1), Sighting(STRANGER, "hci0", -81, T0 + 2),
               Sighting(STRANGER, "hci0", -82, T0 + 120)])
    rec.close()
    first, second = (rows(tmp_path / hour_name(t)) for t in (T0, T0 + 120))
    assert first[0].key == first[1].key and first[0].key.startswith(ANON) and len(first[0].key) == len(ANON) + 16
    assert second[0].key.startswith(ANON) and second[0].key != first[0].key
    for path in tmp_path.iterdir():
        assert "aa:bb" not in path.read_text().lower() and "aabb" not in path.read_text().lower()


def test_a_restart_appends_to_the_hour_without_a_second_header_and_with_a_new_salt(tmp_path: Path) -> None:
    for _ in range(2):
        rec = TraceRecorder(tmp_path, known=lambda k: False)
        rec.write([Sighting(STRANGER, "hci0", -80, T0 + 5)])
        rec.close()
    got = rows(tmp_path / hour_name(T0))
    assert len(got) == 2 and got[0].key != got[1].key
    assert (tmp_path / hour_name(T0)).read_text().count("time,receiver") == 1


def test_purge_deletes_files_past_retention_and_keeps_the_rest(tmp_path: Path) -> None:
    rec = TraceRecorder(tmp_path, known=lambda k: True)
    rec.write([Sighting(KNOWN, "hci0", -60, T0 - 3 * 86400), Sighting(KNOWN, "hci0", -60, T0)])
    (tmp_path / "notes.csv").write_text("mine")
    gone = rec.purge(T0, retention_days=2)
    assert [p.name for p in gone] == ["trace-20261204T09.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.csv", "trace-20261207T09.csv"]
    assert rec.purge(T0 + 1e9, retention_days=0) == []
    rec.close()


# ---------------------------------------------------------------- the recorder in a running gateway

LIVE_T0 = calendar.timegm((2026, 6, 1, 8, 30, 0, 0, 0, 0))  # 08:30 UTC
STORE_BEACON = "ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:9:9"  # the till's fixed beacon, the app ranges it
ADDRESS = "06:AA:BB:CC:DD:EE"  # the unknown tag's address: never in a recording


def two_zone_settings(tmp: Path, record: Path, retention_days: float = 395.0) -> Settings:
    s = live_settings(tmp, campaigns="")
    s.presence = dataclasses.replace(s.presence, record_dir=str(record))
    s.privacy.presence_retention_days = retention_days
    s.receivers = [ReceiverSettings(id="rx-a", zones=[ZoneBand("entrance", 3.0)], measured_power=-59),
                   ReceiverSettings(id="rx-b", zones=[ZoneBand("shoes", 3.0)], measured_power=-59),
                   ReceiverSettings(id=store_beacon_receiver(STORE_BEACON), zones=[ZoneBand("till", 3.0)],
                                    measured_power=-59)]
    return s


def replay_config(tmp: Path, settings: Settings) -> Path:
    """The same receivers and presence settings as a gateway.toml, for `gateway replay`."""
    lines = [f"[presence]\nenter_hold_s = {settings.presence.enter_hold_s}\n"]
    for r in settings.receivers:
        zones = ", ".join(f'{{ name = "{z.name}", max_m = {z.max_m} }}' for z in r.zones)
        lines.append(f'[[receivers]]\nid = "{r.id}"\nzones = [{zones}]\nmeasured_power = {r.measured_power}\n')
    path = tmp / "replay.toml"
    path.write_text("\n".join(lines))
    return path


def adverts(minor: int, address: str, t0: float, seconds: float, loud: str, quiet: str) -> list[Advertisement]:
    """10 Hz adverts of beacon 1:<minor>, heard close by ``loud`` and far by ``quiet``."""
    payload = ibeacon_payload(UUID, 1, minor)
    out = []
    for i in range(int(seconds * 10)):
        t = t0 + i * 0.1
        out += [Advertisement(address, -50, t, loud, payload), Advertisement(address, -88, t + 0.01, quiet, payload)]
    return out


async def feed(rt: Runtime, stream: list[Advertisement]) -> None:
    """Adverts through the runtime's scanner door in quarter-second drains (as `gateway replay` drains)."""
    stream = sorted(stream, key=lambda a: a.time)
    while stream:
        end = (stream[0].time // 0.25 + 1) * 0.25
        n = next((i for i, a in enumerate(stream) if a.time >= end), len(stream))
        rt.inject(stream[:n])
        stream = stream[n:]
        await rt.flush()


def spy_events(rt: Runtime) -> list[PresenceEvent]:
    """Every presence event the live pipeline handles (its own handle_presence, called through)."""
    seen: list[PresenceEvent] = []
    real = rt.pipeline.handle_presence

    def handle(events: Sequence[PresenceEvent]) -> list[int]:
        seen.extend(events)
        return real(events)

    rt.pipeline.handle_presence = handle  # type: ignore[method-assign]
    return seen


def replayed(capsys: pytest.CaptureFixture[str], trace: Path, config: Path) -> list[dict[str, Any]]:
    assert cli_main(["replay", str(trace), "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert "bad rows" not in err, err
    return [json.loads(line) for line in out.splitlines()]


def enters(events: Iterable[tuple[str, str | None, float | None]]) -> list[tuple[str, str | None, float]]:
    return sorted((key, zone, round(since or 0.0, 3)) for key, zone, since in events)


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(LIVE_T0)


async def test_a_live_run_is_recorded_and_replay_reproduces_its_enters(
        tmp_path: Path, runtime_factory: RuntimeFactory, clock: VirtualClock,
        capsys: pytest.CaptureFixture[str]) -> None:
    record = tmp_path / "traces"
    settings = two_zone_settings(tmp_path, record)
    rt = await runtime_factory(settings)
    pid, _ = enrol(rt, "alice", 1)
    live = spy_events(rt)
    t = LIVE_T0 + 1
    await feed(rt, [*adverts(1, "02:00:00:00:00:01", t, 4, "rx-a", "rx-b"),
                    *adverts(1, "02:00:00:00:00:01", t + 4, 4, "rx-b", "rx-a"),
                    *adverts(900, ADDRESS, t + 1, 6, "rx-b", "rx-a")])
    clock.set(t + 12)
    rt.report_sightings(pid, [AppReport(STORE_BEACON, -50, time=t + 8 + i * 0.1) for i in range(40)])
    await rt.flush()
    await runtime_factory.stop(rt)  # stopping flushes the file

    [trace] = sorted(record.iterdir())
    assert trace.name == "trace-20260601T08.csv"
    text = trace.read_text()
    assert ADDRESS.lower() not in text.lower() and "aa:bb:cc" not in text.lower()
    assert beacon(900) not in text  # the unknown tag only as an alias
    assert beacon(1) in text and f"app:{pid}" in text  # enrolled identities as `gateway decode` names them
    anon = {row.key for row in rows(trace) if row.key.startswith(ANON)}
    assert len(anon) == 1  # one unknown tag: one alias in the file
    [alias] = anon

    events = replayed(capsys, trace, replay_config(tmp_path, settings))
    alias_of = {beacon(1): beacon(1), f"app:{pid}": f"app:{pid}", beacon(900): alias}
    live_enters = enters((alias_of[e.key], e.zone, e.zone_since) for e in live if e.kind == "enter")
    assert {z for _, z, _ in live_enters} == {"entrance", "shoes", "till"}  # the walk made every kind of enter
    assert enters((e["beacon"], e["zone"], e["since"]) for e in events if e["event"] == "enter") == live_enters


async def test_files_rotate_at_the_hour_and_an_unknown_tag_has_another_alias_in_each(
        tmp_path: Path, runtime_factory: RuntimeFactory, clock: VirtualClock) -> None:
    record = tmp_path / "traces"
    rt = await runtime_factory(two_zone_settings(tmp_path, record))
    enrol(rt, "alice", 1)
    top = LIVE_T0 + 1800.0  # 09:00:00
    clock.set(top - 5)
    await feed(rt, [*adverts(900, ADDRESS, top - 3, 2, "rx-a", "rx-b"), *adverts(1, "02:00:00:00:00:01", top - 3, 2,
                                                                                 "rx-a", "rx-b")])
    rt.tick()
    await rt.flush()
    first = record / "trace-20260601T08.csv"
    assert rows(first), "the tick flushes what the drains buffered"
    clock.set(top + 5)
    await feed(rt, [*adverts(900, ADDRESS, top + 1, 2, "rx-b", "rx-a"), *adverts(1, "02:00:00:00:00:01", top + 1, 2,
                                                                                 "rx-b", "rx-a")])
    await runtime_factory.stop(rt)
    second = record / "trace-20260601T09.csv"
    assert sorted(p.name for p in record.iterdir()) == [first.name, second.name]
    before, after = rows(first), rows(second)
    assert all(r.time < top for r in before) and all(r.time >= top for r in after)
    anon_before = {r.key for r in before if r.key.startswith(ANON)}
    anon_after = {r.key for r in after if r.key.startswith(ANON)}
    assert len(anon_before) == len(anon_after) == 1 and anon_before != anon_after  # unlinkable across files
    assert beacon(1) in {r.key for r in before} & {r.key for r in after}  # the enrolled key in both
    for path in (first, second):
        assert ADDRESS.lower() not in path.read_text().lower() and beacon(900) not in path.read_text()


async def test_trace_files_past_retention_go_at_start_and_with_the_hourly_purge(
        tmp_path: Path, runtime_factory: RuntimeFactory, clock: VirtualClock) -> None:
    record = tmp_path / "traces"
    record.mkdir()
    header = "time,receiver,beacon,rssi,tx_power\n"
    old, edge, recent = (record / hour_name(LIVE_T0 - d * 86400) for d in (40, 29.5, 1))
    for path in (old, edge, recent):
        path.write_text(header)
    rt = await runtime_factory(two_zone_settings(tmp_path, record, retention_days=30))
    assert not old.exists() and edge.exists() and recent.exists()  # at start
    clock.advance(86400)  # a day later the hourly purge (run by the tick) takes the next one
    rt.tick()
    await rt.flush()
    assert not edge.exists() and recent.exists()


async def test_erasure_leaves_no_key_of_the_profile_in_any_trace_file(
        tmp_path: Path, runtime_factory: RuntimeFactory, clock: VirtualClock) -> None:
    record = tmp_path / "traces"
    rt = await runtime_factory(two_zone_settings(tmp_path, record))
    alice, _ = enrol(rt, "alice", 1)
    enrol(rt, "bob", 2)
    top = LIVE_T0 + 1800.0
    await feed(rt, [*adverts(1, "02:00:00:00:00:01", top - 3, 2, "rx-a", "rx-b"),
                    *adverts(2, "02:00:00:00:00:02", top - 3, 2, "rx-a", "rx-b")])
    clock.set(top + 2)
    rt.report_sightings(alice, [AppReport(STORE_BEACON, -50, time=top + 1)])
    await feed(rt, [*adverts(1, "02:00:00:00:00:01", top, 2, "rx-b", "rx-a"),
                    *adverts(2, "02:00:00:00:00:02", top, 2, "rx-b", "rx-a")])
    rt.tick()  # flushes the current file
    await rt.flush()
    counts = {p.name: len(rows(p)) for p in record.iterdir()}
    assert len(counts) == 2

    rt.service.erase_profile(alice)
    await rt.flush()
    await feed(rt, adverts(1, "02:00:00:00:00:01", top + 3, 1, "rx-b", "rx-a"))  # her tag, anonymous now
    await runtime_factory.stop(rt)

    for path in record.iterdir():
        text = path.read_text()
        assert beacon(1) not in text and f"app:{alice}" not in text, path.name
        assert beacon(2) in text  # bob's rows untouched
        assert not list(record.glob(".*"))  # no temporary file left behind
    assert len(rows(record / "trace-20260601T08.csv")) == counts["trace-20260601T08.csv"]  # rows kept, anonymous
    current = rows(record / "trace-20260601T09.csv")
    aliases = {r.key for r in current if r.key.startswith(ANON) and r.receiver.startswith("rx")}
    assert len(aliases) == 1  # in the file being written, rows before and after the erasure share one alias


def test_run_with_an_unwritable_record_dir_exits_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'data_dir = "{tmp_path}"\n[database]\nurl = "sqlite:///{tmp_path}/gw.db"\n'
                   '[api]\nport = 0\n[mqtt]\nenabled = false\n')
    r = subprocess.run([sys.executable, "-m", "gateway.app.cli", "run", "--config", str(cfg), "--no-ble",
                        "--record", str(tmp_path / "a-file" / "traces")], capture_output=True, text=True,
                       timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    [line] = [ln for ln in r.stderr.splitlines() if "record_dir" in ln]
    assert "a-file" in line


def test_a_receiver_id_with_a_comma_or_quote_is_quoted_and_reads_back(tmp_path: Path) -> None:
    rec = TraceRecorder(tmp_path, known=lambda k: True)
    odd = 'till, "north"'
    rec.write([Sighting(KNOWN, odd, -60, T0 + 1.5, -59), Sighting(KNOWN, "hci0", -61, T0 + 2.0)])
    rec.close()
    f, reader = open_trace(tmp_path / hour_name(T0), [odd, "hci0"])
    with f:
        got = list(reader)
    assert reader.errors.count == 0
    assert got == [Sighting(KNOWN, odd, -60, T0 + 1.5, -59), Sighting(KNOWN, "hci0", -61, T0 + 2.0, None)]


def test_a_scrub_anonymises_only_the_gone_keys_and_later_rows_share_their_alias(tmp_path: Path) -> None:
    enrolled = {KNOWN, "ibeacon:other:1:1"}
    rec = TraceRecorder(tmp_path, known=enrolled.__contains__)
    rec.write([Sighting(KNOWN, "hci0", -60, T0 - 3600), Sighting(KNOWN, "hci0", -60, T0),
               Sighting("ibeacon:other:1:1", "hci0", -70, T0 + 1)])
    enrolled.discard(KNOWN)  # erased: the identity index no longer knows it
    assert rec.scrub(lambda k: k not in enrolled) == 2
    rec.write([Sighting(KNOWN, "hci0", -61, T0 + 2)])  # heard again after the erasure: anonymous
    rec.close()
    old, now = rows(tmp_path / hour_name(T0 - 3600)), rows(tmp_path / hour_name(T0))
    assert old[0].key.startswith(ANON)
    assert [r.key for r in now][1] == "ibeacon:other:1:1"
    assert now[0].key.startswith(ANON) and now[0].key == now[2].key  # one alias in the file, before and after
    assert now[0].key != old[0].key  # and another in the closed file: still unlinkable across files
    assert rec.scrub(lambda k: k not in enrolled) == 0  # nothing left to change; files left as they are


async def test_an_erasure_whose_rewrite_failed_is_finished_at_the_next_start(
        tmp_path: Path, runtime_factory: RuntimeFactory, clock: VirtualClock) -> None:
    record = tmp_path / "traces"
    settings = two_zone_settings(tmp_path, record)
    rt = await runtime_factory(settings)
    alice, _ = enrol(rt, "alice", 1)
    top = LIVE_T0 + 1800.0
    await feed(rt, adverts(1, "02:00:00:00:00:01", top - 3, 2, "rx-a", "rx-b"))
    clock.set(top + 2)
    await feed(rt, adverts(1, "02:00:00:00:00:01", top, 1, "rx-b", "rx-a"))  # the 08:00 file is closed now
    assert rt.recorder is not None

    def crash(*_: object) -> int:  # the process dies while the closed files are rewritten
        raise OSError("disk went away")

    rt.recorder.scrub_closed = crash  # type: ignore[method-assign]
    rt.service.erase_profile(alice)
    await rt.flush()
    await runtime_factory.stop(rt)
    closed = record / "trace-20260601T08.csv"
    assert beacon(1) in closed.read_text()  # not done yet
    assert (record / ".scrub-pending").exists()

    await runtime_factory.stop(await runtime_factory(settings))  # the next start finishes it before any input
    for path in record.glob("trace-*.csv"):
        assert beacon(1) not in path.read_text(), path.name
    assert not (record / ".scrub-pending").exists()
