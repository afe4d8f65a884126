"""Recording sightings: hourly files readable by replay, unknown identities only as a per-file salted hash."""

from __future__ import annotations

import calendar
from pathlib import Path

from beacons.types import Sighting
from gateway.presence.record import ANON, TraceRecorder, hour_name
from gateway.presence.traces import open_trace

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
