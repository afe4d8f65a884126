"""Trace and labels files: real excerpts read back, bad rows reported by line, and fuzzed input never raising."""

from __future__ import annotations

import importlib.util
import io
import itertools
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beacons.types import Sighting
from gateway.presence.traces import (
    Label,
    TraceError,
    TraceReader,
    TraceWriter,
    open_trace,
    read_labels,
    write_labels,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "datasets"


def datasets_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_datasets", ROOT / "benchmarks" / "datasets.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_datasets"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = datasets_module().build(FIXTURES, tmp_path_factory.mktemp("datasets"))
    return out


def test_real_flat_excerpt_reads_back_with_the_anchors_and_rooms(converted: dict[str, dict[str, str]]) -> None:
    f, reader = open_trace(converted["flat-robot-test"]["trace"], [f"anchor{k}" for k in range(1, 7)])
    with f:
        rows = list(reader)
    assert reader.errors.count == 0
    assert len(rows) == int(converted["flat-robot-test"]["sightings"]) == 3600  # 600 rows x 6 anchors heard
    assert rows[0] == Sighting("tag", "anchor1", -73, 0.0)  # the first row: -72.55 dBm averaged, rounded
    assert {s.receiver for s in rows} == {f"anchor{k}" for k in range(1, 7)}
    with open(converted["flat-robot-test"]["labels"], newline="") as fh:
        labels, errors = read_labels(fh)
    assert errors.count == 0
    # The robot starts in the west room (x 0.6, y 5.8) and crosses into the south rooms at 159.5 s.
    assert labels[0] == Label("tag", 0.0, 159.5, "west")
    assert [lb.zone for lb in labels[:3]] == ["west", "south", "south-east"]


def test_real_hall_excerpt_crosses_from_one_area_to_the_next(converted: dict[str, dict[str, str]]) -> None:
    with open(converted["hall-straight-04"]["labels"], newline="") as fh:
        labels, _ = read_labels(fh)
    assert [lb.zone for lb in labels] == ["area-4", "area-1"]
    f, reader = open_trace(converted["hall-straight-04"]["trace"])
    with f:
        rows = list(reader)
    assert len(rows) == 558 and all(-127 <= s.rssi <= 0 for s in rows)
    assert all(a.time <= b.time for a, b in itertools.pairwise(rows))


def test_bad_rows_are_counted_with_their_line_numbers_and_good_rows_still_come() -> None:
    text = ("time,receiver,beacon,rssi,tx_power\n"
            "1.0,rx1,tag,-60,-59\n"       # 2: good
            "abc,rx1,tag,-60,\n"          # 3: time
            "2.0,rx1,tag,-60.5,\n"        # 4: rssi not an integer
            "2.0,rx1,tag,127,\n"          # 5: rssi "unavailable"
            "2.0,rx1,tag\n"               # 6: columns
            "\n"                          # 7: blank: skipped, not an error
            "3.0,rx9,tag,-70,\n"          # 8: unknown receiver
            "3.0,,tag,-70,\n"             # 9: empty receiver
            "nan,rx1,tag,-70,\n"          # 10: not finite
            "4.0,rx1,tag,-70\n")          # 11: good (tx_power may be left off)
    reader = TraceReader(io.StringIO(text), "t.csv", receivers=["rx1"])
    rows = list(reader)
    assert rows == [Sighting("tag", "rx1", -60, 1.0, -59), Sighting("tag", "rx1", -70, 4.0, None)]
    assert reader.errors.count == 7
    assert [n for n, _ in reader.errors.first] == [3, 4, 5, 6, 8, 9, 10]
    report = reader.errors.report()
    assert "t.csv line 4: rssi '-60.5' is not an integer dBm" in report
    assert "t.csv line 8: receiver 'rx9' is not in the config's [[receivers]]" in report


def test_a_wrong_header_is_an_error_at_line_one() -> None:
    with pytest.raises(TraceError, match=r"t.csv line 1: expected the header time,receiver,beacon,rssi\[,tx_power\]"):
        TraceReader(io.StringIO("t,rx,key,rssi\n1,a,b,-50\n"), "t.csv")
    with pytest.raises(TraceError, match="got nothing"):
        TraceReader(io.StringIO(""), "t.csv")


def test_labels_empty_zone_is_no_zone_and_overlaps_are_bad_rows() -> None:
    text = "beacon,start,end,zone\nb,0,10,shoes\nb,10,20,\nb,15,30,till\nb,40,30,x\nc,0,5,shoes\n"
    labels, errors = read_labels(io.StringIO(text), "l.csv")
    assert labels == [Label("b", 0.0, 10.0, "shoes"), Label("b", 10.0, 20.0, None), Label("c", 0.0, 5.0, "shoes")]
    assert [n for n, _ in errors.first] == [5, 4]  # the reversed one is found reading, the overlap after sorting
    assert "l.csv line 4: overlaps the label of 'b' ending at 20" in errors.report()


keys = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r\n"), min_size=1,
               max_size=12).filter(lambda s: s.strip() == s)
sightings = st.builds(Sighting, keys, keys, st.integers(-127, 20),
                      st.floats(-1e9, 1e9, allow_nan=False, allow_infinity=False),
                      st.none() | st.integers(-127, 20))


@settings(max_examples=200, deadline=None)
@given(st.lists(sightings, max_size=30))
def test_what_the_writer_writes_the_reader_reads_back(rows: list[Sighting]) -> None:
    buf = io.StringIO()
    TraceWriter(buf, tx_power=True).write_many(rows)
    buf.seek(0)
    reader = TraceReader(buf)
    assert list(reader) == rows and reader.errors.count == 0


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_any_text_after_a_header_is_rows_or_counted_bad_rows_never_an_exception(body: str) -> None:
    reader = TraceReader(io.StringIO("time,receiver,beacon,rssi\n" + body), "fuzz.csv")
    for s in reader:
        assert math.isfinite(s.time) and -127 <= s.rssi <= 20 and s.key and s.receiver
    assert all(n >= 2 for n, _ in reader.errors.first)
    labels, _errors = read_labels(io.StringIO("beacon,start,end,zone\n" + body), "fuzz.csv")
    assert all(lb.end > lb.start for lb in labels)


def test_labels_round_trip() -> None:
    labels = [Label("a", 0.0, 1.5, "shoes"), Label("a", 1.5, 9.25, None)]
    buf = io.StringIO()
    write_labels(buf, labels)
    buf.seek(0)
    got, errors = read_labels(buf)
    assert got == labels and errors.count == 0
