"""The `gateway` command: demo, run, replay, simulate, decode, db upgrade / backup / restore."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.app.config import example

if TYPE_CHECKING:
    from gateway.app.config import Settings


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("amqtt", "transitions", "uvicorn.error", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_schemas(args: argparse.Namespace) -> int:
    from gateway.app import schemas

    return schemas.run(args.out, args.check)


def cmd_decode(args: argparse.Namespace) -> int:
    from beacons.decode import DecodeError, decode_hex

    try:
        frames = decode_hex(args.hex)
    except DecodeError as exc:
        print(f"gateway decode: {exc}", file=sys.stderr)
        return 2
    for f in frames:
        print(json.dumps(f))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from gateway.app.simulate import parse_duration, progress_bar, simulate
    from gateway.campaigns.model import CampaignError
    from simulators.scenario import ScenarioError, load_scenario

    try:
        duration = parse_duration(args.duration)
        scenario = load_scenario(args.scenario)
        summary = simulate(scenario, duration, campaigns_dir=args.campaigns, seed=args.seed,
                           progress=None if args.quiet else progress_bar())
    except (ValueError, ScenarioError, CampaignError, OSError) as exc:
        print(f"gateway simulate: {exc}", file=sys.stderr)
        return 2
    print(f"\n{scenario.store.name}: {duration / 3600:g} h simulated in {summary.wall_s:.1f} s\n")
    print(summary.table())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    from gateway.app.demo import run_demo

    try:
        asyncio.run(run_demo(port=args.port, scenario_path=args.scenario, campaigns_dir=args.campaigns,
                             data_dir=args.data_dir, mqtt_port=args.mqtt_port, radio=args.radio))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"gateway demo: {exc}", file=sys.stderr)
        return 1
    return 0


def ble_scanner(settings: Any, source: Any) -> Any:
    """The adapter's scanner with its receiver id ([ble] receiver, default the adapter name); warns on a mismatch."""
    if not settings.ble.enabled:
        return None
    from beacons.scanner import receiver_check
    from gateway.app.ble import ble_retry

    receiver = settings.ble.receiver or settings.ble.adapter
    warning = receiver_check(receiver, [r.id for r in settings.receivers])
    if warning:
        print(f"gateway run: warning: {warning}", file=sys.stderr)
    return source(settings.ble.adapter, settings.ble.scanning_mode, receiver=receiver,
                  stale_after_s=settings.ble.stale_after_s, retry=ble_retry())


def with_ble_flags(settings: Settings, adapter: str | None, no_ble: bool) -> Settings:
    """The settings with `run`'s --adapter and --no-ble over the file's [ble] (a copy: the loaded one stays)."""
    if not adapter and not no_ble:
        return settings
    ble = dataclasses.replace(settings.ble, adapter=adapter or settings.ble.adapter,
                              enabled=settings.ble.enabled and not no_ble)
    return settings.model_copy(update={"ble": ble})


def with_presence_flags(settings: Settings, record: str | None, calibration: str | None) -> Settings:
    """The settings with `run`'s --record and --calibration over the file's [presence] (a copy)."""
    if not record and not calibration:
        return settings
    presence = dataclasses.replace(settings.presence, record_dir=record or settings.presence.record_dir,
                                   calibration=calibration or settings.presence.calibration)
    return settings.model_copy(update={"presence": presence})


async def _run(args: argparse.Namespace) -> int:
    from beacons.scanner import BleakSource, ScannerUnavailable
    from devices.mqtt import MqttIntake, settings_from_config
    from gateway.app.config import load_settings
    from gateway.app.runtime import Runtime

    settings = load_settings(args.config)
    from gateway.app.logs import secrets_of, setup_logging

    setup_logging(settings.logging, secrets_of(settings), verbose=args.verbose)  # [logging]: text or JSON lines
    settings = with_ble_flags(settings, args.adapter, args.no_ble)
    settings = with_presence_flags(settings, args.record, args.calibration)
    scanner = ble_scanner(settings, BleakSource)
    mqtt = None
    if settings.mqtt.enabled:
        mqtt = MqttIntake(settings_from_config(settings.mqtt, settings.store.id))
    from gateway.app.watchdog import Watchdog
    from gateway.storage.lease import Lease

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # One active gateway per store: a second one on the same database waits here as standby.
    lease = Lease(settings.database.url, settings.store.id)
    watchdog = Watchdog.from_environ()  # systemd's, if any

    def standby() -> None:
        said = f"another gateway holds store {settings.store.id}'s lease; waiting"
        print(f"gateway standby: {said}", flush=True)
        if watchdog is not None:  # `systemctl status` shows it while the unit is still starting
            watchdog.notifier.send(f"STATUS=standby: {said}")

    if not await lease.acquire(stop, standby):
        return 0
    runtime = Runtime(settings, scanner=scanner, mqtt=mqtt, watchdog=watchdog)
    try:
        await runtime.start()
    except ScannerUnavailable as exc:
        await runtime.stop()
        print(f"gateway run: {exc}", file=sys.stderr)
        return 3
    print(f"gateway running: API on http://{settings.api.host}:{settings.api.port} (docs at /docs)")
    if not settings.api.admin_key:
        print(f"admin key (generated, set [api] admin_key to keep one): {runtime.admin_key}")
    if runtime.dashboard is not None:  # the host a browser can reach: loopback when bound to every address
        host = "127.0.0.1" if settings.api.host in ("0.0.0.0", "::", "") else settings.api.host
        base = f"http://{host}:{settings.api.port}"
        if os.environ.get("JOURNAL_STREAM"):  # stdout is systemd's journal: a sign-in link would be kept there
            print(f"dashboard: {base}/dashboard (sign in with an admin API key)", flush=True)
        else:
            print(f"dashboard (a one-time sign-in link): {runtime.dashboard.login_link(base)}", flush=True)
    lost = asyncio.create_task(lease.watch())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait((lost, stopping), return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    await runtime.stop()
    lease.release()
    if lost.done():  # another gateway may hold the lease now: stop deciding, let the service manager restart us
        print("gateway run: lost the store's lease (database connection); stopped", file=sys.stderr)
        return 4
    lost.cancel()
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from gateway.app.replay import main as replay_main

    return replay_main(args.trace, args.config, args.labels, calibration=args.calibration)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from gateway.app.calibrate import main as calibrate_main

    return calibrate_main(args.trace, labels=args.labels, config=args.config, out=args.out)


def cmd_run(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    from gateway.app.config import ConfigError
    from gateway.campaigns.model import CampaignError

    try:
        return asyncio.run(_run(args))
    except (ConfigError, CampaignError) as exc:
        print(f"gateway run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def _database(args: argparse.Namespace, command: str) -> tuple[Any, Any] | None:
    """(settings, the database at the latest schema) for a maintenance command; None (said on stderr) when
    the config cannot be used."""
    from gateway.app.config import ConfigError, load_settings
    from gateway.storage.db import Database

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"gateway {command}: {exc}", file=sys.stderr)
        return None
    db = Database(args.url or settings.database.url)
    db.upgrade(settings.store.id)
    return settings, db


def cmd_catalogue_import(args: argparse.Namespace) -> int:
    from gateway.app.config import ConfigError, load_settings
    from gateway.app.runtime import token_secret
    from gateway.clock import SystemClock
    from gateway.profiles.identity import IdentityIndex
    from gateway.profiles.service import GatewayService, Invalid
    from gateway.security.tokens import TokenSigner
    from gateway.storage.db import Database

    try:
        settings = load_settings(args.config)
        text = open(args.file, encoding="utf-8-sig").read()  # noqa: SIM115  (Excel writes a BOM)
    except (ConfigError, OSError) as exc:
        print(f"gateway catalogue import: {exc}", file=sys.stderr)
        return 2
    db = Database(args.url or settings.database.url)
    try:
        db.upgrade(settings.store.id)
        service = GatewayService(db, IdentityIndex(), SystemClock(), TokenSigner(token_secret(settings)))
        n = service.import_catalogue_csv(text)
    except Invalid as exc:
        print(f"gateway catalogue import: {args.file}: {exc}; nothing was imported", file=sys.stderr)
        return 2
    finally:
        db.dispose()
    print(f"imported {n} product(s)")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    opened = _database(args, "db upgrade")
    if opened is None:
        return 2
    _, db = opened
    db.dispose()
    print(f"database at {db.url.split('@')[-1]} is at the latest schema")
    return 0


def cmd_db_backup(args: argparse.Namespace) -> int:
    """A consistent copy of the database while the gateway may run (docs: README, "Upgrading")."""
    return _backup_or_restore(args, "db backup")


def cmd_db_restore(args: argparse.Namespace) -> int:
    """The database replaced by a backup (the gateway stopped); an older schema is upgraded."""
    return _backup_or_restore(args, "db restore")


def _backup_or_restore(args: argparse.Namespace, command: str) -> int:
    from gateway.app.config import ConfigError, load_settings
    from gateway.storage.backup import BackupError, backup, restore

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"gateway {command}: {exc}", file=sys.stderr)
        return 2
    url = args.url or settings.database.url
    try:
        if command == "db backup":
            summary = backup(url, args.file)
            print(f"backup written to {summary.path} ({summary.size_bytes / 1e6:.1f} MB, schema {summary.revision}):")
        else:
            summary = restore(url, args.file, store_id=settings.store.id)
            upgraded = f", upgraded from {summary.upgraded_from}" if summary.upgraded_from else ""
            print(f"restored {args.file} into {summary.path} (schema {summary.revision}{upgraded}):")
    except (BackupError, OSError) as exc:
        print(f"gateway {command}: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    import time

    import gateway.security.auth as auth

    opened = _database(args, "keys")
    if opened is None:
        return 2
    _, db = opened
    try:
        with db.session() as s:
            now = time.time()
            if args.keys_command == "create":
                try:
                    expires = None if args.expires_in is None else now + args.expires_in
                    raw, view = auth.create_key(s, args.name, args.scopes, now, expires)
                except ValueError as exc:
                    print(f"gateway keys create: {exc}", file=sys.stderr)
                    return 2
                print(f"key {view['id']} ({','.join(view['scopes'])}); shown once, send it as X-API-Key:\n{raw}")
            elif args.keys_command == "list":
                for k in auth.list_keys(s):
                    state = "revoked" if k["revoked_at"] else "active"
                    print(f"{k['id']}  {k['prefix']}...  {','.join(k['scopes']):<28} {state:<8} {k['name']}")
            elif auth.revoke_key(s, args.key_id, now) is None:
                print(f"gateway keys revoke: no key {args.key_id}", file=sys.stderr)
                return 2
            else:
                print(f"key {args.key_id} revoked")
    finally:
        db.dispose()
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from gateway.app.doctor import main as doctor_main

    return doctor_main(args.config, as_json=args.json, mosquitto_conf=args.mosquitto_conf)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="Proximity and wearable engagement gateway")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="a simulated store on real parts, with the API on --port")
    d.add_argument("--port", type=int, default=8000)
    d.add_argument("--mqtt-port", type=int, default=1883)
    d.add_argument("--scenario", default=example("examples/store.yaml"))
    d.add_argument("--campaigns", default=example("examples/campaigns"))
    d.add_argument("--data-dir", default="data/demo")
    d.add_argument("--radio", choices=("inject", "virtual"), default="inject",
                   help="inject: adverts enter at the scanner boundary; virtual: bumble beacons heard "
                        "through the gateway's bleak scanner (one virtual adapter per receiver)")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("run", help="the production gateway: BLE scanner, MQTT, API, storage")
    r.add_argument("--config", default=None, help="gateway.toml (see examples/gateway.toml)")
    r.add_argument("--adapter", default=None, help="Bluetooth adapter, e.g. hci0")
    r.add_argument("--no-ble", action="store_true", help="run without a Bluetooth adapter")
    r.add_argument("--record", default=None, metavar="DIR",
                   help="write every sighting to hourly trace files in DIR (over [presence] record_dir)")
    r.add_argument("--calibration", default=None, metavar="FILE",
                   help="a file from `gateway calibrate` (over [presence] calibration)")
    r.set_defaults(func=cmd_run)

    rp = sub.add_parser("replay", help="a trace CSV through the presence tracker in virtual time: one JSON "
                                       "event per line; with --labels, scores against them last")
    rp.add_argument("trace", help="time,receiver,beacon,rssi[,tx_power] (docs/presence.md)")
    rp.add_argument("--config", required=True, help="gateway.toml with the trace's [[receivers]]")
    rp.add_argument("--labels", default=None, help="beacon,start,end,zone: where each beacon really was")
    rp.add_argument("--calibration", default=None, metavar="FILE",
                    help="a file from `gateway calibrate` (over the config's [presence] calibration)")
    rp.set_defaults(func=cmd_replay)

    ca = sub.add_parser("calibrate", help="learn receivers and zone signatures from a labelled walk: a TOML file "
                                          "for --calibration, and a report of how well each zone stands apart")
    ca.add_argument("trace", nargs="+", help="the walks' trace CSVs (time,receiver,beacon,rssi[,tx_power]); "
                                             "several are joined one after the other, each walk its own identity")
    ca.add_argument("--labels", required=True, action="append",
                    help="beacon,start,end,zone: where the walker was; once per trace, in the traces' order")
    ca.add_argument("--config", required=True, help="gateway.toml with the [[receivers]] (and [[zones]])")
    ca.add_argument("--out", required=True, help="the calibration TOML to write")
    ca.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("simulate", help="a store day in virtual time, then a summary")
    s.add_argument("--scenario", default=example("examples/store.yaml"))
    s.add_argument("--campaigns", default=example("examples/campaigns"))
    s.add_argument("--duration", default="8h")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_simulate)

    c = sub.add_parser("decode", help="decode one raw advertising payload (AD structures as hex)")
    c.add_argument("hex")
    c.set_defaults(func=cmd_decode)

    sc = sub.add_parser("schemas", help="write the file formats' JSON Schemas (campaign, segments, device-rule, "
                                        "scenario) for editors")
    sc.add_argument("--out", type=Path, default=Path("docs/schemas"), help="directory (default: docs/schemas)")
    sc.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs")
    sc.set_defaults(func=cmd_schemas)

    dr = sub.add_parser("doctor", help="check this machine for the gateway: one line per check, OK, WARN or FAIL "
                                       "with the fix; exit 1 on any FAIL (docs/raspberry-pi.md)")
    dr.add_argument("--config", default=None, help="gateway.toml (default: built-in settings)")
    dr.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    dr.add_argument("--mosquitto-conf", default=None, metavar="FILE",
                    help="the local broker's config (default /etc/mosquitto/mosquitto.conf and its include_dir)")
    dr.set_defaults(func=cmd_doctor)

    db = sub.add_parser("db", help="database maintenance")
    dbs = db.add_subparsers(dest="db_command", required=True)
    up = dbs.add_parser("upgrade", help="apply schema migrations")
    up.add_argument("--config", default=None)
    up.add_argument("--url", default=None)
    up.set_defaults(func=cmd_db_upgrade)
    bk = dbs.add_parser("backup", help="a consistent copy while the gateway runs (SQLite online backup, pg_dump)")
    bk.add_argument("file", help="the backup file to write (replaced only once the new one checks out)")
    rs = dbs.add_parser("restore", help="replace the database with a backup (stop the gateway first)")
    rs.add_argument("file", help="a file from `gateway db backup`")
    for b in (bk, rs):
        b.add_argument("--config", default=None)
        b.add_argument("--url", default=None, help="database URL (default: from the config)")
    bk.set_defaults(func=cmd_db_backup)
    rs.set_defaults(func=cmd_db_restore)
    cat = sub.add_parser("catalogue", help="the product catalogue (where each item is in the shop)")
    cats = cat.add_subparsers(dest="catalogue_command", required=True)
    imp = cats.add_parser("import", help="import a CSV: sku,name[,price,zone,aisle] with a header row")
    imp.add_argument("file")
    imp.add_argument("--config", default=None)
    imp.add_argument("--url", default=None, help="database URL (default: from the config)")
    imp.set_defaults(func=cmd_catalogue_import)
    keys = sub.add_parser("keys", help="admin API keys with scopes (docs/api-auth.md)")
    ks = keys.add_subparsers(dest="keys_command", required=True)
    kc = ks.add_parser("create", help="create a key and print it once")
    kc.add_argument("--scopes", required=True, help="comma-separated: read,write,campaigns,privacy,admin")
    kc.add_argument("--name", default="cli")
    kc.add_argument("--expires-in", type=float, default=None, metavar="SECONDS")
    kl = ks.add_parser("list", help="every key (never the key itself)")
    kr = ks.add_parser("revoke", help="revoke a key by its id")
    kr.add_argument("key_id")
    for k in (kc, kl, kr):
        k.add_argument("--config", default=None)
        k.add_argument("--url", default=None, help="database URL (default: from the config)")
        k.set_defaults(func=cmd_keys)
    from gateway.app.service import add_parser as add_service

    add_service(sub)  # service install | uninstall
    from gateway.app.hq import add_parser as add_hq

    add_hq(sub)  # hq: head office's consumer and API
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False) is None:
        args.verbose = False
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:  # Ctrl-C before the command's own handler is in place (imports, startup)
        print(f"gateway {args.command}: interrupted", file=sys.stderr)
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
