"""``gateway doctor``: is this machine ready to run the gateway? One line per check, with the fix.

Facts are gathered first (by a :class:`SystemProbe` for what the operating system knows, and by
connecting to the configured broker and database), then each ``check_*`` function turns them into
one :class:`Check`. The checks are pure, so tests can feed them facts of a machine that has a
Bluetooth adapter while this one has none; the probe reads files under a root directory, so tests
can also point it at a fake ``/sys`` tree and exercise the real parsing.

Nothing here changes the machine: no database file, table or token secret is created, and the
broker sees a clean session under a client id of its own (never the gateway's, whose session holds
the telemetry queued for it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import grp
import json
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from gateway.app.config import Settings

Status = Literal["OK", "WARN", "FAIL", "SKIP"]

MIN_PYTHON = (3, 11)
PASSIVE_BLUEZ = (5, 56)  # AdvertisementMonitor (bleak's passive scan with or_patterns), with --experimental
DEFAULT_MOSQUITTO_CONF = "/etc/mosquitto/mosquitto.conf"
MOSQUITTO_DEFAULT_QUEUE = 1000  # Mosquitto 2's max_queued_messages: past it, QoS 1 messages are dropped
ADVISED_QUEUE = 100_000  # fewer than this queued messages is a few minutes of a busy shop's telemetry
WARN_FREE_BYTES = 1 << 30
FAIL_FREE_BYTES = 100 << 20
BROKER_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 5.0
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "")
DROP_IN = "/etc/systemd/system/bluetooth.service.d/experimental.conf"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def line(self) -> str:
        """``OK    python       3.11.2``; ``FAIL  adapter      hci0 not found -> plug in ...``."""
        text = f"{self.status:<5} {self.name:<12} {self.detail}"
        return f"{text} -> {self.fix}" if self.fix else text


# ---------------------------------------------------------------- what the operating system knows


@dataclass(frozen=True)
class Rfkill:
    soft: bool
    hard: bool


class SystemProbe(Protocol):
    """What the checks need to know of the machine; :class:`LinuxProbe` reads it, tests give their own."""

    def python_version(self) -> tuple[int, int, int]: ...
    def bluez_version(self) -> str | None: ...
    def bluetoothd_argv(self) -> list[str] | None: ...
    def bluetooth_exec_start(self) -> list[str] | None: ...
    def bluez_main_conf(self) -> str | None: ...
    def adapters(self) -> list[str]: ...
    def rfkill(self, adapter: str) -> Rfkill | None: ...
    def adapter_powered(self, adapter: str) -> tuple[bool | None, str]: ...
    def user(self) -> tuple[int, str, set[str]]: ...
    def clock_synchronised(self) -> bool | None: ...
    def disk_usage(self, path: Path) -> tuple[int, int]: ...


def _run(argv: Sequence[str]) -> tuple[int, str]:
    """A command's exit code and output (stdout, else stderr); 127 when it is not installed."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except FileNotFoundError:
        return 127, f"{argv[0]} not found"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 126, str(exc)
    return done.returncode, (done.stdout.strip() or done.stderr.strip())


class LinuxProbe:
    """The real machine, read under ``root`` (``/``; a temporary tree in tests) and through a few commands."""

    UNIT_DIRS = ("etc/systemd/system", "run/systemd/system", "lib/systemd/system", "usr/lib/systemd/system")

    def __init__(self, root: Path | str = "/") -> None:
        self.root = Path(root)

    def _path(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def _read(self, path: str) -> str | None:
        try:
            return self._path(path).read_text(errors="replace")
        except OSError:
            return None

    def python_version(self) -> tuple[int, int, int]:
        return sys.version_info[0], sys.version_info[1], sys.version_info[2]

    def bluez_version(self) -> str | None:
        """``5.66`` from ``bluetoothd --version`` (outside PATH on Debian), else ``bluetoothctl --version``."""
        candidates = [str(self._path(p)) for p in ("usr/libexec/bluetooth/bluetoothd", "usr/lib/bluetooth/bluetoothd")]
        for argv in ([c, "--version"] for c in [*candidates, "bluetoothd", "bluetoothctl"]):
            rc, out = _run(argv)
            found = re.search(r"\b(\d+\.\d+)\b", out) if rc == 0 else None
            if found:
                return found[1]
        return None

    def bluetoothd_argv(self) -> list[str] | None:
        """The running bluetoothd's command line (from /proc/*/cmdline), or None when it is not running."""
        try:
            entries = list(self._path("proc").iterdir())
        except OSError:
            return None
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                argv = [a for a in (entry / "cmdline").read_bytes().decode(errors="replace").split("\0") if a]
            except OSError:
                continue
            if argv and Path(argv[0]).name == "bluetoothd":
                return argv
        return None

    def bluetooth_exec_start(self) -> list[str] | None:
        """bluetooth.service's effective ExecStart: the unit file's, then its drop-ins' in name order (an empty
        ``ExecStart=`` resets it, as systemd does)."""
        unit: Path | None = None
        for d in self.UNIT_DIRS:
            if self._path(f"{d}/bluetooth.service").is_file():
                unit = self._path(f"{d}/bluetooth.service")
                break
        if unit is None:
            return None
        files = [unit]
        drop_ins: dict[str, Path] = {}
        for d in reversed(self.UNIT_DIRS):  # /etc overrides /lib for a drop-in of the same name
            folder = self._path(f"{d}/bluetooth.service.d")
            if folder.is_dir():
                drop_ins.update({p.name: p for p in folder.glob("*.conf")})
        files += [drop_ins[name] for name in sorted(drop_ins)]
        exec_start: list[str] | None = None
        for f in files:
            for line in f.read_text(errors="replace").splitlines():
                key, sep, value = line.strip().partition("=")
                if sep and key.strip() == "ExecStart":
                    exec_start = value.split() or None
        return exec_start

    def bluez_main_conf(self) -> str | None:
        return self._read("/etc/bluetooth/main.conf")

    def adapters(self) -> list[str]:
        try:
            names = [p.name for p in self._path("sys/class/bluetooth").iterdir()]
        except OSError:
            return []
        return sorted(n for n in names if re.fullmatch(r"hci\d+", n))

    def rfkill(self, adapter: str) -> Rfkill | None:
        try:
            switches = list(self._path("sys/class/rfkill").iterdir())
        except OSError:
            return None
        for switch in switches:
            name, kind = self._read(f"sys/class/rfkill/{switch.name}/name"), self._read(
                f"sys/class/rfkill/{switch.name}/type")
            if (name or "").strip() == adapter and (kind or "").strip() == "bluetooth":
                soft = (self._read(f"sys/class/rfkill/{switch.name}/soft") or "0").strip() == "1"
                hard = (self._read(f"sys/class/rfkill/{switch.name}/hard") or "0").strip() == "1"
                return Rfkill(soft=soft, hard=hard)
        return None

    def adapter_powered(self, adapter: str) -> tuple[bool | None, str]:
        """BlueZ's ``Adapter1.Powered`` over the system bus (also a test of our permission to use BlueZ):
        (True/False, "") or (None, why it could not be read)."""
        rc, out = _run(["busctl", "get-property", "org.bluez", f"/org/bluez/{adapter}", "org.bluez.Adapter1",
                        "Powered"])
        if rc == 0 and out.split()[-1:] in (["true"], ["false"]):
            return out.split()[-1] == "true", ""
        return None, out.splitlines()[-1] if out else f"busctl exited with {rc}"

    def user(self) -> tuple[int, str, set[str]]:
        uid = os.geteuid()
        names = set()
        for gid in {os.getegid(), *os.getgroups()}:
            try:
                names.add(grp.getgrgid(gid).gr_name)
            except KeyError:
                continue
        try:
            import pwd

            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return uid, name, names

    def clock_synchronised(self) -> bool | None:
        """systemd's NTPSynchronized, else timesyncd's flag file, else the kernel's (adjtimex: TIME_ERROR
        means unsynchronised); None when nothing can tell."""
        rc, out = _run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"])
        if rc == 0 and out in ("yes", "no"):
            return out == "yes"
        if self._path("run/systemd/timesync/synchronized").exists():
            return True
        return _adjtimex_synchronised()

    def disk_usage(self, path: Path) -> tuple[int, int]:
        usage = shutil.disk_usage(path)
        return usage.free, usage.total


def _adjtimex_synchronised() -> bool | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        timex = ctypes.create_string_buffer(512)  # struct timex, zeroed: modes 0 only reads the state
        state = int(libc.adjtimex(timex))
    except (OSError, AttributeError):
        return None
    return None if state < 0 else state != 5  # TIME_ERROR: the kernel's clock is not disciplined by NTP


# ---------------------------------------------------------------- the broker, its config, the database


@dataclass(frozen=True)
class BrokerFacts:
    host: str
    port: int
    reachable: bool
    error: str = ""


def broker_facts(m: Any, timeout_s: float = BROKER_TIMEOUT_S) -> BrokerFacts:
    """Connect to [mqtt]'s broker as the gateway would (protocol, credentials, TLS) and wait for the CONNACK."""
    import paho.mqtt.client as mqtt

    from devices.mqtt import secure_client, settings_from_config

    version = mqtt.MQTTv5 if str(m.protocol) == "5" else mqtt.MQTTv311
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"gateway-doctor-{secrets.token_hex(4)}", protocol=version)
    client.connect_timeout = timeout_s
    answered = threading.Event()
    result: dict[str, str] = {}

    def on_connect(c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if rc.is_failure:
            result["error"] = f"the broker refused the connection: {rc}"
        answered.set()

    client.on_connect = on_connect
    try:
        # Credentials and TLS as the intake sets them; a missing CA or key file is an OSError here: said
        # like any other way of not connecting.
        secure_client(client, settings_from_config(m, "doctor"))
        client.connect(m.host, int(m.port), keepalive=10)
    except (OSError, ValueError) as exc:
        return BrokerFacts(m.host, int(m.port), False, f"{type(exc).__name__}: {exc}")
    client.loop_start()
    try:
        if not answered.wait(timeout_s):
            return BrokerFacts(m.host, int(m.port), False, f"no CONNACK within {timeout_s:g} s")
    finally:
        client.disconnect()
        client.loop_stop()
    error = result.get("error", "")
    return BrokerFacts(m.host, int(m.port), not error, error)


@dataclass(frozen=True)
class MosquittoConf:
    """The settings of a Mosquitto config that the no-loss guarantee depends on, each with where it was set."""

    path: str
    found: bool
    settings: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (value, "file:line")
    error: str = ""


GUARANTEE_KEYS = ("persistence", "max_queued_messages", "persistent_client_expiration")


def read_mosquitto_conf(path: str | Path) -> MosquittoConf:
    """A mosquitto.conf and the files of its ``include_dir`` lines (in name order, at that point, as Mosquitto
    reads them); a later line overrides an earlier one."""
    path = Path(path)
    if not path.is_file():
        return MosquittoConf(str(path), False)
    found: dict[str, tuple[str, str]] = {}

    def read(file: Path, depth: int) -> None:
        for n, raw in enumerate(file.read_text(errors="replace").splitlines(), 1):
            words = raw.split("#", 1)[0].split()
            if len(words) < 2:
                continue
            key, value = words[0], " ".join(words[1:])
            if key == "include_dir" and depth < 4:
                folder = Path(value)
                if folder.is_dir():
                    for inc in sorted(folder.glob("*.conf")):
                        read(inc, depth + 1)
            elif key in GUARANTEE_KEYS:
                found[key] = (value, f"{file}:{n}")

    try:
        read(path, 0)
    except OSError as exc:
        return MosquittoConf(str(path), True, found, str(exc))
    return MosquittoConf(str(path), True, found)


@dataclass(frozen=True)
class DatabaseFacts:
    url: str  # masked
    state: Literal["current", "behind", "empty", "ahead", "missing", "down"]
    applied: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    behind: int = 0
    error: str = ""


def database_facts(url: str) -> DatabaseFacts:
    """Connect and read the applied migrations against those this version ships. A SQLite file that does not
    exist is not created (connecting would)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from gateway.app.config import masked_url
    from gateway.storage.db import MIGRATIONS, PG_CONNECT_TIMEOUT_S, describe

    shown = masked_url(url)
    try:
        parsed = make_url(url)
    except Exception as exc:
        return DatabaseFacts(shown, "down", error=str(exc))
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            return DatabaseFacts(shown, "down", error="an in-memory SQLite database keeps nothing")
        if not Path(parsed.database).is_file():
            return DatabaseFacts(shown, "missing", error=f"no database file at {parsed.database}")
        connect_args: dict[str, Any] = {}
    else:
        connect_args = {"connect_timeout": PG_CONNECT_TIMEOUT_S} if parsed.get_backend_name() == "postgresql" else {}
    engine = create_engine(url, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            applied = tuple(sorted(MigrationContext.configure(conn).get_current_heads()))
    except Exception as exc:
        return DatabaseFacts(shown, "down", error=describe(exc))
    finally:
        engine.dispose()
    script = ScriptDirectory(str(MIGRATIONS))
    heads = tuple(sorted(script.get_heads()))
    if not applied:
        return DatabaseFacts(shown, "empty", applied, heads)
    known = {r.revision for r in script.walk_revisions()}
    if not set(applied) <= known:
        return DatabaseFacts(shown, "ahead", applied, heads)
    if applied == heads:
        return DatabaseFacts(shown, "current", applied, heads)
    behind = len(list(script.iterate_revisions(heads, applied)))
    return DatabaseFacts(shown, "behind", applied, heads, behind)


# ---------------------------------------------------------------- the facts, and the checks over them


@dataclass
class Facts:
    python: tuple[int, int, int]
    config: str | None = None  # the file given, if any
    config_error: str = ""
    settings: Settings | None = None
    ble_enabled: bool = True
    adapter: str = "hci0"
    scanning_mode: str = "passive"
    bluez_version: str | None = None
    bluetoothd_argv: list[str] | None = None
    exec_start: list[str] | None = None
    main_conf: str | None = None
    adapters: list[str] = field(default_factory=list)
    rfkill: Rfkill | None = None
    powered: bool | None = None
    powered_error: str = ""
    uid: int = 0
    user: str = "root"
    groups: set[str] = field(default_factory=set)
    clock_synchronised: bool | None = None
    broker: BrokerFacts | None = None
    mosquitto: MosquittoConf | None = None
    database: DatabaseFacts | None = None
    data_dir: str = "data"
    disk_free: int | None = None
    disk_total: int | None = None
    disk_error: str = ""
    warn_free_bytes: int = WARN_FREE_BYTES
    fail_free_bytes: int = FAIL_FREE_BYTES
    token_secret_configured: bool = False
    token_secret_mode: int | None = None  # None: no file yet
    config_mode: int | None = None
    config_has_secrets: bool = False


def _version(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(p) for p in text.split("."))
    except ValueError:
        return None


def check_python(f: Facts) -> Check:
    shown = ".".join(map(str, f.python))
    if f.python[:2] < MIN_PYTHON:
        return Check("python", "FAIL", f"{shown} (the gateway needs >= 3.11)",
                     "use Raspberry Pi OS Bookworm (Python 3.11) or a newer Python in the venv")
    return Check("python", "OK", shown)


def check_config(f: Facts) -> Check:
    where = f.config or "built-in defaults"
    if f.config_error:
        return Check("config", "FAIL", f.config_error, "fix the line named and run `gateway doctor` again")
    if f.config_has_secrets and f.config_mode is not None and f.config_mode & 0o077:
        return Check("config", "WARN", f"{where} holds secrets and has mode {f.config_mode:04o}",
                     f"chmod 600 {f.config}")
    return Check("config", "OK", f"{f.config} is valid" if f.config else "built-in defaults (no --config given)")


def _experimental(f: Facts) -> tuple[bool, str]:
    """Whether bluetoothd runs (or would start) with experimental interfaces, and what says so."""
    def flagged(argv: list[str] | None) -> bool:
        return any(a == "--experimental" or (re.fullmatch(r"-[A-Za-z]+", a) is not None and "E" in a)
                   for a in argv or [])

    if f.bluetoothd_argv is not None:
        if flagged(f.bluetoothd_argv):
            return True, "bluetoothd runs with --experimental"
    elif flagged(f.exec_start):
        return True, "bluetooth.service starts bluetoothd with --experimental"
    for line in (f.main_conf or "").splitlines():
        key, sep, value = line.split("#", 1)[0].partition("=")
        if sep and key.strip() == "Experimental" and value.strip().lower() == "true":
            return True, "/etc/bluetooth/main.conf sets Experimental = true"
    return False, ""


def check_bluez(f: Facts) -> Check:
    if not f.ble_enabled:
        return _ble_skipped("bluez")
    if f.bluez_version is None:
        return Check("bluez", "FAIL", "BlueZ not found (no bluetoothd or bluetoothctl)", "sudo apt install bluez")
    if f.bluetoothd_argv is None:
        return Check("bluez", "FAIL", f"BlueZ {f.bluez_version} installed, bluetoothd not running",
                     "sudo systemctl enable --now bluetooth")
    return Check("bluez", "OK", f"BlueZ {f.bluez_version}, bluetoothd running")


def check_passive(f: Facts) -> Check:
    if not f.ble_enabled:
        return _ble_skipped("passive")
    if f.scanning_mode != "passive":
        return Check("passive", "OK", "[ble] scanning_mode = active: passive scanning not needed")
    version = _version(f.bluez_version)
    if version is None:
        return Check("passive", "WARN", "cannot tell without BlueZ: the gateway will scan actively",
                     "sudo apt install bluez")
    if version < PASSIVE_BLUEZ:
        return Check("passive", "WARN", f"BlueZ {f.bluez_version} is older than 5.56: the gateway will scan "
                     "actively (scan requests to every tag, no filtering in the kernel)",
                     "upgrade to Raspberry Pi OS Bookworm (BlueZ 5.66), or set [ble] scanning_mode = \"active\"")
    on, why = _experimental(f)
    if not on:
        return Check("passive", "WARN", f"BlueZ {f.bluez_version} without --experimental: the gateway will scan "
                     "actively", f"add ExecStart with -E in {DROP_IN} (docs/raspberry-pi.md), or set "
                     "Experimental = true in /etc/bluetooth/main.conf; then sudo systemctl restart bluetooth")
    return Check("passive", "OK", f"BlueZ {f.bluez_version}; {why}")


def check_adapter(f: Facts) -> Check:
    if not f.ble_enabled:
        return _ble_skipped("adapter")
    if f.adapter in f.adapters:
        return Check("adapter", "OK", f"{f.adapter} present")
    others = f"; found {', '.join(f.adapters)}" if f.adapters else ""
    fix = "plug in a USB adapter or set [ble] adapter" if not f.adapters else \
        f"set [ble] adapter to one of {', '.join(f.adapters)} (or `gateway run --adapter {f.adapters[0]}`)"
    return Check("adapter", "FAIL", f"{f.adapter} not found{others}", fix)


def check_rfkill(f: Facts) -> Check:
    if not f.ble_enabled:
        return _ble_skipped("rfkill")
    if f.adapter not in f.adapters:
        return Check("rfkill", "SKIP", f"no {f.adapter}")
    if f.rfkill is None:
        return Check("rfkill", "OK", f"no rfkill switch for {f.adapter}")
    if f.rfkill.hard:
        return Check("rfkill", "FAIL", f"{f.adapter} is hard-blocked (a switch, or the firmware)",
                     "check the device's radio switch or its dtoverlay=disable-bt in /boot/firmware/config.txt")
    if f.rfkill.soft:
        return Check("rfkill", "FAIL", f"{f.adapter} is soft-blocked", "sudo rfkill unblock bluetooth")
    return Check("rfkill", "OK", f"{f.adapter} not blocked")


def _denied(error: str) -> bool:
    return any(w in error.lower() for w in ("access denied", "accessdenied", "not allowed", "permission"))


def check_powered(f: Facts) -> Check:
    if not f.ble_enabled:
        return _ble_skipped("powered")
    if f.adapter not in f.adapters:
        return Check("powered", "SKIP", f"no {f.adapter}")
    if f.powered is True:
        return Check("powered", "OK", f"{f.adapter} powered")
    if f.powered is False:
        return Check("powered", "FAIL", f"{f.adapter} is powered off",
                     f"bluetoothctl power on (or sudo btmgmt --index {f.adapter.removeprefix('hci')} power on)")
    if _denied(f.powered_error):
        return Check("powered", "SKIP", f"BlueZ refused to say ({f.powered_error}): see dbus")
    return Check("powered", "WARN", f"cannot ask BlueZ ({f.powered_error or 'no answer'})",
                 "check that bluetoothd runs and busctl is installed (systemd)")


def check_dbus(f: Facts) -> Check:
    if not f.ble_enabled:
        return _ble_skipped("dbus")
    fix = f"sudo usermod -aG bluetooth {f.user}, then log in again (or restart the service)"
    if _denied(f.powered_error):
        return Check("dbus", "FAIL", f"user {f.user} may not use BlueZ over D-Bus ({f.powered_error})", fix)
    if f.uid == 0:
        return Check("dbus", "OK", "running as root (the service should run as its own user in group bluetooth)")
    if "bluetooth" in f.groups:
        return Check("dbus", "OK", f"user {f.user} is in group bluetooth")
    return Check("dbus", "WARN", f"user {f.user} is not in group bluetooth: BlueZ's D-Bus policy may refuse it", fix)


def check_broker(f: Facts) -> Check:
    if f.settings is not None and not f.settings.mqtt.enabled:
        return Check("broker", "SKIP", "[mqtt] enabled = false")
    b = f.broker
    if b is None:
        return Check("broker", "SKIP", "config invalid")
    if b.reachable:
        return Check("broker", "OK", f"{b.host}:{b.port} answered")
    if "refused the connection" in b.error:
        return Check("broker", "FAIL", f"{b.host}:{b.port}: {b.error}",
                     "check [mqtt] username, password and TLS settings against the broker's")
    return Check("broker", "FAIL", f"cannot connect to {b.host}:{b.port} ({b.error})",
                 "start the broker (sudo systemctl enable --now mosquitto) or set [mqtt] host and port")


def check_mosquitto(f: Facts) -> Check:
    """The broker settings the no-loss guarantee needs (docs/telemetry.md): only a local Mosquitto's file is read."""
    if f.settings is not None and not f.settings.mqtt.enabled:
        return Check("mosquitto", "SKIP", "[mqtt] enabled = false")
    c = f.mosquitto
    if c is None:
        return Check("mosquitto", "SKIP", "the broker is not on this machine: check its settings there "
                     "(docs/telemetry.md, 'The broker settings the guarantee depends on')")
    if not c.found:
        return Check("mosquitto", "WARN", f"no {c.path} (not Mosquitto, or configured elsewhere)",
                     "pass --mosquitto-conf FILE, or see examples/mosquitto.conf")
    if c.error:
        return Check("mosquitto", "WARN", f"{c.path}: {c.error}", "make it readable by this user")
    problems: list[str] = []
    fixes: list[str] = []
    persistence = c.settings.get("persistence")
    if persistence is None or persistence[0].lower() != "true":
        problems.append("persistence is off" + (f" ({persistence[1]})" if persistence else ""))
        fixes.append("add `persistence true`")
    queued = c.settings.get("max_queued_messages")
    limit = MOSQUITTO_DEFAULT_QUEUE if queued is None else int(queued[0]) if queued[0].isdigit() else -1
    if limit != 0 and limit < ADVISED_QUEUE:
        problems.append(f"max_queued_messages is {limit if limit >= 0 else queued and queued[0]}"
                        + (f" ({queued[1]})" if queued else " (the default)")
                        + ": past it, queued telemetry is dropped")
        fixes.append("add `max_queued_messages 1000000`")
    if problems:
        return Check("mosquitto", "WARN", f"{c.path}: " + "; ".join(problems),
                     " and ".join(fixes) + f" to {c.path} (or a file in its include_dir), then restart mosquitto")
    return Check("mosquitto", "OK", f"{c.path}: persistence true, max_queued_messages "
                 f"{c.settings['max_queued_messages'][0]}")


def check_database(f: Facts) -> Check:
    d = f.database
    if d is None:
        return Check("database", "SKIP", "config invalid")
    upgrade = "run `gateway db upgrade`" + (f" --config {f.config}" if f.config else "")
    if d.state == "current":
        return Check("database", "OK", f"{d.url} at the latest schema ({', '.join(d.heads)})")
    if d.state == "missing":
        return Check("database", "FAIL", f"{d.error}", f"{upgrade} (or check [database] url)")
    if d.state == "down":
        return Check("database", "FAIL", f"{d.url}: {d.error}",
                     "check [database] url, that the server runs and that this user may connect")
    if d.state == "empty":
        return Check("database", "FAIL", f"{d.url} has no schema (a wrong url, or never set up)",
                     f"{upgrade} (or check [database] url)")
    if d.state == "ahead":
        return Check("database", "FAIL", f"{d.url} is at {', '.join(d.applied)}, newer than this version knows",
                     "install the gateway version that migrated it")
    return Check("database", "WARN", f"{d.url} is {d.behind} migration(s) behind (at {', '.join(d.applied)}, "
                 f"latest {', '.join(d.heads)}); `gateway run` applies them at start", upgrade)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def check_disk(f: Facts) -> Check:
    if f.disk_free is None or f.disk_total is None:
        return Check("disk", "WARN", f"cannot read free space for {f.data_dir}: {f.disk_error}",
                     "check that data_dir exists and is readable")
    detail = f"{_size(f.disk_free)} free of {_size(f.disk_total)} for {f.data_dir}"
    fix = "free some space (old logs: sudo journalctl --vacuum-size=100M), or move data_dir to a larger disk"
    if f.disk_free < f.fail_free_bytes:
        return Check("disk", "FAIL", f"{detail} (below {_size(f.fail_free_bytes)})", fix)
    if f.disk_free < f.warn_free_bytes:
        return Check("disk", "WARN", f"{detail} (below {_size(f.warn_free_bytes)})", fix)
    return Check("disk", "OK", detail)


def check_clock(f: Facts) -> Check:
    if f.clock_synchronised is True:
        return Check("clock", "OK", "synchronised")
    fix = "sudo timedatectl set-ntp true (systemd-timesyncd), and let the Pi reach an NTP server"
    why = "quiet hours, schedules, token expiry and daily figures follow it; a Pi has no battery clock"
    if f.clock_synchronised is False:
        return Check("clock", "WARN", f"not synchronised: {why}", fix)
    return Check("clock", "WARN", f"cannot tell whether it is synchronised: {why}", fix)


def check_token_secret(f: Facts) -> Check:
    path = Path(f.data_dir) / "token.secret"
    if f.token_secret_configured:
        return Check("token", "OK", "[api] token_secret is set (keep the config file mode 0600)")
    if f.token_secret_mode is None:
        return Check("token", "OK", f"{path} not created yet (`gateway run` creates it with mode 0600)")
    if f.token_secret_mode & 0o077:
        return Check("token", "FAIL", f"{path} has mode {f.token_secret_mode:04o}: other users can forge "
                     "customer tokens", f"chmod 600 {path}")
    return Check("token", "OK", f"{path} mode {f.token_secret_mode:04o}")


def check_floor(f: Facts) -> Check:
    """Receivers and zones consistent beyond what loading checks: positions inside the floor plan, every zone
    heard by some receiver, and this adapter's receiver id among the receivers."""
    s = f.settings
    if s is None:
        return Check("floor", "SKIP", "config invalid")
    from beacons.scanner import receiver_check
    from gateway.presence import floor

    problems: list[str] = []
    drawn = [z for z in s.zones if len(z.polygon) >= 3]
    for r in s.receivers:
        if r.position is not None and drawn and floor.zone_at(drawn, (r.position[0], r.position[1])) is None:
            problems.append(f"receiver {r.id!r} at {r.position} is outside every zone polygon")
    heard = {b.name for r in s.receivers for b in r.zones}
    unheard = [z.name for z in s.zones if z.name not in heard]
    if s.receivers and unheard:
        problems.append(f"no receiver has a band for zone(s) {', '.join(unheard)}")
    if s.ble.enabled:
        warning = receiver_check(s.ble.receiver or s.ble.adapter, [r.id for r in s.receivers])
        if warning:
            problems.append(warning)
    if problems:
        return Check("floor", "WARN", "; ".join(problems), "fix [[receivers]] and [[zones]] in the config")
    if not s.receivers:
        return Check("floor", "OK", "no [[receivers]] configured (presence has no zones to report)")
    return Check("floor", "OK", f"{len(s.receivers)} receiver(s), {len(s.zones)} zone(s) on the floor plan")


def _ble_skipped(name: str) -> Check:
    return Check(name, "SKIP", "[ble] enabled = false: Bluetooth not checked")


CHECKS: tuple[Callable[[Facts], Check], ...] = (
    check_python, check_config, check_bluez, check_passive, check_adapter, check_rfkill, check_powered,
    check_dbus, check_broker, check_mosquitto, check_database, check_disk, check_clock, check_token_secret,
    check_floor,
)


# ---------------------------------------------------------------- gathering, and the command


def _existing(path: Path) -> Path:
    """The path, or its nearest existing parent: free space is the same, and nothing needs creating."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


def _is_local(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return host in (socket.gethostname(), socket.getfqdn())
    except OSError:
        return False


def gather(config: str | None, probe: SystemProbe, *, mosquitto_conf: str | None = None,
           warn_free_bytes: int = WARN_FREE_BYTES, fail_free_bytes: int = FAIL_FREE_BYTES,
           environ: dict[str, str] | None = None) -> Facts:
    """Everything the checks look at. A config that fails to load is reported, and what needs it is skipped."""
    from gateway.app.config import load_settings
    from gateway.errors import ConfigError

    f = Facts(python=probe.python_version(), config=config, warn_free_bytes=warn_free_bytes,
              fail_free_bytes=fail_free_bytes)
    f.uid, f.user, f.groups = probe.user()
    f.clock_synchronised = probe.clock_synchronised()
    try:
        settings = load_settings(config, environ)
    except ConfigError as exc:
        f.config_error = str(exc)
        f.ble_enabled = False
        return f
    f.settings = settings
    if config is not None:
        f.config_mode = _mode(Path(config))
        text = Path(config).read_text(errors="replace")
        f.config_has_secrets = re.search(r"^\s*(admin_key|token_secret|password)\s*=\s*\"[^\"]+\"", text,
                                         re.MULTILINE) is not None
    f.ble_enabled, f.adapter, f.scanning_mode = settings.ble.enabled, settings.ble.adapter, settings.ble.scanning_mode
    if f.ble_enabled:
        f.bluez_version = probe.bluez_version()
        f.bluetoothd_argv = probe.bluetoothd_argv()
        f.exec_start = probe.bluetooth_exec_start()
        f.main_conf = probe.bluez_main_conf()
        f.adapters = probe.adapters()
        if f.adapter in f.adapters:
            f.rfkill = probe.rfkill(f.adapter)
            f.powered, f.powered_error = probe.adapter_powered(f.adapter)
    if settings.mqtt.enabled:
        f.broker = broker_facts(settings.mqtt)
        if mosquitto_conf is not None or _is_local(settings.mqtt.host):
            f.mosquitto = read_mosquitto_conf(mosquitto_conf or DEFAULT_MOSQUITTO_CONF)
    f.database = database_facts(settings.database.url)
    f.data_dir = settings.data_dir
    try:
        f.disk_free, f.disk_total = probe.disk_usage(_existing(Path(settings.data_dir)))
    except OSError as exc:
        f.disk_error = str(exc)
    f.token_secret_configured = bool(settings.api.token_secret)
    f.token_secret_mode = _mode(Path(settings.data_dir) / "token.secret")
    return f


WITHOUT_CONFIG = (check_python, check_config, check_clock)
"""What still means something when the config does not load; the rest is skipped, saying why."""


def run_checks(facts: Facts) -> list[Check]:
    if facts.settings is None:
        return [check(facts) if check in WITHOUT_CONFIG else
                Check(check.__name__.removeprefix("check_").replace("token_secret", "token"), "SKIP",
                      "config invalid") for check in CHECKS]
    return [check(facts) for check in CHECKS]


def report(checks: Iterable[Check], as_json: bool = False) -> str:
    checks = list(checks)
    if as_json:
        return json.dumps({"checks": [asdict(c) for c in checks],
                           "ok": not any(c.status == "FAIL" for c in checks)})
    return "\n".join(c.line() for c in checks)


def exit_code(checks: Iterable[Check]) -> int:
    """1 when any check failed, else 0 (warnings leave a working, if imperfect, gateway)."""
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def main(config: str | None, *, as_json: bool = False, mosquitto_conf: str | None = None,
         probe: SystemProbe | None = None) -> int:
    checks = run_checks(gather(config, probe or LinuxProbe(), mosquitto_conf=mosquitto_conf))
    print(report(checks, as_json), flush=True)
    return exit_code(checks)
