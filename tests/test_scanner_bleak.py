"""The gateway's own bleak scanner code, run against bumble's virtual controller.

Beacons are bumble devices advertising real AD bytes over a LocalLink; each adapter hears them
with the RSSI the simulator's radio model gives for the distance. `BleakSource` goes through
`bleak.BleakScanner(backend=...)`, so everything from bleak's callback to the gateway's parser
is the production path. Time for the watchdog and the backoff is a fake clock with a fake sleep;
the radio runs on the event loop, and tests wait for it by bounded polling only.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import pytest

from beacons.bleak_virtual import VirtualAdapter, VirtualAir, advertisement_data
from beacons.encode import ad_structure, altbeacon_payload, eddystone_uid_payload, ibeacon_payload
from beacons.parse import parse_advertisement
from beacons.scanner import BleakSource, ScannerGroup, ScannerUnavailable
from beacons.types import Advertisement
from gateway.app.ble import ble_retry
from gateway.delivery.backoff import Backoff
from simulators.radio import expected_rssi
from simulators.scenario import Radio, Receiver, load_scenario
from simulators.store_sim import StoreSimulator
from simulators.virtual_radio import RadioPropagation, VirtualStore

UUID = "426c7565-4368-6172-6d42-6561636f6e73"
NEAR, FAR = f"ibeacon:{UUID}:1:1", f"ibeacon:{UUID}:1:2"
EDDY = "eddystone_uid:00112233445566778899:aabbccddeeff"
ALT_ID = "0123456789abcdef0123456789abcdef00070009"
ALT = f"altbeacon:{ALT_ID}"


def _receiver() -> Receiver:
    return Receiver(id="rx-test", position=(0.0, 0.0), zones=(), measured_power=-59, path_loss_exponent=2.0,
                    rssi_offset=3.0)


def _radio(sigma: float = 3.0) -> Radio:
    return Radio(tx_power=-59, shadowing_sigma_db=sigma, advert_interval_s=0.05, loss=0.0)


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Bounded polling for a condition the radio (another task) satisfies."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class FakeTime:
    """A clock and a sleep the test moves by hand: sleepers wake only when time is advanced past them."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, fut))
        await fut

    @property
    def sleeping(self) -> int:
        return sum(1 for _, f in self._sleepers if not f.done())

    def advance(self, seconds: float) -> None:
        self.now += seconds
        keep = []
        for deadline, fut in self._sleepers:
            if fut.done():
                continue
            if deadline <= self.now:
                fut.set_result(None)
            else:
                keep.append((deadline, fut))
        self._sleepers = keep


async def _air(sigma: float = 3.0, **kwargs: object) -> tuple[VirtualAir, RadioPropagation, VirtualAdapter]:
    prop = RadioPropagation({"hci0": _receiver()}, _radio(sigma), clock=time.time, seed=5)
    air = VirtualAir(prop, **kwargs)  # type: ignore[arg-type]
    adapter = await air.add_adapter("hci0")
    return air, prop, adapter


async def _beacon(air: VirtualAir, prop: RadioPropagation, payload: bytes, at: tuple[float, float],
                  interval_s: float = 0.02) -> str:
    beacon = await air.add_beacon(payload, interval_s=interval_s)
    prop.place(beacon.address, at)
    return beacon.address


def _source(air: VirtualAir, **kwargs: object) -> BleakSource:
    kwargs.setdefault("retry", ble_retry())
    return BleakSource("hci0", backend=air.backend(), receiver="rx-test", **kwargs)  # type: ignore[arg-type]


def _by_identity(adverts: list[Advertisement]) -> dict[str, list[Advertisement]]:
    out: dict[str, list[Advertisement]] = defaultdict(list)
    for adv in adverts:
        for frame in parse_advertisement(adv):
            if frame.key is not None:
                out[frame.key].append(adv)
    return out


async def test_gateway_scanner_hears_virtual_beacons_with_radio_model_rssi(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.scanner")
    air, prop, _ = await _air(sigma=3.0)
    near = await _beacon(air, prop, ibeacon_payload(UUID, 1, 1, -59), (1.0, 0.0))
    far = await _beacon(air, prop, ibeacon_payload(UUID, 1, 2, -59), (0.0, 8.0))
    eddy = await _beacon(air, prop, eddystone_uid_payload("00112233445566778899", "aabbccddeeff"), (3.0, 0.0))
    await _beacon(air, prop, altbeacon_payload(ALT_ID), (0.0, 4.0))  # company 0x0118: or-pattern at offset 2
    got: list[Advertisement] = []
    source = _source(air)
    try:
        await source.start(got.append)
        await until(lambda: all(len(v) >= 25 for v in _by_identity(got).values()) and len(_by_identity(got)) == 4,
                    "25 adverts from each beacon")
    finally:
        await source.stop()
        await air.close()

    seen = _by_identity(got)
    assert set(seen) == {NEAR, FAR, EDDY, ALT}
    assert {a.address for a in seen[NEAR]} == {near} and {a.address for a in seen[FAR]} == {far}
    assert {a.address for a in seen[EDDY]} == {eddy}
    assert {a.receiver for a in got} == {"rx-test"}
    means = {k: statistics.fmean(a.rssi for a in v) for k, v in seen.items()}
    # the model: -59 dBm at 1 m, n = 2, +3 dB receiver offset, shadowing sigma 3 dB
    for key, d in ((NEAR, 1.0), (FAR, 8.0), (EDDY, 3.0), (ALT, 4.0)):
        assert abs(means[key] - (expected_rssi(d, -59.0, 2.0) + 3.0)) < 3.0, (key, means[key])
    assert means[NEAR] > means[EDDY] > means[FAR]
    assert len({a.rssi for a in seen[NEAR]}) > 3  # shadowing noise reaches the gateway: RSSI does not stall
    assert source.mode == "passive"
    assert "passive mode" in caplog.text
    assert source.state() == "stopped"


async def test_passive_refused_falls_back_to_active_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.scanner")
    air, prop, _ = await _air(passive_supported=False)
    await _beacon(air, prop, ibeacon_payload(UUID, 1, 1), (1.0, 0.0))
    got: list[Advertisement] = []
    source = _source(air)
    try:
        await source.start(got.append)
        assert source.mode == "active" and source.state() == "running (active)"
        await until(lambda: NEAR in _by_identity(got), "an advert in active mode")
    finally:
        await source.stop()
        await air.close()
    assert "active mode, because passive was refused" in caplog.text
    assert "--experimental" in caplog.text


async def test_passive_scan_delivers_only_or_pattern_matches_active_delivers_all() -> None:
    air, prop, _ = await _air(sigma=0.0)
    other = await _beacon(air, prop, ad_structure(0x01, b"\x06") + ad_structure(0x09, b"thermo"), (1.0, 0.0))
    await _beacon(air, prop, ibeacon_payload(UUID, 1, 1), (1.0, 0.0))
    counts: dict[str, int] = defaultdict(int)
    calls = {"n": 0}
    inner = air.propagation

    def counting(address: str, adapter: str) -> int | None:
        calls["n"] += 1
        return inner(address, adapter)

    air.propagation = counting
    passive = _source(air)
    try:
        await passive.start(lambda a: counts.__setitem__(a.address, counts[a.address] + 1))
        await until(lambda: calls["n"] >= 40, "40 adverts on the air")
        assert other not in counts and sum(counts.values()) > 0
        await passive.stop()
        active = BleakSource("hci0", "active", backend=air.backend(), retry=ble_retry())
        await active.start(lambda a: counts.__setitem__(a.address, counts[a.address] + 1))
        await until(lambda: other in counts, "the non-beacon advert in active mode")
        await active.stop()
    finally:
        await passive.stop()
        await air.close()


async def test_first_start_failure_is_loud_and_names_the_way_out() -> None:
    air, _, adapter = await _air()
    adapter.fail_starts = 2  # passive, then the active fallback
    source = _source(air)
    with pytest.raises(ScannerUnavailable, match=r"'hci0'.*--adapter hciN.*--no-ble"):
        await source.start(lambda a: None)
    assert source.state() == "unavailable"
    missing = BleakSource("hci7", backend=air.backend(), retry=ble_retry())
    with pytest.raises(ScannerUnavailable, match="adapter 'hci7' not found"):
        await missing.start(lambda a: None)
    await air.close()


async def test_watchdog_restarts_a_silently_stalled_scan() -> None:
    air, prop, adapter = await _air()
    await _beacon(air, prop, ibeacon_payload(UUID, 1, 1), (1.0, 0.0))
    fake = FakeTime()
    source = _source(air, watchdog_s=10.0, sleep=fake.sleep, clock=fake.clock)
    got: list[Advertisement] = []
    try:
        await source.start(got.append)
        await until(lambda: fake.sleeping == 1 and len(got) > 0, "the watchdog asleep and a first advert")
        # adverts keep arriving: 8 s, an advert, 8 s again is never 10 s of silence
        fake.advance(8.0)
        n = len(got)
        await until(lambda: len(got) > n and fake.sleeping == 1, "an advert after 8 s")
        fake.advance(8.0)
        await until(lambda: fake.sleeping == 1, "the watchdog asleep again")
        assert source.watchdog_trips == 0 and adapter.scan_starts == 1

        adapter.stall()  # BlueZ stops delivering, without any error
        await asyncio.sleep(0)
        fake.advance(10.0)
        await until(lambda: source.restarts == 1, "a watchdog restart")
        n = len(got)
        await until(lambda: len(got) > n, "adverts after the restart")
    finally:
        await source.stop()
        await air.close()
    assert source.watchdog_trips == 1 and source.start_failures == 0
    assert adapter.scan_starts == 2
    assert got[-1].time == fake.now  # adverts are stamped from the injected clock


async def test_vanished_adapter_is_retried_with_capped_jittered_backoff_until_it_returns() -> None:
    air, prop, adapter = await _air()
    await _beacon(air, prop, ibeacon_payload(UUID, 1, 1), (1.0, 0.0))
    fake = FakeTime()
    retry = Backoff(base_s=1.0, factor=2.0, max_s=8.0, jitter=0.2, rng=random.Random(7).random)
    source = _source(air, watchdog_s=10.0, sleep=fake.sleep, clock=fake.clock, retry=retry)
    got: list[Advertisement] = []
    try:
        await source.start(got.append)
        await until(lambda: fake.sleeping == 1 and len(got) > 0, "scanning")
        adapter.unplug()
        await asyncio.sleep(0)
        fake.advance(10.0)
        for k in range(1, 7):
            await until(lambda k=k: len(source.delays) == k and fake.sleeping == 1, f"retry {k}")  # type: ignore[misc]
            assert source.state().startswith("retrying") and "not found" in source.state()
            fake.advance(source.delays[-1])
        await until(lambda: len(source.delays) == 7 and fake.sleeping == 1, "retry 7")
        adapter.replug()
        n = len(got)
        fake.advance(source.delays[-1])
        await until(lambda: source.restarts == 1 and len(got) > n, "adverts after the adapter came back")
        assert source.state() == "running (passive)"
    finally:
        await source.stop()
        await air.close()
    delays = source.delays
    assert source.start_failures == 7
    for i, d in enumerate(delays):
        base = min(8.0, 2.0**i)
        assert 0.8 * base <= d <= base, (i, d)
    assert max(delays) <= 8.0 and delays[-1] > 6.0  # grew to the cap and stayed under it
    assert len({round(d / min(8.0, 2.0**i), 6) for i, d in enumerate(delays)}) > 1  # jittered


async def test_stop_during_backoff_is_prompt_and_clean() -> None:
    air, prop, adapter = await _air()
    await _beacon(air, prop, ibeacon_payload(UUID, 1, 1), (1.0, 0.0))
    fake = FakeTime()
    source = _source(air, watchdog_s=5.0, sleep=fake.sleep, clock=fake.clock)
    await source.start(lambda a: None)
    await until(lambda: fake.sleeping == 1, "the watchdog asleep")
    adapter.unplug()
    fake.advance(5.0)
    await until(lambda: len(source.delays) == 1, "a backoff sleep")
    await asyncio.wait_for(source.stop(), 2.0)
    assert source.state() == "stopped"
    assert [t for t in asyncio.all_tasks() if t.get_name() == "scanner-hci0"] == []
    await air.close()


async def test_duplicate_filter_hides_repeats_until_the_scan_restarts() -> None:
    """What Linux does to a passive scan: one report per (address, data); a restart shows fresh RSSI."""
    air, prop, _ = await _air(duplicate_filter=True)
    await _beacon(air, prop, ibeacon_payload(UUID, 1, 1), (1.0, 0.0))
    calls = {"n": 0}
    inner = air.propagation

    def counting(address: str, adapter: str) -> int | None:
        calls["n"] += 1
        return inner(address, adapter)

    air.propagation = counting
    got: list[Advertisement] = []
    source = _source(air, sleep=FakeTime().sleep)
    try:
        await source.start(got.append)
        await until(lambda: calls["n"] >= 30, "30 adverts on the air")
        assert len(got) == 1
        await source.restart()
        await until(lambda: len(got) == 2, "a fresh report after the restart")
    finally:
        await source.stop()
        await air.close()


def test_advertisement_data_is_filled_as_bleaks_bluez_backend_fills_it() -> None:
    svc128 = bytes(reversed(bytes.fromhex("6e400001b5a3f393e0a9e50e24dcca9e")))
    data = advertisement_data([(0x01, b"\x06"), (0x09, b"tag-7"), (0x0A, b"\xf4"), (0x03, b"\xaa\xfe\x0f\x18"),
                               (0x07, svc128), (0xFF, b"\x4c\x00\x02\x15"), (0x16, b"\xaa\xfe\x10"),
                               (0x21, svc128 + b"\x01")], -71)
    assert data.local_name == "tag-7" and data.tx_power == -12 and data.rssi == -71
    assert data.manufacturer_data == {0x004C: b"\x02\x15"}
    assert data.service_uuids == ["0000feaa-0000-1000-8000-00805f9b34fb", "0000180f-0000-1000-8000-00805f9b34fb",
                                  "6e400001-b5a3-f393-e0a9-e50e24dcca9e"]
    assert data.service_data == {"0000feaa-0000-1000-8000-00805f9b34fb": b"\x10",
                                 "6e400001-b5a3-f393-e0a9-e50e24dcca9e": b"\x01"}


def test_a_scanning_mode_that_does_not_exist_is_refused() -> None:
    with pytest.raises(ValueError):
        BleakSource("hci0", "aggressive", retry=ble_retry())


def test_the_entry_points_restart_delays_are_the_scanners_schedule_for_as_long_as_it_fails() -> None:
    """1 s doubling to 60 s, each up to 20 % shorter; still 60 s at most after a day and more of failures."""
    shortest, longest = ble_retry(), ble_retry()
    shortest.rng, longest.rng = (lambda: 1.0), (lambda: 0.0)  # the jitter's two ends
    for attempts in range(1, 12):
        base = min(60.0, 2.0 ** (attempts - 1))
        assert (shortest.delay(attempts), longest.delay(attempts)) == pytest.approx((0.8 * base, base))
    assert 48.0 <= ble_retry().delay(5000) <= 60.0  # no overflow: the scanner retries until the adapter returns


async def test_virtual_store_walkers_are_heard_per_receiver_through_bleak() -> None:
    """The demo's path: present walkers become bumble tags, one BleakSource per scenario receiver."""
    scenario = load_scenario("examples/store.yaml")
    start = 1_767_261_600.0
    sim = StoreSimulator(scenario, start=start, seed=1, duration_s=600)
    clock = {"t": start + 45.0}
    store = VirtualStore(sim, clock=lambda: clock["t"])
    await store.start()
    await store.sync()
    present = {w.key for w in sim.people_present(clock["t"])}
    assert sum(1 for _ in store.air.beacons()) == len(present) > 0  # one tag on the air per walker present
    got: list[Advertisement] = []
    group = ScannerGroup(store.sources(retry=ble_retry()))
    try:
        await group.start(got.append)
        await until(lambda: len(_by_identity(got)) == len(present), "every present tag heard", timeout=15.0)
        assert "rx-entrance: running (passive)" in group.state()
    finally:
        await group.stop()
        await store.close()
    assert set(_by_identity(got)) == present
    assert {a.receiver for a in got} <= {rx.id for rx in scenario.receivers}


async def test_passive_scan_with_the_duplicate_filter_keeps_a_lingering_customer_present() -> None:
    """Linux's controller reports each tag once per passive scan; the staleness check restarts the scan,
    so presence keeps the customer in the zone instead of exiting everyone after exit_after_s."""
    from beacons.types import Sighting
    from gateway.presence.settings import PresenceSettings, ReceiverSettings, ZoneBand
    from gateway.presence.tracker import PresenceTracker

    async def lingering(stale_after_s: float) -> tuple[list[tuple[str, str | None]], BleakSource]:
        air, prop, _ = await _air(duplicate_filter=True)
        await _beacon(air, prop, ibeacon_payload(UUID, 1, 1), (1.0, 0.0))
        fake = FakeTime()
        got: list[Advertisement] = []
        source = _source(air, sleep=fake.sleep, clock=fake.clock, stale_after_s=stale_after_s)
        tracker = PresenceTracker(PresenceSettings(enter_hold_s=0.0),
                                  [ReceiverSettings("rx-test", [ZoneBand("till", 3.0)], measured_power=-56)])
        tracker.enter_samples = 1
        events = []
        fed = 0
        try:
            await source.start(got.append)
            await until(lambda: len(got) == 1, "the first report")
            for _ in range(15):  # 30 s of (fake) time with the customer standing still at 1 m
                fake.advance(2.0)
                await until(lambda: fake.sleeping == 1, "the supervisor asleep again")
                await until(lambda: len(got) == 1 + source.stale_restarts, "a report after each restart")
                for adv in got[fed:]:
                    for frame in parse_advertisement(adv):
                        events += tracker.observe(Sighting(frame.key, adv.receiver, adv.rssi, adv.time,
                                                           frame.ref_power))
                fed = len(got)
                events += tracker.tick(fake.now)
        finally:
            await source.stop()
            await air.close()
        return [(e.kind, e.zone) for e in events if e.kind in ("enter", "exit")], source

    kept, source = await lingering(4.0)
    assert source.mode == "passive" and source.stale_restarts >= 5
    assert kept == [("enter", "till")]  # entered once, never exited while standing there
    lost, source = await lingering(0.0)  # no staleness check: the one report, then silence
    assert source.stale_restarts == 0
    # not kept present: the one report is too little for the HMM tracker to enter on, or it enters and exits
    assert lost in ([], [("enter", "till"), ("exit", "till")])
