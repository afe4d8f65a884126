"""State survives a gateway restart: pending (delayed) sends, cooldowns and caps."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from gateway.app.config import CapSettings, Settings
from gateway.presence.settings import ReceiverSettings, ZoneBand
from gateway.presence.tracker import PresenceEvent
from gateway.profiles.service import NewProfile
from gateway.storage.models import Decision, Notification
from tests.fixtures import runtime_settings

T0 = 1_780_300_800.0
KEY = "ibeacon:aa:1:1"


def settings(tmp_path: Path, campaigns: Path) -> Settings:
    s = runtime_settings(tmp_path)
    s.campaigns.dir = str(campaigns)
    s.receivers = [ReceiverSettings("rx", [ZoneBand("a", 5.0), ZoneBand("b", 9.0)])]
    s.engine.caps = [CapSettings(3600, 2)]
    return s


async def test_delays_cooldowns_and_caps_survive_a_restart(tmp_path, clock, runtime_factory):
    campaigns = tmp_path / "campaigns"
    campaigns.mkdir()
    (campaigns / "later.yaml").write_text(
        "id: later\npurpose: offers\ntrigger: {type: enter, zone: a}\n"
        "action: {title: t, body: b, delay_s: 300}\nlimits: {cooldown_s: 86400}\n")
    (campaigns / "now.yaml").write_text(
        "id: now\npurpose: offers\ntrigger: {type: enter, zone: b}\naction: {title: t, body: b}\n")
    rt = await runtime_factory(settings(tmp_path, campaigns), serve_api=False)
    pid = rt.service.create_profile(NewProfile(external_id="ann", identifiers=[("beacon", KEY)],
                                               consents={"offers": True}))["id"]
    rt.pipeline.handle_presence([PresenceEvent("enter", KEY, T0, "a", T0, T0)])  # scheduled for T0+300
    rt.pipeline.handle_presence([PresenceEvent("enter", KEY, T0 + 1, "b", T0 + 1, T0)])  # sent: 2 of 2 cap
    await runtime_factory.stop(rt)

    clock.set(T0 + 301)
    rt2 = await runtime_factory(settings(tmp_path, campaigns), serve_api=False)
    released = rt2.pipeline.tick(clock.now())
    with rt2.db.session() as s:
        later = s.scalars(select(Notification).where(Notification.campaign_id == "later")).one()
        assert released == [later.id] and later.status == "pending"
    rt2.pipeline.handle_presence([PresenceEvent("enter", KEY, T0 + 400, "a", T0 + 400, T0)])
    rt2.pipeline.handle_presence([PresenceEvent("enter", KEY, T0 + 401, "b", T0 + 401, T0)])
    with rt2.db.session() as s:
        reasons = [(d.campaign_id, d.reason) for d in s.scalars(select(Decision).order_by(Decision.id))]
    assert reasons[-2:] == [("later", "cooldown"), ("now", "capped")]
    assert pid == rt2.identities.beacon(KEY)
