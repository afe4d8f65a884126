"""Telemetry payload parsing and topic layout: strict, and nothing but PayloadError on bad input."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from devices.payloads import (
    BAD_EVENT,
    BAD_METRIC,
    BAD_SEQ,
    BAD_STATUS,
    BAD_TS,
    MAX_PAYLOAD_BYTES,
    MISSING_METRICS,
    NOT_JSON,
    NOT_OBJECT,
    NOT_UTF8,
    TOO_LARGE,
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


finite = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53)


@given(
    st.dictionaries(st.text(min_size=1, max_size=12), finite, min_size=1, max_size=8),
    st.none() | st.floats(allow_nan=False, allow_infinity=False),
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
