"""Property tests for the BLE parsers: nothing the radio hears may raise, every drop is counted.

Arbitrary bytes mostly die at framing, so the strategies also build well-framed adverts
whose structures start like real beacon formats and then go wrong, to reach the format
checks behind the framing.
"""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beacons import encode, rotating
from beacons import parse as parse_module
from beacons.decode import DecodeError, decode_hex
from beacons.parse import (
    EDDYSTONE_SERVICE_UUID,
    ParseStats,
    parse_bleak,
    parse_manufacturer,
    parse_payload,
    parse_service_data,
)
from beacons.types import AltBeacon, EddystoneEID, EddystoneTLM, EddystoneUID, EddystoneURL, IBeacon

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND = settings(max_examples=200, deadline=None)

# Starts of real formats (after the AD type), so fuzzed tails reach the per-format checks.
PREFIXES = [
    b"\x4c\x00\x02\x15",  # iBeacon
    b"\x4c\x00\x02",
    b"\x18\x01\xbe\xac",  # AltBeacon
    b"\xaa\xfe\x00",      # Eddystone UID, URL, TLM, EID, reserved
    b"\xaa\xfe\x10",
    b"\xaa\xfe\x20\x00",
    b"\xaa\xfe\x20\x01",
    b"\xaa\xfe\x30",
    b"\xaa\xfe\x40",
    b"",
]

ad_data = st.builds(lambda prefix, tail: (prefix + tail)[:254], st.sampled_from(PREFIXES),
                    st.binary(max_size=30))
structures = st.lists(
    st.tuples(st.sampled_from([0x01, 0x03, 0x09, 0x16, 0xFF, 0xFF, 0x16]), ad_data), max_size=4)
framed = st.builds(lambda items: b"".join(encode.ad_structure(t, d) for t, d in items), structures)
garbage_tail = st.one_of(st.just(b""), st.binary(max_size=4))


def check_counted(payload: bytes) -> list:
    """Parse and check the bookkeeping: every call is counted, frames or rejects."""
    stats = ParseStats()
    frames = parse_payload(payload, stats)
    assert isinstance(frames, list)
    assert stats.accepted.total() == len(frames)
    assert stats.total >= 1
    if not frames:
        assert stats.rejected.total() >= 1
    for frame in frames:
        assert frame.format in parse_module.FORMATS
        assert frame.as_dict()["format"] == frame.format
        assert frame.key is None or frame.key.startswith(frame.format + ":")
    return frames


@FUZZ
@given(st.binary(max_size=96))
def test_arbitrary_bytes_never_raise(payload: bytes) -> None:
    check_counted(payload)


@FUZZ
@given(framed, garbage_tail)
def test_framed_adverts_never_raise(payload: bytes, tail: bytes) -> None:
    check_counted(payload + tail)


VALID = [
    encode.ibeacon_payload("e2c56db5-dffb-48d2-b060-d0f5a71096e0", 1, 2),
    encode.altbeacon_payload(bytes(range(20))),
    encode.eddystone_uid_payload(bytes(10), bytes(6)),
    encode.eddystone_url_payload("https://example.com/x"),
    encode.eddystone_tlm_payload(3000, 21.5, 10, 12.3),
    encode.eddystone_eid_payload(bytes(8)),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid advert with one byte changed, inserted or removed: the near misses."""
    payload = bytearray(draw(st.sampled_from(VALID)))
    at = draw(st.integers(0, len(payload) - 1))
    action = draw(st.sampled_from(["set", "insert", "delete"]))
    if action == "set":
        payload[at] = draw(st.integers(0, 255))
    elif action == "insert":
        payload.insert(at, draw(st.integers(0, 255)))
    else:
        del payload[at]
    return bytes(payload)


@FUZZ
@given(mutated())
def test_mutated_adverts_never_raise(payload: bytes) -> None:
    check_counted(payload)


@FUZZ
@given(st.one_of(framed, mutated()))
def test_results_do_not_depend_on_the_caches(payload: bytes) -> None:
    warm = parse_payload(payload)
    assert parse_payload(payload) == warm
    parse_module._PAYLOAD_CACHE.clear()
    parse_module._IBEACON_CACHE.clear()
    parse_module._UUID_CACHE.clear()
    assert parse_payload(payload) == warm


@FUZZ
@given(st.dictionaries(st.integers(0, 0xFFFF), ad_data.map(lambda d: d[2:]), max_size=3),
       st.dictionaries(st.sampled_from([EDDYSTONE_SERVICE_UUID, "0000fd6f-0000-1000-8000-00805f9b34fb"]),
                       ad_data.map(lambda d: d[2:]), max_size=2))
def test_bleak_shapes_never_raise(mfg: dict[int, bytes], service: dict[str, bytes]) -> None:
    stats = ParseStats()
    frames = parse_bleak(SimpleNamespace(manufacturer_data=mfg, service_data=service), stats)
    assert stats.accepted.total() == len(frames)
    assert frames or stats.rejected.total() >= 1
    for company_id, data in mfg.items():
        before = stats.total
        parse_manufacturer(company_id, data, stats)
        assert stats.total == before + 1
    for uuid, data in service.items():
        before = stats.total
        parse_service_data(uuid, data, stats)
        assert stats.total == before + 1


@FUZZ
@given(st.one_of(st.text(max_size=40), framed.map(bytes.hex)))
def test_decode_hex_fails_only_with_decode_error(text: str) -> None:
    try:
        result = decode_hex(text)
    except DecodeError as exc:
        assert str(exc)
    else:
        assert result and all("format" in d for d in result)


# --- round trips -------------------------------------------------------------------------------

tx = st.integers(-128, 127)
u16 = st.integers(0, 0xFFFF)


@ROUND
@given(st.uuids(), u16, u16, tx, st.booleans())
def test_ibeacon_round_trip(uuid: object, major: int, minor: int, tx_power: int, flags: bool) -> None:
    payload = encode.ibeacon_payload(str(uuid), major, minor, tx_power, flags=flags)
    assert parse_payload(payload) == [IBeacon(str(uuid), major, minor, tx_power)]


@ROUND
@given(st.binary(min_size=20, max_size=20), tx, st.integers(0, 255), u16)
def test_altbeacon_round_trip(beacon_id: bytes, tx_power: int, reserved: int, company: int) -> None:
    payload = encode.altbeacon_payload(beacon_id, tx_power, reserved, company)
    frames = parse_payload(payload)
    if company == 0x004C and beacon_id[:1] == b"\x02":
        return  # Apple's own iBeacon subtype wins over the AltBeacon code for Apple's company id
    assert frames == [AltBeacon(beacon_id.hex(), tx_power, reserved, company)]


@ROUND
@given(st.binary(min_size=10, max_size=10), st.binary(min_size=6, max_size=6), tx)
def test_eddystone_uid_round_trip(namespace: bytes, instance: bytes, tx_power: int) -> None:
    payload = encode.eddystone_uid_payload(namespace, instance, tx_power)
    assert parse_payload(payload) == [EddystoneUID(namespace.hex(), instance.hex(), tx_power)]


url_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=24)


@ROUND
@given(st.sampled_from(["http://", "https://", "http://www.", "https://www."]), url_text, tx)
def test_eddystone_url_round_trip(scheme: str, rest: str, tx_power: int) -> None:
    url = scheme + rest
    try:
        payload = encode.eddystone_url_payload(url, tx_power)
    except ValueError as exc:
        assert "at most 17" in str(exc)  # printable text: being too long is the only failure
        return
    assert parse_payload(payload) == [EddystoneURL(url, tx_power)]


@ROUND
@given(st.one_of(st.none(), st.integers(1, 0xFFFF)),
       st.one_of(st.none(), st.integers(-0x7FFF, 0x7FFF).map(lambda raw: raw / 256)),
       st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1).map(lambda raw: raw / 10))
def test_eddystone_tlm_round_trip(voltage: int | None, temperature: float | None, count: int,
                                  uptime: float) -> None:
    payload = encode.eddystone_tlm_payload(voltage, temperature, count, uptime)
    assert parse_payload(payload) == [EddystoneTLM(voltage, temperature, count, uptime)]


@ROUND
@given(st.binary(min_size=8, max_size=8), tx)
def test_eddystone_eid_round_trip(eid: bytes, tx_power: int) -> None:
    assert parse_payload(encode.eddystone_eid_payload(eid, tx_power)) == [EddystoneEID(eid.hex(), tx_power)]


@ROUND
@given(st.binary(min_size=16, max_size=16), st.integers(0, 15), st.integers(0, 2**32 - 1), tx)
def test_computed_eids_round_trip_through_every_parser_path(identity_key: bytes, k: int, time_s: int,
                                                           tx_power: int) -> None:
    """Whatever EID a beacon computes, the raw, bleak and service-data paths give the same frame and key."""
    value = rotating.eid(identity_key, k, time_s)
    expected = EddystoneEID(value.hex(), tx_power)
    frame_bytes = encode.eddystone_eid_frame(value, tx_power)
    assert parse_payload(encode.eddystone_eid_payload(value, tx_power)) == [expected]
    assert parse_service_data(EDDYSTONE_SERVICE_UUID, frame_bytes) == expected
    svc = {EDDYSTONE_SERVICE_UUID: frame_bytes}
    assert parse_bleak(SimpleNamespace(manufacturer_data={}, service_data=svc)) == [expected]
    assert expected.key == f"eddystone_eid:{value.hex()}"
