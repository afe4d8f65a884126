"""BLE advertisement parsers: public test vectors, malformed input, bleak shapes, round trips.

Vectors are copied byte for byte from the named projects' tests or specs, so a parser
change that disagrees with the rest of the ecosystem shows up here.
"""

from __future__ import annotations

import base64
from types import SimpleNamespace
from typing import Any

import pytest
from bleak.backends.scanner import AdvertisementData

from beacons import encode, rotating
from beacons.decode import DecodeError, decode_hex
from beacons.parse import (
    EDDYSTONE_SERVICE_UUID,
    MAX_PAYLOAD,
    MalformedAD,
    ParseStats,
    iter_ad_structures,
    parse_ad_structure,
    parse_advertisement,
    parse_bleak,
    parse_manufacturer,
    parse_payload,
    parse_service_data,
)
from beacons.types import (
    Advertisement,
    AltBeacon,
    EddystoneEID,
    EddystoneTLM,
    EddystoneUID,
    EddystoneURL,
    Frame,
    IBeacon,
)

H = bytes.fromhex


def only(payload: bytes) -> tuple[Frame, ParseStats]:
    stats = ParseStats()
    frames = parse_payload(payload, stats)
    assert len(frames) == 1, (frames, stats)
    return frames[0], stats


def rejected(payload: bytes) -> ParseStats:
    stats = ParseStats()
    assert parse_payload(payload, stats) == []
    assert stats.rejected.total() >= 1 and not stats.accepted
    return stats


# --- iBeacon ------------------------------------------------------------------------------

# beacontools (citruz/beacontools) tests/test_parser.py, test_ibeacon
BEACONTOOLS_IBEACON = (b"\x02\x01\x06\x1a\xff\x4c\x00\x02\x15\x41\x42\x43\x44\x45\x46\x47\x48"
                       b"\x49\x40\x41\x42\x43\x44\x45\x46\x00\x01\x00\x02\xf8")
# beacontools tests/test_parser.py, test_cypress_beacon (Cypress CYALKIT-E02)
BEACONTOOLS_CYPRESS = (b"\x02\x01\x04\x1a\xff\x4c\x00\x02\x15\x00\x05\x00\x01\x00\x00\x10\x00"
                       b"\x80\x00\x00\x80\x5f\x9b\x01\x31\x00\x02\x6c\x66\xc3")
# bluetooth-data-tools (Bluetooth-Devices/bluetooth-data-tools) tests/test_gap.py,
# test_parse_advertisement_data_unknown_apple_215
BDT_APPLE_215 = base64.b64decode("AgEGGv9MAAIV1Ubfl0dXR+++CT4ty90MdxU2zcm1")
# bluetooth-data-tools tests/test_gap.py, test_parse_advertisement_data_unknown_apple_device
BDT_APPLE_NEARBY = base64.b64decode("AgEaAgoFCv9MABAFChx3+Vs=")
# ibeacon-ble (Bluetooth-Devices/ibeacon-ble) tests/test_init.py, SERVICE_INFO (BlueCharm beacon)
IBEACON_BLE_MFG = {76: b"\x02\x15BlueCharmBeacons\x0e\xfe\x13U\xc5"}
IBEACON_BLE_SERVICE = {
    "00002080-0000-1000-8000-00805f9b34fb": b"k\x0c\x0e\xfe\x13U",
    "0000feaa-0000-1000-8000-00805f9b34fb": b" \x00\x0b\xfe\x1c\x00\x00\x00\x07\x08\x00\x00>|",
}


def test_ibeacon_beacontools_vector() -> None:
    frame, stats = only(BEACONTOOLS_IBEACON)
    assert frame == IBeacon("41424344-4546-4748-4940-414243444546", 1, 2, -8)
    assert frame.key == "ibeacon:41424344-4546-4748-4940-414243444546:1:2"
    assert stats.accepted == {"ibeacon": 1} and not stats.rejected


def test_ibeacon_cypress_vector() -> None:
    frame, _ = only(BEACONTOOLS_CYPRESS)
    assert isinstance(frame, IBeacon)
    assert (frame.uuid, frame.major, frame.tx_power) == ("00050001-0000-1000-8000-00805f9b0131", 2, -61)


def test_ibeacon_bluetooth_data_tools_vector() -> None:
    frame, _ = only(BDT_APPLE_215)
    assert frame == IBeacon("d546df97-4757-47ef-be09-3e2dcbdd0c77", 0x1536, 0xCDC9, -75)


def test_apple_continuity_is_not_a_beacon() -> None:
    assert rejected(BDT_APPLE_NEARBY).rejected == {"not_a_beacon": 1}


def test_ibeacon_ble_vector_through_bleak_shape() -> None:
    stats = ParseStats()
    adv = SimpleNamespace(manufacturer_data=IBEACON_BLE_MFG, service_data=IBEACON_BLE_SERVICE)
    frames = parse_bleak(adv, stats)
    assert frames == [
        IBeacon("426c7565-4368-6172-6d42-6561636f6e73", 3838, 4949, -59),
        EddystoneTLM(voltage_mv=3070, temperature_c=28.0, advertising_count=1800, uptime_s=1599.6),
    ]
    assert stats.accepted == {"ibeacon": 1, "eddystone_tlm": 1}


def test_ibeacon_ble_not_ibeacon_vector() -> None:
    # ibeacon-ble tests/test_init.py, NOT_IBEACON_SERVIE_INFO: iBeacon bytes under company 21
    stats = ParseStats()
    assert parse_manufacturer(21, b"\x02\x15BlueCharmBeacons\x0e\xfe\x13U\xc5", stats) is None
    assert stats.rejected == {"not_a_beacon": 1}


@pytest.mark.parametrize("data", [
    b"\x02\x15" + bytes(20),            # one byte short
    b"\x02\x15" + bytes(22),            # one byte long
    b"\x02\x16" + bytes(21),            # right size, wrong inner length
    b"\x02",
])
def test_ibeacon_wrong_lengths(data: bytes) -> None:
    stats = ParseStats()
    assert parse_manufacturer(0x004C, data, stats) is None
    assert stats.rejected == {"ibeacon_length": 1}
    assert parse_payload(encode.ad_structure(0xFF, b"\x4c\x00" + data), stats) == []
    assert stats.rejected == {"ibeacon_length": 2}


def test_ibeacon_as_dict() -> None:
    frame, _ = only(BEACONTOOLS_IBEACON)
    assert frame.as_dict() == {"format": "ibeacon", "uuid": "41424344-4546-4748-4940-414243444546",
                               "major": 1, "minor": 2, "tx_power": -8}


# --- AltBeacon ----------------------------------------------------------------------------

# android-beacon-library (AltBeacon/android-beacon-library)
# lib/src/test/java/org/altbeacon/beacon/AltBeaconParserTest.java, testRecognizeBeacon
ALT_RECOGNIZE = H("02011a1bff1801beac2f234454cf6d4a0fadf2f4911ba9ffa600010002c50900")
# AltBeaconParserTest.java, testDetectsDaveMHardwareBeacon (RadBeacon USB, with a name)
ALT_DAVEM = H("02011a1bff1801beac2f234454cf6d4a0fadf2f4911ba9ffa600050003be020e09526164426561636f6e"
              "20555342020a0300000000000000000000000000")
# AltBeaconParserTest.java, testDetectsAlternateBeconType (type code 0xaabb, not 0xbeac)
ALT_OTHER_CODE = H("02011a1bff1801aabb2f234454cf6d4a0fadf2f4911ba9ffa600010002c50900")
# AltBeaconParserTest.java, testParseWrongFormatReturnsNothing
ALT_WRONG_FORMAT = H("02011a1aff1801ffff2f234454cf6d4a0fadf2f4911ba9ffa600010002c509")
# AltBeaconParserTest.java, testParsesBeaconMissingDataField (no mfg reserved byte)
ALT_MISSING_RESERVED = H("02011a1aff1801beac2f234454cf6d4a0fadf2f4911ba9ffa600010002c5000000")
# lib/src/test/java/org/altbeacon/beacon/BeaconParserTest.java, testParseProblematicBeaconFromIssue229
ALT_ISSUE_229 = H("0201061bffe000beac7777772e626c756b692e636f6d000100010001abaa000000")
# BeaconParserTest.java, testParseManufacturerIdentifierThatRunsOverPduLength (AD length 0x16)
ALT_SHORT_AD = H("02011a16ff1801beac2f234454cf6d4a0fadf2f4911ba9ffa600010002c509000000")
# BeaconParserTest.java, doesNotCashWithOverflowingByteCodeComparisonOnPdu
ALT_HALF_CODE = H("02010604ffe000be")


def test_altbeacon_recognize_vector() -> None:
    frame, _ = only(ALT_RECOGNIZE)
    assert frame == AltBeacon("2f234454cf6d4a0fadf2f4911ba9ffa600010002", -59, 9, 0x0118)
    assert frame.key == "altbeacon:2f234454cf6d4a0fadf2f4911ba9ffa600010002"
    assert frame.as_dict() == {
        "format": "altbeacon", "beacon_id": "2f234454cf6d4a0fadf2f4911ba9ffa600010002",
        "tx_power": -59, "mfg_reserved": 9,
        "uuid": "2f234454-cf6d-4a0f-adf2-f4911ba9ffa6", "major": 1, "minor": 2,
    }


def test_altbeacon_with_name_and_tx_power_structures() -> None:
    frame, _ = only(ALT_DAVEM)
    assert isinstance(frame, AltBeacon)
    assert (frame.major, frame.minor, frame.tx_power, frame.mfg_reserved) == (5, 3, -66, 2)


def test_altbeacon_missing_reserved_byte_is_accepted() -> None:
    frame, _ = only(ALT_MISSING_RESERVED)
    assert isinstance(frame, AltBeacon)
    assert (frame.uuid, frame.major, frame.minor, frame.tx_power) == (
        "2f234454-cf6d-4a0f-adf2-f4911ba9ffa6", 1, 2, -59)
    assert frame.mfg_reserved is None


def test_altbeacon_other_company_id() -> None:
    frame, _ = only(ALT_ISSUE_229)
    assert isinstance(frame, AltBeacon)
    assert frame.company_id == 0x00E0
    assert frame.beacon_id == "7777772e626c756b692e636f6d000100010001ab"


@pytest.mark.parametrize(("payload", "reason"), [
    (ALT_OTHER_CODE, "not_a_beacon"),
    (ALT_WRONG_FORMAT, "truncated_ad"),   # the trailing 0x09 is a length running past the end
    (ALT_SHORT_AD, "altbeacon_length"),
    (ALT_HALF_CODE, "not_a_beacon"),
])
def test_altbeacon_rejects(payload: bytes, reason: str) -> None:
    assert rejected(payload).rejected == {reason: 1}


# --- Eddystone ----------------------------------------------------------------------------

# beacontools tests/test_parser.py, test_eddystone_uid
BT_UID = (b"\x02\x01\x06\x03\x03\xaa\xfe\x17\x16\xaa\xfe\x00\xe3\x12\x34\x56\x78\x90"
          b"\x12\x34\x67\x89\x01\x00\x00\x00\x00\x00\x01\x00\x00")
# beacontools tests/test_parser.py, test_eddystone_url
BT_URL = b"\x03\x03\xAA\xFE\x13\x16\xAA\xFE\x10\xF8\x03github\x00citruz"
# beacontools tests/test_parser.py, test_eddystone_tlm (note the stray trailing 0xe4 byte)
BT_TLM = (b"\x02\x01\x06\x03\x03\xaa\xfe\x11\x16\xaa\xfe\x20\x00\x0b\x18\x13\x00\x00"
          b"\x00\x14\x67\x00\x00\x2a\xc4\xe4")
# beacontools tests/test_parser.py, test_eddystone_tlm_enc (encrypted TLM, version 1)
BT_TLM_ENC = (b"\x02\x01\x06\x03\x03\xaa\xfe\x11\x16\xaa\xfe\x20\x01\x41\x41\x41"
              b"\x41\x41\x41\x41\x41\x41\x41\x41\x41\xDE\xAD\xBE\xFF")
BT_TLM_ENC_FRAMED = BT_TLM_ENC[:7] + b"\x15" + BT_TLM_ENC[8:]
# beacontools tests/test_parser.py, test_eddystone_eid
BT_EID = b"\x02\x01\x06\x03\x03\xaa\xfe\x0d\x16\xaa\xfe\x30\xe3\x45\x49\x44\x5f\x74\x65\x73\x74"
# beacontools tests/test_parser.py, test_bad_packets (the last one: Eddystone frame type 0x01)
BT_BAD_FRAME = (b"\x02\x01\x06\x03\x03\xaa\xfe\x17\x16\xaa\xfe\x01\xe3\x12\x34\x56\x78\x90"
                b"\x12\x34\x67\x89\x01\x00\x00\x00\x00\x00\x01\x00\x00")
# android-beacon-library BeaconParserTest.java, testParseGattIdentifierThatRunsOverPduLength
ABL_URL = H("0201060303aafe0d16aafe10e702676f6f676c65000c09526164426561636f6e2047000000000000000000"
            "00000000000000000000000000000000000000")


def test_eddystone_uid_vector() -> None:
    frame, _ = only(BT_UID)
    assert frame == EddystoneUID("12345678901234678901", "000000000001", -29)
    assert frame.key == "eddystone_uid:12345678901234678901:000000000001"
    assert frame.as_dict() == {"format": "eddystone_uid", "namespace": "12345678901234678901",
                               "instance": "000000000001", "tx_power": -29}


def test_eddystone_uid_without_rfu_bytes() -> None:
    # Eddystone spec (google/eddystone) eddystone-uid/README.md: older UIDs omit the RFU
    # bytes (service data length 0x15); the namespace is the spec's elided-UUID example.
    frame = encode.eddystone_uid_frame("8b0ca750095477cb3e77", "000000000001", -20)[:-2]
    assert parse_service_data(EDDYSTONE_SERVICE_UUID, frame) == EddystoneUID(
        "8b0ca750095477cb3e77", "000000000001", -20)


def test_eddystone_url_vectors() -> None:
    frame, _ = only(BT_URL)
    assert frame == EddystoneURL("https://github.com/citruz", -8)
    assert frame.key == "eddystone_url:https://github.com/citruz"
    assert frame.as_dict() == {"format": "eddystone_url", "url": "https://github.com/citruz", "tx_power": -8}
    frame, _ = only(ABL_URL)
    assert frame == EddystoneURL("http://google.com/", -25)


# android-beacon-library lib/src/test/java/org/altbeacon/beacon/utils/UrlBeaconUrlCompressorTest.java:
# the uncompress/compress pairs (scheme byte + encoded URL).
URL_COMPRESSOR_VECTORS = [
    (b"\x02google.co", "http://google.co"),
    (b"\x02google\x00123", "http://google.com/123"),
    (b"\x01radiusnetworks\x07", "https://www.radiusnetworks.com"),
    (b"\x01radiusnetworks\x00", "https://www.radiusnetworks.com/"),
    (b"\x02xxx", "http://xxx"),
    (b"\x00forums.google\x07", "http://www.forums.google.com"),
    (b"\x00forums.google\x00", "http://www.forums.google.com/"),
    (b"\x02google\x0b", "http://google.info"),
    (b"\x02google.ca", "http://google.ca"),
    (b"\x02goo.gl/C2HC48", "http://goo.gl/C2HC48"),
]


@pytest.mark.parametrize(("encoded", "url"), URL_COMPRESSOR_VECTORS)
def test_eddystone_url_expansion(encoded: bytes, url: str) -> None:
    assert parse_service_data(EDDYSTONE_SERVICE_UUID, b"\x10\xee" + encoded) == EddystoneURL(url, -18)
    assert encode.encode_url(url) == encoded


def test_eddystone_url_longer_than_spec_is_rejected() -> None:
    # UrlBeaconUrlCompressorTest.java, testUncompressWithSubdomainsAndSlashesInPath: 21 encoded
    # bytes, more than the 17 the Eddystone-URL spec allows (and a legacy advert can carry).
    encoded = b"\x00forums.google\x00123/456"
    stats = ParseStats()
    assert parse_service_data(EDDYSTONE_SERVICE_UUID, b"\x10\xee" + encoded, stats) is None
    assert stats.rejected == {"eddystone_url_length": 1}
    with pytest.raises(ValueError, match="at most 17"):
        encode.encode_url("http://www.forums.google.com/123/456")


def test_eddystone_url_scheme_in_caps() -> None:
    # UrlBeaconUrlCompressorTest.java, testCompressWithSchemeInCaps
    assert encode.encode_url("HTTP://goo.gl/C2HC48") == b"\x02goo.gl/C2HC48"


def test_eddystone_tx_power_examples_from_spec() -> None:
    # Eddystone spec eddystone-url/README.md: 0x12 is +18 dBm, 0xEE is -18 dBm
    for byte, dbm in ((0x12, 18), (0xEE, -18)):
        frame = parse_service_data(EDDYSTONE_SERVICE_UUID, bytes((0x10, byte, 0x03)) + b"x")
        assert frame == EddystoneURL("https://x", dbm)


def test_eddystone_tlm_vector_is_truncated_as_published() -> None:
    # The published vector carries one stray byte (0xe4) after the TLM structure: read as
    # a length it runs past the end, which is a framing error, so the whole advert goes.
    assert rejected(BT_TLM).rejected == {"truncated_ad": 1}
    frame, _ = only(BT_TLM[:-1])
    assert frame == EddystoneTLM(voltage_mv=2840, temperature_c=19.0, advertising_count=5223,
                                 uptime_s=1094.8)
    assert frame.key is None and frame.tx_power is None
    assert frame.as_dict() == {"format": "eddystone_tlm", "voltage_mv": 2840, "temperature_c": 19.0,
                               "advertising_count": 5223, "uptime_s": 1094.8}


def test_eddystone_tlm_not_supported_values() -> None:
    # Eddystone spec eddystone-tlm/tlm-plain.md: voltage 0 and temperature 0x8000 mean "not supported"
    data = bytes((0x20, 0x00, 0x00, 0x00, 0x80, 0x00)) + (7).to_bytes(4, "big") + (25).to_bytes(4, "big")
    assert parse_service_data(EDDYSTONE_SERVICE_UUID, data) == EddystoneTLM(None, None, 7, 2.5)


def test_eddystone_tlm_negative_temperature() -> None:
    data = bytes((0x20, 0x00, 0x0B, 0xB8, 0xFF, 0x80)) + bytes(8)  # -0.5 C in 8.8 fixed point
    frame = parse_service_data(EDDYSTONE_SERVICE_UUID, data)
    assert isinstance(frame, EddystoneTLM) and frame.temperature_c == -0.5 and frame.voltage_mv == 3000


def test_eddystone_encrypted_tlm_is_counted_not_parsed() -> None:
    # As published, the AD length (0x11) leaves salt and MIC outside the structure, so the
    # bytes after it are a framing error; with the length corrected to 0x15 it is a
    # well-formed version-1 (encrypted) TLM, which is counted and not read.
    assert rejected(BT_TLM_ENC).rejected == {"truncated_ad": 1}
    assert rejected(BT_TLM_ENC_FRAMED).rejected == {"eddystone_tlm_version": 1}


def test_eddystone_eid_vector() -> None:
    frame, _ = only(BT_EID)
    assert frame == EddystoneEID(b"EID_test".hex(), -29)
    assert frame.key == "eddystone_eid:4549445f74657374"
    assert frame.as_dict() == {"format": "eddystone_eid", "eid": "4549445f74657374", "tx_power": -29}


def test_a_rotating_eid_parses_to_a_new_opaque_key_each_window() -> None:
    """An EID beacon's frames, computed as the spec says (beacons.rotating), through both parser paths and
    their caches: each window's EID is its own key, and the key carries the 8 bytes the resolver looks up."""
    ik = H("0102030405060708090a111213141516")  # RadiusNetworks/ephemeral_calc's key: EID a9b76a71c5f89290 at 0
    keys = []
    for t in (0, 1023, 1024, 2048, 0):
        value = rotating.eid(ik, 10, t)
        raw_frame, _ = only(encode.eddystone_eid_payload(value, -20))
        svc = {EDDYSTONE_SERVICE_UUID: encode.eddystone_eid_frame(value, -20)}
        bleak_frames = parse_bleak(SimpleNamespace(manufacturer_data={}, service_data=svc))
        assert bleak_frames == [raw_frame] == [EddystoneEID(value.hex(), -20)]
        assert isinstance(raw_frame, EddystoneEID)
        assert bytes.fromhex(raw_frame.eid) == value and raw_frame.ref_power == -61
        keys.append(raw_frame.key)
    assert keys[0] == "eddystone_eid:a9b76a71c5f89290"
    assert keys[0] == keys[1] == keys[4] and len({keys[0], keys[2], keys[3]}) == 3


def test_a_parsed_eid_resolves_through_the_rotating_table() -> None:
    ik, epoch, now = bytes(range(16)), 1_700_000_000, 1_765_000_000.0
    table: rotating.RotatingTable[str] = rotating.RotatingTable()
    table.build([rotating.EidEntry("beacon-7", ik, 12, epoch)], now)
    heard = rotating.eid(ik, 12, int(now) - epoch)
    (frame,) = parse_payload(encode.eddystone_eid_payload(heard, -18))
    assert isinstance(frame, EddystoneEID)
    assert table.lookup_eid(bytes.fromhex(frame.eid)) == "beacon-7"
    assert table.lookup_eid(bytes.fromhex(EddystoneEID("00" * 8, -18).eid)) is None


def test_eddystone_unknown_frame_vector() -> None:
    assert rejected(BT_BAD_FRAME).rejected == {"eddystone_unknown_frame": 1}


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "eddystone_empty"),
    (b"\x40\x00", "eddystone_unknown_frame"),
    (b"\x00\xe3" + bytes(15), "eddystone_uid_length"),
    (b"\x00\xe3" + bytes(17), "eddystone_uid_length"),
    (b"\x00\xe3" + bytes(19), "eddystone_uid_length"),
    (b"\x10\xe3", "eddystone_url_length"),
    (b"\x10\xe3\x03" + b"a" * 18, "eddystone_url_length"),
    (b"\x10\xe3\x04abc", "eddystone_url_scheme"),
    (b"\x10\xe3\x03ab\x0ec", "eddystone_url_reserved_code"),
    (b"\x10\xe3\x03ab c", "eddystone_url_reserved_code"),
    (b"\x10\xe3\x03ab\x7f", "eddystone_url_reserved_code"),
    (b"\x10\xe3\x03ab\xff", "eddystone_url_reserved_code"),
    (b"\x20", "eddystone_tlm_length"),
    (b"\x20\x00" + bytes(11), "eddystone_tlm_length"),
    (b"\x20\x00" + bytes(13), "eddystone_tlm_length"),
    (b"\x20\x02" + bytes(12), "eddystone_tlm_version"),
    (b"\x30\xe3" + bytes(7), "eddystone_eid_length"),
    (b"\x30\xe3" + bytes(9), "eddystone_eid_length"),
])
def test_eddystone_rejects(data: bytes, reason: str) -> None:
    stats = ParseStats()
    assert parse_service_data(EDDYSTONE_SERVICE_UUID, data, stats) is None
    assert parse_payload(encode.eddystone_payload(data), stats) == []
    assert stats.rejected == {reason: 2} and not stats.accepted


@pytest.mark.parametrize("uuid", [EDDYSTONE_SERVICE_UUID, EDDYSTONE_SERVICE_UUID.upper(), "feaa", "0xFEAA"])
def test_eddystone_uuid_spellings(uuid: str) -> None:
    assert parse_service_data(uuid, b"\x30\xe3" + bytes(8)) == EddystoneEID("00" * 8, -29)


def test_other_service_data_is_not_a_beacon() -> None:
    stats = ParseStats()
    assert parse_service_data("0000fd6f-0000-1000-8000-00805f9b34fb", b"\x30\xe3" + bytes(8), stats) is None
    assert parse_payload(b"\x0d\x16\x6f\xfd\x30\xe3" + bytes(8), stats) == []
    assert stats.rejected == {"not_a_beacon": 2}


# --- framing ------------------------------------------------------------------------------

IBEACON = encode.ibeacon_payload("e2c56db5-dffb-48d2-b060-d0f5a71096e0", 7, 9)


def test_iter_ad_structures() -> None:
    assert list(iter_ad_structures(BT_UID)) == [
        (0x01, b"\x06"), (0x03, b"\xaa\xfe"), (0x16, BT_UID[9:]),
    ]
    assert list(iter_ad_structures(b"\x01\x09")) == [(0x09, b"")]   # type only, no data
    assert list(iter_ad_structures(b"\x02\x01\x06\x00\x05\xff")) == [(0x01, b"\x06")]  # zero ends it
    assert list(iter_ad_structures(b"")) == []


def test_iter_ad_structures_truncated() -> None:
    with pytest.raises(MalformedAD, match="truncated AD structure at offset 3") as info:
        list(iter_ad_structures(b"\x02\x01\x06\x05\xff\x4c"))
    assert info.value.offset == 3 and info.value.reason == "truncated_ad"


@pytest.mark.parametrize(("payload", "reason"), [
    (b"", "empty"),
    (b"0000000", "truncated_ad"),                 # beacontools test_bad_packets
    (b"\x02\x01\x06\x03\x03", "truncated_ad"),    # beacontools test_bad_packets
    (IBEACON + b"\x02", "truncated_ad"),          # trailing garbage
    (IBEACON + b"\x05\xff\x4c\x00", "truncated_ad"),
    (IBEACON[:-1], "truncated_ad"),               # cut short
    (b"\x1b" + IBEACON[4:], "truncated_ad"),      # AD length one too big
    (b"\x00", "not_a_beacon"),                    # zero-length AD: nothing there
    (bytes(31), "not_a_beacon"),
    (b"\x00" + IBEACON, "not_a_beacon"),          # the zero ends the data before the beacon
    (b"\x01\xff", "not_a_beacon"),                # manufacturer data without a company id
    (b"\x02\x01\x06", "not_a_beacon"),
    (IBEACON * 60, "oversized"),
])
def test_malformed_payloads(payload: bytes, reason: str) -> None:
    assert rejected(payload).rejected == {reason: 1}


def test_oversized_limit() -> None:
    padding = encode.ad_structure(0x09, b"n" * 200) * 8
    assert len(IBEACON + padding) <= MAX_PAYLOAD
    assert parse_payload(IBEACON + padding) == parse_payload(IBEACON)
    big = IBEACON + padding + bytes(MAX_PAYLOAD)
    assert rejected(big).rejected == {"oversized": 1}


def test_zero_padding_after_beacon_is_fine() -> None:
    frame, stats = only(IBEACON + bytes(10) + b"\x05\xff")  # after the zero, nothing counts
    assert frame == IBeacon("e2c56db5-dffb-48d2-b060-d0f5a71096e0", 7, 9, -59)
    assert not stats.rejected


def test_two_frames_and_a_reject_in_one_advert() -> None:
    payload = (encode.ibeacon_payload("e2c56db5-dffb-48d2-b060-d0f5a71096e0", 1, 2, flags=False)
               + encode.ad_structure(0x16, b"\xaa\xfe" + encode.eddystone_eid_frame("0102030405060708"))
               + encode.ad_structure(0x16, b"\xaa\xfe\x50\x00"))
    stats = ParseStats()
    frames = parse_payload(payload, stats)
    assert [f.format for f in frames] == ["ibeacon", "eddystone_eid"]
    assert stats.accepted == {"ibeacon": 1, "eddystone_eid": 1}
    assert stats.rejected == {"eddystone_unknown_frame": 1}
    assert stats.total == 3


def test_repeated_and_mutable_payloads_give_equal_frames() -> None:
    stats = ParseStats()
    first = parse_payload(IBEACON, stats)
    assert parse_payload(bytes(bytearray(IBEACON)), stats) == first
    assert parse_payload(bytearray(IBEACON), stats) == first  # type: ignore[arg-type]
    assert parse_payload(memoryview(IBEACON), stats) == first  # type: ignore[arg-type]
    assert stats.accepted == {"ibeacon": 4}
    assert parse_payload(IBEACON) is not first  # callers own the list they get


def test_parse_ad_structure() -> None:
    stats = ParseStats()
    assert parse_ad_structure(0xFF, IBEACON[5:], stats) == IBeacon(
        "e2c56db5-dffb-48d2-b060-d0f5a71096e0", 7, 9, -59)
    assert parse_ad_structure(0x09, b"name", stats) is None
    assert parse_ad_structure(0xFF, b"\x4c", stats) is None
    assert stats.accepted == {"ibeacon": 1} and stats.rejected == {"not_a_beacon": 2}


def test_stats_snapshot_and_dict() -> None:
    stats = ParseStats()
    parse_payload(IBEACON, stats)
    parse_payload(b"\x02\x01\x06", stats)
    assert stats.as_dict() == {"accepted": {"ibeacon": 1}, "rejected": {"not_a_beacon": 1}}
    assert stats.total == 2
    assert "ibeacon" in repr(stats)


def test_non_bytes_may_raise_type_error() -> None:
    with pytest.raises(TypeError):
        parse_payload(["not", "bytes"])  # type: ignore[arg-type]


# --- Advertisement and bleak shapes --------------------------------------------------------

def test_parse_advertisement_prefers_payload() -> None:
    adv = Advertisement("AA:BB", -60, 1.0, "r1", payload=IBEACON,
                        manufacturer_data={0x004C: BEACONTOOLS_IBEACON[7:]})
    assert [f.key for f in parse_advertisement(adv)] == [
        "ibeacon:e2c56db5-dffb-48d2-b060-d0f5a71096e0:7:9"]


def test_parse_advertisement_dicts() -> None:
    stats = ParseStats()
    adv = Advertisement("AA:BB", -60, 1.0, "r1", manufacturer_data={0x004C: BEACONTOOLS_IBEACON[7:]},
                        service_data={EDDYSTONE_SERVICE_UUID: BT_UID[11:]})
    frames = parse_advertisement(adv, stats)
    assert frames == [IBeacon("41424344-4546-4748-4940-414243444546", 1, 2, -8),
                      EddystoneUID("12345678901234678901", "000000000001", -29)]
    empty = Advertisement("AA:BB", -60, 1.0, "r1")
    assert parse_advertisement(empty, stats) == []
    assert stats.rejected == {"empty": 1}


def test_parse_bleak_advertisement_data() -> None:
    """A real bleak AdvertisementData, as BlueZ would hand it over."""
    data = AdvertisementData(
        local_name="BlueCharm_177999", manufacturer_data=IBEACON_BLE_MFG,
        service_data=IBEACON_BLE_SERVICE, service_uuids=[EDDYSTONE_SERVICE_UUID], tx_power=None,
        rssi=-60, platform_data=(),
    )
    stats = ParseStats()
    assert [f.format for f in parse_bleak(data, stats)] == ["ibeacon", "eddystone_tlm"]
    assert [f.format for f in parse_bleak(data, stats)] == ["ibeacon", "eddystone_tlm"]
    assert stats.accepted == {"ibeacon": 2, "eddystone_tlm": 2}


@pytest.mark.parametrize(("mfg", "service", "reason"), [
    ({}, {}, "empty"),
    ({0x004C: b"\x10\x05\x0a\x1c\x77\xf9\x5b"}, {}, "not_a_beacon"),
    ({0x004C: b"\x02\x15" + bytes(20)}, {}, "ibeacon_length"),
    ({0x0118: b"\xbe\xac" + bytes(20)}, {}, "altbeacon_length"),
    ({}, {EDDYSTONE_SERVICE_UUID: b"\x20\x01" + bytes(12)}, "eddystone_tlm_version"),
    ({}, {"0000fe2c-0000-1000-8000-00805f9b34fb": b"\x00"}, "not_a_beacon"),
])
def test_bleak_shape_rejects(mfg: dict[int, bytes], service: dict[str, bytes], reason: str) -> None:
    stats = ParseStats()
    assert parse_bleak(SimpleNamespace(manufacturer_data=mfg, service_data=service), stats) == []
    assert stats.rejected == {reason: 1}


def test_bleak_shape_missing_attributes() -> None:
    stats = ParseStats()
    assert parse_bleak(SimpleNamespace(manufacturer_data={0x004C: IBEACON[7:]}), stats)[0].format == "ibeacon"
    assert parse_bleak(object(), stats) == []
    assert stats.rejected == {"empty": 1}


# --- round trips --------------------------------------------------------------------------

ROUND_TRIPS: list[tuple[bytes, Frame]] = [
    (encode.ibeacon_payload("f7826da6-4fa2-4e98-8024-bc5b71e0893e", 65535, 0, -128),
     IBeacon("f7826da6-4fa2-4e98-8024-bc5b71e0893e", 65535, 0, -128)),
    (encode.altbeacon_payload("2f234454-cf6d-4a0f-adf2-f4911ba9ffa6" + "00010002", -59, 9),
     AltBeacon("2f234454cf6d4a0fadf2f4911ba9ffa600010002", -59, 9, 0x0118)),
    (encode.eddystone_uid_payload("8b0ca750095477cb3e77", "0000000000ff", -20, flags=False),
     EddystoneUID("8b0ca750095477cb3e77", "0000000000ff", -20)),
    (encode.eddystone_url_payload("https://shop.example.org/a7", 18),
     EddystoneURL("https://shop.example.org/a7", 18)),
    (encode.eddystone_tlm_payload(2950, -12.25, 123456, 86400.5),
     EddystoneTLM(2950, -12.25, 123456, 86400.5)),
    (encode.eddystone_tlm_payload(None, None, 0, 0.0), EddystoneTLM(None, None, 0, 0.0)),
    (encode.eddystone_eid_payload(bytes(range(8)), -4), EddystoneEID("0001020304050607", -4)),
]


@pytest.mark.parametrize(("payload", "frame"), ROUND_TRIPS, ids=lambda v: getattr(v, "format", ""))
def test_encode_parse_round_trip(payload: bytes, frame: Frame) -> None:
    assert parse_payload(payload) == [frame]
    assert decode_hex(payload.hex()) == [frame.as_dict()]


def test_ibeacon_encoder_writes_company_id_little_endian() -> None:
    assert IBEACON[5:9] == b"\x4c\x00\x02\x15"  # as on the air, and in every vector above


@pytest.mark.parametrize(("call", "message"), [
    (lambda: encode.encode_url("ftp://x"), "must start with"),
    (lambda: encode.encode_url("https://a b"), "cannot be sent"),
    (lambda: encode.encode_url("https://" + "x" * 18), "at most 17"),
    (lambda: encode.eddystone_uid_frame("00", "00" * 6), "namespace must be 10 bytes"),
    (lambda: encode.altbeacon_payload(bytes(16)), "beacon_id must be 20 bytes"),
    (lambda: encode.eddystone_eid_frame("zz"), "non-hexadecimal"),
])
def test_encoders_refuse_what_cannot_be_sent(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# --- gateway decode ----------------------------------------------------------------------

def test_decode_hex_accepts_common_spellings() -> None:
    expected = [{"format": "ibeacon", "uuid": "d546df97-4757-47ef-be09-3e2dcbdd0c77", "major": 0x1536,
                 "minor": 0xCDC9, "tx_power": -75}]
    plain = BDT_APPLE_215.hex()
    assert decode_hex(plain) == expected
    assert decode_hex("0x" + plain.upper()) == expected
    assert decode_hex(BDT_APPLE_215.hex(" ")) == expected
    assert decode_hex(BDT_APPLE_215.hex(":")) == expected
    assert decode_hex(f"  {plain}\n") == expected


def test_decode_hex_several_frames() -> None:
    adv = BEACONTOOLS_IBEACON + encode.ad_structure(0x16, b"\xaa\xfe" + encode.eddystone_eid_frame(bytes(8)))
    assert [d["format"] for d in decode_hex(adv.hex())] == ["ibeacon", "eddystone_eid"]


@pytest.mark.parametrize(("text", "message"), [
    ("", "malformed hex: no digits"),
    ("0x", "malformed hex: no digits"),
    ("02010g", "malformed hex: 'g' is not a hex digit"),
    ("020", r"malformed hex: odd number of digits \(3\)"),
    ("02 01 06 05 ff 4c", "truncated AD structure at offset 3"),
    (BT_TLM.hex(), "truncated AD structure at offset 25"),
    ("020106", "no beacon found in 1 AD structures$"),
    (BDT_APPLE_NEARBY.hex(), "no beacon found in 3 AD structures$"),
    (BT_TLM_ENC_FRAMED.hex(), r"no beacon found in 3 AD structures \(rejected: eddystone_tlm_version\)"),
    ("00" * (MAX_PAYLOAD + 1), "exceeds"),
])
def test_decode_hex_errors(text: str, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_hex(text)


def test_eddystone_power_is_brought_from_0_m_to_the_1_m_reference() -> None:
    """Eddystone advertises power at 0 m; the Eddystone spec's conversion is 41 dB down to 1 m."""
    uid, _ = only(BT_UID)  # beacontools vector: tx -29 dBm at 0 m
    url, _ = only(BT_URL)  # beacontools vector: tx -8 dBm at 0 m
    eid, _ = only(BT_EID)  # beacontools vector: tx -29 dBm at 0 m
    assert (uid.tx_power, uid.ref_power) == (-29, -70)
    assert (url.tx_power, url.ref_power) == (-8, -49)
    assert eid.ref_power == -70
    ib = encode.ibeacon_payload("8f3c0a52-6d1e-4b7a-9c2d-5e4f3a2b1c00", 1, 2, -59)
    assert only(ib)[0].ref_power == -59  # iBeacon's measured power is already at 1 m


def test_an_eddystone_beacon_heard_at_2_m_lands_in_the_near_zone() -> None:
    """The audit's case: -20 dBm at 0 m is -61 dBm at 1 m, so -67 dBm is about 2 m away."""
    from beacons.types import Sighting
    from gateway.presence.settings import PresenceSettings, ReceiverSettings, ZoneBand
    from gateway.presence.tracker import PresenceTracker

    frame = parse_service_data(EDDYSTONE_SERVICE_UUID, encode.eddystone_uid_frame("8b0ca750095477cb3e77",
                                                                                    "000000000001", -20))
    assert frame is not None and frame.ref_power == -61
    t = PresenceTracker(PresenceSettings(enter_hold_s=0.0),
                        [ReceiverSettings("rx", [ZoneBand("near", 3.0)])])  # no measured power: the beacon's
    events = []
    for i in range(30):  # 3 s at 10 Hz (the HMM tracker wants a few looks, not five adverts in 0.4 s)
        events += t.observe(Sighting(frame.key, "rx", -67, 1000.0 + i * 0.1, frame.ref_power))
    assert ("enter", "near") in [(e.kind, e.zone) for e in events]
