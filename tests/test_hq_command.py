"""`gateway hq` as a real process, fed by a real store gateway: a Runtime (virtual clock) with ``[hq] uplink``
on publishes its visits, stays, decisions, notifications and footfall to a real Mosquitto; `gateway hq`
(its own process) consumes them into a fresh PostgreSQL and serves the figures over HTTP, which equal the
store's own, for ``store=<id>``, several stores and every store."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from gateway.app.config import (
    CampaignSettings,
    DatabaseSettings,
    HqSettings,
    MqttSettings,
    Settings,
    StoreSettings,
)
from gateway.presence.tracker import PresenceEvent
from gateway.profiles.service import NewProfile
from tests.conftest import MosquittoServer, free_port, fresh_pg_database, wait_for_port
from tests.fixtures import RuntimeFactory

TZ = "Europe/Paris"
T0 = dt.datetime(2026, 6, 1, 10, 0, tzinfo=ZoneInfo(TZ)).timestamp()
DAY = "2026-06-01"
KEY = "hq-admin-key-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[1]


def tag(name: str) -> str:
    return f"ibeacon:8f3c0a52-6d1e-4b7a-9c2d-5e4f3a2b1c00:7:{sum(map(ord, name))}"


@pytest.fixture
def hq_url(pg_url: str) -> Iterator[str]:
    with fresh_pg_database(pg_url, "gw_hqcmd") as url:
        yield url


async def test_gateway_hq_serves_a_stores_figures_as_the_store_counts_them(
        tmp_path: Path, mosquitto: MosquittoServer, hq_url: str, runtime_factory: RuntimeFactory) -> None:
    (tmp_path / "campaigns").mkdir()
    (tmp_path / "campaigns" / "shoes.yaml").write_text(
        "id: shoes-offer\npurpose: offers\ntrigger: {type: enter, zone: shoes}\naction: {title: t, body: b}\n")
    settings = Settings(store=StoreSettings(id="north", timezone=TZ),
                        database=DatabaseSettings(url=f"sqlite:///{tmp_path}/north.db"),
                        mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port, topic_prefix="chain"),
                        campaigns=CampaignSettings(dir=str(tmp_path / "campaigns")),
                        hq=HqSettings(uplink=True, interval_s=0.1), data_dir=str(tmp_path / "data"))
    port = free_port()
    config = tmp_path / "hq.toml"
    config.write_text(f'data_dir = "{tmp_path / "hqdata"}"\n[database]\nurl = "{hq_url}"\n'
                      f'[mqtt]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\n'
                      f'topic_prefix = "chain"\n[api]\nhost = "127.0.0.1"\nport = {port}\nadmin_key = "{KEY}"\n'
                      f'[store]\ntimezone = "{TZ}"\n[hq]\nclient_id = "hq-{port}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "gateway.app.cli", "hq", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # gateway hq serves once subscribed: the store's events from now on reach its session.
        assert wait_for_port("127.0.0.1", port, 30, proc), "gateway hq did not serve its API"
        rt = await runtime_factory(settings, serve_api=False)
        rt.service.create_profile(NewProfile(external_id="ann", consents={"offers": True},
                                             identifiers=[("beacon", tag("ann"))]))
        for key, start in ((tag("ann"), T0), (tag("stranger"), T0 + 60)):
            await rt._run(rt.pipeline.handle_presence, [
                PresenceEvent("visit_start", key, start, "shoes", start, start),
                PresenceEvent("enter", key, start, "shoes", start, start)])
            await rt._run(rt.pipeline.handle_presence, [
                PresenceEvent("exit", key, start + 90, "shoes", start, start, 90.0),
                PresenceEvent("visit_end", key, start + 95, None, None, start, 95.0)])
        await rt._run(rt.pipeline.flush_footfall)
        own = rt.service.figures(DAY, None, TZ, store="north")
        assert own["footfall"] == 2 and own["notifications"]["total"]["notified"] == 1
        pause = threading.Event()
        got: dict[str, object] = {}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": KEY}) as http:
            for _ in range(400):  # bounded: the uplink publishes every 0.1 s, the consumer commits at once
                r = await http.get("/v1/figures", params={"from": DAY, "store": "north"})
                assert r.status_code == 200, r.text
                got = r.json()
                if got == json.loads(json.dumps(own)):
                    break
                pause.wait(0.05)
            assert got == json.loads(json.dumps(own))
            several = (await http.get("/v1/figures", params={"from": DAY, "store": "north,south"})).json()
            every = (await http.get("/v1/figures", params={"from": DAY})).json()
        assert several["footfall"] == every["footfall"] == 2
        assert every["notifications"]["total"]["notified"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
