"""Unknown tags are counted for footfall only: their identity and address never reach the database."""

from __future__ import annotations

import json

from sqlalchemy import JSON, String, Text, insert, select

from beacons.encode import eddystone_uid_payload, ibeacon_payload
from beacons.types import Advertisement
from gateway.app.config import Settings
from gateway.app.pipeline import Pipeline
from gateway.campaigns.model import CampaignIndex
from gateway.presence.settings import PresenceSettings, ReceiverSettings, ZoneBand
from gateway.profiles.identity import IdentityIndex
from gateway.storage.db import Database
from gateway.storage.models import Base, FootfallCount, Profile, Visit

T0 = 1_780_000_000.0
KNOWN_UUID = "8f3c0a52-6d1e-4b7a-9c2d-5e4f3a2b1c00"
ANON_UUID = "0a1b2c3d-0000-4000-8000-00000000abcd"
ANON_NAMESPACE, ANON_INSTANCE = "a1b2c3d4e5f6a7b8c9d0", "0123456789ab"
ANON = [(f"5A:{i:02X}:3C:4D:5E:6F", ibeacon_payload(ANON_UUID, 4242, 700 + i, -59)) for i in range(3)]
ANON.append(("6B:11:22:33:44:55", eddystone_uid_payload(ANON_NAMESPACE, ANON_INSTANCE, -20)))
KNOWN = ("7C:AA:BB:CC:DD:EE", ibeacon_payload(KNOWN_UUID, 100, 1, -59))


def needles() -> list[str]:
    """Every spelling of the unknown tags' identities and addresses a careless writer might store."""
    out = [ANON_UUID, ANON_UUID.replace("-", ""), ANON_NAMESPACE, ANON_INSTANCE]
    for address, _ in ANON:
        out += [address, address.lower(), address.replace(":", ""), address.replace(":", "").lower()]
    return [n.lower() for n in out]


def test_unknown_tags_reach_the_footfall_counts_and_nothing_else(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'gw.db'}")
    db.upgrade()
    with db.session() as s:
        s.execute(insert(Profile), [{"id": 1, "external_id": "alice", "name": "Alice", "attributes": {},
                                     "created_at": T0 - 10}])
    ids = IdentityIndex()
    ids.add("beacon", f"ibeacon:{KNOWN_UUID}:100:1", 1)
    st = Settings()
    st.presence = PresenceSettings(visit_end_after_s=30, dwell_every_s=5)
    st.receivers = [ReceiverSettings("rx-a", [ZoneBand("a", 4.0)], measured_power=-59),
                    ReceiverSettings("rx-b", [ZoneBand("b", 4.0)], measured_power=-59)]
    p = Pipeline(st, db, CampaignIndex([]), ids)
    for i in range(300):  # 30 s at 10 Hz: everyone in zone a, then zone b
        t = T0 + i * 0.1
        near, far = (-61, -80) if i < 150 else (-80, -61)
        adverts = [Advertisement(addr, rssi, t + k * 0.01, rx, payload)
                   for k, (addr, payload) in enumerate([*ANON, KNOWN])
                   for rx, rssi in (("rx-a", near), ("rx-b", far))]
        p.ingest_adverts(adverts)
        if i % 10 == 9:
            p.tick(t)
    for s in range(31, 100, 2):  # everyone leaves: exits, visit ends, footfall flushed
        p.tick(T0 + s)
    assert p.figures["anonymous_visits"] == len(ANON)  # they were seen and counted ...
    with db.session() as s:
        assert s.scalars(select(Visit)).all()  # ... the enrolled customer's visit was stored ...
        footfall = s.scalars(select(FootfallCount)).all()
        assert sum(f.anonymous_visits for f in footfall if f.zone == "") == len(ANON)
        # ... and no text in any table carries an unknown tag's identity or address.
        found = []
        for table in Base.metadata.sorted_tables:
            cols = [c for c in table.columns if isinstance(c.type, String | Text | JSON)]
            if not cols:
                continue
            for row in s.execute(select(*cols)):
                for col, value in zip(cols, row, strict=True):
                    text = (value if isinstance(value, str) else json.dumps(value)).lower()
                    found += [(table.name, col.name, n) for n in needles() if n in text]
        assert found == []
