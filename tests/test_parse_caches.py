"""The parser's caches are invisible: an advert answered from them gives the frames and counts it gives
cold (caches cleared), on random bytes, mutated real adverts and bleak's dictionaries, alone or in a drain."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beacons import encode
from beacons import parse as p
from beacons.parse import ParseStats, parse_advertisement, parse_adverts, parse_payload
from beacons.types import Advertisement, IBeacon

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

UUID = bytes.fromhex("e2c56db5dffb48d2b060d0f5a71096e0")  # Apple's AirLocate sample uuid
# The layout iOS and most tags send: flags (LE general discoverable, no BR/EDR), then Apple's iBeacon.
IBEACON_RAW = bytes.fromhex("020106" "1aff4c000215") + UUID + bytes.fromhex("0001" "0002" "c5")


def clear_caches() -> None:
    p._PAYLOAD_CACHE.clear()
    p._IBEACON_CACHE.clear()
    p._EDDYSTONE_CACHE.clear()
    p._UUID_CACHE.clear()


def parsed(payload: bytes) -> tuple[list, dict]:
    stats = ParseStats()
    return parse_payload(payload, stats), stats.as_dict()


@st.composite
def mutated_ibeacon(draw: st.DrawFn) -> bytes:
    """A real iBeacon advert with a few bytes flipped, inserted or dropped, or its tx power,
    length bytes, company id and subtype bytes changed: what an identity's cache entry must not answer."""
    payload = bytearray(draw(st.sampled_from([IBEACON_RAW, IBEACON_RAW[3:], IBEACON_RAW + b"\x00"])))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "flip", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(payload) - 1)))
        if op == "flip" and payload:
            payload[at] = draw(st.sampled_from([0, 1, 2, 0x15, 0x16, 0x1A, 0x1B, 0x4C, 0xFF,
                                                draw(st.integers(0, 255))]))
        elif op == "insert":
            payload.insert(at, draw(st.integers(0, 255)))
        elif payload:
            del payload[at]
    return bytes(payload)


ibeacon_like = st.builds(
    lambda uuid, major, minor, tx, flags: (encode.ad_structure(0x01, flags) if flags is not None else b"")
    + encode.ad_structure(0xFF, b"\x4c\x00\x02\x15" + uuid + major.to_bytes(2, "big") + minor.to_bytes(2, "big")
                          + (tx & 0xFF).to_bytes(1, "big")),
    st.binary(min_size=16, max_size=16), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(-128, 127),
    st.one_of(st.none(), st.binary(min_size=1, max_size=1)))


@FUZZ
@given(st.one_of(st.binary(max_size=40), mutated_ibeacon(), ibeacon_like))
def test_a_payload_parses_the_same_warm_as_cold(payload: bytes) -> None:
    clear_caches()
    cold = parsed(payload)
    assert parsed(payload) == cold  # warm: from the payload cache, when the advert was an identity
    assert parsed(bytearray(payload)) == cold  # type: ignore[arg-type]  # mutable bytes: copied, same answer


def _assert_warm_drain_parses_as_cold(adverts: list[Advertisement]) -> None:
    """parse_adverts over the drain from empty caches gives the frames and counts of each advert parsed alone with
    the caches cleared first (the one check the drain tests share)."""
    cold, cold_stats = [], ParseStats()
    for a in adverts:
        clear_caches()
        cold += [(a, f) for f in parse_advertisement(a, cold_stats)]
    clear_caches()
    warm_stats = ParseStats()
    assert parse_adverts(adverts, warm_stats) == cold
    assert warm_stats.as_dict() == cold_stats.as_dict()


@FUZZ
@given(st.lists(st.one_of(mutated_ibeacon(), ibeacon_like, st.binary(max_size=32)), min_size=1, max_size=6),
       st.booleans())
def test_a_drain_parses_as_its_adverts_do_cold(payloads: list[bytes], as_bleak: bool) -> None:
    """parse_adverts over a drain (raw bytes, or bleak's one-entry dictionaries), half of it answered from the
    caches, gives the frames and counts of each advert parsed with the caches cleared."""
    def advert(data: bytes) -> Advertisement:
        if as_bleak:  # bleak hands over manufacturer data without the company id's two bytes
            return Advertisement("AA:BB:CC:DD:EE:FF", -60, 1.0, "rx", manufacturer_data={0x004C: data[9:]})
        return Advertisement("AA:BB:CC:DD:EE:FF", -60, 1.0, "rx", payload=data)

    _assert_warm_drain_parses_as_cold([advert(d) for d in payloads * 2])  # twice: the second half from the caches


eddystone_data = st.one_of(
    st.builds(lambda ns, inst, tx: encode.eddystone_uid_frame(ns, inst, tx_power=tx),
              st.binary(min_size=10, max_size=10), st.binary(min_size=6, max_size=6), st.integers(-100, 20)),
    st.builds(lambda mv, t, n, up: encode.eddystone_tlm_frame(mv, t, n, up), st.integers(0, 0xFFFF),
              st.floats(-40, 80), st.integers(0, 2**32 - 1), st.integers(0, 2**28)),
    st.binary(max_size=22))
bleak_maps = st.tuples(
    st.dictionaries(st.sampled_from([0x004C, 0x0006, 0x0118]), st.one_of(
        st.just(IBEACON_RAW[7:]), st.binary(max_size=25), mutated_ibeacon().map(lambda d: d[7:])), max_size=2),
    st.dictionaries(st.sampled_from([p.EDDYSTONE_SERVICE_UUID, "feaa", "0000fd6f-0000-1000-8000-00805f9b34fb"]),
                    eddystone_data, max_size=2))


@FUZZ
@given(st.lists(bleak_maps, min_size=1, max_size=5))
def test_bleak_dictionaries_from_the_caches_parse_as_cold(maps: list[tuple[dict, dict]]) -> None:
    """Frames and counts for bleak's dictionaries do not depend on what the caches hold."""
    _assert_warm_drain_parses_as_cold([Advertisement("AA:BB:CC:DD:EE:FF", -60, 1.0, "rx", manufacturer_data=m,
                                                     service_data=sd) for m, sd in maps * 2])


def test_the_usual_raw_ibeacon_is_read_and_counted() -> None:
    clear_caches()
    frame = IBeacon("e2c56db5-dffb-48d2-b060-d0f5a71096e0", 1, 2, -59)
    stats = ParseStats()
    assert parse_payload(IBEACON_RAW, stats) == [frame]
    assert parse_payload(IBEACON_RAW, stats) == [frame]  # from the cache
    assert parse_payload(IBEACON_RAW[3:], stats) == [frame]  # no flags structure: 27 bytes
    assert stats.as_dict() == {"accepted": {"ibeacon": 3}, "rejected": {}}
    assert parse_payload(IBEACON_RAW[:-1], stats) == []  # a byte short
    assert stats.rejected["truncated_ad"] == 1


def test_the_caches_stay_bounded_and_keep_what_is_in_use() -> None:
    cache = p._Recent(4)
    for i in range(4):
        cache.put(bytes([i]), i + 1)
    cache.put(b"new", 99)  # full: the four become the old generation
    assert cache[bytes([0])] == 1  # used again: back in the new one
    for i in range(10, 20):
        cache.put(bytes([i]), i)
    assert len(cache) + len(cache.old) <= 8
    assert cache[b"never"] is None
    clear_caches()
    for n in range(3 * p._CACHE_MAX // 2):  # a flood of distinct beacons
        parse_payload(IBEACON_RAW[:-5] + n.to_bytes(4, "big") + b"\xc5")
    assert len(p._PAYLOAD_CACHE) + len(p._PAYLOAD_CACHE.old) <= 2 * p._CACHE_MAX
