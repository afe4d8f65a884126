"""QoS 1 telemetry per second from the broker to validated, stored and rules-evaluated readings, against a
bare paho-mqtt subscriber that only counts, on the same Mosquitto in the same run; then two gateway workers
sharing the load through a ``$share`` subscription.

The script starts its own Mosquitto (``max_queued_messages 0``, ``max_inflight_messages 10000``). For each
consumer it first creates the consumer's persistent session (subscribe, disconnect), then publishes the
whole backlog (N messages from D devices, the clean simulated fleet of simulators/wearables.py, QoS 1) so
the broker queues it, and only then starts the consumer in a process of its own and times it from its
CONNACK to its last message: the anchor's last message received (paho acknowledges on return), our last
batch committed and acknowledged. The publisher never shares the CPU with a measured consumer.

- anchor: paho-mqtt 2.x, MQTT 5, QoS 1, a callback that counts.
- ours: the gateway's Runtime (devices/mqtt.py intake with manual acks after commit, the telemetry store
  with the example device profiles and all devices registered, the device rules, the campaign engine) on
  SQLite (or ``--db`` PostgreSQL).
- two workers: two such processes, distinct client ids, one ``$share/bench/`` group, one database.

``lost`` is published minus stored after dedup (distinct (device, seq) rows), for the one-worker run;
``lost_2_workers`` the same for the two-worker run.

``--bad-share F`` adds a run of one worker on the same backlog with a share F of its messages replaced by
odd ones, the kinds that used to fail a whole batch (a lone surrogate or NUL in a metric name, NUL or a
lone surrogate in an event code, NUL in a firmware, a device id longer than its column in the topic):
the parser dead-letters each, at no cost to the rest. ``bad_share_ratio`` is that run's messages per
second over the clean one-worker run's, measured the same way in the same run. ``--rounds R`` runs the
clean and the odd one-worker backlogs R times each, alternating (clean first, then odd first...), and
reports the best round of each (``rounds`` and ``rounds_cpu_us_per_msg`` list them all): on a machine
shared with other work, the least disturbed.

``--workers 1,2,4`` adds, for each N, N workers on one ``$share`` group writing one fresh database (head
office's shape: meant for ``--db`` PostgreSQL), R rounds in alternating order, the round with the least
total CPU per message reported: ``cpu_us_per_msg_workers`` (every worker's CPU over every message, per N),
``cpu_us_per_msg_per_worker`` (each worker's CPU over its own messages), ``scaling_N`` (the total with N
workers over one worker's), ``lost_workers``, ``db_server_cpu_us_per_msg_workers`` (the local PostgreSQL
server's CPU meanwhile, from /proc: what the workers moved to the server is counted too), msgs/s, wall and the
split. ``--workers-only`` skips the other runs. ``--profile F`` writes a cProfile (CPU time) per worker thread.

    .venv/bin/python benchmarks/telemetry_ingest.py [--quick] [--messages N] [--devices D] [--db URL]
        [--bad-share F] [--rounds R] [--workers 1,2,4 [--workers-only]] [--profile F]

The last line printed is one JSON object: msgs_per_s, anchor_msgs_per_s, ratio, ratio_2_workers, lost, ...,
``cpu_us_per_msg``: CPU microseconds per message of each consumer process (both of its threads; summed
over the two workers) and of the broker while it served that consumer, from the CONNACK to the last message,
and ``wall_s``: each consumer's seconds from its CONNACK to its last message. With ``--bad-share``:
bad_share, bad_share_msgs_per_s, bad_share_ratio, bad_share_odd (odd messages published), bad_share_dead_lettered,
bad_share_lost (good messages not stored). ``telemetry_failures``: batches of each one-worker run that
failed and were retried message by message.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _mosquitto import Broker  # noqa: E402  (the benchmarks' own Mosquitto)

T0 = 1_767_261_600.0
IDLE_S = 3.0  # a consumer that got nothing for this long (after its first message) is done


# ------------------------------------------------------------------ roles (each in its own process)


def _paho(client_id: str, port: int, on_message: Any = None) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5)
    c.connected_at = None
    c.ready = threading.Event()

    def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.connected_at = time.time()
        client.ready.set()

    c.on_connect = on_connect
    if on_message is not None:
        c.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", port, keepalive=30, clean_start=False, properties=props)
    return c


def make_session(client_id: str, port: int, topic_filter: str) -> None:
    """The consumer's persistent session, subscribed, then away: the broker queues the backlog for it."""
    c = _paho(client_id, port)
    c.loop_start()
    assert c.ready.wait(10)
    done = threading.Event()
    c.on_subscribe = lambda *a: done.set()
    c.subscribe(topic_filter, qos=1)
    assert done.wait(10)
    c.disconnect()
    c.loop_stop()


def role_anchor(args: argparse.Namespace) -> None:
    state = {"n": 0, "last": 0.0}

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        state["n"] += 1
        state["last"] = time.time()

    c = _paho(args.client_id, args.port, on_message)
    c.loop_start()
    c.ready.wait(10)
    cpu0 = time.process_time()
    while True:
        time.sleep(0.05)
        if state["n"] >= args.expect or (state["n"] and time.time() - state["last"] > IDLE_S):
            break
    cpu = time.process_time() - cpu0
    c.disconnect()
    c.loop_stop()
    print(json.dumps({"connected_at": c.connected_at, "last_at": state["last"], "count": state["n"], "cpu_s": cpu}))


def use_paho(api: str) -> None:
    """Make the intake build the client ``api`` names: ``private``, the intake's own (buffered reads and one
    write for a batch's PUBACKs, both on paho's private methods); ``public``, paho's client as it ships, every
    PUBACK its own ``ack()``; ``reads`` and ``acks``, one of the two overrides alone."""
    import paho.mqtt.client as mqtt

    import devices.mqtt

    ours = devices.mqtt._Client

    class PublicAcks:
        def ack_many(self, mids: list[int]) -> None:
            for mid in mids:
                self.ack(mid, 1)  # type: ignore[attr-defined]

    class Public(PublicAcks, mqtt.Client):
        pass

    class ReadsOnly(PublicAcks, ours):  # type: ignore[misc,valid-type]
        pass

    class AcksOnly(mqtt.Client):
        ack_many = ours.ack_many

    devices.mqtt._Client = {"private": ours, "public": Public, "reads": ReadsOnly,  # type: ignore[misc,assignment]
                            "acks": AcksOnly}[api]


def role_intake(args: argparse.Namespace) -> None:
    """The intake alone: each batch acknowledged as soon as it is taken (no storage), so its CPU is paho's
    reads, the parsing and the acks."""
    import asyncio

    from devices.mqtt import MqttIntake, MqttSettings

    use_paho(args.paho)

    async def run() -> dict[str, Any]:
        intake = MqttIntake(MqttSettings(port=args.port, client_id=args.client_id, store_id="s1",
                                         topic_prefix=args.prefix, session_expiry=3600,
                                         receive_maximum=args.window))
        await intake.start()
        cpu0 = time.process_time()
        await intake.wait_connected(30)
        acked, last = 0, 0.0
        while acked < args.expect:
            try:
                batch = await asyncio.wait_for(intake.batches.get(), IDLE_S)
            except TimeoutError:
                break
            acked += intake.ack(batch)
            last = time.time()
        cpu = time.process_time() - cpu0
        connected_at = intake.last_connack_at
        await intake.stop()
        return {"last_at": last, "acked": acked, "accepted": intake.accepted, "cpu_s": cpu,
                "connected_monotonic": connected_at}

    print(json.dumps(_with_wall_connect(run)))


def _with_wall_connect(run: Any) -> dict[str, Any]:
    """Run the role; the intake notes its CONNACK on the monotonic clock: bring it to wall time."""
    import asyncio

    started = time.time()
    monotonic0 = time.monotonic()
    out: dict[str, Any] = asyncio.run(run())
    out["connected_at"] = started + (out.pop("connected_monotonic") - monotonic0)
    return out


def role_worker(args: argparse.Namespace) -> None:
    import asyncio
    import logging

    from devices.mqtt import MqttIntake, MqttSettings

    use_paho(args.paho)
    from gateway.app.config import Settings
    from gateway.app.runtime import Runtime

    logging.basicConfig(level=logging.WARNING)

    async def run() -> dict[str, Any]:
        settings = Settings()
        settings.database.url = args.db
        settings.data_dir = args.data_dir
        settings.campaigns.dir = str(ROOT / "examples/campaigns")
        settings.devices.profiles_dir = str(ROOT / "examples/device-profiles")
        intake = MqttIntake(MqttSettings(port=args.port, client_id=args.client_id, store_id="s1",
                                         topic_prefix=args.prefix, share_group=args.share_group or None,
                                         session_expiry=3600, receive_maximum=args.window))
        rt = Runtime(settings, mqtt=intake, serve_api=False, on_outcome=None, tick_s=3600)
        times = {"last": 0.0, "acks": 0, "calls": 0}
        real_ack = intake.ack

        def ack(batch: Any) -> int:
            n = real_ack(batch)
            times["last"], times["acks"], times["calls"] = time.time(), times["acks"] + n, times["calls"] + 1
            return n

        intake.ack = ack  # type: ignore[method-assign]
        await rt.start()  # migrated, rules loaded; the connection is being made (the backlog flows at CONNACK)
        cpu0 = time.process_time()  # both threads: paho's (reads, parsing) and the loop's (storage, rules)
        await intake.wait_connected(30)
        while True:
            await asyncio.sleep(0.05)
            if times["acks"] >= args.expect or (times["acks"] and time.time() - times["last"] > IDLE_S):
                break
        cpu = time.process_time() - cpu0
        connected_at = intake.last_connack_at  # the queued backlog flows from the CONNACK on, as for the anchor
        await rt.stop()
        t = rt.pipeline.telemetry.stats()
        return {"last_at": times["last"], "acked": times["acks"],
                "ack_calls": times["calls"], "accepted": t["accepted"], "duplicates": t["duplicates"],
                "dead_lettered": t["dead_lettered_total"], "connected_monotonic": connected_at, "cpu_s": cpu,
                "telemetry_failures": rt.telemetry_failures}

    if not args.profile:
        print(json.dumps(_with_wall_connect(run)))
        return
    import cProfile

    profiles: list[tuple[str, cProfile.Profile]] = []
    thread_run = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:  # paho's network thread gets a profile of its own
        prof = cProfile.Profile(time.thread_time)  # CPU, not wall: waits for the GIL or the socket are free
        profiles.append((self.name, prof))
        prof.runcall(thread_run, self)

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    main_prof = cProfile.Profile(time.thread_time)
    out = main_prof.runcall(_with_wall_connect, run)
    main_prof.dump_stats(f"{args.profile}.{args.client_id}.main")
    for i, (name, prof) in enumerate(profiles):
        prof.dump_stats(f"{args.profile}.{args.client_id}.{i}-{name}")
    print(json.dumps(out))


# ------------------------------------------------------------------ the parent


def spawn(*argv: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, __file__, *argv], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)


def result_of(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"consumer failed ({proc.returncode}): {out[-500:]}")
    parsed: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return parsed


def odd_message(topic: str, i: int) -> tuple[str, bytes]:
    """The i-th odd message, in place of a fleet reading on ``topic``: valid JSON on a topic of the right
    shape, refused only by what the database would refuse. Odd metric names go to devices with no profile
    (as a device never seen before has), whose metrics nothing else checks."""
    device = topic.rsplit("/", 1)[0]  # {prefix}/{store}/devices/{device}
    devices = device.rsplit("/", 1)[0]
    kind = i % 6
    if kind == 0:  # a lone surrogate: UTF-8 cannot encode it (SQLite and PostgreSQL)
        return f"{devices}/odd-{i % 7}/telemetry", rb'{"metrics": {"\ud800": 1}}'
    if kind == 1:  # NUL: PostgreSQL's text refuses it
        return f"{devices}/odd-{i % 7}/telemetry", rb'{"metrics": {"a\u0000b": 1}}'
    if kind == 2:
        return f"{device}/events", rb'{"type": "error", "code": "E\u00004"}'
    if kind == 3:
        return f"{device}/events", rb'{"type": "error", "code": "E\udc00"}'
    if kind == 4:
        return f"{device}/status", rb'{"state": "online", "firmware": "2.4\u0000"}'
    return f"{devices}/{'d' * 129}/telemetry", b'{"metrics": {"x": 1}}'  # devices.id is 128 characters


def backlog(port: int, prefix: str, messages: int, devices: int, bad_share: float = 0.0) -> tuple[int, int]:
    """Publish the clean fleet's telemetry, QoS 1, a share ``bad_share`` of it replaced by odd messages, and
    wait until the broker acknowledged all of it. Returns (messages published, of which odd)."""
    from simulators.wearables import Fleet, FleetSpec, PipelinedPublisher

    fleet = Fleet(FleetSpec(devices=devices, interval_s=60, store_id="s1", prefix=prefix, seed=1), T0)
    pub = PipelinedPublisher("127.0.0.1", port)
    rng = random.Random(7)
    n = odd = 0
    try:
        while n < messages:
            for m in fleet.step():
                if n == messages:
                    break
                if bad_share and rng.random() < bad_share:
                    pub.publish(*odd_message(m.topic, odd))
                    odd += 1
                else:
                    pub.publish(m.topic, m.payload)
                n += 1
        if not pub.flush(300):
            raise RuntimeError("the broker did not acknowledge the backlog")
    finally:
        pub.close()
    return n, odd


def prepare_db(url: str, prefix: str, devices: int) -> None:
    """Migrated, with every simulated device registered with its kind (so its profile validates it)."""
    from gateway.storage.db import Database
    from gateway.storage.models import Device
    from simulators.wearables import Fleet, FleetSpec

    db = Database(url)
    db.upgrade()
    with db.session() as s:
        s.add_all(Device(id=d.id, kind=d.kind, state={}, quarantined=False, store_id="s1")
                  for d in Fleet(FleetSpec(devices=devices, prefix=prefix), T0).devices)
    db.dispose()


def stored(url: str) -> int:
    from sqlalchemy import func, select

    from gateway.storage.db import Database
    from gateway.storage.models import ReadingRecord

    db = Database(url)
    with db.session() as s:
        n = int(s.scalar(select(func.count(func.distinct(ReadingRecord.device_id + ":" + ReadingRecord.key)))) or 0)
    db.dispose()
    return n


def fresh_db(base: str | None, workdir: Path, name: str) -> str:
    if base is None or base.startswith("sqlite"):
        return f"sqlite:///{workdir}/{name}.db"
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(base)
    db = f"bench_{name}_{secrets.token_hex(4)}"
    with psycopg.connect(host=u.host, port=u.port or 5432, user=u.username, password=u.password,
                         dbname=u.database, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    CREATED.append((base, db))
    return u.set(database=db).render_as_string(hide_password=False)


CREATED: list[tuple[str, str]] = []  # PostgreSQL databases this run made, dropped at the end


def drop_created() -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    for base, db in CREATED:
        u = make_url(base)
        with psycopg.connect(host=u.host, port=u.port or 5432, user=u.username, password=u.password,
                             dbname=u.database, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def one_worker(broker: Broker, args: argparse.Namespace, work: Path, tag: str, bad_share: float,
               paho: str = "private", role: str = "worker") -> dict[str, Any]:
    """One gateway worker drains a fresh backlog into a fresh database; its rate, costs and losses. With
    ``role="intake"``, the intake alone (no database) on the same kind of backlog."""
    prefix, client_id = f"bench-{tag}", f"gw-{tag}"
    url = ""
    if role == "worker":
        url = fresh_db(args.db, work, tag.replace("-", "_"))
        prepare_db(url, prefix, args.devices)
    for kind in ("telemetry", "status", "events"):
        make_session(client_id, broker.port, f"{prefix}/+/devices/+/{kind}")
    published, odd = backlog(broker.port, prefix, args.messages, args.devices, bad_share)
    b0 = broker.cpu_s()
    w = result_of(spawn("--role", role, "--port", str(broker.port), "--client-id", client_id, "--prefix", prefix,
                        "--db", url, "--data-dir", str(work), "--expect", str(published),
                        "--window", str(args.window), "--paho", paho), 1200)
    wall = w["last_at"] - w["connected_at"]
    lost = published - odd - (stored(url) if role == "worker" else w["acked"])
    out = {"telemetry_failures": 0, **w, "odd": odd, "wall_s": wall, "rate": w["acked"] / wall,
           "cpu_per_msg": w["cpu_s"] / w["acked"], "broker_cpu_per_msg": (broker.cpu_s() - b0) / w["acked"],
           "lost": lost}
    print(f"{role} ({tag}, paho {paho}, {odd} odd messages): {w}", file=sys.stderr)
    return out


def pg_server_cpu_s() -> float:
    """The local PostgreSQL server's CPU so far (user + system), from /proc: its live processes, plus what the
    postmaster reaped of ended ones (a connection's backend ends with it). 0 where there is none here; it
    counts every client's queries, so it is only as clean as the machine is quiet."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.find("(") + 1:text.rfind(")")] != "postgres":
            continue
        f = text.rsplit(")", 1)[1].split()
        ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def n_workers(broker: Broker, args: argparse.Namespace, work: Path, count: int, tag: str) -> dict[str, Any]:
    """``count`` gateway workers on one ``$share`` group drain a fresh backlog into one fresh database: the
    rate over the span from the first CONNACK to the last message, each worker's CPU per message and the
    total CPU per message (every worker's CPU over every message), and what was lost."""
    prefix = f"bench-{tag}"
    url = fresh_db(args.db, work, tag.replace("-", "_"))
    prepare_db(url, prefix, args.devices)
    cids = [f"gw-{tag}-w{i + 1}" for i in range(count)]
    for cid in cids:
        for kind in ("telemetry", "status", "events"):
            make_session(cid, broker.port, f"$share/bench/{prefix}/+/devices/+/{kind}")
    published, _ = backlog(broker.port, prefix, args.messages, args.devices)
    b0, pg0 = broker.cpu_s(), pg_server_cpu_s()
    extra = ["--profile", f"{args.profile}.{tag}"] if args.profile else []
    procs = [spawn("--role", "worker", "--port", str(broker.port), "--client-id", cid, "--prefix", prefix,
                   "--db", url, "--data-dir", str(work), "--share-group", "bench",
                   "--expect", str(published), "--window", str(args.window), *extra) for cid in cids]
    results = [result_of(p, 1200) for p in procs]
    acked = sum(r["acked"] for r in results)
    span = max(r["last_at"] for r in results) - min(r["connected_at"] for r in results)
    print(f"{count} worker(s) ({tag}): {results}", file=sys.stderr)
    return {"results": results, "rate": acked / span, "wall_s": span, "acked": acked,
            "cpu_per_msg": sum(r["cpu_s"] for r in results) / acked,
            "per_worker_cpu_per_msg": [r["cpu_s"] / max(1, r["acked"]) for r in results],
            "broker_cpu_per_msg": (broker.cpu_s() - b0) / acked,
            "db_server_cpu_per_msg": (pg_server_cpu_s() - pg0) / acked, "lost": published - stored(url),
            "split": [r["acked"] for r in results]}


def workers_figures(runs: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """--workers' keys: per worker count the round with the least total CPU per message (the least disturbed),
    its per-worker figures, and scaling_N = total CPU per message with N workers / with one."""
    best = {n: min(rs, key=lambda x: x["cpu_per_msg"]) for n, rs in runs.items()}
    out: dict[str, Any] = {
        "cpu_us_per_msg_workers": {str(n): round(b["cpu_per_msg"] * 1e6, 1) for n, b in best.items()},
        "cpu_us_per_msg_per_worker": {str(n): [round(c * 1e6, 1) for c in b["per_worker_cpu_per_msg"]]
                                      for n, b in best.items()},
        "broker_cpu_us_per_msg_workers": {str(n): round(b["broker_cpu_per_msg"] * 1e6, 1) for n, b in best.items()},
        "db_server_cpu_us_per_msg_workers": {str(n): round(b["db_server_cpu_per_msg"] * 1e6, 1)
                                             for n, b in best.items()},
        "msgs_per_s_workers": {str(n): round(b["rate"], 1) for n, b in best.items()},
        "wall_s_workers": {str(n): round(b["wall_s"], 2) for n, b in best.items()},
        "split_workers": {str(n): b["split"] for n, b in best.items()},
        "lost_workers": {str(n): max(x["lost"] for x in rs) for n, rs in runs.items()},
        "rounds_cpu_us_per_msg_workers": {str(n): [round(x["cpu_per_msg"] * 1e6, 1) for x in rs]
                                          for n, rs in runs.items()},
    }
    if 1 in best:
        for n, b in best.items():
            if n != 1:
                out[f"scaling_{n}"] = round(b["cpu_per_msg"] / best[1]["cpu_per_msg"], 3)
    return out


PAHO_VARIANTS = {"intake": ("intake", "private"), "intake_public": ("intake", "public"),
                 "intake_reads": ("intake", "reads"), "intake_acks": ("intake", "acks"),
                 "clean": ("worker", "private"), "public": ("worker", "public")}
"""--paho-api's runs: variant -> (role, paho client). ``clean`` is the one-worker run every report has."""


def paho_api_figures(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each paho client's best rate, least CPU per message (of its rounds: the least disturbed) and their ratio
    to the intake's own client, for the intake alone and for the whole worker."""
    out: dict[str, Any] = {}
    for variant, (role, api) in PAHO_VARIANTS.items():
        rounds = runs[variant]
        rate = max(x["rate"] for x in rounds)
        cpu = min(x["cpu_per_msg"] for x in rounds)
        base = runs["intake" if role == "intake" else "clean"]
        out.setdefault(role, {})[api] = {
            "msgs_per_s": round(rate, 1), "cpu_us_per_msg": round(cpu * 1e6, 1),
            "wall_s": round(min(x["wall_s"] for x in rounds), 2),
            "rate_ratio": round(rate / max(x["rate"] for x in base), 3),
            "cpu_ratio": round(cpu / min(x["cpu_per_msg"] for x in base), 3),
            "lost": max(x["lost"] for x in rounds),
            "rounds_cpu_us_per_msg": [round(x["cpu_per_msg"] * 1e6, 1) for x in rounds]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny run that only checks the script works")
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--db", default=None, help="a PostgreSQL URL (default: SQLite files in a temp dir)")
    ap.add_argument("--bad-share", type=float, default=0.0,
                    help="also run one worker on the backlog with this share of odd messages (e.g. 0.005)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="one-worker runs of each backlog, clean and odd alternating; the best of each is reported")
    ap.add_argument("--window", type=int, default=10000,
                    help="the broker's max_inflight_messages and the gateway's receive_maximum")
    ap.add_argument("--paho-api", action="store_true",
                    help="also run the worker and the intake alone on paho's public API only (no private "
                         "override), and the intake with each override alone, alternating in each round")
    ap.add_argument("--workers", default="",
                    help="also N workers on one $share group and one database for each N of this list (e.g. "
                         "1,2,4): CPU per message per worker and in total, and scaling_N against one worker")
    ap.add_argument("--workers-only", action="store_true",
                    help="with --workers: skip the anchor, the one-worker and two-worker runs")
    ap.add_argument("--profile", default="", help="cProfile each worker into FILE.<tag>.<client id> (pstats)")
    ap.add_argument("--role", choices=["anchor", "worker", "intake"], help=argparse.SUPPRESS)
    ap.add_argument("--paho", choices=["private", "public", "reads", "acks"], default="private",
                    help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--client-id", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    ap.add_argument("--expect", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--share-group", default="", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "anchor":
        role_anchor(args)
        return
    if args.role == "worker":
        role_worker(args)
        return
    if args.role == "intake":
        role_intake(args)
        return
    if args.quick:
        args.messages, args.devices = 2000, 50

    if not 0.0 <= args.bad_share < 1.0:
        ap.error("--bad-share is a fraction: 0 <= F < 1")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    try:
        counts = sorted({int(x) for x in args.workers.split(",") if x.strip()})
    except ValueError:
        ap.error(f"--workers is a list of worker counts like 1,2,4, not {args.workers!r}")
    if any(c < 1 for c in counts):
        ap.error("--workers: every count must be at least 1")
    if args.workers_only and not counts:
        ap.error("--workers-only needs --workers")
    worker_runs: dict[int, list[dict[str, Any]]] = {c: [] for c in counts}
    n = args.messages
    work = Path(tempfile.mkdtemp(prefix="telemetry-bench-"))
    broker = Broker(work, args.window)
    cpu: dict[str, float] = {}  # CPU seconds per message: each consumer process, and the broker meanwhile
    wall: dict[str, float] = {}
    bad: dict[str, Any] = {}
    failures: dict[str, int] = {}  # batches that failed and were retried message by message
    try:
        if args.workers:  # N workers on one $share group, each N in its rounds (order reversed every other round)
            for r in range(args.rounds):
                for count in counts if r % 2 == 0 else counts[::-1]:
                    worker_runs[count].append(n_workers(broker, args, work, count, f"n{count}-{r}"))
        if not args.workers_only:
            # 1. the anchor
            prefix = "bench-anchor"
            make_session("anchor", broker.port, f"{prefix}/+/devices/+/telemetry")
            published, _ = backlog(broker.port, prefix, n, args.devices)
            b0 = broker.cpu_s()
            a = result_of(spawn("--role", "anchor", "--port", str(broker.port), "--client-id", "anchor",
                                "--expect", str(published)), 600)
            cpu["anchor"], cpu["anchor_broker"] = a["cpu_s"] / a["count"], (broker.cpu_s() - b0) / a["count"]
            wall["anchor"] = a["last_at"] - a["connected_at"]
            anchor_rate = a["count"] / wall["anchor"]
            print(f"anchor: {a['count']} messages in {a['last_at'] - a['connected_at']:.2f} s", file=sys.stderr)

            # 2. one gateway worker; with --bad-share, also on the backlog with odd messages, the two alternating
            # (ABBA...) for --rounds rounds, so that a drift or a neighbour's load falls on both alike
            # With --paho-api, also the worker and the intake alone on paho's public API only, in the same rounds.
            variants = ["clean", *(["bad"] if args.bad_share else []),
                        *([v for v in PAHO_VARIANTS if v != "clean"] if args.paho_api else [])]
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
            for r in range(args.rounds):
                for variant in variants if r % 2 == 0 else variants[::-1]:
                    role, paho = PAHO_VARIANTS.get(variant, ("worker", "private"))
                    runs[variant].append(one_worker(broker, args, work, f"{variant.replace('_', '-')}-{r}",
                                                    args.bad_share if variant == "bad" else 0.0, paho, role))
            w = max(runs["clean"], key=lambda x: x["rate"])  # the best round of each: the least disturbed
            ours_rate, lost, wall["one_worker"] = w["rate"], w["lost"], w["wall_s"]
            cpu["one_worker"], cpu["one_worker_broker"] = w["cpu_per_msg"], w["broker_cpu_per_msg"]
            failures["one_worker"] = sum(x["telemetry_failures"] for x in runs["clean"])
            paho_api = {"paho_api": paho_api_figures(runs)} if args.paho_api else {}
            if args.bad_share:
                wb = max(runs["bad"], key=lambda x: x["rate"])
                wall["one_worker_bad"] = wb["wall_s"]
                cpu["one_worker_bad"], cpu["one_worker_bad_broker"] = wb["cpu_per_msg"], wb["broker_cpu_per_msg"]
                failures["one_worker_bad"] = sum(x["telemetry_failures"] for x in runs["bad"])
                bad = {"bad_share": args.bad_share, "bad_share_msgs_per_s": round(wb["rate"], 1),
                       "bad_share_ratio": round(wb["rate"] / ours_rate, 3), "bad_share_odd": wb["odd"],
                       "bad_share_dead_lettered": wb["dead_lettered"], "bad_share_lost": wb["lost"],
                       "rounds": {v: [round(x["rate"], 1) for x in runs[v]] for v in ("clean", "bad")},
                       "rounds_cpu_us_per_msg": {v: [round(x["cpu_per_msg"] * 1e6, 1) for x in runs[v]]
                                                 for v in ("clean", "bad")}}

            # 3. two workers sharing one $share group and one database
            prefix = "bench-two"
            url2 = fresh_db(args.db, work, "two")
            prepare_db(url2, prefix, args.devices)
            for cid in ("gw-w1", "gw-w2"):
                for kind in ("telemetry", "status", "events"):
                    make_session(cid, broker.port, f"$share/bench/{prefix}/+/devices/+/{kind}")
            published2, _ = backlog(broker.port, prefix, n, args.devices)
            b0 = broker.cpu_s()
            procs = [spawn("--role", "worker", "--port", str(broker.port), "--client-id", cid, "--prefix", prefix,
                           "--db", url2, "--data-dir", str(work), "--share-group", "bench",
                           "--expect", str(published2), "--window", str(args.window)) for cid in ("gw-w1", "gw-w2")]
            results = [result_of(p, 1200) for p in procs]
            span = wall["two_workers"] = max(r["last_at"] for r in results) - min(r["connected_at"] for r in results)
            two_rate = sum(r["acked"] for r in results) / span
            acked2 = sum(r["acked"] for r in results)
            cpu["two_workers"] = sum(r["cpu_s"] for r in results) / acked2
            cpu["two_workers_broker"] = (broker.cpu_s() - b0) / acked2
            lost2 = published2 - stored(url2)
            print(f"two workers: {results}", file=sys.stderr)
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
        drop_created()

    db_kind = "postgresql" if args.db and not args.db.startswith("sqlite") else "sqlite"
    workers = workers_figures(worker_runs) if counts else {}
    if args.workers_only:
        print(json.dumps({"messages": n, "devices": args.devices, "db": db_kind, "rounds": args.rounds, **workers}))
        return
    print(json.dumps({
        "msgs_per_s": round(ours_rate, 1), "anchor_msgs_per_s": round(anchor_rate, 1),
        "ratio": round(ours_rate / anchor_rate, 3), "two_workers_msgs_per_s": round(two_rate, 1),
        "ratio_2_workers": round(two_rate / anchor_rate, 3), "lost": lost, "lost_2_workers": lost2,
        "messages": n, "devices": args.devices, "db": "postgresql" if args.db and not args.db.startswith("sqlite")
        else "sqlite", "duplicates": w["duplicates"], "dead_lettered": w["dead_lettered"],
        "mean_batch": round(w["acked"] / max(1, w["ack_calls"]), 1),
        "worker_split": [r["acked"] for r in results], **bad, **paho_api, "telemetry_failures": failures,
        "cpu_us_per_msg": {k: round(v * 1e6, 1) for k, v in cpu.items()},
        "wall_s": {k: round(v, 2) for k, v in wall.items()}, **workers}))


if __name__ == "__main__":
    main()
