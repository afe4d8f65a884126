"""The guard: floods and rotating addresses limited as Home Assistant does, passers-by ignored, state bounded."""

from __future__ import annotations

import random
import tracemalloc

from beacons.guard import Guard, GuardSettings
from beacons.parse import parse_payload
from beacons.types import Advertisement, IBeacon
from gateway.app.config import Settings
from gateway.presence.settings import PresenceSettings, ReceiverSettings, ZoneBand
from gateway.profiles.identity import IdentityIndex

UUID = "e2c56db5-dffb-48d2-b060-d0f5a71096e0"
T0 = 1_780_000_000.0


def beacon(minor: int, uuid: str = UUID, major: int = 1) -> IBeacon:
    return IBeacon(uuid, major, minor, -59)


def feed(g: Guard, address: str, frame: IBeacon, times: list[float]) -> list[bool]:
    return [g.admit(address, frame, t) for t in times]


def test_a_steady_beacon_passes_after_proving_itself_and_every_drop_has_a_reason():
    g = Guard(GuardSettings(stable_after=3, stable_window_s=10))
    assert feed(g, "aa:01", beacon(1), [T0, T0 + 1, T0 + 2, T0 + 3]) == [False, False, True, True]
    assert g.dropped["transient"] == 2
    assert g.figures["admitted"] == 2 and g.figures["stable_identities"] == 1


def test_a_passer_by_heard_briefly_is_never_admitted_then_accepted_once_it_lingers():
    g = Guard(GuardSettings(stable_after=3, stable_window_s=10))
    # Walking past the window: heard twice, 3 s apart, then gone; again a minute later.
    assert not any(feed(g, "aa:02", beacon(2), [T0, T0 + 3, T0 + 60, T0 + 64]))
    assert g.dropped["transient"] == 4
    # Then it stays near the door: three sightings in a window and it passes.
    assert feed(g, "aa:02", beacon(2), [T0 + 100, T0 + 101, T0 + 102]) == [False, False, True]


def test_slow_tags_are_admitted_once_heard_for_the_window():
    """Tags advertising every 5.5-10 s never get 3 sightings into 10 s, yet they are really there."""
    for n, interval in enumerate((5.5, 6.0, 10.0)):
        g = Guard(GuardSettings(stable_after=3, stable_window_s=10))
        got = feed(g, f"aa:1{n}", beacon(10 + n), [T0 + k * interval for k in range(8)])
        first = got.index(True)
        assert first * interval >= 10.0 and first * interval <= 10.0 + interval  # after ~10 s of being heard
        assert all(got[first:])
    # A gap longer than twice the window starts the proof again.
    g = Guard(GuardSettings(stable_after=3, stable_window_s=10))
    assert feed(g, "aa:20", beacon(20), [T0, T0 + 25, T0 + 50]) == [False, False, False]


def test_enrolled_tags_pass_at_once_even_when_slow():
    g = Guard(GuardSettings(stable_after=3, stable_window_s=10), trusted=lambda key: key == beacon(30).key)
    assert feed(g, "aa:30", beacon(30), [T0, T0 + 30, T0 + 60]) == [True, True, True]
    assert feed(g, "aa:31", beacon(31), [T0, T0 + 30, T0 + 60]) == [False, False, False]  # not enrolled


def test_an_address_flooding_many_identities_is_ignored_including_the_ones_it_sent_before():
    g = Guard(GuardSettings(max_ids_per_address=10, stable_after=1))
    results = [g.admit("bad:01", beacon(minor), T0 + minor * 0.01) for minor in range(30)]
    assert results[:9] == [True] * 9  # up to the cap it is an ordinary sender
    assert not any(results[9:])
    assert g.dropped["address_flood"] == 21 and g.figures["ignored_addresses"] == 1
    assert not g.admit("bad:01", beacon(0), T0 + 1), "an ignored address gets nothing through, old ids included"
    assert g.admit("good:01", beacon(500), T0 + 1), "other addresses are unaffected"
    # Silence for longer than forget_after_s: the address gets a fresh start.
    assert g.admit("bad:01", beacon(0), T0 + 1 + g.settings.forget_after_s + 1)


def test_one_identity_rotating_addresses_is_tracked_by_identity_with_a_capped_address_set():
    g = Guard(GuardSettings(max_addresses_per_identity=10, stable_after=3, stable_window_s=10))
    frame = beacon(7)
    admitted = [g.admit(f"rpa:{k:04x}", frame, T0 + k) for k in range(200)]  # a new random address per advert
    assert admitted[:2] == [False, False] and all(admitted[2:]), "identity proves itself across addresses"
    assert g.figures["rotating_identities"] == 1
    ident = g._identities[frame.key]
    assert ident.addresses is None, "no address list kept once it is known to rotate"


def test_identity_with_its_address_set_at_the_cap_stops_collecting_addresses():
    g = Guard(GuardSettings(max_addresses_per_identity=4, stable_after=1))
    for k in range(3):
        g.admit(f"rpa:{k}", beacon(1), T0 + k)
    assert g._identities[beacon(1).key].addresses == {"rpa:0", "rpa:1", "rpa:2"}
    assert g.figures["rotating_identities"] == 0
    g.admit("rpa:3", beacon(1), T0 + 3)
    assert g._identities[beacon(1).key].addresses is None and g.figures["rotating_identities"] == 1


def test_a_uuid_spewing_random_major_minor_is_ignored_but_enrolled_identities_are_not():
    enrolled = {beacon(9999).key}
    g = Guard(GuardSettings(max_ids_per_uuid=50, stable_after=1), trusted=enrolled.__contains__)
    results = [g.admit(f"addr:{m}", beacon(m), T0 + m * 0.1) for m in range(60)]
    assert all(results[:50]) and not any(results[50:])
    assert g.figures["ignored_uuids"] == 1 and g.dropped["uuid_flood"] == 10
    assert not g.admit("addr:0", beacon(0), T0 + 10), "identities of an ignored uuid are purged"
    assert g.admit("addr:x", beacon(9999), T0 + 10), "an enrolled customer with that uuid still passes"
    other = IBeacon("11111111-2222-3333-4444-555555555555", 1, 1, -59)
    assert g.admit("addr:y", other, T0 + 10)


def test_time_comes_from_the_advertisements_not_a_wall_clock():
    g = Guard(GuardSettings(stable_after=2, stable_window_s=5))
    # Virtual years apart: the window restarts; seconds apart: it proves. No wall clock involved.
    assert feed(g, "aa:03", beacon(3), [0.0, 1e8, 1e8 + 1]) == [False, False, True]


def test_state_stays_bounded_under_a_flood_of_random_addresses():
    """200,000 fresh random addresses, a hundred times the cap (half carrying random identities, half one
    rotating identity)."""
    cap = 2048
    g = Guard(GuardSettings(max_addresses=cap, max_identities=cap, stable_after=2))
    customer = beacon(1, uuid="aaaaaaaa-0000-0000-0000-000000000000")
    frames = [beacon(m, uuid=f"{m:08x}-0000-0000-0000-000000000000") for m in range(4096)]
    rotating = beacon(2)
    getrandbits = random.Random(7).getrandbits
    admit = g.admit
    t = T0

    def stream(start: int, stop: int) -> None:
        nonlocal t
        for k in range(start, stop):
            t += 0.001
            admit(f"{getrandbits(48):012x}", rotating if k & 1 else frames[k & 4095], t)
            if k % 10 == 0:
                admit("cu:st:om:er:00:01", customer, t)

    for start in range(0, 150_000, 50_000):
        stream(start, start + 50_000)
        size = g.state_size()
        assert size["addresses"] <= cap and size["identities"] <= cap and size["uuids"] <= cap, size
    tracemalloc.start()  # what the last 50,000 adverts leave behind: at most the capped tables
    try:
        stream(150_000, 200_000)
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert retained < 2_000_000, f"{retained} bytes retained: state grows with the stream"
    assert g.figures["evicted"] > 180_000 and g.figures["rotating_identities"] == 1
    assert g.dropped["transient"] > 80_000, "fresh random identities never prove themselves"
    assert g.admit("cu:st:om:er:00:01", customer, t + 0.01), "the steady customer was never pushed out"
    assert g.admit(f"{getrandbits(48):012x}", rotating, t + 0.02), "the rotating identity still passes"


def test_pipeline_counts_guard_drops_and_parse_stats():
    """Wired into Pipeline.ingest_adverts: a transient is never seen by presence; counters are exposed."""
    from beacons.encode import ibeacon_payload
    from gateway.app.pipeline import Pipeline
    from gateway.campaigns.model import CampaignIndex

    settings = Settings(presence=PresenceSettings(),
                        receivers=[ReceiverSettings(id="rx", zones=[ZoneBand(name="door", max_m=5.0)])])
    p = Pipeline(settings, db=None, campaigns=CampaignIndex([]), identities=IdentityIndex())  # type: ignore[arg-type]
    payload = ibeacon_payload(UUID, 1, 42)
    assert parse_payload(payload)[0].key == beacon(42).key
    p.ingest_adverts([Advertisement("aa:bb", -60, T0, "rx", payload)])  # heard once: a passer-by
    assert beacon(42).key not in p.presence.tracks
    p.ingest_adverts([Advertisement("aa:bb", -60, T0 + k * 0.5, "rx", payload) for k in range(1, 6)])
    assert beacon(42).key in p.presence.tracks
    stats = p.stats()
    assert stats["guard"]["dropped"]["transient"] == 2
    assert stats["parse"]["accepted"]["ibeacon"] == 6
    assert stats["figures"]["adverts"] == 6


def test_what_the_guard_knows_about_an_address_expires_with_silence():
    """Unknown passers-by leave nothing behind: their address and identity are forgotten after the window."""
    g = Guard(GuardSettings(stable_after=1, forget_after_s=60))
    for k in range(5):
        g.admit(f"passer:{k}", beacon(100 + k), T0 + k)
    assert g.state_size()["addresses"] == 5 and g.state_size()["identities"] == 5
    g.admit("later:01", beacon(1), T0 + 200)  # advert time moves on; the sweep runs on it, no wall clock
    assert g.state_size() == {"addresses": 1, "identities": 1, "uuids": 1}
    assert g.figures["expired"] == 10


def test_how_a_stream_is_cut_into_drains_changes_nothing():
    """Drains of 250 (the tables held in locals across a drain) against one advert per call (``admit``), on a
    stream with every case: steady tags, passers-by, an address flood, a rotating phone, a uuid spewing ids, TLM
    frames without identity, Eddystone, and table caps small enough that housekeeping replaces the tables
    mid-drain."""
    from beacons.types import EddystoneTLM, EddystoneUID, Sighting

    rng = random.Random(3)
    eddy = EddystoneUID("0102030405060708090a", "0000000000aa", -20)
    tlm = EddystoneTLM(3000, 21.0, 10, 100.0)
    stream: list[tuple[Advertisement, object]] = []
    t = T0
    for k in range(6000):
        t += rng.uniform(0.0, 0.05)
        u = rng.random()
        if u < 0.4:
            address, frame = f"st:{k % 7}", beacon(k % 7)
        elif u < 0.5:
            address, frame = "fl:00", beacon(1000 + k % 40)  # one address, many identities
        elif u < 0.6:
            address, frame = f"ro:{k}", beacon(77)  # one identity, a new address every advert
        elif u < 0.7:
            address, frame = f"sp:{k % 3}", beacon(k, uuid="bbbbbbbb-0000-0000-0000-000000000000")
        elif u < 0.8:
            address, frame = "ed:01", (tlm if k % 4 == 0 else eddy)
        else:
            address, frame = f"px:{rng.getrandbits(16)}", beacon(rng.getrandbits(12) + 5000)  # passers-by
        stream.append((Advertisement(address, -60 - k % 30, t, "rx"), frame))
    settings = GuardSettings(max_addresses=64, max_identities=64, stable_after=2, forget_after_s=20)
    trusted = {beacon(3).key}.__contains__
    one, many = Guard(settings, trusted), Guard(settings, trusted)
    expected = [Sighting(f.key, a.receiver, a.rssi, a.time, f.ref_power)  # type: ignore[attr-defined]
                for a, f in stream if f.key is not None and one.admit(a.address, f, a.time)]  # type: ignore[attr-defined]
    got: list[Sighting] = []
    for start in range(0, len(stream), 250):  # drains of 250
        got += many.sightings(stream[start:start + 250])  # type: ignore[arg-type]
    assert got == expected and all(type(s) is Sighting for s in got)
    assert many.stats() == one.stats()
    assert one.figures["evicted"] > 0 and one.figures["ignored_addresses"] > 0 and one.dropped["transient"] > 0
    assert one.figures["rotating_identities"] > 0 and one.figures["ignored_uuids"] > 0


def test_an_identity_evicted_mid_drain_proves_itself_again():
    """Housekeeping run by one advert of a drain (a new address into full tables) replaces the tables: the
    drain's later adverts see the new ones, so an evicted customer is a new identity, not its old state."""
    x, ys = beacon(1), [beacon(k) for k in (2, 3, 4)]
    g = Guard(GuardSettings(max_addresses=4, max_identities=4, stable_after=2),
              trusted={y.key for y in ys}.__contains__)
    drain = [(Advertisement("a0", -60, T0, "rx"), x), (Advertisement("a0", -60, T0 + 0.5, "rx"), x)]
    drain += [(Advertisement(f"a{k}", -60, T0 + k, "rx"), y) for k, y in enumerate(ys, 1)]
    drain.append((Advertisement("b0", -60, T0 + 4, "rx"), x))  # a new address: tables full, halved, x evicted
    got = g.sightings(drain)  # type: ignore[arg-type]
    assert [s.key for s in got] == [x.key] + [y.key for y in ys]  # x's first advert and its last one dropped
    assert g.dropped["transient"] == 2 and g.figures["evicted"] > 0
    assert g.state_size()["identities"] == 3  # the two newest kept, and x anew
