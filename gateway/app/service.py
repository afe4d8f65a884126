"""`gateway service install | uninstall`: the gateway as a hardened systemd service.

``install`` (as root) creates a system user in the ``bluetooth`` group, writes the config (the example with
absolute paths and a generated admin key and token secret, mode 0600, owned by that user), the data
directory and the unit, then enables the unit. An existing config is never overwritten: it is a shop's
own, and its keys are the ones its apps and staff use. ``uninstall`` removes the unit; the config only with
``--purge`` and the data only with ``--purge-data``. The user stays (its id may own files elsewhere).

``--root DIR`` writes every path under DIR (tests, image builders): user and group are created with
``useradd --prefix DIR`` and the unit is enabled with ``systemctl --root=DIR``, so the running system is
never touched. ``--dry-run`` writes and runs nothing: it prints each command and each file (secrets masked).
Commands go through a ``Runner`` that tests replace.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

NAME = "engagement-gateway"
UNIT = f"{NAME}.service"
CONFIG_DIR = f"/etc/{NAME}"
CONFIG = f"{CONFIG_DIR}/gateway.toml"
DATA_DIR = f"/var/lib/{NAME}"
UNIT_PATH = f"/etc/systemd/system/{UNIT}"
BLUETOOTH_GROUP = "bluetooth"
HIDDEN_BY_PROTECT_HOME = ("/home", "/root", "/run/user")
MASK = "<generated at install, shown in the file only>"

Runner = Callable[[Sequence[str]], None]
"""Runs one command (useradd, systemctl...); raises ServiceError when it fails."""


class ServiceError(Exception):
    """Why install or uninstall cannot go on; nothing after it was done."""


def run_command(cmd: Sequence[str]) -> None:
    """The real runner."""
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ServiceError(f"{cmd[0]}: {exc.strerror}") from None
    if done.returncode != 0:
        raise ServiceError(f"`{shlex.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()}")


@dataclass
class Layout:
    """Where everything goes: systemd's absolute paths, under ``root``."""

    root: Path = Path("/")
    user: str = NAME
    prefix: Path = field(default_factory=lambda: Path(sys.prefix))

    def at(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    @property
    def scratch(self) -> bool:
        return self.root.resolve() != Path("/")

    @property
    def gateway(self) -> Path:
        return self.prefix / "bin" / "gateway"


# ---------------------------------------------------------------- what is written


def unit_text(layout: Layout, group: str | None = None) -> str:
    """The unit. Every hardening line keeps BlueZ over D-Bus, the API and MQTT working. ``group``: the user's
    primary group (default: the user's name, as ``useradd --user-group`` makes it)."""
    exec_start = f"{layout.gateway} run --config {CONFIG}".replace("%", "%%")
    return f"""\
# Written by `gateway service install`; rewritten by the next install. Local changes: systemctl edit {NAME}
[Unit]
Description=Proximity and wearable engagement gateway
After=bluetooth.target network-online.target
Wants=bluetooth.target network-online.target

[Service]
# The gateway says READY=1 once its API answers /health/ready, and pings the watchdog only while its event
# loop, its database and its BLE scanner work (docs/service.md): unfed for WatchdogSec, it is restarted.
Type=notify
NotifyAccess=main
WatchdogSec=30
ExecStart={exec_start}
Restart=always
RestartSec=5
# 2: the config is wrong; a restart cannot fix it (`systemctl status` shows the line naming the key).
RestartPreventExitStatus=2
# A second gateway on the same database waits as standby for the store's lease before it says READY=1
# (STATUS= says so): its start has no time limit. 4: it held the lease and lost it; restarted, it waits again.
TimeoutStartSec=infinity
TimeoutStopSec=30
User={layout.user}
Group={group or layout.user}
SupplementaryGroups={BLUETOOTH_GROUP}
StateDirectory={NAME}
StateDirectoryMode=0750
ConfigurationDirectory={NAME}
WorkingDirectory={DATA_DIR}
Environment=PYTHONUNBUFFERED=1
StandardOutput=journal
StandardError=journal
SyslogIdentifier={NAME}
UMask=0077

# No capabilities: bleak scans through BlueZ over D-Bus and needs none. A raw HCI socket (a bumble HCI
# transport, btmgmt) would need CAP_NET_RAW and CAP_NET_ADMIN: add both to CapabilityBoundingSet= and
# AmbientCapabilities= in an override (systemctl edit {NAME}).
CapabilityBoundingSet=
AmbientCapabilities=
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
# AF_UNIX: D-Bus (BlueZ) and the notify socket; AF_INET*: the API, MQTT, PostgreSQL, webhooks, Web Push;
# AF_NETLINK: interface lookups; AF_BLUETOOTH: BlueZ's own sockets.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_BLUETOOTH
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
PrivateMounts=yes
# Not MemoryDenyWriteExecute=yes: libffi closures (ctypes callbacks) need writable code pages.

[Install]
WantedBy=multi-user.target
"""


_KEY_LINE = r'^(\s*{key}\s*=\s*)("(?:[^"\\]|\\.)*"|[^\s#]+)'


def _set(text: str, section: str, key: str, value: str) -> str:
    """``key = value`` in ``[section]`` ("" for the top level), its comment kept; the line must exist."""
    lines = text.splitlines(keepends=True)
    current = ""
    pattern = re.compile(_KEY_LINE.format(key=re.escape(key)))
    for i, line in enumerate(lines):
        header = re.match(r"^\s*\[\[?\s*([^\]]+?)\s*\]", line)
        if header:
            current = header[1]
            continue
        if current == section and (m := pattern.match(line)):
            lines[i] = m[1] + json.dumps(value) + line[m.end():]
            return "".join(lines)
    raise ServiceError(f"the example config has no {section + '.' if section else ''}{key} to set")


def config_text(example: str, admin_key: str, token_secret: str) -> str:
    """The example config with the service's absolute paths and the generated secrets."""
    text = example
    for section, key, value in (
        ("", "data_dir", DATA_DIR),
        ("database", "url", f"sqlite:///{DATA_DIR}/gateway.db"),
        ("api", "admin_key", admin_key),
        ("api", "token_secret", token_secret),
        ("devices", "profiles_dir", f"{CONFIG_DIR}/device-profiles"),
        ("campaigns", "dir", f"{CONFIG_DIR}/campaigns"),
        ("device_rules", "dir", f"{CONFIG_DIR}/device-rules"),
    ):
        text = _set(text, section, key, value)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"# Written by `gateway service install` on {stamp}; never overwritten by a later install.\n"
            f"# The admin key and token secret below were generated for this gateway: keep this file private.\n"
            f"# After editing: systemctl restart {NAME}\n\n{text}")


def _example_dir() -> Path:
    from gateway.app.config import EXAMPLES

    return EXAMPLES


# ---------------------------------------------------------------- the accounts


def _entry(path: Path, name: str) -> list[str] | None:
    """The ``name:...`` line of a passwd or group file, split; None when absent."""
    try:
        for line in path.read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return fields
    except FileNotFoundError:
        return None
    return None


def _account_commands(layout: Layout) -> list[list[str]]:
    where = ["--prefix", str(layout.root)] if layout.scratch else []
    cmds = []
    if _entry(layout.at("/etc/group"), BLUETOOTH_GROUP) is None:  # BlueZ's package creates it; not installed yet
        cmds.append(["groupadd", "--system", *where, BLUETOOTH_GROUP])
    if _entry(layout.at("/etc/passwd"), layout.user) is None:
        cmds.append(["useradd", "--system", *where, "--user-group", "--groups", BLUETOOTH_GROUP,
                     "--home-dir", DATA_DIR, "--no-create-home", "--shell", "/usr/sbin/nologin",
                     "--comment", "engagement gateway", layout.user])
    return cmds


def _ids(layout: Layout) -> tuple[int, int] | None:
    entry = _entry(layout.at("/etc/passwd"), layout.user)
    if entry is None or len(entry) < 4:
        return None
    try:
        return int(entry[2]), int(entry[3])
    except ValueError:
        return None


def _booted(layout: Layout) -> bool:
    """systemd runs this system (sd_booted): then it is told to reload its units."""
    return not layout.scratch and Path("/run/systemd/system").is_dir()


def _primary_group(layout: Layout) -> str | None:
    """The name of the user's primary group, when the user exists (one made before us may have another)."""
    user = _entry(layout.at("/etc/passwd"), layout.user)
    if user is None or len(user) < 4:
        return None
    try:
        for line in layout.at("/etc/group").read_text().splitlines():
            fields = line.split(":")
            if len(fields) > 2 and fields[2] == user[3]:
                return fields[0]
    except FileNotFoundError:
        return None
    return None


def _systemctl(layout: Layout, *args: str) -> list[str]:
    return ["systemctl", f"--root={layout.root}", *args] if layout.scratch else ["systemctl", *args]


# ---------------------------------------------------------------- install, uninstall


@dataclass
class _Plan:
    """What one run does, in order, so --dry-run can say it and a real run do it."""

    out: TextIO
    dry_run: bool
    runner: Runner
    owner: tuple[int, int] | None = None

    def say(self, line: str) -> None:
        print(line, file=self.out)

    def run(self, cmd: Sequence[str]) -> None:
        if self.dry_run:
            self.say(f"would run: {shlex.join(cmd)}")
            return
        self.runner(cmd)
        self.say(f"ran: {shlex.join(cmd)}")

    def write(self, path: Path, shown: str, text: str, mode: int, owned: bool) -> None:
        who = "the service user" if owned else "root"
        if self.dry_run:
            self.say(f"--- would write {shown} (mode {mode:04o}, owner {who})")
            self.say(text.rstrip("\n"))
            self.say("--- end")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        if owned and self.owner is not None:
            os.chown(tmp, *self.owner)
        os.replace(tmp, path)
        self.say(f"wrote {shown} (mode {mode:04o})")

    def mkdir(self, path: Path, shown: str, mode: int, owned: bool) -> None:
        if path.is_dir():
            self.say(f"kept {shown}")
            return
        if self.dry_run:
            self.say(f"would create {shown}/ (mode {mode:04o}, owner {'the service user' if owned else 'root'})")
            return
        path.mkdir(parents=True, mode=mode)
        os.chmod(path, mode)
        if owned and self.owner is not None:
            os.chown(path, *self.owner)
        self.say(f"created {shown}/")


def install(layout: Layout, *, dry_run: bool = False, runner: Runner = run_command,
            out: TextIO = sys.stdout) -> None:
    """Account, config (kept if present), data dir and unit, then enable it. Raises ServiceError first,
    before anything is done, for what would make the service unable to start."""
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", layout.user):
        raise ServiceError(f"--user: not a valid system user name: {layout.user!r}")
    if re.search(r"\s", str(layout.prefix)):
        raise ServiceError(f"--prefix: a path with spaces cannot start the unit: {layout.prefix}")
    if not os.access(layout.gateway, os.X_OK) and not os.access(layout.at(str(layout.gateway)), os.X_OK):
        raise ServiceError(f"no gateway command at {layout.gateway}: give the installation's --prefix "
                           "(its bin/gateway is the unit's ExecStart)")
    hidden = next((h for h in HIDDEN_BY_PROTECT_HOME if layout.prefix.is_relative_to(h)), None)
    if hidden is not None:
        message = (f"--prefix {layout.prefix} is under {hidden}, which ProtectHome=yes hides from the service: "
                   f"install the gateway elsewhere, e.g. python3 -m venv /opt/{NAME}")
        if not dry_run:
            raise ServiceError(message)
        print(f"gateway service install: warning: {message}", file=sys.stderr)
    if not dry_run and os.geteuid() != 0:
        raise ServiceError("must run as root (sudo gateway service install), or try --dry-run")
    example = (_example_dir() / "gateway.toml").read_text()

    plan = _Plan(out, dry_run, runner)
    for cmd in _account_commands(layout):
        plan.run(cmd)
    plan.owner = _ids(layout)
    if not dry_run and plan.owner is None:
        plan.say(f"note: {layout.user} is not in {layout.at('/etc/passwd')}: files stay owned by root")

    config = layout.at(CONFIG)
    plan.mkdir(layout.at(CONFIG_DIR), CONFIG_DIR, 0o755, owned=False)
    if config.exists():
        plan.say(f"kept {CONFIG}: an existing config is never overwritten (its keys are the shop's)")
    else:
        admin_key, token_secret = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        text = config_text(example, admin_key, token_secret)
        body = text.replace(admin_key, MASK).replace(token_secret, MASK) if dry_run else text
        plan.write(config, CONFIG, body, 0o600, owned=True)
    for sub in ("campaigns", "device-rules"):  # empty: the examples would send real offers in a real shop
        plan.mkdir(layout.at(f"{CONFIG_DIR}/{sub}"), f"{CONFIG_DIR}/{sub}", 0o755, owned=False)
    profiles = layout.at(f"{CONFIG_DIR}/device-profiles")
    if profiles.is_dir():
        plan.say(f"kept {CONFIG_DIR}/device-profiles")
    elif dry_run:
        plan.say(f"would copy the example device profiles to {CONFIG_DIR}/device-profiles/")
    else:
        shutil.copytree(_example_dir() / "device-profiles", profiles)
        plan.say(f"copied the example device profiles to {CONFIG_DIR}/device-profiles/")
    plan.mkdir(layout.at(DATA_DIR), DATA_DIR, 0o750, owned=True)
    plan.write(layout.at(UNIT_PATH), UNIT_PATH, unit_text(layout, _primary_group(layout)), 0o644, owned=False)
    if _booted(layout):
        plan.run(_systemctl(layout, "daemon-reload"))
    plan.run(_systemctl(layout, "enable", UNIT))  # works offline too (a chroot, an image)
    if not dry_run:
        plan.say(f"\nnext: edit {CONFIG} (store id, receivers; its admin key is [api] admin_key), then\n"
                 f"  systemctl start {NAME}; journalctl -u {NAME} -f")


def uninstall(layout: Layout, *, purge: bool = False, purge_data: bool = False, dry_run: bool = False,
              runner: Runner = run_command, out: TextIO = sys.stdout) -> None:
    """The unit goes; the config with ``purge``, the data with ``purge_data``; the user stays."""
    if not dry_run and os.geteuid() != 0:
        raise ServiceError("must run as root (sudo gateway service uninstall), or try --dry-run")
    plan = _Plan(out, dry_run, runner)
    unit = layout.at(UNIT_PATH)
    if unit.exists():
        plan.run(_systemctl(layout, "disable", *(["--now"] if _booted(layout) else []), UNIT))

    def remove(path: Path, shown: str) -> None:
        if not path.exists():
            return
        if dry_run:
            plan.say(f"would remove {shown}")
            return
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        plan.say(f"removed {shown}")

    had_unit = unit.exists()
    remove(unit, UNIT_PATH)
    if had_unit and _booted(layout):
        plan.run(_systemctl(layout, "daemon-reload"))
    if purge:
        remove(layout.at(CONFIG_DIR), f"{CONFIG_DIR} (the config, its keys, campaigns and rules)")
    elif layout.at(CONFIG_DIR).exists():
        plan.say(f"kept {CONFIG_DIR} (--purge removes it)")
    if purge_data:
        remove(layout.at(DATA_DIR), f"{DATA_DIR} (the database and everything the gateway kept)")
    elif layout.at(DATA_DIR).exists():
        plan.say(f"kept {DATA_DIR} (--purge-data removes it)")
    if not had_unit and not any(layout.at(p).exists() for p in (CONFIG_DIR, DATA_DIR)):
        plan.say(f"nothing of {NAME} is installed under {layout.root}")
    if _entry(layout.at("/etc/passwd"), layout.user) is not None:
        plan.say(f"the user {layout.user} is kept (files elsewhere may carry its id): userdel {layout.user}")


# ---------------------------------------------------------------- the command


def _layout(args: argparse.Namespace) -> Layout:
    return Layout(root=Path(args.root).absolute(), user=args.user, prefix=Path(args.prefix).absolute())


def cmd_service(args: argparse.Namespace) -> int:
    try:
        if args.service_command == "install":
            install(_layout(args), dry_run=args.dry_run)
        else:
            uninstall(_layout(args), purge=args.purge, purge_data=args.purge_data, dry_run=args.dry_run)
    except (ServiceError, OSError) as exc:
        print(f"gateway service {args.service_command}: {exc}", file=sys.stderr)
        return 2
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`service install | uninstall` on the `gateway` command."""
    p = sub.add_parser("service", help="install or remove the gateway as a systemd service (docs/service.md)")
    ps = p.add_subparsers(dest="service_command", required=True)
    i = ps.add_parser("install", help=f"user, config ({CONFIG}, kept if present), data ({DATA_DIR}) and "
                                      "a hardened unit, enabled (as root)")
    u = ps.add_parser("uninstall", help="remove the unit; the config only with --purge, the data only with "
                                        "--purge-data")
    u.add_argument("--purge", action="store_true", help=f"also remove {CONFIG_DIR} (config, keys, campaigns)")
    u.add_argument("--purge-data", action="store_true", help=f"also remove {DATA_DIR} (the database)")
    for q in (i, u):
        q.add_argument("--user", default=NAME, help=f"the system user it runs as (default {NAME})")
        q.add_argument("--prefix", default=sys.prefix,
                       help="the installation whose bin/gateway the unit runs (default: this one, %(default)s)")
        q.add_argument("--root", default="/", help="write every path under this directory (image builders, tests)")
        q.add_argument("--dry-run", action="store_true", help="write and run nothing: print every command and file")
        q.set_defaults(func=cmd_service)
