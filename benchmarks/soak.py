"""A 24-hour soak in virtual time: does the gateway's memory stay flat, and do the day's figures match its rows?

The example store (examples/store.yaml) scaled up: its people cloned to ``--people`` enrolled customers
with one or two visits each across the day, its devices cloned to ``--devices`` products publishing every
``--interval`` s, the anonymous crowd arriving all day, the example campaigns firing. The synchronous
Pipeline (the one the Runtime's worker runs) is driven in virtual time on SQLite, as ``gateway simulate``
does, and every virtual hour the process's RSS and the size of every in-memory table of the pipeline's
stages (presence tracks, engine caches, zone switches, guard, rotating cache, telemetry caches...: found
by walking each stage's attributes, so a new one is reported without being named here) are sampled.

Head office is attached as production runs it: the store's uplink (gateway/hq/uplink.py, its own MQTT
connection, QoS 1) publishes to a Mosquitto this script starts, one cycle every virtual minute on the
soak's clock; head office's ``HqConsumer`` runs in a process of its own (this script with
``--hq-consumer``, as ``gateway hq`` runs it) into ``--hq-db`` (default: a fresh database on the local
PostgreSQL, ``$GATEWAY_SOAK_POSTGRES_URL`` or postgres@127.0.0.1:5432, when one answers, else a SQLite
file in a temporary directory). Every virtual hour that
process's RSS (/proc/<pid>/status) and its in-memory tables (it reports them over a pipe) are sampled too;
the uplink's tables are in the store's walk.

At the end, the day's figures (the figures function /v1/figures serves) are checked against what the
rows say: visits, notifications and decisions counted straight from their tables. Then, once the uplink
has drained and the consumer has caught up (its ledger polled, bounded), head office's figures for the
store are checked against the store's, and its rows of every kind the uplink publishes (and every kind
in its ledger) against the store's rows, footfall counters included.

    python benchmarks/soak.py            # 24 h, 1,000 people, 500 devices
    python benchmarks/soak.py --quick    # 2 h, 100 people, 50 devices

Last line: one JSON object (``rss_mb`` per hour, ``rss_growth_pct`` last hour against the first, ``tables``
per hour, ``tables_max``, ``figures_match``, CPU and wall seconds; head office's ``hq_rss_mb`` per hour,
``hq_rss_growth_pct``, ``hq_tables``, ``hq_events``, ``hq_equal``, ``hq_mismatches``, ``uplink_published``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import os
import random
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _mosquitto import Broker  # noqa: E402  (the benchmarks' own Mosquitto)

from gateway.app.config import Settings  # noqa: E402
from gateway.app.pipeline import Pipeline  # noqa: E402
from gateway.app.scenarios import apply_scenario  # noqa: E402
from gateway.app.simulate import open_store, opening_time, run_steps  # noqa: E402
from gateway.campaigns.model import CampaignIndex, load_campaigns, load_segments  # noqa: E402
from gateway.clock import VirtualClock  # noqa: E402
from gateway.engine.figures import figures as day_figures  # noqa: E402
from gateway.hq import events as hq_events  # noqa: E402
from gateway.hq import uplink as hq_uplink  # noqa: E402
from gateway.profiles.service import GatewayService  # noqa: E402
from gateway.security.tokens import TokenSigner  # noqa: E402
from gateway.storage.db import Database  # noqa: E402
from gateway.storage.models import (  # noqa: E402
    Base,
    Decision,
    FootfallCount,
    FootfallHour,
    HqEvent,
    HqUplinkOpen,
    Notification,
    NotificationStatus,
    ReadingRollup,
)
from gateway.storage.models import Visit as VisitRecord  # noqa: E402
from simulators.scenario import Scenario, Visit, load_scenario  # noqa: E402
from simulators.store_sim import StoreSimulator  # noqa: E402
from simulators.wearables import TelemetryModel  # noqa: E402

SIZED = (dict, set, list, collections.deque, collections.Counter, collections.OrderedDict, frozenset)
PREFIX = "stores"
UPLINK_EVERY_S = 60.0  # virtual seconds between the uplink's cycles
LOCAL_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
CATCH_UP_S = 600.0  # wall-clock bound on waiting for head office to hold everything the uplink published
READY_S = 60.0  # bound on the consumer process's start (migrations, subscription)


def rss_mb() -> float:
    """The process's resident set now (Linux /proc), in MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 1e6


def vm_rss_mb(pid: int) -> float:
    """Another process's resident set now (VmRSS in /proc/<pid>/status), in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    return 0.0


def deep_kb(obj: Any) -> float:
    """What a container holds, every level (dicts, lists, tuples, sets and what is in them), in kB."""
    seen: set[int] = set()
    stack, total = [obj], 0
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list | tuple | set | frozenset | collections.deque):
            stack.extend(o)
    return round(total / 1e3, 1)


def uplink_tables_kb(uplink: hq_uplink.Uplink) -> dict[str, float]:
    """The uplink's tables (its container attributes, and those of a dict of them) by what they hold."""
    out: dict[str, float] = {}
    for name, v in vars(uplink).items():
        if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            out.update({f"{name}[{k}]": deep_kb(x) for k, x in v.items()})
        elif isinstance(v, SIZED):
            out[name] = deep_kb(v)
    return out


def scaled(base: Scenario, people: int, devices: int, interval_s: float, hours: float, seed: int) -> Scenario:
    """The example store with ``people`` customers (clones of its own, one or two visits each across the
    run) and ``devices`` products (clones of its own, owned by the clones), the crowd arriving all run."""
    rng = random.Random(seed)
    span = hours * 3600.0
    templates = base.people
    persons = []
    for i in range(people):
        p = templates[i % len(templates)]
        routes = [v.route for q in templates for v in q.visits] or [p.visits[0].route]
        visits = tuple(sorted((Visit(rng.uniform(0, span * 0.95), rng.choice(routes))
                               for _ in range(rng.choice((1, 1, 2)))), key=lambda v: v.at))
        pid = p.id if i < len(templates) else f"{p.id}-{i}"
        email = p.email if i < len(templates) or p.email is None else f"{i}.{p.email}"
        persons.append(dataclasses.replace(p, id=pid, email=email, visits=visits,
                                           beacon=dataclasses.replace(p.beacon, major=1000 + i // 60000,
                                                                      minor=1 + i % 60000)))
    owners = {p.id for p in templates}
    devs = []
    for i in range(devices):
        d = base.devices[i % len(base.devices)]
        owner = persons[i % len(persons)].id if persons else d.owner
        devs.append(dataclasses.replace(d, id=f"{d.id}-{i}", owner=owner if owner in owners or i >= len(base.devices)
                                        else d.owner, interval_s=interval_s))
    crowd = dataclasses.replace(base.crowd, arrivals_per_hour=max(base.crowd.arrivals_per_hour, 40.0),
                                count=max(base.crowd.count, int(40 * hours)))
    return dataclasses.replace(base, people=tuple(persons), devices=tuple(devs), crowd=crowd)


def sizes(stages: dict[str, Any]) -> dict[str, int]:
    """``stage.attr`` -> len, for every container attribute of the stages (one level of nested objects too)."""
    out: dict[str, int] = {}

    def walk(prefix: str, obj: Any, depth: int) -> None:
        names = list(getattr(obj, "__dict__", {})) + [n for c in type(obj).__mro__
                                                      for n in getattr(c, "__slots__", ())]
        for name in names:
            if name in ("settings", "__dict__") or name.startswith("__"):
                continue
            try:
                value = getattr(obj, name)
            except AttributeError:
                continue
            if isinstance(value, SIZED):
                out[f"{prefix}.{name}"] = len(value)
                if isinstance(value, dict) and value and all(isinstance(v, SIZED) for v in list(value.values())[:50]):
                    out[f"{prefix}.{name}[*]"] = sum(len(v) for v in list(value.values()))  # what they hold
            elif depth and hasattr(value, "__dict__") and type(value).__module__.split(".")[0] in (
                    "gateway", "beacons", "devices") and not callable(value):
                walk(f"{prefix}.{name}", value, depth - 1)

    for name, stage in stages.items():
        walk(name, stage, 0 if name == "pipeline" else 1)  # the pipeline's own; its stages by their names
    return out


@contextlib.contextmanager
def hq_database(url: str | None, tmp: Path) -> Iterator[tuple[str, str]]:
    """Head office's database URL and what it is: ``url`` as given, else a fresh database on the local
    PostgreSQL (dropped afterwards), else a SQLite file in ``tmp`` when no PostgreSQL answers."""
    if url:
        yield url, "given"
        return
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    base = make_url(os.environ.get("GATEWAY_SOAK_POSTGRES_URL") or LOCAL_PG)
    args: dict[str, Any] = {"host": base.host or "127.0.0.1", "port": base.port or 5432, "user": base.username,
            "password": base.password, "dbname": base.database, "connect_timeout": 2, "autocommit": True}
    try:
        psycopg.connect(**args).close()
    except psycopg.Error:
        yield f"sqlite:///{tmp / 'hq.db'}", "sqlite (no PostgreSQL answered)"
        return
    name = f"gw_soak_hq_{secrets.token_hex(6)}"
    with psycopg.connect(**args) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield base.set(database=name).render_as_string(hide_password=False), "postgresql (a fresh database)"
    finally:
        with psycopg.connect(**args) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def consume(url: str, port: int) -> None:
    """The child's side (``--hq-consumer``): head office's consumer as ``gateway hq`` runs it (migrate, then
    subscribe, ack after commit), answering each ``stats`` line on stdin with one JSON line on stdout:
    its ledger count and in-memory table sizes."""
    from gateway.hq.consumer import HqConsumer

    db = Database(url)
    db.upgrade()
    consumer = HqConsumer(db, "127.0.0.1", port, PREFIX, f"hq-soak-{secrets.token_hex(3)}")
    consumer.start()
    if not consumer.subscribed.wait(READY_S):
        raise SystemExit(f"hq consumer: not subscribed to 127.0.0.1:{port} within {READY_S:.0f} s")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "stats":
            break
        with db.session() as s:
            ledger = int(s.scalar(select(func.count()).select_from(HqEvent)) or 0)
            waiting = int(s.scalar(select(func.count()).select_from(HqEvent).where(HqEvent.row_id.is_(None))) or 0)
        gc.collect()  # as the store's side before its sample: the parent reads this process's RSS next
        tables = sizes({"consumer": consumer})
        tables["consumer._inbox"] = consumer._inbox.qsize()  # a queue.Queue: not one of SIZED
        print(json.dumps({"ledger": ledger, "waiting": waiting, "stats": dataclasses.asdict(consumer.stats),
                          "tables": tables}), flush=True)
    consumer.stop()
    db.dispose()


class HeadOffice:
    """The consumer's process, asked for its figures over a pipe; its RSS read from /proc."""

    def __init__(self, url: str, port: int) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--hq-consumer", url, "--hq-port", str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._line()  # {"ready": true}: migrated and subscribed (the child bounds its own wait)

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the hq consumer process ended (exit {self.proc.wait(10)}); see its stderr above")
        out: dict[str, Any] = json.loads(line)
        return out

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return self._line()

    def rss_mb(self) -> float:
        return vm_rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()  # EOF: the child stops its consumer and exits
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Customers:
    """The customers' apps: of each notification released (not scheduled), about half are opened and a
    third of those clicked, as ``POST /v1/me/notifications/{id}/{kind}`` records them (seeded)."""

    def __init__(self, service: GatewayService, seed: int) -> None:
        self.service, self.rng, self.seen = service, random.Random(seed), 0

    def act(self) -> None:
        with self.service.db.session() as s:
            released = s.execute(select(Notification.id, Notification.profile_id).where(
                Notification.id > self.seen, Notification.status != NotificationStatus.SCHEDULED)
                .order_by(Notification.id)).all()
        for nid, pid in released:
            self.seen = nid
            if self.rng.random() < 0.5:
                self.service.record_interaction(pid, nid, "opened")
                if self.rng.random() < 0.33:
                    self.service.record_interaction(pid, nid, "clicked")


def uplink_cycle(uplink: hq_uplink.Uplink) -> int:
    """One cycle as the uplink's thread runs it: batches until one publishes nothing (bounded)."""
    n = 0
    for _ in range(10_000):
        k = uplink.run_once()
        n += k
        if not k:
            break
    return n


def differences(store: Any, hq: Any, path: str = "") -> list[str]:
    """Where two figures' JSON differ, each as ``path: store X, hq Y``."""
    if isinstance(store, dict) and isinstance(hq, dict):
        return [d for k in sorted(set(store) | set(hq), key=str)
                for d in differences(store.get(k), hq.get(k), f"{path}.{k}" if path else str(k))]
    if isinstance(store, list) and isinstance(hq, list) and len(store) == len(hq):
        return [d for i, (a, b) in enumerate(zip(store, hq, strict=True)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if store == hq else [f"{path}: store {store!r}, hq {hq!r}"]


# A kind whose rows are not its own table "<kind>s": the table and which of its rows the kind covers.
KIND_ROWS: dict[str, tuple[Any, list[Any]]] = {"reading_hour": (ReadingRollup, [ReadingRollup.period == 3600])}
NOT_ROWS = ("footfall_day", "footfall_hour", "erasure")  # counters (compared as tables) and erasures


def kind_rows(kind: str, store: str) -> tuple[Any, list[Any]] | None:
    """A kind's table and its "of this store" condition: the uplink's own (KINDS), which head office's rows,
    written with the store's id, meet too; else the table named after the kind, by its ``store_id`` if it has
    one (the soak has one store: all of it otherwise). None: a kind this cannot place."""
    for k in hq_uplink.KINDS:
        if k.name == kind:
            return k.model, list(k.of_store(store))
    if kind in KIND_ROWS:
        model, where = KIND_ROWS[kind]
    else:
        found = [m.class_ for m in Base.registry.mappers if getattr(m.class_, "__tablename__", "") == f"{kind}s"]
        if not found:
            return None
        model, where = found[0], []
    store_col = getattr(model, "store_id", None)
    return model, [*where, *([store_col == store] if store_col is not None else [])]


def row_counts(db: Database, store: str, kinds: set[str]) -> dict[str, int | None]:
    """Rows of each kind (None: a kind with no table to count)."""
    out: dict[str, int | None] = {}
    with db.session() as s:
        for kind in sorted(kinds):
            placed = kind_rows(kind, store)
            out[kind] = None if placed is None else int(s.scalar(
                select(func.count()).select_from(placed[0]).where(*placed[1])) or 0)
    return out


def upward_kinds() -> set[str]:
    """Every kind of row the schema carries upward (events.KINDS) and the uplink publishes (its KINDS)."""
    return ({k.name for k in hq_uplink.KINDS} | set(hq_events.KINDS)) - set(NOT_ROWS)


def footfall_rows(db: Database, store: str) -> dict[str, list[tuple[Any, ...]]]:
    """The store's footfall counters, every column, in key order."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with db.session() as s:
        for model in (FootfallCount, FootfallHour):
            cols = list(model.__table__.columns)
            out[model.__tablename__] = sorted(tuple(r) for r in s.execute(
                select(*cols).where(model.store_id == store)))
    return out


def compare_hq(store_db: Database, hq_db: Database, store: str, store_fig: dict[str, Any], day: str, tz: str,
               settings: Settings) -> tuple[dict[str, Any], list[str]]:
    """Head office's rows, ledger and figures for ``store`` against the store's: (the counts, mismatches)."""
    mismatches: list[str] = []
    with hq_db.session() as s:
        ledger = {kind: int(n) for kind, n in s.execute(select(HqEvent.kind, func.count()).where(
            HqEvent.store_id == store).group_by(HqEvent.kind))}
    kinds = upward_kinds() | set(ledger)
    own, there = row_counts(store_db, store, kinds), row_counts(hq_db, store, kinds)
    with hq_db.session() as s:
        waiting = int(s.scalar(select(func.count()).select_from(HqEvent).where(
            HqEvent.store_id == store, HqEvent.row_id.is_(None))) or 0)
        hq_fig = day_figures(s, day, day, tz, bounce_s=settings.figures.bounce_s, store=store,
                             conversion_window_s=settings.interactions.conversion_window_s)
    rows: dict[str, Any] = {}
    for kind in sorted(kinds):
        # The ledger holds the kinds head office keeps once by id; those it keeps by key (a device, an hour's
        # rollup: the latest version) are not in it, and their rows are what to compare.
        rows[kind] = r = {"store": own[kind] if kind != "erasure" else 0, "hq": there[kind], "ledger": ledger.get(kind)}
        if r["store"] is None:
            mismatches.append(f"rows.{kind}: {r['ledger']} event(s) in the ledger, no table here to count")
        elif (r["ledger"] is not None and r["ledger"] != r["store"]) or r["hq"] != r["store"]:
            mismatches.append(f"rows.{kind}: store {r['store']}, hq {r['hq']}, ledger {r['ledger']}")
    if waiting:
        mismatches.append(f"ledger: {waiting} event(s) still waiting for their parent")
    foot_own, foot_hq = footfall_rows(store_db, store), footfall_rows(hq_db, store)
    for table, ours in foot_own.items():
        rows[table] = {"store": len(ours), "hq": len(foot_hq[table])}
        if ours != foot_hq[table]:
            mismatches.append(f"rows.{table}: {len(set(ours) ^ set(foot_hq[table]))} row(s) differ")
    mismatches += [f"figures.{d}" for d in differences(store_fig, hq_fig)]
    return rows, mismatches


def run(hours: float, people: int, devices: int, interval_s: float, step_s: float, seed: int,
        hq_db_url: str | None = None) -> dict[str, Any]:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    base = load_scenario(ROOT / "examples/store.yaml")
    scenario = scaled(base, people, devices, interval_s, hours, seed)
    campaigns_dir = str(ROOT / "examples/campaigns")
    settings = apply_scenario(Settings(), scenario)
    store_id = settings.store.id
    start = opening_time(scenario, dt.date(2026, 6, 1))
    duration = hours * 3600.0
    clock = VirtualClock(start)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-soak-")))
        (tmp / "broker").mkdir()
        broker = Broker(tmp / "broker")
        stack.callback(broker.stop)
        hq_url, hq_kind = stack.enter_context(hq_database(hq_db_url, tmp))
        hq = HeadOffice(hq_url, broker.port)
        stack.callback(hq.stop)
        db = Database(f"sqlite:///{tmp / 'soak.db'}")
        stack.callback(db.dispose)
        identities = open_store(db, settings, scenario, clock, start)
        link = hq_uplink.UplinkThread(lambda publish: hq_uplink.Uplink(db, store_id, PREFIX, publish, now=clock.now),
                                      "127.0.0.1", broker.port, f"uplink-soak-{secrets.token_hex(3)}")
        link.connect()
        stack.callback(link.stop)
        if not link.wait_connected(READY_S):
            raise RuntimeError(f"the uplink did not connect to 127.0.0.1:{broker.port}")
        uplink = link.uplink
        by_kind: collections.Counter[str] = collections.Counter()  # what goes up, per kind (the topic's last level)
        send = uplink.publish

        def counted(topic: str, payload: bytes) -> hq_uplink.Delivery:
            by_kind[topic.rsplit("/", 1)[-1]] += 1
            return send(topic, payload)

        uplink.publish = counted
        customers = Customers(GatewayService(db, identities, clock, TokenSigner(b"simulation-only-secret-0123456789")),
                              seed)
        outcomes = 0

        def on_outcome(*_: Any) -> None:
            nonlocal outcomes
            outcomes += 1

        pipeline = Pipeline(settings, db, CampaignIndex(load_campaigns(campaigns_dir)), identities, on_outcome,
                            segments=load_segments(campaigns_dir))
        sim = StoreSimulator(scenario, start=start, seed=seed, duration_s=duration)
        telemetry = TelemetryModel(scenario, start=start, seed=seed)
        stages = {"pipeline": pipeline, "presence": pipeline.presence, "engine": pipeline.engine,
                  "guard": pipeline.guard, "switches": pipeline.switches, "telemetry": pipeline.telemetry,
                  "rules": pipeline.rules, "rotating": pipeline.rotating, "identities": identities,
                  "uplink": uplink, "uplink.mqtt": link._client}  # the uplink's paho client: its in-flight queues
        rss: list[float] = []
        tables: list[dict[str, int]] = []
        hq_rss: list[float] = []
        hq_tables: list[dict[str, int]] = []
        uplink_kb: list[dict[str, float]] = []  # the uplink's tables by what they hold, at hour 1 and the end
        end = start + duration
        next_hour, next_uplink = start + 3600.0, start + UPLINK_EVERY_S
        for t in run_steps(pipeline, sim, telemetry, clock, scenario.store.id, start, end, step_s):
            if t >= next_uplink:
                customers.act()
                uplink_cycle(uplink)
                next_uplink += UPLINK_EVERY_S
            if t >= next_hour or t >= end:
                gc.collect()
                rss.append(round(rss_mb(), 2))
                tables.append(sizes(stages))
                at_hq = hq.stats()
                hq_rss.append(round(hq.rss_mb(), 2))
                hq_tables.append(at_hq["tables"])
                if len(rss) == 1:  # walked at the first hour and the end only: the walk's own garbage would show
                    uplink_kb.append(uplink_tables_kb(uplink))  # in the next hour's RSS
                next_hour += 3600.0
                print(f"hour {len(rss)}: rss {rss[-1]} MB, tracks {len(pipeline.presence.tracks)}; "
                      f"uplink {uplink.stats.published} published; hq rss {hq_rss[-1]} MB, ledger {at_hq['ledger']}",
                      file=sys.stderr, flush=True)
        uplink_kb.append(uplink_tables_kb(uplink))
        clock.set(end + settings.presence.visit_end_after_s + 1)  # everyone still inside times out
        pipeline.tick(clock.now())
        pipeline.flush_footfall()
        customers.act()
        tz = ZoneInfo(settings.store.timezone)
        day = dt.datetime.fromtimestamp(start, tz).date()
        lo = dt.datetime.combine(day, dt.time(0), tz).timestamp()
        hi = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), tz).timestamp()
        with db.session() as s:
            fig = day_figures(s, day.isoformat(), day.isoformat(), settings.store.timezone,
                              bounce_s=settings.figures.bounce_s, store=store_id,
                              conversion_window_s=settings.interactions.conversion_window_s)
            rows_visits = s.scalar(select(func.count()).select_from(VisitRecord).where(
                VisitRecord.started_at >= lo, VisitRecord.started_at < hi)) or 0
            rows_notified = s.scalar(select(func.count()).select_from(Notification).where(
                Notification.created_at >= lo, Notification.created_at < hi)) or 0
            rows_decisions = s.scalar(select(func.count()).select_from(Decision)) or 0
        # Head office: the uplink drains (every row settled now; the clock past the rollups' grace), then the
        # consumer catches up, polled.
        failed = uplink.stats.unacknowledged
        clock.set(clock.now() + 3600.0)
        uplink_cycle(uplink)
        with db.session() as s:
            still_open = int(s.scalar(select(func.count()).select_from(HqUplinkOpen)) or 0)
        waited0 = time.monotonic()
        at_hq = hq.stats()
        while time.monotonic() - waited0 < CATCH_UP_S and not (  # every event the broker acknowledged, committed
                at_hq["stats"]["received"] >= uplink.stats.published and at_hq["tables"]["consumer._inbox"] == 0):
            time.sleep(0.1)  # the consumer is another process: polled, bounded by CATCH_UP_S
            at_hq = hq.stats()
        caught_up_s = round(time.monotonic() - waited0, 2)
        behind = uplink.stats.published - at_hq["stats"]["received"]
        hq_db = Database(hq_url)
        stack.callback(hq_db.dispose)
        hq_rows, mismatches = compare_hq(db, hq_db, store_id, fig, day.isoformat(), settings.store.timezone, settings)
        if behind > 0:
            mismatches.append(f"hq: {behind} event(s) not received within {CATCH_UP_S:.0f} s")
        if still_open:
            mismatches.append(f"uplink: {still_open} row(s) still open at the store after the drain")
        if uplink.stats.unacknowledged > failed:
            mismatches.append(f"uplink: {uplink.stats.unacknowledged - failed} drain cycle(s) not acknowledged")
        hq_end = {"ledger": at_hq["ledger"], "stats": at_hq["stats"], "tables": at_hq["tables"]}
    first = rss[1] if len(rss) > 2 else rss[0]  # the first hour fills caches and the allocator: measured after it
    hq_first = hq_rss[1] if len(hq_rss) > 2 else hq_rss[0]
    keys = sorted({k for row in tables for k in row})
    tables_max = {k: max(row.get(k, 0) for row in tables) for k in keys}
    tables_last = {k: tables[-1].get(k, 0) for k in keys}
    hq_keys = sorted({k for row in [*hq_tables, hq_end["tables"]] for k in row})
    checks = {"visits": (fig["enrolled_visits"], rows_visits),
              "notifications": (fig["notifications"]["total"]["notified"], rows_notified),
              "decisions": (outcomes, rows_decisions)}
    return {"benchmark": "soak", "hours": hours, "people": people, "devices": devices, "device_interval_s": interval_s,
            "step_s": step_s, "seed": seed, "rss_mb": rss,
            "rss_growth_pct": round(100 * (rss[-1] - first) / first, 2),
            "rss_growth_from_hour": 2 if len(rss) > 2 else 1,
            "goal_growth_pct": 5.0, "tables": tables, "tables_max": tables_max, "tables_last": tables_last,
            "figures": {k: {"figures": a, "rows": b} for k, (a, b) in checks.items()},
            "figures_match": all(a == b for a, b in checks.values()),
            "adverts": pipeline.figures["adverts"], "readings": pipeline.figures["readings"],
            "hq_db": hq_kind, "hq_rss_mb": hq_rss,
            "hq_rss_growth_pct": round(100 * (hq_rss[-1] - hq_first) / hq_first, 2),
            "hq_tables": {"last": {k: hq_end["tables"].get(k, 0) for k in hq_keys},
                          "max": {k: max(row.get(k, 0) for row in [*hq_tables, hq_end["tables"]]) for k in hq_keys}},
            "hq_events": hq_end["ledger"], "hq_consumer": hq_end["stats"], "hq_rows": hq_rows,
            "hq_caught_up_s": caught_up_s, "hq_equal": not mismatches, "hq_mismatches": mismatches,
            "uplink_published": uplink.stats.published, "uplink_published_by_kind": dict(sorted(by_kind.items())),
            "uplink_tables_kb": uplink_kb, "uplink_cycles": uplink.stats.cycles,
            "uplink_unacknowledged": uplink.stats.unacknowledged,
            "cpu_s": round(time.process_time() - cpu0, 2), "wall_s": round(time.perf_counter() - wall0, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 virtual hours, 100 people, 50 devices")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--people", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--interval", type=float, default=300.0, help="seconds between a device's readings")
    parser.add_argument("--step", type=float, default=1.0, help="virtual seconds per pipeline step")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--hq-db", default=None, metavar="URL",
                        help="head office's database, empty (default: a fresh one on the local PostgreSQL, "
                             "else a SQLite file in a temporary directory)")
    parser.add_argument("--hq-consumer", default=None, metavar="URL", help=argparse.SUPPRESS)  # the child's side
    parser.add_argument("--hq-port", type=int, default=0, help=argparse.SUPPRESS)
    a = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: the broker, consumer and database go too
    if a.hq_consumer:
        consume(a.hq_consumer, a.hq_port)
        return
    if a.quick:
        a.hours, a.people, a.devices = 2.0, 100, 50
    print(json.dumps(run(a.hours, a.people, a.devices, a.interval, a.step, a.seed, a.hq_db)))


if __name__ == "__main__":
    main()
