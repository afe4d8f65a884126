"""A gateway process for the Home Assistant last-will test: Runtime with the paho intake and the Home
Assistant link on a broker, SQLite, no API, one zone.

``python -m tests.ha_gateway --port P --prefix X --discovery D --data-dir DIR`` connects as client
``gw-kill`` of store ``s1``, announces, and runs until it is killed.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from devices.mqtt import MqttIntake, MqttSettings
from gateway.app.config import Settings
from gateway.app.runtime import Runtime
from gateway.presence.settings import ReceiverSettings, ZoneBand


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--discovery", required=True)
    ap.add_argument("--data-dir", required=True)
    a = ap.parse_args()
    s = Settings()
    s.data_dir = a.data_dir
    s.database.url = f"sqlite:///{Path(a.data_dir) / 'gw.db'}"
    s.store.id = "s1"
    s.mqtt.topic_prefix = a.prefix
    s.homeassistant.enabled = True
    s.homeassistant.discovery_prefix = a.discovery
    (Path(a.data_dir) / "campaigns").mkdir(parents=True, exist_ok=True)
    s.campaigns.dir = str(Path(a.data_dir) / "campaigns")
    s.receivers = [ReceiverSettings(id="rx", zones=[ZoneBand("shop", 50.0)], measured_power=-59)]
    intake = MqttIntake(MqttSettings(host="127.0.0.1", port=a.port, client_id="gw-kill", store_id="s1",
                                     topic_prefix=a.prefix, keepalive=5))
    rt = Runtime(s, mqtt=intake, serve_api=False, on_outcome=None)
    await rt.start()
    print("READY", flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main())
