"""A gateway process for the power-loss loop: Runtime, real uvicorn, SQLite, MQTT intake on a broker.

``python -m tests.power_gateway --db D --port P --data-dir DIR --broker HOST:PORT --prefix X --client-id C``
loads the gateway's code once, then, for each ``start`` line on stdin, forks a gateway: Runtime with the API
and a telemetry intake whose MQTT session is persistent (a fixed client id). It prints ``PID <pid>``, the
gateway prints ``READY`` once the API and the broker answer and serves until it is killed; ``EXIT`` follows
its death. The test kills each gateway with SIGKILL while telemetry and API writes are in flight, fifty
times over: the fork only saves the second of imports each run would pay, the process killed is a whole
gateway with its own connections, files and threads.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import api.app  # loaded once, before the forks: each run pays only its own start)
import api.dashboard.mount  # noqa: F401  (its routes too)
from devices.mqtt import MqttIntake, MqttSettings
from gateway.app.config import Settings
from gateway.app.runtime import Runtime
from gateway.clock import SystemClock

ADMIN_KEY = "power-admin-key-0123456789"


async def main(args: argparse.Namespace) -> None:
    host, _, port = args.broker.rpartition(":")
    s = Settings()
    s.data_dir = args.data_dir
    s.database.url = f"sqlite:///{args.db}"
    s.api.port = args.port
    s.api.admin_key = ADMIN_KEY
    s.api.token_secret = "power-test-token-secret"
    s.campaigns.dir = args.data_dir  # no campaigns: the writes under test are readings and profiles
    intake = MqttIntake(MqttSettings(host=host, port=int(port), client_id=args.client_id, store_id="s1",
                                     topic_prefix=args.prefix, reconnect_min_delay=1, reconnect_max_delay=1,
                                     session_expiry=600))
    rt = Runtime(s, clock=SystemClock(), mqtt=intake, on_outcome=None, tick_s=3600)
    await rt.start()
    if not await intake.wait_connected(10):
        print(f"NO-BROKER {intake.last_error}", flush=True)
        sys.exit(2)
    print("READY", flush=True)
    await asyncio.Event().wait()  # serve until killed


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for flag in ("--db", "--data-dir", "--broker", "--prefix", "--client-id"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--port", type=int, required=True)
    options = parser.parse_args()
    for line in sys.stdin:
        if line.strip() != "start":
            continue
        child = os.fork()
        if child == 0:
            try:
                asyncio.run(main(options))
            finally:
                os._exit(1)
        print(f"PID {child}", flush=True)
        os.waitpid(child, 0)
        print("EXIT", flush=True)
