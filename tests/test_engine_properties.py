"""Under any order and timing of events: no cap is exceeded and no profile gets a campaign twice
inside its cooldown (property tests over the real engine and a real SQLite database)."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from gateway.campaigns import CampaignIndex, parse_campaign
from gateway.engine import Engine, EngineEvent, FrequencyCap
from gateway.storage.db import Database
from gateway.storage.models import Base, Consent, Notification, Profile

T0 = 1_780_300_800.0
ZONES = ("entrance", "shoes", "apparel")
CAPS = [FrequencyCap(600, 2), FrequencyCap(3600, 3)]
CAMPAIGNS = [
    parse_campaign({"id": f"{kind}-{zone}", "purpose": "offers", "priority": i,
                    "trigger": {"type": kind, "zone": zone, **({"min_dwell_s": 10} if kind == "dwell" else {})},
                    "action": {"title": "t", "body": "b"}, "limits": {"cooldown_s": 300 * (1 + i % 3)}})
    for i, (kind, zone) in enumerate((k, z) for k in ("enter", "dwell") for z in ZONES)
]

events = st.lists(
    st.tuples(st.integers(0, 2), st.sampled_from(("enter", "dwell")), st.sampled_from(ZONES),
              st.floats(0, 7200, allow_nan=False), st.integers(0, 5)),
    min_size=1, max_size=60,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events)
def test_caps_and_cooldowns_hold_under_any_event_order(evs):
    db = Database("sqlite://")
    Base.metadata.create_all(db.engine)
    with db.session() as s:
        for pid in (1, 2, 3):
            s.add(Profile(id=pid, name=f"p{pid}", attributes={}, created_at=T0))
            s.add(Consent(profile_id=pid, purpose="offers", granted=True, updated_at=T0))
    engine = Engine(CampaignIndex(CAMPAIGNS), caps=CAPS)
    for pid, kind, zone, t, stay in sorted(evs, key=lambda e: e[3]):
        with db.session() as s:
            engine.handle(s, EngineEvent(kind, pid + 1, T0 + t, f"stay:{zone}:{stay}", zone, dwell_s=15))
    with db.session() as s:
        sent = [(n.profile_id, n.campaign_id, n.created_at) for n in s.scalars(select(Notification))]
    db.dispose()
    by_campaign = {c.id: c for c in CAMPAIGNS}
    for pid in (1, 2, 3):
        mine = sorted(t for p, _, t in sent if p == pid)
        for cap in CAPS:
            for i, start in enumerate(mine):
                in_window = [t for t in mine[i:] if t - start < cap.window_s]
                assert len(in_window) <= cap.max, (pid, cap, mine)
        for cid, c in by_campaign.items():
            times = sorted(t for p, k, t in sent if p == pid and k == cid)
            assert all(b - a >= c.cooldown_s for a, b in itertools.pairwise(times)), (pid, cid, times)
