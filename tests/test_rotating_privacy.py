"""Privacy proven on a recorded capture: two simulated days of enrolled customers carrying the app's rotating
beacon. Without the keys nothing in the capture repeats from one window to the next (addresses, major/minor),
so nothing links a customer's visits; the gateway with the keys counts the same customers as returning."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from beacons import rotating as proto
from beacons.parse import parse_adverts
from beacons.types import Advertisement, IBeacon
from gateway.app.config import Settings
from gateway.app.pipeline import Pipeline
from gateway.app.scenarios import apply_scenario, enrol, enrol_apps
from gateway.campaigns.model import CampaignIndex
from gateway.clock import VirtualClock
from gateway.profiles.identity import IdentityIndex
from gateway.profiles.rotating import RotatingIdentities, SecretBox
from gateway.storage.models import RotatingIdentity
from simulators.scenario import parse_scenario
from simulators.store_sim import AppBeacons, StoreSimulator
from tests.fixtures import make_service

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_780_300_800.0  # 2026-06-01 08:00 UTC
DAY_S = 40 * 60  # each day's stretch: two visits 20 minutes apart
PERIOD_S = 900


def scenario():
    """The example store with three customers, each visiting twice a day, and a few anonymous shoppers."""
    raw = yaml.safe_load((ROOT / "examples/store.yaml").read_text())
    people = raw["people"][:3]
    for p in people:
        p["visits"] = [{"at": 10, "route": [["entrance", 5], ["shoes", 40], ["checkout", 10]]},
                       {"at": 1200, "route": [["entrance", 5], ["apparel", 40], ["checkout", 10]]}]
    raw["people"] = people
    raw["devices"] = []
    raw["carts"] = []
    raw["crowd"]["count"] = 4
    return parse_scenario(raw, source="privacy")


def capture(sc, app: AppBeacons) -> list[list[Advertisement]]:
    """Both days' adverts, in one-second drains (day 2 walks differently: another seed)."""
    drains = []
    for day in (0, 1):
        start = T0 + day * 86400
        sim = StoreSimulator(sc, start=start, seed=7 + day, duration_s=DAY_S, app=app)
        drains += [sim.advertisements(start + t, start + t + 1) for t in range(DAY_S)]
    return drains


def run(pipeline: Pipeline, clock: VirtualClock, drains: list[list[Advertisement]]) -> None:
    for day in (0, 1):
        start = T0 + day * 86400
        for t in range(DAY_S):
            clock.set(start + t + 1)
            pipeline.ingest_adverts(drains[day * DAY_S + t])
            pipeline.tick(clock.now())
        clock.set(start + DAY_S + 600)  # everyone times out: the day's visits end
        pipeline.tick(clock.now())


def test_two_days_nothing_links_without_the_keys_and_the_gateway_counts_returning(db, tmp_path):
    sc = scenario()
    settings = apply_scenario(Settings(data_dir=str(tmp_path)), sc)
    clock = VirtualClock(T0)
    service = make_service(db, clock)
    identities = service.identities
    pipeline = Pipeline(settings, db, CampaignIndex([]), identities)
    service.rotating = RotatingIdentities(db, SecretBox(bytes(range(32))), clock, pipeline.rotating,
                                          period_s=PERIOD_S)
    ids = enrol(service, sc, static_beacons=False)
    app = AppBeacons(settings.identities.app_uuid, PERIOD_S, enrol_apps(service.rotating, sc, ids))
    drains = capture(sc, app)

    # The observer without keys: every value the phones sent, and the windows it was heard in.
    windows: dict[tuple[object, ...], set[int]] = defaultdict(set)
    app_adverts = 0
    for drain in drains:
        for adv, frame in parse_adverts(drain):
            if isinstance(frame, IBeacon) and frame.uuid == settings.identities.app_uuid:
                app_adverts += 1
                w = int(adv.time // PERIOD_S)
                windows[("address", adv.address)].add(w)
                windows[("major/minor", frame.major, frame.minor)].add(w)
    assert app_adverts > 1000
    repeated = {v: sorted(ws) for v, ws in windows.items() if len(ws) > 1}
    assert repeated == {}, repeated  # no value links two windows, let alone two visits or two days
    per_person_windows = 2 * 2 * 2  # at least: two days, two visits, each visit in its own window or two
    assert len({v for v in windows if v[0] == "major/minor"}) >= len(sc.people) * per_person_windows // 2

    # An observer's gateway, without the keys: anonymous footfall, nobody returns.
    blind = Pipeline(settings, db, CampaignIndex([]), IdentityIndex())
    blind_clock = VirtualClock(T0)
    run(blind, blind_clock, drains)
    assert blind.figures["visits_new"] == blind.figures["visits_returning"] == 0
    assert blind.figures["anonymous_visits"] > 0

    # The gateway with the keys: three customers, each new once and returning afterwards.
    run(pipeline, clock, drains)
    assert pipeline.figures["visits_new"] == len(sc.people)
    assert pipeline.figures["visits_returning"] >= 3 * len(sc.people)  # visit 2 of day 1, both of day 2
    assert pipeline.rotating.figures["app"] > 0

    # Erasure: the person's keys and table rows go at once; their adverts are anonymous again.
    gone = ids[sc.people[0].id]
    secret = app.secrets[sc.people[0].beacon.key]
    service.erase_profile(gone)
    with db.session() as s:
        assert s.scalars(select(RotatingIdentity).where(RotatingIdentity.profile_id == gone)).first() is None
    major, minor = proto.app_beacon(secret, proto.app_window(clock.now(), PERIOD_S))
    assert pipeline.rotating._table.lookup_app(major, minor) is None
    assert not pipeline.rotating.holds(gone) and identities.beacon(f"app:{gone}") is None
    assert len(pipeline.rotating) == len(sc.people) - 1


@pytest.mark.parametrize("n", [1, 3, 4, 40])
def test_rpa_drains_agree_with_the_spec_function_known_addresses_cost_nothing_again(n):
    """The resolver's RPA cache, a drain at a time: each address resolved as ah() says, once."""
    rng = random.Random(n)
    irks = {i: rng.randbytes(16) for i in range(1, 51)}
    cache: proto.RpaCache[int] = proto.RpaCache(irks, max_entries=1000)

    def rpa(irk: bytes) -> str:
        prand = bytes([0x40 | rng.getrandbits(6), rng.getrandbits(8), rng.getrandbits(8)])
        return ":".join(f"{b:02X}" for b in prand + proto.rpa_hash(irk, prand))

    owners = [rng.choice(list(irks)) for _ in range(n)]
    mine = [rpa(irks[o]) for o in owners]
    strangers = [rpa(rng.randbytes(16)) for _ in range(n)]
    static = "C1:22:33:44:55:66"  # random static: never resolvable, no AES spent on it
    got = cache.resolve_many(mine + strangers + [static], 100.0)
    assert got == owners + [None] * (n + 1)
    for a, o in zip(mine, owners, strict=True):
        assert proto.rpa_matches(irks[o], a)
    passes = cache.aes_passes
    assert n * len(irks) < passes <= 2 * n * len(irks)  # a stranger costs every IRK, a phone up to its own
    assert cache.resolve_many(mine, 101.0) == owners  # known: nothing computed again
    assert cache.aes_passes == passes
    cache.remove(owners[0])
    assert cache.resolve_many(mine[:1], 102.0) == [None]


def test_rpa_drains_stay_bounded_under_a_flood():
    cache: proto.RpaCache[int] = proto.RpaCache({1: bytes(range(16))}, max_entries=64)
    rng = random.Random(3)
    for second in range(50):
        flood = [":".join(f"{b:02X}" for b in bytes([0x40 | rng.getrandbits(6)]) + rng.randbytes(5))
                 for _ in range(20)]
        assert cache.resolve_many(flood, float(second)) == [None] * 20
        assert len(cache) <= 64
