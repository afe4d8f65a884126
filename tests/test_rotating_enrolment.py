"""Rotating identities on the gateway: enrolment over the real API, the keys encrypted at rest, resolution
before presence (EID, app beacon, RPA), erasure dropping the keys and the resolver's rows at once."""

from __future__ import annotations

import logging
import os
import random

import httpx
import pytest
from sqlalchemy import select

from beacons import rotating as proto
from beacons.encode import eddystone_eid_payload, ibeacon_payload
from beacons.remote import app_key
from beacons.types import Advertisement
from gateway.app.config import ConfigError, IdentitySettings, Settings
from gateway.errors import Conflict, Invalid, NotFound
from gateway.profiles.identity import IdentityIndex
from gateway.profiles.rotating import Resolver, RotatingIdentities, SecretBox, load_key, read_entries
from gateway.profiles.service import NewProfile
from gateway.storage.models import RotatingIdentity
from tests.fixtures import make_service, runtime_settings

T0 = 1_780_300_800.0
ADMIN = "test-admin-key-rotating-0123456789"
IDENTITY_KEY = bytes.fromhex("e2c56db5dffb48d2b060d0f5a71096e0")
IRK = bytes.fromhex("ec0234a357c8ad05341010a60a397d9b")  # the Core spec's sample
RX = """
[[receivers]]
id = "door"
measured_power = -59
zones = [{ name = "entrance", max_m = 4.0 }]
"""


def rpa(irk: bytes, rng: random.Random) -> str:
    """A resolvable private address made with ``irk``: prand's top bits 0b01, hash = ah(irk, prand)."""
    prand = bytes([0x40 | rng.getrandbits(6), rng.getrandbits(8), rng.getrandbits(8)])
    return ":".join(f"{b:02X}" for b in prand + proto.rpa_hash(irk, prand))


def settings_for(tmp_path) -> Settings:
    s = runtime_settings(tmp_path)
    s.api.admin_key = ADMIN
    from gateway.presence.settings import ReceiverSettings, ZoneBand

    s.receivers = [ReceiverSettings(id="door", zones=[ZoneBand("entrance", 4.0)], measured_power=-59)]
    return s


def adverts(address: str, payload: bytes, t: float, n: int = 5) -> list[Advertisement]:
    return [Advertisement(address, -60, t + i * 0.2, "door", payload) for i in range(n)]


async def test_enrol_over_the_api_resolve_each_kind_and_erase(tmp_path, clock, runtime_factory, caplog):
    caplog.set_level(logging.DEBUG)
    settings = settings_for(tmp_path)
    rt = await runtime_factory(settings)
    base = f"http://127.0.0.1:{settings.api.port}/v1"
    async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": ADMIN}, timeout=10) as client:
        r = await client.post("/profiles", json={"external_id": "rosa", "consents": {"offers": True}})
        assert r.status_code == 201, r.text
        pid = r.json()["id"]
        # Bad input: a clear 422 naming the field, and nothing stored.
        for body, field in (({"kind": "eid", "identity_key": IDENTITY_KEY.hex()}, "k"),
                            ({"kind": "eid", "identity_key": "abcd", "k": 4}, "identity_key"),
                            ({"kind": "irk", "irk": "00" * 16}, "irk"),
                            ({"kind": "app", "irk": IRK.hex()}, "irk"),
                            ({"kind": "eid", "identity_key": IDENTITY_KEY.hex(), "k": 16}, "k"),
                            ({"kind": "tile"}, "kind")):
            r = await client.post(f"/profiles/{pid}/rotating-identities", json=body)
            assert r.status_code == 422, (body, r.text)
            assert field in r.text
        assert (await client.get(f"/profiles/{pid}/rotating-identities")).json() == []
        assert (await client.post("/profiles/999/rotating-identities", json={"kind": "app"})).status_code == 404

        r = await client.post(f"/profiles/{pid}/rotating-identities", json={"kind": "app"})
        assert r.status_code == 201, r.text
        app = r.json()
        secret = bytes.fromhex(app["secret"])
        assert len(secret) == 32 and app["period_s"] == 900 and app["uuid"] == settings.identities.app_uuid
        r = await client.post(f"/profiles/{pid}/rotating-identities",
                              json={"kind": "eid", "identity_key": IDENTITY_KEY.hex(), "k": 8, "epoch": int(T0) - 5000})
        assert r.status_code == 201, r.text
        assert "secret" not in r.json() and r.json()["k"] == 8
        r = await client.post(f"/profiles/{pid}/rotating-identities", json={"kind": "irk", "irk": IRK.hex()})
        assert r.status_code == 201, r.text
        # The same key again, for anyone: 409.
        r = await client.post(f"/profiles/{pid}/rotating-identities", json={"kind": "irk", "irk": IRK.hex()})
        assert r.status_code == 409, r.text

        listed = (await client.get(f"/profiles/{pid}/rotating-identities")).json()
        assert [i["kind"] for i in listed] == ["app", "eid", "irk"]
        assert not any("secret" in i for i in listed)
        exported = (await client.get(f"/profiles/{pid}/export")).json()
        assert [i["kind"] for i in exported["rotating_identities"]] == ["app", "eid", "irk"]
        assert "secret" not in str(exported["rotating_identities"])

        # At rest: ciphertext only; the key file decrypts it.
        with rt.db.session() as s:
            rows = list(s.scalars(select(RotatingIdentity).order_by(RotatingIdentity.id)))
            for row, plain in zip(rows, (secret, IDENTITY_KEY, IRK), strict=True):
                assert plain not in row.secret and plain.hex() not in row.secret.hex()
            box = SecretBox(load_key(settings.identities.key_file, settings.data_dir))
            assert [e.secret for e in read_entries(s, box)] == [secret, IDENTITY_KEY, IRK]
        text = caplog.text
        assert app["secret"] not in text and IDENTITY_KEY.hex() not in text and IRK.hex() not in text

        # Each kind resolves to the profile's one presence key.
        await rt.flush()
        now = clock.now()
        major, minor = proto.app_beacon(secret, proto.app_window(now))
        eid_now = proto.eid(IDENTITY_KEY, 8, int(now) - (int(T0) - 5000))
        rng = random.Random(5)
        kinds = {
            "app": adverts(rpa(os.urandom(16), rng), ibeacon_payload(settings.identities.app_uuid, major, minor), now),
            "eid": adverts("C4:00:00:00:00:01", eddystone_eid_payload(eid_now), now),
            "rpa": adverts(rpa(IRK, rng), b"\x02\x01\x06", now),
        }
        for kind, batch in kinds.items():
            before = rt.pipeline.rotating.figures[kind]
            rt.inject(batch)
            await rt.flush()
            assert rt.pipeline.rotating.figures[kind] > before, kind
        assert app_key(pid) in rt.pipeline.presence.tracks
        assert rt.identities.beacon(app_key(pid)) == pid
        assert not any(k.startswith(("ibeacon:d0e7033a", "eddystone_eid:")) for k in rt.pipeline.presence.tracks)

        # Removing one: that identifier is anonymous from the next advert on.
        r = await client.delete(f"/profiles/{pid}/rotating-identities/{listed[1]['id']}")
        assert r.status_code == 204
        await rt.flush()
        before = rt.pipeline.rotating.figures["eid"]
        rt.inject(kinds["eid"])
        await rt.flush()
        assert rt.pipeline.rotating.figures["eid"] == before

        # Erasure: the keys leave the database and the resolver's table at once.
        r = await client.delete(f"/profiles/{pid}")
        assert r.status_code == 204, r.text
        with rt.db.session() as s:
            assert s.scalars(select(RotatingIdentity)).first() is None
        await rt.flush()
        assert len(rt.pipeline.rotating) == 0
        assert rt.pipeline.rotating._table.lookup_app(major, minor) is None
        assert rt.identities.beacon(app_key(pid)) is None
        rt.inject(kinds["app"] + kinds["rpa"])
        await rt.flush()
        assert app_key(pid) not in rt.pipeline.presence.tracks


def test_storage_both_engines_restart_and_link(any_db, clock, tmp_path):
    """On SQLite and PostgreSQL: enrolled, read back by a new resolver (a restart), moved by a link."""
    settings = Settings(data_dir=str(tmp_path))
    box = SecretBox(load_key(settings.identities.key_file, settings.data_dir))
    service = make_service(any_db, clock)
    identities = service.identities
    resolver = Resolver(identities, app_uuid=settings.identities.app_uuid)
    rot = service.rotating = RotatingIdentities(any_db, box, clock, resolver)
    a = service.create_profile(NewProfile(external_id="a"))["id"]
    b = service.create_profile(NewProfile(external_id="b"))["id"]
    issued = rot.enrol(b, "app")
    rot.enrol(b, "irk", irk=IRK.hex())
    with pytest.raises(Conflict):
        rot.enrol(a, "irk", irk=IRK.hex())
    with pytest.raises(Invalid, match="irk"):
        rot.enrol(a, "irk", irk="zz")
    with pytest.raises(NotFound):
        rot.remove(a, 1)

    again = Resolver(IdentityIndex(), app_uuid=settings.identities.app_uuid)
    with any_db.session() as s:
        again.load(read_entries(s, box), clock.now())
    major, minor = proto.app_beacon(bytes.fromhex(issued["secret"]), proto.app_window(clock.now()))
    assert again._table.lookup_app(major, minor) is not None

    service.link_profiles(a, b)
    assert [i["kind"] for i in rot.list(a)] == ["app", "irk"]
    assert resolver.holds(a) and not resolver.holds(b)
    assert identities.beacon(app_key(a)) == a

    # Another key file opens nothing: the rows are skipped (logged by id), the gateway still starts.
    with any_db.session() as s:
        assert read_entries(s, SecretBox(os.urandom(32))) == []
    service.erase_profile(a)
    assert len(resolver) == 0
    with any_db.session() as s:
        assert s.scalars(select(RotatingIdentity)).first() is None


def test_key_file_forms_and_errors(tmp_path):
    raw = os.urandom(32)
    for i, text in enumerate((raw, raw.hex().encode(), __import__("base64").b64encode(raw) + b"\n")):
        path = tmp_path / f"k{i}"
        path.write_bytes(text)
        assert load_key(str(path), str(tmp_path)) == raw
    (tmp_path / "short").write_bytes(b"0123")
    with pytest.raises(ConfigError, match=r"identities\.key_file: .*short: expected 32 bytes"):
        load_key(str(tmp_path / "short"), str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_key(str(tmp_path / "missing"), str(tmp_path))
    generated = load_key("", str(tmp_path / "data"))
    assert (tmp_path / "data" / "identities.key").stat().st_mode & 0o777 == 0o600
    assert load_key("", str(tmp_path / "data")) == generated
    with pytest.raises(ConfigError, match="app_uuid"):
        IdentitySettings(app_uuid="not-a-uuid")


async def test_a_restart_resolves_what_was_enrolled_before_it(tmp_path, clock, runtime_factory):
    """The keys come back from the database (decrypted with the key file kept in the data dir)."""
    settings = settings_for(tmp_path)
    rt = await runtime_factory(settings)
    pid = rt.service.create_profile(NewProfile(external_id="ines"))["id"]
    assert rt.service.rotating is not None
    secret = bytes.fromhex(rt.service.rotating.enrol(pid, "app")["secret"])
    await runtime_factory.stop(rt)

    rt = await runtime_factory(settings)
    major, minor = proto.app_beacon(secret, proto.app_window(clock.now()))
    rt.inject(adverts("4A:00:00:00:00:09", ibeacon_payload(settings.identities.app_uuid, major, minor), clock.now()))
    await rt.flush()
    assert app_key(pid) in rt.pipeline.presence.tracks
    assert rt.pipeline.rotating.figures["app"] == 1


def test_the_resolvers_memo_follows_the_windows_as_they_move() -> None:
    """An identifier answered once is answered from the memo; when its window leaves the table it stops
    resolving, and one heard before its window entered resolves once it has (the memo forgets just those)."""
    from beacons.parse import parse_adverts
    from gateway.profiles.rotating import Entry

    resolver = Resolver(IdentityIndex(), app_uuid=Settings().identities.app_uuid)
    secret = bytes(range(32))
    k = 5  # a new EID every 32 s; the table keeps the 8 windows nearest now
    resolver.load([Entry(1, 7, "eid", IDENTITY_KEY, k=k, epoch=0), Entry(2, 8, "app", secret, period_s=60),
                   Entry(3, 9, "app", bytes(range(1, 33)), period_s=60)], T0)

    def keys(payload: bytes, t: float) -> list[str]:
        return [f.key for _, f in resolver.resolve(adverts("C1:00:00:00:00:01", payload, t, 1), parse_adverts)]

    now_eid = eddystone_eid_payload(proto.eid(IDENTITY_KEY, k, int(T0)), -20)
    later_eid = eddystone_eid_payload(proto.eid(IDENTITY_KEY, k, int(T0) + 32 * 6), -20)
    w = proto.app_window(T0, 60)
    app_now = ibeacon_payload(Settings().identities.app_uuid, *proto.app_beacon(secret, w), -59)
    app_later = ibeacon_payload(Settings().identities.app_uuid, *proto.app_beacon(secret, w + 2), -59)
    assert keys(now_eid, T0) == [app_key(7)] and keys(app_now, T0) == [app_key(8)]
    assert keys(later_eid, T0) != [app_key(7)] and keys(app_later, T0) != [app_key(8)]  # not in yet: unknown
    t = T0 + 32 * 6
    resolver.refresh(t)
    assert keys(later_eid, t) == [app_key(7)] and keys(app_later, t) == [app_key(8)]
    assert keys(now_eid, t) != [app_key(7)] and keys(app_now, t) != [app_key(8)]  # left the table: no longer
