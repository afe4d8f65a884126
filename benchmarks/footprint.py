"""The gateway's footprint: resident memory and time to ready of ``gateway run`` with 1,000 tracked people
and 500 devices reporting.

The script starts its own Mosquitto on a free port and writes a gateway.toml in a temporary directory
(SQLite there, the example campaigns, device profiles and rules, four ESPresense receivers of the example
store's zones, no BLE, no webhook or Web Push). Then:

- ``ready_s``: seconds from spawning ``python -m gateway.app.cli run --no-ble`` to the first 200 from
  ``/health/ready``, the median of ``--starts`` starts (each a fresh process on the same database, as at
  every restart); ``first_ready_s``: the same for the very first start, which creates the database and runs
  every migration;
- ``idle_rss_mb``: VmRSS of the last start when it is ready, with nobody tracked; ``enrolled_rss_mb`` once
  the enrolled people's profiles are created over the API;
- then ``--people`` people are made present (``--enrolled`` of them enrolled over the API with a beacon and
  the offers consent, the others anonymous tags, each of its own uuid) by ESPresense sightings over MQTT,
  one per person and second, while ``--devices`` devices of simulators/wearables.py's fleet publish
  telemetry (QoS 1) every ``--interval`` s. Once ``GET /v1/presence`` counts every person and
  ``GET /v1/devices`` lists every device, the feed goes on for ``--settle`` s;
- ``rss_mb``: VmRSS at the end of that, ``hwm_mb``: VmHWM (the peak), both from /proc/PID/status.

    .venv/bin/python benchmarks/footprint.py [--people 1000] [--enrolled 600] [--devices 500] [--starts 3]
        [--settle 20] [--quick]

The last line printed is one JSON object: rss_mb, ready_s, first_ready_s, idle_rss_mb, enrolled_rss_mb,
hwm_mb, ready_runs_s,
cpu_s_to_ready (the gateway's CPU seconds, user + system, when it was ready), cpu_s (the gateway's CPU
seconds over the whole loaded run), wall_s (the loaded run's seconds), tracked, devices_seen, and the goal
flags rss_ok (rss_mb <= 120) and ready_ok (ready_s <= 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _mosquitto import Broker, free_port  # noqa: E402  (the benchmarks' own Mosquitto)

ADMIN_KEY = "footprint-admin-key-0123456789abcdef"
GOAL_RSS_MB = 120.0
GOAL_READY_S = 2.0
ROOMS = ("entrance", "shoes", "apparel", "checkout")
UUID = "f7826da6-4fa2-4e98-8024-bc5b71e0893e"
WAIT_S = 180.0  # bound on every wait for the gateway


def config(tmp: Path, api_port: int, mqtt_port: int) -> Path:
    receivers = "\n".join(
        f'[[receivers]]\nid = "espresense:{room}"\nmeasured_power = -59\nzones = [{{ name = "{room}", max_m = 5.0 }}]\n'
        for room in ROOMS)
    path = tmp / "gateway.toml"
    path.write_text(f"""data_dir = "{tmp / 'data'}"
[store]
id = "store-001"
[database]
url = "sqlite:///{tmp / 'data' / 'gateway.db'}"
[api]
host = "127.0.0.1"
port = {api_port}
admin_key = "{ADMIN_KEY}"
admin_rate_limit_per_s = 0
[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
[devices]
profiles_dir = "{ROOT / 'examples' / 'device-profiles'}"
[campaigns]
dir = "{ROOT / 'examples' / 'campaigns'}"
[device_rules]
dir = "{ROOT / 'examples' / 'device-rules'}"
[remote]
espresense = true
{receivers}""")
    return path


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM in MB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Gateway:
    def __init__(self, conf: Path, tmp: Path, api_port: int, n: int) -> None:
        self.url = f"http://127.0.0.1:{api_port}"
        self.log = (tmp / f"gateway-{n}.log").open("ab")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.app.cli", "run", "--config", str(conf),
                                      "--no-ble"], cwd=tmp, stdout=self.log, stderr=self.log,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})

    def wait_ready(self) -> float:
        import httpx

        deadline = time.monotonic() + WAIT_S
        with httpx.Client(base_url=self.url, timeout=2) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited with {self.proc.returncode}; see {self.log.name}")
                try:
                    if c.get("/health/ready").status_code == 200:
                        return time.perf_counter() - self.t0
                except httpx.TransportError:
                    pass
                time.sleep(0.01)
        raise RuntimeError("the gateway was not ready in time")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def people(n: int, enrolled: int) -> list[tuple[str, str | None]]:
    """(ESPresense id, our beacon key if enrolled) per person: enrolled ones share a uuid (as a shop's
    tags do), anonymous ones each have their own (the guard holds back a uuid spewing many ids)."""
    out: list[tuple[str, str | None]] = []
    for i in range(n):
        if i < enrolled:
            out.append((f"iBeacon:{UUID}-1-{i + 1}", f"ibeacon:{UUID}:1:{i + 1}"))
        else:
            out.append((f"iBeacon:{uuid.UUID(int=i + 1)}-2-{i + 1}", None))
    return out


def enrol(url: str, crowd: list[tuple[str, str | None]]) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": ADMIN_KEY}) as c:
        for i, (_, key) in enumerate(crowd):
            if key is None:
                continue
            r = c.post("/v1/profiles", json={"external_id": f"p{i}", "name": f"Person {i}",
                                             "attributes": {"tier": "bronze"},
                                             "identifiers": [{"kind": "beacon", "value": key}],
                                             "consents": {"offers": True}})
            if r.status_code != 201:
                raise RuntimeError(f"enrolment {i}: {r.status_code} {r.text[:200]}")


class Feed(threading.Thread):
    """ESPresense sightings (one per person per second, QoS 0) and the fleet's telemetry (QoS 1)."""

    def __init__(self, port: int, crowd: list[tuple[str, str | None]], devices: int, interval_s: float) -> None:
        super().__init__(daemon=True)
        import paho.mqtt.client as mqtt

        from simulators.wearables import Fleet, FleetSpec

        self.crowd = crowd
        self.fleet = Fleet(FleetSpec(devices=devices, interval_s=interval_s), time.time() - interval_s)
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.published = 0
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id="footprint-feed", protocol=mqtt.MQTTv5)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def run(self) -> None:
        next_fleet = time.monotonic()
        while not self.stop.is_set():
            started = time.monotonic()
            for i, (eid, _) in enumerate(self.crowd):
                room = ROOMS[i % len(ROOMS)]
                self.client.publish(f"espresense/devices/{eid}/{room}",
                                    json.dumps({"id": eid, "rssi": -58 - i % 5, "rssi@1m": -59}), qos=0)
            self.published += len(self.crowd)
            if started >= next_fleet:
                for m in self.fleet.step():
                    self.client.publish(m.topic, m.payload, qos=1, retain=m.retain)
                    self.published += 1
                next_fleet += self.interval_s
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    def close(self) -> None:
        self.stop.set()
        self.join(10)
        self.client.loop_stop()
        self.client.disconnect()


def counts(url: str) -> tuple[int, int]:
    import httpx

    with httpx.Client(base_url=url, timeout=10, headers={"X-API-Key": ADMIN_KEY}) as c:
        presence = c.get("/v1/presence").json()
        seen = len(c.get("/v1/devices", params={"limit": 1000}).json())
    return int(presence["enrolled"]) + int(presence["anonymous"]), seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--people", type=int, default=1000)
    ap.add_argument("--enrolled", type=int, default=600)
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between a device's readings")
    ap.add_argument("--starts", type=int, default=3,
                    help="restarts timed to ready after the first start (their median is ready_s)")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds fed once everyone is counted")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    ap.add_argument("--quick", action="store_true", help="100 people, 50 devices, one restart: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.people, args.enrolled, args.devices, args.starts, args.settle = 100, 60, 50, 1, 1.0

    tmp = Path(tempfile.mkdtemp(prefix="footprint-"))
    broker = Broker(tmp)
    api_port = free_port()
    conf = config(tmp, api_port, broker.port)
    crowd = people(args.people, min(args.enrolled, args.people))
    runs: list[float] = []
    gw: Gateway | None = None
    feed: Feed | None = None
    try:
        for n in range(args.starts + 1):
            if gw is not None:
                gw.stop()
            gw = Gateway(conf, tmp, api_port, n)
            runs.append(gw.wait_ready())
            print(f"start {n + 1}: ready in {runs[-1]:.2f} s, RSS {proc_status(gw.proc.pid)['VmRSS']:.1f} MB",
                  flush=True)
        assert gw is not None
        pid = gw.proc.pid
        idle = proc_status(pid)["VmRSS"]
        cpu_ready = cpu_s(pid)
        enrol(gw.url, crowd)
        enrolled_rss = proc_status(pid)["VmRSS"]
        t0, cpu0 = time.perf_counter(), cpu_s(pid)
        feed = Feed(broker.port, crowd, args.devices, args.interval)
        feed.start()
        deadline = time.monotonic() + WAIT_S
        tracked = seen = 0
        while time.monotonic() < deadline:
            tracked, seen = counts(gw.url)
            if tracked >= args.people and seen >= args.devices:
                break
            time.sleep(1.0)
        else:
            print(f"warning: only {tracked} people tracked and {seen} devices seen", file=sys.stderr)
        print(f"{tracked} tracked, {seen} devices after {time.perf_counter() - t0:.1f} s; "
              f"RSS {proc_status(pid)['VmRSS']:.1f} MB", flush=True)
        time.sleep(args.settle)  # the measured steady state: the feed goes on meanwhile
        tracked, seen = counts(gw.url)
        status = proc_status(pid)
        result: dict[str, Any] = {
            "rss_mb": round(status["VmRSS"], 1), "ready_s": round(statistics.median(runs[1:]), 2),
            "first_ready_s": round(runs[0], 2), "idle_rss_mb": round(idle, 1),
            "enrolled_rss_mb": round(enrolled_rss, 1), "hwm_mb": round(status["VmHWM"], 1),
            "ready_runs_s": [round(r, 2) for r in runs], "cpu_s_to_ready": round(cpu_ready, 2),
            "cpu_s": round(cpu_s(pid) - cpu0, 2), "wall_s": round(time.perf_counter() - t0, 1),
            "people": args.people, "enrolled": min(args.enrolled, args.people), "devices": args.devices,
            "tracked": tracked, "devices_seen": seen, "messages_published": feed.published,
            "python": sys.version.split()[0],
        }
        result["rss_ok"] = result["rss_mb"] <= GOAL_RSS_MB
        result["ready_ok"] = result["ready_s"] <= GOAL_READY_S
    finally:
        if feed is not None:
            feed.close()
        if gw is not None:
            gw.stop()
        broker.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
