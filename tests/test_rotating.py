"""Rotating identities, the protocol half: published vectors, byte orders, the RPA cache's AES accounting,
and the precomputed table's windows, bounds and removal."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import random
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from beacons.rotating import (
    AppEntry,
    EidEntry,
    RotatingTable,
    RpaCache,
    app_beacon,
    app_window,
    eid,
    eid_window_start,
    is_rpa,
    parse_irk,
    rpa_hash,
    rpa_matches,
)

H = bytes.fromhex
PROPS = settings(max_examples=150, deadline=None)

# --- Eddystone-EID ---------------------------------------------------------------------------

# google/eddystone eddystone-eid/eid-computation.md specifies the computation but prints no numeric
# example; these vectors are RadiusNetworks/ephemeral_calc's spec/encryptor_spec.rb (identity key
# 0102030405060708090A111213141516, K = 10, beacon time 0 and 2000 s), an independent implementation of
# that document. The 65535/65536 pair straddles the temporary key's roll-over; 396973b40660265b was checked
# by hand with `openssl enc -aes-128-ecb -nopad` following the document's two tables.
EID_KEY = H("0102030405060708090A111213141516")
EID_VECTORS = [
    (10, 0, "a9b76a71c5f89290"),  # ephemeral_calc
    (10, 2000, "4144413e45fefa58"),  # ephemeral_calc: 2000 s is in the window starting at 1024
    (10, 65535, "a2a2bd394ff76ef2"),
    (10, 65536, "396973b40660265b"),  # openssl, by hand
]


@pytest.mark.parametrize(("k", "time_s", "expected"), EID_VECTORS)
def test_eid_vectors(k: int, time_s: int, expected: str) -> None:
    assert eid(EID_KEY, k, time_s).hex() == expected


def _eidtools(ik: bytes, scaler: int, t: int) -> bytes:
    """google/eddystone eddystone-eid/tools/eidtools.py GetAndPrintEid, transcribed (its arithmetic, not ours)."""
    def aes(key: bytes, block: bytes) -> bytes:
        enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        return enc.update(block) + enc.finalize()
    tk = aes(ik, b"\x00" * 11 + b"\xff" + b"\x00" * 2 + bytes(((t // 2**24) % 256, (t // 2**16) % 256)))
    t = (t // 2**scaler) * 2**scaler
    return aes(tk, b"\x00" * 11 + bytes((scaler, (t // 2**24) % 256, (t // 2**16) % 256, (t // 2**8) % 256,
                                         t % 256)))[:8]


@PROPS
@given(st.binary(min_size=16, max_size=16), st.integers(0, 15), st.integers(0, 2**32 - 1))
def test_eid_agrees_with_the_reference_tool(ik: bytes, k: int, t: int) -> None:
    assert eid(ik, k, t) == _eidtools(ik, k, t)


def test_eid_is_constant_within_a_window_and_changes_at_its_edge() -> None:
    assert eid_window_start(2000, 10) == 1024
    assert {eid(EID_KEY, 10, t) for t in (1024, 1500, 2047)} == {eid(EID_KEY, 10, 1024)}
    assert eid(EID_KEY, 10, 2048) != eid(EID_KEY, 10, 2047)
    assert eid(EID_KEY, 0, 5) != eid(EID_KEY, 0, 6)  # K = 0: a new EID every second


@pytest.mark.parametrize(("args", "message"), [
    ((b"short", 10, 0), "identity_key: expected 16 bytes"),
    ((EID_KEY, 16, 0), "k: the rotation exponent"),
    ((EID_KEY, -1, 0), "k: the rotation exponent"),
    ((EID_KEY, 10, -1), "time_s: the beacon clock"),
    ((EID_KEY, 10, 2**32), "time_s: the beacon clock"),
])
def test_eid_rejects_bad_arguments_naming_them(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        eid(*args)


# --- resolvable private addresses ----------------------------------------------------------------

# Bluetooth Core spec Vol 3 Part H, Appendix D.7 (ah sample data): IRK ec0234a357c8ad05341010a60a397d9b,
# prand 708194 -> hash 0dfbaa, all written most significant octet first; the address is 70:81:94:0D:FB:AA.
SPEC_IRK = H("ec0234a357c8ad05341010a60a397d9b")
SPEC_ADDRESS = "70:81:94:0D:FB:AA"


def test_ah_matches_the_core_spec_sample() -> None:
    assert rpa_hash(SPEC_IRK, H("708194")) == H("0dfbaa")
    assert rpa_matches(SPEC_IRK, SPEC_ADDRESS)
    assert rpa_matches(SPEC_IRK, SPEC_ADDRESS.lower())


def test_the_irk_reversed_does_not_match() -> None:
    """The byte-order pitfall: an IRK taken in the wrong order resolves nothing, silently."""
    assert not rpa_matches(SPEC_IRK[::-1], SPEC_ADDRESS)
    assert not rpa_matches(SPEC_IRK, "AA:FB:0D:94:81:70")  # the address read LSB-first


def test_is_rpa_reads_the_top_two_bits() -> None:
    assert is_rpa(SPEC_ADDRESS)  # 0x70 = 0b01110000
    assert not is_rpa("F0:81:94:0D:FB:AA")  # 0b11: random static
    assert not is_rpa("30:81:94:0D:FB:AA")  # 0b00: non-resolvable
    assert not is_rpa("B0:81:94:0D:FB:AA")  # 0b10: reserved
    for junk in ("", "70:81:94:0D:FB", "70-81-94-0D-FB-AA", "zz:81:94:0D:FB:AA", "70:81:94:0D:FB:AA:00"):
        assert not is_rpa(junk) and not rpa_matches(SPEC_IRK, junk)


def test_an_address_with_the_right_hash_but_not_rpa_form_does_not_match() -> None:
    for prand in (H("308194"), H("f08194")):  # non-resolvable and random static forms
        address = ":".join(f"{b:02X}" for b in prand + rpa_hash(SPEC_IRK, prand))
        assert not rpa_matches(SPEC_IRK, address)


def _address(irk: bytes, prand: bytes) -> str:
    raw = prand + rpa_hash(irk, prand)
    return ":".join(f"{b:02X}" for b in raw)


@PROPS
@given(st.binary(min_size=16, max_size=16), st.binary(min_size=3, max_size=3))
def test_agrees_with_bluetooth_data_tools(irk: bytes, prand: bytes) -> None:
    """Home Assistant's resolver (bluetooth-data-tools) and ours agree on every address, made or not."""
    privacy = pytest.importorskip("bluetooth_data_tools.privacy")
    cipher = privacy.get_cipher_for_irk(irk)
    prand = bytes((prand[0] & 0x3F | 0x40,)) + prand[1:]
    made = _address(irk, prand)
    assert rpa_matches(irk, made) and privacy.resolve_private_address(cipher, made)
    other = made[:-2] + f"{int(made[-2:], 16) ^ 1:02X}"
    assert rpa_matches(irk, other) == privacy.resolve_private_address(cipher, other) is False


def test_parse_irk_hex_is_msb_first_base64_lsb_first() -> None:
    lsb = SPEC_IRK[::-1]
    assert parse_irk("ec0234a357c8ad05341010a60a397d9b") == SPEC_IRK
    assert parse_irk("EC:02:34:A3:57:C8:AD:05:34:10:10:A6:0A:39:7D:9B") == SPEC_IRK
    assert parse_irk("0xec0234a357c8ad05341010a60a397d9b") == SPEC_IRK
    assert parse_irk(" irk:ec02 34a3 57c8 ad05 3410 10a6 0a39 7d9b ") == SPEC_IRK
    # macOS Keychain / iOS export: base64 of the key as stored, least significant byte first.
    apple = base64.b64encode(lsb).decode()
    assert parse_irk(apple) == SPEC_IRK
    assert parse_irk(apple.rstrip("=")) == SPEC_IRK
    assert rpa_matches(parse_irk(apple), SPEC_ADDRESS)
    # Forced orders: a little-endian hex dump (btsnoop, BlueZ), a big-endian base64.
    assert parse_irk(lsb.hex(), byte_order="lsb") == SPEC_IRK
    assert parse_irk(base64.b64encode(SPEC_IRK).decode(), byte_order="msb") == SPEC_IRK
    assert parse_irk(lsb.hex()) == lsb  # "auto" takes hex as written
    assert not rpa_matches(parse_irk(lsb.hex()), SPEC_ADDRESS)


@pytest.mark.parametrize(("text", "message"), [
    ("", "irk: empty"),
    ("irk:", "irk: empty"),
    ("ec0234a357c8ad05341010a60a397d", "32 digits .16 bytes., got 30 digits"),
    ("ec0234a357c8ad05341010a60a397d9b00", "32 digits .16 bytes., got 34 digits"),
    ("not a key!", "neither 32 hex digits nor valid base64"),
    (base64.b64encode(bytes(range(1, 21))).decode(), "decode to 16 bytes, got 20"),
    ("00" * 16, "all zeros"),
])
def test_parse_irk_says_why_and_never_echoes_the_key(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_irk(text)
    if len(text) > 8:
        assert text not in str(caught.value)
    with pytest.raises(ValueError, match="byte_order"):
        parse_irk("ec0234a357c8ad05341010a60a397d9b", byte_order="big")


# --- the RPA cache -------------------------------------------------------------------------------

def _random_rpa() -> str:
    raw = bytearray(os.urandom(6))
    raw[0] = raw[0] & 0x3F | 0x40
    return ":".join(f"{b:02X}" for b in raw)


def _irks(n: int) -> dict[int, bytes]:
    return {i: hashlib.sha256(b"irk%d" % i).digest()[:16] for i in range(n)}


def test_a_flood_of_unknown_addresses_costs_one_pass_per_irk_once() -> None:
    irks = _irks(5)
    cache: RpaCache[int] = RpaCache(irks, max_entries=1000, ttl_s=900)
    flood = [_random_rpa() for _ in range(200)]
    assert all(cache.resolve(a, 0.0) is None for a in flood)
    assert cache.aes_passes == 200 * 5 and cache.misses == 200
    for t in (1.0, 500.0, 899.0):  # the same flood again and again: dictionary hits only
        assert all(cache.resolve(a, t) is None for a in flood)
    assert cache.aes_passes == 1000 and cache.hits == 600
    assert cache.resolve(flood[0], 900.0) is None  # expired: one more pass per IRK
    assert cache.aes_passes == 1005


def test_an_enrolled_phone_is_recognised_whatever_address_it_uses() -> None:
    irks = _irks(5)
    cache: RpaCache[int] = RpaCache(irks)
    addresses = [_address(irks[3], bytes((0x40 | i, i, i))) for i in range(10)]
    assert [cache.resolve(a, 10.0) for a in addresses] == [3] * 10
    before = cache.aes_passes
    assert cache.aes_passes <= 10 * 5
    assert [cache.resolve(a, 11.0) for a in addresses] == [3] * 10
    assert cache.aes_passes == before


def test_resolve_many_gives_resolves_answers_batching_new_addresses() -> None:
    irks = _irks(40)
    phones = [_address(irks[i], bytes((0x40 | i, i, 7))) for i in (0, 13, 39)]
    flood = [_random_rpa() for _ in range(300)]
    drain = [*flood[:100], phones[1], "F0:81:94:0D:FB:AA", phones[0], "junk", *flood[100:], phones[2],
             phones[1], flood[5]]
    one: RpaCache[int] = RpaCache(irks)
    many: RpaCache[int] = RpaCache(irks)
    expected = [one.resolve(a, 5.0) for a in drain]
    assert many.resolve_many(drain, 5.0) == expected
    assert [expected[drain.index(p)] for p in phones] == [0, 13, 39]
    assert many.misses == one.misses == 303  # each distinct resolvable address once
    assert many.aes_passes == 303 * 40  # the batch tries every IRK on every new address
    assert many.resolve_many(drain, 6.0) == expected
    assert many.aes_passes == 303 * 40 and many.hits == len(drain) - 2  # the second time: hits only
    assert many.resolve_many([], 7.0) == []
    small: RpaCache[int] = RpaCache(irks)  # a drain with few new addresses takes resolve's path
    assert small.resolve_many([phones[2], phones[2], flood[0]], 5.0) == [39, 39, None]


@PROPS
@given(st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=6, unique=True),
       st.lists(st.tuples(st.integers(0, 6), st.binary(min_size=3, max_size=3)), min_size=4, max_size=40))
def test_resolve_many_agrees_with_rpa_matches(keys: list[bytes], picks: list[tuple[int, bytes]]) -> None:
    """Index len(keys) or more stands for an address of no enrolled key."""
    stranger = b"\xa5" * 16
    drain = []
    for which, prand in picks:
        key = keys[which] if which < len(keys) else stranger
        drain.append(_address(key, bytes((prand[0] & 0x3F | 0x40,)) + prand[1:]))
    cache: RpaCache[int] = RpaCache(dict(enumerate(keys)))
    got = cache.resolve_many(drain, 0.0)
    for address, ident in zip(drain, got, strict=True):
        matching = [i for i, key in enumerate(keys) if rpa_matches(key, address)]
        assert ident == (matching[0] if matching else None)


def test_addresses_that_are_not_resolvable_cost_nothing() -> None:
    cache: RpaCache[int] = RpaCache(_irks(3))
    for address in ("F0:81:94:0D:FB:AA", "00:11:22:33:44:55", "garbage", ""):
        assert cache.resolve(address, 0.0) is None
    assert cache.aes_passes == 0 and len(cache) == 0


def test_the_cache_is_bounded() -> None:
    cache: RpaCache[int] = RpaCache(_irks(1), max_entries=16)
    for _ in range(500):
        cache.resolve(_random_rpa(), 0.0)
        assert len(cache) <= 16
    assert cache.aes_passes == 500


def test_enrolling_forgets_misses_and_removal_drops_answers() -> None:
    irks = _irks(3)
    phone = H("00112233445566778899aabbccddeeff")
    address = _address(phone, H("5a0102"))
    cache: RpaCache[int] = RpaCache(irks)
    assert cache.resolve(address, 0.0) is None  # not enrolled yet: remembered as unknown
    cache.add(7, phone)
    assert cache.resolve(address, 1.0) == 7
    assert cache.resolve(address, 2.0) == 7
    cache.remove(7)
    assert cache.resolve(address, 3.0) is None
    assert cache.irk_count == 3
    with pytest.raises(ValueError, match="irk: expected 16 bytes"):
        cache.add(8, b"\x01" * 15)


# --- the app's rotating iBeacon ------------------------------------------------------------------

# docs/identities.md prints these: secret 000102...1f (32 bytes), HMAC-SHA256 over the window as 8 bytes
# big-endian. 7621ed8d... for window 1961111 was checked with `openssl dgst -sha256 -mac HMAC`.
APP_SECRET = bytes(range(32))
APP_VECTORS = [(0, (40716, 55737)), (1, (50226, 57433)), (1961111, (30241, 60813))]


@pytest.mark.parametrize(("window", "expected"), APP_VECTORS)
def test_app_beacon_vectors(window: int, expected: tuple[int, int]) -> None:
    assert app_beacon(APP_SECRET, window) == expected
    digest = hmac.new(APP_SECRET, window.to_bytes(8, "big"), hashlib.sha256).digest()
    assert expected == (int.from_bytes(digest[0:2], "big"), int.from_bytes(digest[2:4], "big"))


def test_app_window() -> None:
    assert app_window(1765000000) == 1961111  # 2025-12-06 05:46:40 UTC, 15-minute windows
    assert app_window(899.9) == 0 and app_window(900.0) == 1
    assert app_window(3600, 60) == 60
    with pytest.raises(ValueError, match="period_s"):
        app_window(0, 0)
    with pytest.raises(ValueError, match="time_s"):
        app_window(float("nan"))


def test_app_beacon_rejects_weak_secrets_and_bad_windows() -> None:
    with pytest.raises(ValueError, match="secret: expected at least 16 bytes"):
        app_beacon(b"short", 1)
    with pytest.raises(ValueError, match="window"):
        app_beacon(APP_SECRET, -1)


# --- the rotating table --------------------------------------------------------------------------

NOW = 1_765_000_000.0
EPOCH = 1_700_000_000  # the beacons' clocks started here


def _secret(i: int) -> bytes:
    return hashlib.sha256(b"secret%d" % i).digest()


def _table(n_eid: int = 20, n_app: int = 20, k: int = 10) -> tuple[RotatingTable[str], list, list]:
    eids = [EidEntry(f"eid{i}", _secret(i)[:16], k, EPOCH) for i in range(n_eid)]
    apps = [AppEntry(f"app{i}", _secret(1000 + i)) for i in range(n_app)]
    table: RotatingTable[str] = RotatingTable()
    table.build([*eids, *apps], NOW)
    return table, eids, apps


def _eid_at(entry: EidEntry, now: float) -> bytes:
    return eid(entry.identity_key, entry.k, int(now) - entry.epoch)


def test_table_resolves_previous_current_and_next_app_windows_only() -> None:
    table, _, apps = _table()
    w = app_window(NOW)
    for entry in apps:
        for window in (w - 1, w, w + 1):
            assert table.lookup_app(*app_beacon(entry.secret, window)) == entry.ident
        for window in (w - 2, w + 2):
            assert table.lookup_app(*app_beacon(entry.secret, window)) is None


def test_table_resolves_eids_within_the_clock_slack() -> None:
    table, eids, _ = _table()
    for entry in eids:
        assert table.lookup_eid(_eid_at(entry, NOW)) == entry.ident
        assert table.lookup_eid(_eid_at(entry, NOW + 500)) == entry.ident  # beacon clock 500 s fast
        assert table.lookup_eid(_eid_at(entry, NOW - 500)) == entry.ident  # or slow
        assert table.lookup_eid(_eid_at(entry, NOW + 5000)) is None  # too far: another beacon's business
    assert table.lookup_eid(b"\x00" * 8) is None
    assert table.lookup_eid(b"") is None and table.lookup_app(0, 0) is None


def test_eid_offset_tells_how_far_a_beacon_clock_has_drifted() -> None:
    table, eids, _ = _table(n_eid=1, n_app=1)
    entry = eids[0]
    assert table.eid_offset("eid0", _eid_at(entry, NOW)) == 0
    assert table.eid_offset("eid0", _eid_at(entry, NOW + 1024)) == 1024  # one K = 10 window fast
    assert table.eid_offset("eid0", _eid_at(entry, NOW - 1024)) == -1024
    assert table.eid_offset("eid0", b"\x00" * 8) is None
    assert table.eid_offset("app0", b"\x00" * 8) is None and table.eid_offset("nobody", b"") is None


def test_refresh_moves_windows_incrementally() -> None:
    table, eids, apps = _table(n_eid=10, n_app=10)
    rows = table.rows
    assert table.refresh(NOW) == 0  # nothing due: nothing computed
    w = app_window(NOW)
    later = (w + 1) * 900.0  # the next app window starts
    computed = table.refresh(later)
    assert computed >= len(apps)  # one new window per app (and any EID window that came due)
    for entry in apps:
        assert table.lookup_app(*app_beacon(entry.secret, w + 2)) == entry.ident
        assert table.lookup_app(*app_beacon(entry.secret, w - 1)) is None
    day = later
    for _ in range(96):  # a day of 15-minute steps
        day += 900
        table.refresh(day)
    for entry in eids:
        assert table.lookup_eid(_eid_at(entry, day)) == entry.ident
    for entry in apps:
        assert table.lookup_app(*app_beacon(entry.secret, app_window(day))) == entry.ident
    assert table.rows == rows  # bounded: windows leave as they enter


def test_table_bounds_small_rotation_exponents() -> None:
    table, eids, _ = _table(n_eid=5, n_app=0, k=0)  # K = 0: a new EID every second
    assert table.rows == 5 * table.max_eid_windows
    for entry in eids:
        assert table.lookup_eid(_eid_at(entry, NOW)) == entry.ident
        assert table.lookup_eid(_eid_at(entry, NOW + 1)) == entry.ident
    table.refresh(NOW + 100)
    assert table.rows == 5 * table.max_eid_windows
    for entry in eids:
        assert table.lookup_eid(_eid_at(entry, NOW + 100)) == entry.ident


def test_removal_drops_rows_at_once() -> None:
    table, eids, apps = _table(n_eid=3, n_app=3)
    gone_eid, gone_app = _eid_at(eids[1], NOW), app_beacon(apps[1].secret, app_window(NOW))
    table.remove("eid1")
    table.remove("app1")
    table.remove("never-enrolled")
    assert table.lookup_eid(gone_eid) is None and table.lookup_app(*gone_app) is None
    assert len(table) == 4
    table.refresh(NOW + 86400)  # its heap entries come up and are skipped
    assert table.lookup_eid(_eid_at(eids[1], NOW + 86400)) is None
    assert table.lookup_eid(_eid_at(eids[0], NOW + 86400)) == "eid0"


def test_a_key_two_identities_share_resolves_to_neither_until_one_leaves() -> None:
    table: RotatingTable[str] = RotatingTable()
    table.build([AppEntry("a", APP_SECRET), AppEntry("b", APP_SECRET)], NOW)
    beacon = app_beacon(APP_SECRET, app_window(NOW))
    assert table.lookup_app(*beacon) is None and table.collisions == 3
    table.remove("a")
    assert table.lookup_app(*beacon) == "b" and table.collisions == 0


def test_readding_replaces() -> None:
    table, eids, _ = _table(n_eid=1, n_app=0)
    old = _eid_at(eids[0], NOW)
    table.add(EidEntry("eid0", b"\x42" * 16, 10, EPOCH), NOW)
    assert table.lookup_eid(old) is None
    assert table.lookup_eid(eid(b"\x42" * 16, 10, int(NOW) - EPOCH)) == "eid0"


def test_table_memory_for_ten_thousand_identities_is_under_20_mb() -> None:
    table, _, _ = _table(n_eid=5000, n_app=5000)
    assert table.rows == 30000 - table.collisions
    assert table.size_bytes() < 20_000_000
    cache: RpaCache[int] = RpaCache(_irks(3334), max_entries=65536)
    for _ in range(1000):
        cache.resolve(_random_rpa(), 0.0)
    assert cache.size_bytes() < 10_000_000


def test_a_bounded_refresh_spreads_a_window_edge_without_missing_lookups() -> None:
    table, _, apps = _table(n_eid=0, n_app=50)
    w = app_window(NOW)
    edge = (w + 1) * 900.0
    done = table.refresh(edge, max_windows=10)
    assert done == 10 and table.pending == 40
    for entry in apps:  # the window that starts now was already in: nobody is missed meanwhile
        assert table.lookup_app(*app_beacon(entry.secret, w + 1)) == entry.ident
    while table.pending:
        assert table.refresh(edge + 1, max_windows=10) <= 10
    for entry in apps:
        assert table.lookup_app(*app_beacon(entry.secret, w + 2)) == entry.ident
        assert table.lookup_app(*app_beacon(entry.secret, w - 1)) is None


def test_replacing_an_identity_leaves_no_stale_schedule() -> None:
    table, eids, _ = _table(n_eid=1, n_app=1)
    for _ in range(20):
        table.add(eids[0], NOW)
        table.add(AppEntry("app0", _secret(1000)), NOW)
    assert table.refresh(NOW + 900 * 4) <= 2 * 4 + 2 * 4  # each identity moved once, not once per re-add
    assert len(table._due) == 2


@pytest.mark.parametrize(("make", "message"), [
    (lambda: EidEntry("x", b"short", 10), "identity_key"),
    (lambda: EidEntry("x", EID_KEY, 16), "k: the rotation exponent"),
    (lambda: AppEntry("x", b"short"), "secret"),
    (lambda: AppEntry("x", APP_SECRET, 0), "period_s"),
    (lambda: RotatingTable(max_eid_windows=2), "max_eid_windows"),
    (lambda: RpaCache(max_entries=0), "max_entries"),
])
def test_entries_are_checked_when_made(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_two_days_of_rotating_values_share_nothing_an_observer_could_link() -> None:
    """What a scanner without keys records: two shop days (09:00-18:00, a sighting a minute) of 30 customers,
    ten of each kind. No value repeats across windows or days, so nothing links a customer's two visits;
    with the keys, every value of both days resolves to the same customer."""
    eids = [EidEntry(f"e{i}", _secret(i)[:16], 10, EPOCH + 977 * i) for i in range(10)]
    apps = [AppEntry(f"a{i}", _secret(100 + i)) for i in range(10)]
    irks = {f"r{i}": _secret(200 + i)[:16] for i in range(10)}
    day1 = 1_765_011_600  # a 09:00 UTC
    days = (day1, day1 + 86400)
    seen: dict[str, list[set[object]]] = {}  # customer -> per day, the values heard
    windows: dict[object, set[tuple[int, int]]] = {}  # value -> the (day, window) it was heard in
    resolved: dict[str, set[object]] = {}
    cache: RpaCache[str] = RpaCache(irks)
    table: RotatingTable[str] = RotatingTable()
    for d, start in enumerate(days):
        table.build([*eids, *apps], start)
        for minute in range(9 * 60):
            now = start + 60 * minute
            table.refresh(now)
            heard: list[tuple[str, object, object]] = []
            for e in eids:
                eid_value = _eid_at(e, now)
                heard.append((e.ident, eid_value, table.lookup_eid(eid_value)))
            for a in apps:
                beacon = app_beacon(a.secret, app_window(now))
                heard.append((a.ident, beacon, table.lookup_app(*beacon)))
            for ident, irk in irks.items():  # a new address every 15 minutes, prand from the phone's RNG
                seed = hashlib.sha256(f"{ident}{now // 900}".encode()).digest()
                address = _address(irk, bytes((seed[0] & 0x3F | 0x40,)) + seed[1:3])
                heard.append((ident, address, cache.resolve(address, now)))
            for customer, value, who in heard:
                seen.setdefault(customer, [set(), set()])[d].add(value)
                windows.setdefault(value, set()).add((d, now // 900))
                resolved.setdefault(customer, set()).add(who)
    for ident, (first, second) in seen.items():
        assert first and second and not first & second, ident  # nothing carried from one day to the next
    for heard_value, when in windows.items():
        assert len({d for d, _ in when}) == 1, heard_value  # each value on one day only,
        span = max(w for _, w in when) - min(w for _, w in when)
        assert span <= 2, heard_value  # and within one rotation (EID K = 10: 17 minutes, two 15-minute slots)
    assert all(who == {ident} for ident, who in resolved.items())  # the keys link them all
    assert len(resolved) == 30


@pytest.mark.parametrize("slack", [0, 7, 100, 600])
def test_refresh_holds_what_a_fresh_build_would_for_every_k(slack: int) -> None:
    """The incremental refresh (each identity woken only when its window set changes) never lags a build."""
    rng = random.Random(slack)
    entries: list[EidEntry[int] | AppEntry[int]] = [
        EidEntry(i, rng.randbytes(16), k, epoch=rng.randrange(10**6)) for i, k in enumerate([0, 1, 3, 5, 8, 10, 15])]
    entries += [AppEntry(100 + i, rng.randbytes(32), 60) for i in range(3)]
    table: RotatingTable[int] = RotatingTable(eid_slack_s=slack)
    now = NOW + 0.5
    table.build(entries, now)
    for _ in range(400):
        now += rng.choice([0.3, 1.0, 7.0, 33.0])
        table.refresh(now)
        fresh: RotatingTable[int] = RotatingTable(eid_slack_s=slack)
        fresh.build(entries, now)
        assert table._eids == fresh._eids and table._apps == fresh._apps
