"""Under any order and timing of events: no cap is exceeded and no profile gets a campaign twice
inside its cooldown (property tests over the real engine and a real SQLite database).

Events arrive in any order (late ones included), some campaigns delay their sends or hold them for
quiet hours, the engine restarts (memory lost) at random points, and held sends are released as
time passes. The checks are on what the customer receives: the send times."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from gateway.campaigns.model import CampaignIndex, parse_campaign
from gateway.engine.engine import Engine, EngineEvent, FrequencyCap
from gateway.storage.db import Database
from gateway.storage.models import Base, Consent, Notification, Profile

T0 = 1_780_300_800.0  # 2026-06-01 08:00 UTC
ZONES = ("entrance", "shoes", "apparel")
CAPS = [FrequencyCap(600, 2), FrequencyCap(3600, 3), FrequencyCap(1800, 1, channel="webpush")]


def _campaign(i: int, kind: str, zone: str) -> object:
    limits: dict[str, object] = {"cooldown_s": 300 * (1 + i % 3)}
    action: dict[str, object] = {"title": "t", "body": "b"}
    if i % 3 == 1:
        action["delay_s"] = 120 * i
    if i % 4 == 2:
        limits["quiet_hours"] = {"start": "08:30", "end": "09:15", "mode": "hold"}
    if i == 5:
        limits["budget"] = {"max_sends": 4}
    return parse_campaign({"id": f"{kind}-{zone}", "purpose": "offers", "priority": i,
                           "trigger": {"type": kind, "zone": zone, **({"min_dwell_s": 10} if kind == "dwell" else {})},
                           "action": action, "limits": limits})


CAMPAIGNS = [_campaign(i, k, z) for i, (k, z) in enumerate((k, z) for k in ("enter", "dwell") for z in ZONES)]

events = st.lists(
    st.tuples(st.integers(0, 2), st.sampled_from(("enter", "dwell")), st.sampled_from(ZONES),
              st.floats(0, 7200, allow_nan=False), st.integers(0, 5), st.booleans()),
    min_size=1, max_size=60,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events, st.randoms(use_true_random=False))
def test_caps_and_cooldowns_hold_under_any_event_order(evs, rng):
    db = Database("sqlite://")
    Base.metadata.create_all(db.engine)
    with db.session() as s:
        for pid in (1, 2, 3):
            s.add(Profile(id=pid, name=f"p{pid}", attributes={}, created_at=T0))
            s.add(Consent(profile_id=pid, purpose="offers", granted=True, updated_at=T0))

    def fresh() -> Engine:
        return Engine(CampaignIndex(CAMPAIGNS), caps=CAPS, channels=("sse", "webpush"))

    engine = fresh()
    order = list(evs)
    rng.shuffle(order)  # any arrival order, not only time order
    for pid, kind, zone, t, stay, restart in order:
        if restart:
            engine = fresh()  # the gateway restarts: only the database remembers
        with db.session() as s:
            engine.handle(s, EngineEvent(kind, pid + 1, T0 + t, f"stay:{zone}:{stay}", zone, dwell_s=15))
            engine.release_due(s, T0 + t)
    with db.session() as s:
        engine.release_due(s, T0 + 10 * 86400)
        sent = [(n.profile_id, n.campaign_id, n.deliver_at or n.created_at, (n.data or {}).get("channels"))
                for n in s.scalars(select(Notification).where(Notification.status.not_in(("cancelled", "expired"))))]
        per_campaign = dict(s.execute(select(Notification.campaign_id, func.count()).group_by(
            Notification.campaign_id)).all())
    db.dispose()
    by_campaign = {c.id: c for c in CAMPAIGNS}
    for cid, n in per_campaign.items():
        assert not by_campaign[cid].budget_sends or n <= by_campaign[cid].budget_sends
    for pid in (1, 2, 3):
        for cap in CAPS:
            mine = sorted(t for p, _, t, chs in sent if p == pid
                          and (cap.channel is None or chs is None or cap.channel in chs))
            for i, start in enumerate(mine):
                in_window = [t for t in mine[i:] if t - start < cap.window_s]
                assert len(in_window) <= cap.max, (pid, cap, mine)
        for cid, c in by_campaign.items():
            times = sorted(t for p, k, t, _ in sent if p == pid and k == cid)
            assert all(b - a >= c.cooldown_s for a, b in itertools.pairwise(times)), (pid, cid, times)
