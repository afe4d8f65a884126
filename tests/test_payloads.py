"""Telemetry payload parsing and topic layout: strict, and nothing but PayloadError on bad input."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.payloads import (
    BAD_DEVICE_ID,
    BAD_EVENT,
    BAD_METRIC,
    BAD_SEQ,
    BAD_STATUS,
    BAD_STORE_ID,
    BAD_TS,
    MAX_DATA_DEPTH,
    MAX_MAGNITUDE,
    MAX_PAYLOAD_BYTES,
    MAX_TS,
    MISSING_METRICS,
    NOT_JSON,
    NOT_OBJECT,
    NOT_UTF8,
    TOO_LARGE,
    DeviceEvent,
    DeviceStatus,
    PayloadError,
    Reading,
    parse_event,
    parse_status,
    parse_telemetry,
)
from devices.profiles import (
    NOT_INTEGER,
    OUT_OF_RANGE,
    UNKNOWN_METRIC,
    ProfileError,
    load_profiles,
    parse_profile,
    validate,
)
from devices.topics import (
    TopicParts,
    command_topic,
    gateway_status_topic,
    parse_topic,
    telemetry_filter,
    telemetry_topic,
)
from gateway.storage.models import Device, DeviceEventRecord, ReadingRecord, ReadingRollup

PARTS = TopicParts("store-7", "mower-42", "telemetry")
NOW = 1767261600.0


def test_valid_payload_becomes_reading() -> None:
    payload = b'{"ts": 1767261000.5, "metrics": {"blade_hours": 49.6, "battery_pct": 85}}'
    reading = parse_telemetry(PARTS, payload, NOW)
    assert reading == Reading("mower-42", "store-7", 1767261000.5, {"blade_hours": 49.6, "battery_pct": 85.0})
    assert isinstance(reading.metrics["battery_pct"], float)


def test_ts_defaults_to_received_at() -> None:
    assert parse_telemetry(PARTS, b'{"metrics": {"x": 1}}', NOW).time == NOW
    assert parse_telemetry(PARTS, b'{"ts": null, "metrics": {"x": 1}}', NOW).time == NOW


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe{}", NOT_UTF8),
        (b"not json", NOT_JSON),
        (b"", NOT_JSON),
        (b"[" * 100_000, TOO_LARGE),
        (b"[" * 20_000 + b"]" * 20_000, NOT_JSON),  # nested past the recursion limit
        (b"1" * 5000, NOT_JSON),  # past Python's int digit limit
        (b"[1, 2]", NOT_OBJECT),
        (b'"metrics"', NOT_OBJECT),
        (b"{}", MISSING_METRICS),
        (b'{"metrics": {}}', MISSING_METRICS),
        (b'{"metrics": [1]}', MISSING_METRICS),
        (b'{"metrics": {"x": NaN}}', BAD_METRIC),
        (b'{"metrics": {"x": Infinity}}', BAD_METRIC),
        (b'{"metrics": {"x": 1e999}}', BAD_METRIC),
        (b'{"metrics": {"x": "12"}}', BAD_METRIC),
        (b'{"metrics": {"x": true}}', BAD_METRIC),
        (b'{"metrics": {"x": null}}', BAD_METRIC),
        (b'{"metrics": {"": 1}}', BAD_METRIC),
        (b'{"metrics": {"x": ' + b"9" * 400 + b"}}", BAD_METRIC),  # int too big for a float
        (b'{"ts": "today", "metrics": {"x": 1}}', BAD_TS),
        (b'{"ts": false, "metrics": {"x": 1}}', BAD_TS),
        (b'{"ts": NaN, "metrics": {"x": 1}}', BAD_TS),
    ],
)
def test_bad_payloads_have_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        parse_telemetry(PARTS, payload, NOW)
    assert info.value.reason_code == reason
    assert info.value.message


def test_size_limit_is_inclusive() -> None:
    body = b'{"metrics": {"x": 1}}'
    padded = body + b" " * (MAX_PAYLOAD_BYTES - len(body))
    assert parse_telemetry(PARTS, padded, NOW).metrics == {"x": 1.0}
    with pytest.raises(PayloadError):
        parse_telemetry(PARTS, padded + b" ", NOW)


@given(st.binary(max_size=2048))
def test_arbitrary_bytes_only_raise_payload_error(payload: bytes) -> None:
    try:
        reading = parse_telemetry(PARTS, payload, NOW)
    except PayloadError:
        return
    assert reading.metrics and all(math.isfinite(v) for v in reading.metrics.values())


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = (
    scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=8), scalars, max_size=3)
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "ts": json_values,
            "metrics": json_values | st.dictionaries(st.text(max_size=8), scalars, min_size=1, max_size=4),
            "other": json_values,
        },
    )
)
def test_arbitrary_json_objects_only_raise_payload_error(document: dict[str, object]) -> None:
    payload = json.dumps(document).encode()
    try:
        reading = parse_telemetry(PARTS, payload, NOW)
    except PayloadError:
        return
    assert reading.metrics and all(math.isfinite(v) for v in reading.metrics.values())
    assert math.isfinite(reading.time)


finite = st.floats(-MAX_MAGNITUDE, MAX_MAGNITUDE) | st.integers(-(2**53), 2**53)
names = st.text(st.characters(exclude_categories=["Cc", "Cs"]), min_size=1, max_size=12)


@given(
    st.dictionaries(names, finite, min_size=1, max_size=8),
    st.none() | st.floats(0, MAX_TS, exclude_max=True),
)
def test_valid_documents_round_trip(metrics: dict[str, float], ts: float | None) -> None:
    document: dict[str, object] = {"metrics": metrics}
    if ts is not None:
        document["ts"] = ts
    reading = parse_telemetry(PARTS, json.dumps(document).encode(), NOW)
    assert reading.metrics == {k: float(v) for k, v in metrics.items()}
    assert reading.time == (NOW if ts is None else ts)


def test_topic_layout_round_trips() -> None:
    assert telemetry_filter() == "stores/+/devices/+/telemetry"
    assert telemetry_filter("acme/stores", "s1") == "acme/stores/s1/devices/+/telemetry"
    topic = telemetry_topic("s1", "dev-9")
    assert topic == "stores/s1/devices/dev-9/telemetry"
    assert parse_topic(topic) == TopicParts("s1", "dev-9", "telemetry")
    assert parse_topic("acme/stores/s1/devices/d/events", "acme/stores") == TopicParts("s1", "d", "events")
    assert command_topic("s1", "dev-9") == "stores/s1/devices/dev-9/commands"
    assert gateway_status_topic("s1", "gw-1") == "stores/s1/gateways/gw-1/status"


@pytest.mark.parametrize(
    "topic",
    [
        "stores/s1/devices/d1",
        "stores/s1/devices/d1/telemetry/extra",
        "stores/s1/gateways/d1/status",
        "stores/s1/devices/d1/unknown",
        "stores//devices/d1/telemetry",
        "other/s1/devices/d1/telemetry",
        "storesX/s1/devices/d1/telemetry",
    ],
)
def test_foreign_topics_parse_to_none(topic: str) -> None:
    assert parse_topic(topic) is None


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "x#"])
def test_ids_that_would_change_the_topic_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        telemetry_topic("s1", bad)
    with pytest.raises(ValueError):
        command_topic(bad, "d1")


# -- seq, status, events -----------------------------------------------------------------------------


def test_seq_makes_the_dedup_key_and_ts_is_the_fallback() -> None:
    with_seq = parse_telemetry(PARTS, b'{"ts": 5, "seq": 12, "metrics": {"x": 1}}', NOW)
    without = parse_telemetry(PARTS, b'{"ts": 5.25, "metrics": {"x": 1}}', NOW)
    assert (with_seq.seq, with_seq.key, without.key) == (12, "s12", "t5.25")
    for bad in (b'{"seq": -1, "metrics": {"x": 1}}', b'{"seq": 1.5, "metrics": {"x": 1}}',
                b'{"seq": true, "metrics": {"x": 1}}', b'{"seq": "7", "metrics": {"x": 1}}'):
        with pytest.raises(PayloadError) as exc:
            parse_telemetry(PARTS, bad, NOW)
        assert exc.value.reason_code == BAD_SEQ


@pytest.mark.parametrize(("payload", "online", "firmware"), [
    (b"online", True, None), (b" offline\n", False, None),
    (b'{"state": "online", "firmware": "1.4.2", "ts": 7}', True, "1.4.2")])
def test_status_payloads(payload: bytes, online: bool, firmware: str | None) -> None:
    st_ = parse_status(PARTS._replace(kind="status"), payload, NOW)
    assert (st_.online, st_.firmware, st_.device_id) == (online, firmware, "mower-42")


@pytest.mark.parametrize("payload", [b"sleeping", b'{"state": "up"}', b'{"state": "online", "firmware": ""}',
                                     b"\xff", b"{", b'{"state": "online", "firmware": "' + b"9" * 100 + b'"}'])
def test_bad_status_payloads(payload: bytes) -> None:
    with pytest.raises(PayloadError):
        parse_status(PARTS._replace(kind="status"), payload, NOW)
    try:
        parse_status(PARTS._replace(kind="status"), payload, NOW)
    except PayloadError as exc:
        assert exc.reason_code in (BAD_STATUS, NOT_UTF8, NOT_JSON)


def test_events() -> None:
    ev = parse_event(PARTS, b'{"ts": 9, "type": "error", "code": "E42", "data": {"motor": "stalled"}}', NOW)
    assert (ev.time, ev.type, ev.code, ev.data) == (9.0, "error", "E42", {"motor": "stalled"})
    assert parse_event(PARTS, b'{"type": "button"}', NOW).time == NOW
    for bad in (b'{"code": "E1"}', b'{"type": ""}', b'{"type": "e", "data": [1]}', b'{"type": 5.5}'):
        with pytest.raises(PayloadError) as exc:
            parse_event(PARTS, bad, NOW)
        assert exc.value.reason_code == BAD_EVENT


@given(st.binary(max_size=200))
def test_status_and_event_parsers_only_raise_payload_error(payload: bytes) -> None:
    for parse in (parse_status, parse_event):
        with contextlib.suppress(PayloadError):
            parse(PARTS, payload, NOW)


# -- device profiles ----------------------------------------------------------------------------------

WATCH = parse_profile({"id": "watch", "metrics": {"steps": {"min": 0, "max": 200000, "integer": True},
                                                  "heart_rate": {"unit": "bpm", "min": 25, "max": 240}}})


def test_profile_validation_reasons() -> None:
    def check(metrics: dict[str, float]) -> str | None:
        v = validate(WATCH, Reading("w", "s", NOW, metrics))
        return None if v is None else v.reason

    assert check({"steps": 1000, "heart_rate": 70}) is None
    assert check({"heart_rate": 20}) == OUT_OF_RANGE
    assert check({"steps": 10.5}) == NOT_INTEGER
    assert check({"spo2": 97}) == UNKNOWN_METRIC
    lenient = parse_profile({"id": "w2", "strict": False, "metrics": {"steps": {}}})
    assert validate(lenient, Reading("w", "s", NOW, {"spo2": 97})) is None


@pytest.mark.parametrize("document", [
    {"metrics": {"x": {}}}, {"id": "a"}, {"id": "a", "metrics": {"x": {"min": 5, "max": 1}}},
    {"id": "a", "metrics": {"x": {"min": "low"}}}, {"id": "a", "metrics": {"x": {"colour": 1}}},
    {"id": "a", "metrics": {"x": {}}, "reporting_interval_s": 0}, {"id": "a", "metrics": {"x": {}}, "extra": 1}])
def test_bad_profiles_are_refused_with_a_message(document: dict[str, object]) -> None:
    with pytest.raises(ProfileError):
        parse_profile(document)


def test_the_example_profiles_load_and_cover_the_example_store() -> None:
    root = Path(__file__).resolve().parent.parent
    profiles = load_profiles(root / "examples/device-profiles")
    store = yaml.safe_load((root / "examples/store.yaml").read_text())
    for device in store["devices"]:
        profile = profiles.get(device["kind"])
        assert profile is not None, device["kind"]
        assert set(device["metrics"]) <= set(profile.metrics), device["id"]


@given(st.dictionaries(st.sampled_from(["steps", "heart_rate", "spo2"]),
                       st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=1, max_size=3))
def test_fuzzed_readings_against_a_profile_are_either_valid_or_have_one_reason(metrics: dict[str, float]) -> None:
    v = validate(WATCH, Reading("w", "s", NOW, metrics))
    in_profile = all(
        name in WATCH.metrics
        and WATCH.metrics[name].min <= value <= WATCH.metrics[name].max  # type: ignore[operator]
        and (not WATCH.metrics[name].integer or float(value).is_integer())
        for name, value in metrics.items())
    assert (v is None) == in_profile
    assert v is None or v.reason in (OUT_OF_RANGE, UNKNOWN_METRIC, NOT_INTEGER)


# -- odd input: whatever passes can be stored ----------------------------------------------------------
# A value the parser lets through but the database refuses fails the commit of its whole batch: the
# rules below are the columns' (gateway/storage/models.py) and the encodings' limits.

LONG_DEVICE = TopicParts("store-7", "d" * 129, "telemetry")


@pytest.mark.parametrize(("parts", "payload", "reason"), [
    (PARTS, rb'{"metrics": {"\ud800": 1}}', BAD_METRIC),  # json decodes a lone surrogate; UTF-8 cannot encode it
    (PARTS, rb'{"metrics": {"\udc00x": 1}}', BAD_METRIC),
    (PARTS, rb'{"metrics": {"a\u0000b": 1}}', BAD_METRIC),  # PostgreSQL text refuses NUL
    (PARTS, rb'{"metrics": {"a\u001b[31m": 1}}', BAD_METRIC),  # control characters
    (PARTS, rb'{"metrics": {"a\u0085": 1}}', BAD_METRIC),  # C1 control
    (PARTS, b'{"metrics": {"' + b"m" * 65 + b'": 1}}', BAD_METRIC),  # reading_rollups.metric is 64
    (PARTS, b'{"metrics": {"x": 1e101}}', BAD_METRIC),  # sums of such overflow PostgreSQL's float8
    (PARTS, b'{"metrics": {"x": -1e101}}', BAD_METRIC),
    (PARTS, b'{"ts": 1e300, "metrics": {"x": 1}}', BAD_TS),  # no datetime for the rules and the engine
    (PARTS, b'{"ts": -1, "metrics": {"x": 1}}', BAD_TS),
    (PARTS, b'{"ts": 32503680000, "metrics": {"x": 1}}', BAD_TS),
    (LONG_DEVICE, b'{"metrics": {"x": 1}}', BAD_DEVICE_ID),  # devices.id is 128
    (PARTS._replace(device_id="d\x01"), b'{"metrics": {"x": 1}}', BAD_DEVICE_ID),
    (PARTS._replace(device_id="d\ud800"), b'{"metrics": {"x": 1}}', BAD_DEVICE_ID),
    (PARTS._replace(store_id="s" * 65), b'{"metrics": {"x": 1}}', BAD_STORE_ID),  # devices.store_id is 64
    (PARTS._replace(store_id="s\x00"), b'{"metrics": {"x": 1}}', BAD_STORE_ID),
])
def test_odd_telemetry_is_refused_with_its_reason(parts: TopicParts, payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        parse_telemetry(parts, payload, NOW)
    assert info.value.reason_code == reason
    info.value.message.encode("utf-8")  # the detail is stored and logged: it must be text itself
    assert "\x00" not in info.value.message


@pytest.mark.parametrize(("payload", "reason"), [
    (rb'{"state": "online", "firmware": "2.4\u0000"}', BAD_STATUS),
    (rb'{"state": "online", "firmware": "\ud83d"}', BAD_STATUS),
    (b'{"state": "online", "firmware": "' + b"9" * 65 + b'"}', BAD_STATUS),
    (b'{"state": "online", "ts": NaN}', BAD_TS),
])
def test_odd_status_is_refused_with_its_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        parse_status(PARTS._replace(kind="status"), payload, NOW)
    assert info.value.reason_code == reason


DEEP = b'{"type": "e", "data": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}"


@pytest.mark.parametrize(("parts", "payload", "reason"), [
    (PARTS, rb'{"type": "error", "code": "E\u00004"}', BAD_EVENT),
    (PARTS, rb'{"type": "err\ud800"}', BAD_EVENT),
    (PARTS, rb'{"type": "error\n"}', BAD_EVENT),
    (PARTS, b'{"type": "' + b"t" * 33 + b'"}', BAD_EVENT),  # device_events.type is 32
    (PARTS, b'{"type": "e", "code": "' + b"c" * 65 + b'"}', BAD_EVENT),
    (PARTS, b'{"type": "e", "data": {"x": NaN}}', BAD_EVENT),  # json.dumps writes NaN; PostgreSQL's json refuses it
    (PARTS, b'{"type": "e", "data": {"x": [1, Infinity]}}', BAD_EVENT),
    (PARTS, rb'{"type": "e", "data": {"\ud800": 1}}', BAD_EVENT),
    (PARTS, rb'{"type": "e", "data": {"x": "a\u0000"}}', BAD_EVENT),
    (PARTS, DEEP, BAD_EVENT),  # serialised again deep inside the commit: bounded nesting
    (PARTS._replace(device_id="d" * 129), b'{"type": "e"}', BAD_DEVICE_ID),
])
def test_odd_events_are_refused_with_their_reason(parts: TopicParts, payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        parse_event(parts._replace(kind="events"), payload, NOW)
    assert info.value.reason_code == reason


def test_text_that_is_fine_stays_as_it_was() -> None:
    """Non-ASCII names, a code given as a number and free text with newlines in an event's data pass."""
    r = parse_telemetry(PARTS._replace(device_id="montre-é" + "x" * 119), '{"metrics": {"température": -1e100, '
                        '"μ": 1e100}, "ts": 0}'.encode(), NOW)
    assert r.metrics == {"température": -1e100, "μ": 1e100} and r.time == 0.0
    ev = parse_event(PARTS, b'{"type": "note", "code": 42, "data": {"text": "line 1\\nline 2", "n": 99999999999}}',
                     NOW)
    assert (ev.code, ev.data) == ("42", {"text": "line 1\nline 2", "n": 99999999999})
    st_ = parse_status(PARTS, '{"state": "online", "firmware": "v2 β"}'.encode(), NOW)
    assert st_.firmware == "v2 β"


# The fuzzers: arbitrary bytes and arbitrary JSON (lone surrogates, NUL, NaN, long and odd names
# included) never raise anything but PayloadError, and whatever is accepted fits the tables.

def _length(column: Any) -> int:
    length = column.type.length
    assert isinstance(length, int)
    return length


def _storable_text(value: str, column: Any | None = None) -> None:
    value.encode("utf-8")  # strict: a lone surrogate raises
    assert "\x00" not in value
    if column is not None:
        assert 0 < len(value) <= _length(column), (column, len(value))


def _storable_json(value: Any, depth: int = 0) -> None:
    assert depth <= MAX_DATA_DEPTH
    if isinstance(value, str):
        _storable_text(value)
    elif isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _storable_text(k)
            _storable_json(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _storable_json(v, depth + 1)
    else:
        assert value is None or isinstance(value, bool | int)


def assert_storable(item: Reading | DeviceStatus | DeviceEvent) -> None:
    _storable_text(item.device_id, Device.__table__.c.id)
    _storable_text(item.store_id, Device.__table__.c.store_id)
    assert math.isfinite(item.time)
    dt.datetime.fromtimestamp(item.time, dt.UTC)  # the rules and the engine take local dates of it
    if isinstance(item, Reading):
        assert item.metrics
        assert len(item.key) <= _length(ReadingRecord.__table__.c.key)
        for name, value in item.metrics.items():
            _storable_text(name, ReadingRollup.__table__.c.metric)
            assert math.isfinite(value) and abs(value) <= MAX_MAGNITUDE
        json.dumps(item.metrics, allow_nan=False)
    elif isinstance(item, DeviceStatus):
        if item.firmware is not None:
            _storable_text(item.firmware, Device.__table__.c.firmware)
    else:
        _storable_text(item.type, DeviceEventRecord.__table__.c.type)
        if item.code is not None:
            _storable_text(item.code, DeviceEventRecord.__table__.c.code)
        _storable_json(item.data)
        json.dumps(item.data, allow_nan=False)


PARSERS = [(parse_telemetry, "telemetry"), (parse_status, "status"), (parse_event, "events")]
NASTY = ["\ud800", "\udfff", "\x00", "a\x00b", "\x1b[2J", "\x7f", "\x85", "\u2028", "\ufeff", "é", "😀",
         "m" * 64, "m" * 65, "c" * 32, "c" * 33, "online", "offline", "error", "1.4.2", "", " "]
odd_text = st.text(st.characters(exclude_categories=()), max_size=10) | st.sampled_from(NASTY)
good_ids = st.sampled_from(["mower-1", "s1", "d" * 64, "montre-é"])
odd_ids = odd_text | st.sampled_from(["d" * 128, "d" * 129, "s" * 65])
ids = st.integers(0, 3).flatmap(lambda i: odd_ids if i == 0 else good_ids)  # mostly fine, so payloads get parsed
topic_parts = st.builds(TopicParts, ids, ids, st.just("telemetry"))
odd_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70)
               | st.floats() | st.sampled_from([1e300, -1e300, 1e100, 1e101, 32503680000.0, -1.0, 0.0]) | odd_text)
odd_json = st.recursive(odd_scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(odd_text, inner, max_size=3), max_leaves=12)
odd_metrics = st.integers(0, 3).flatmap(lambda i: (
    odd_json, st.dictionaries(names, finite, min_size=1, max_size=3),
    st.dictionaries(names | odd_text, finite | odd_scalars, min_size=1, max_size=4))[min(i, 2)])
odd_documents = st.fixed_dictionaries({"metrics": odd_metrics}, optional={
    "ts": odd_scalars, "seq": odd_scalars, "state": odd_scalars, "firmware": odd_scalars, "type": odd_scalars,
    "code": odd_scalars, "data": odd_json})


@settings(max_examples=400)
@given(topic_parts, st.binary(max_size=512))
def test_fuzzed_bytes_are_refused_or_storable(parts: TopicParts, payload: bytes) -> None:
    for parse, kind in PARSERS:
        try:
            item = parse(parts._replace(kind=kind), payload, NOW)
        except PayloadError as exc:
            exc.message.encode("utf-8")
            continue
        assert_storable(item)


@settings(max_examples=800)
@given(topic_parts, odd_documents)
def test_fuzzed_json_is_refused_or_storable(parts: TopicParts, document: dict[str, Any]) -> None:
    try:
        payload = json.dumps(document).encode()  # lone surrogates as \ud800 escapes, NaN and Infinity as tokens
    except ValueError:  # an int past Python's digit limit: not a document anyone can send
        return
    for parse, kind in PARSERS:
        try:
            item = parse(parts._replace(kind=kind), payload, NOW)
        except PayloadError as exc:
            exc.message.encode("utf-8")
            continue
        assert_storable(item)
