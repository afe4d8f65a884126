"""`gateway doctor`: each check says OK, WARN or FAIL with the fix a user would apply.

The Bluetooth parts run against a fake machine (a temporary tree of /sys, /proc, /etc and systemd units
read by the real probe, plus fakes for the commands), since this one has no adapter. The broker, the
databases, mosquitto.conf, the disk and the files are real.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.app import doctor
from gateway.app.doctor import Check, LinuxProbe, Rfkill
from gateway.storage.db import MIGRATIONS, Database, upgrade
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


class FakeMachine(LinuxProbe):
    """The real probe over a fake root, with the commands (bluetoothd --version, busctl) and the user faked."""

    def __init__(self, root: Path, *, bluez: str | None = "5.66", powered: bool | None = True,
                 powered_error: str = "", user: tuple[int, str, set[str]] = (1000, "pi", {"pi", "bluetooth"}),
                 synchronised: bool | None = True) -> None:
        super().__init__(root)
        self._bluez, self._powered, self._powered_error = bluez, powered, powered_error
        self._user, self._synchronised = user, synchronised

    def bluez_version(self) -> str | None:
        return self._bluez

    def adapter_powered(self, adapter: str) -> tuple[bool | None, str]:
        return self._powered, self._powered_error

    def user(self) -> tuple[int, str, set[str]]:
        return self._user

    def clock_synchronised(self) -> bool | None:
        return self._synchronised


def machine_tree(root: Path, *, adapters: tuple[str, ...] = ("hci0",), rfkill_soft: bool = False,
                 bluetoothd: list[str] | None = None, exec_start: str = "/usr/libexec/bluetooth/bluetoothd",
                 drop_in: str | None = None, main_conf: str | None = None) -> Path:
    """A Pi's /sys, /proc, /etc and unit files as the kernel, systemd and BlueZ lay them out."""
    for i, name in enumerate(adapters):
        (root / "sys/class/bluetooth" / name).mkdir(parents=True)
        (root / "sys/class/bluetooth" / f"{name}:64").mkdir()  # a connection handle, not an adapter
        switch = root / "sys/class/rfkill" / f"rfkill{i}"
        switch.mkdir(parents=True)
        (switch / "name").write_text(f"{name}\n")
        (switch / "type").write_text("bluetooth\n")
        (switch / "soft").write_text("1\n" if rfkill_soft else "0\n")
        (switch / "hard").write_text("0\n")
    wifi = root / "sys/class/rfkill/rfkill9"
    wifi.mkdir(parents=True)
    (wifi / "name").write_text("phy0\n")
    (wifi / "type").write_text("wlan\n")
    (wifi / "soft").write_text("1\n")
    (wifi / "hard").write_text("0\n")
    (root / "proc/1").mkdir(parents=True)
    (root / "proc/1/cmdline").write_bytes(b"/sbin/init\0splash\0")
    (root / "proc/self").mkdir()
    if bluetoothd is not None:
        (root / "proc/612").mkdir()
        (root / "proc/612/cmdline").write_bytes("\0".join(bluetoothd).encode() + b"\0")
    units = root / "lib/systemd/system"
    units.mkdir(parents=True)
    (units / "bluetooth.service").write_text(f"[Unit]\nDescription=Bluetooth service\n[Service]\nType=dbus\n"
                                             f"ExecStart={exec_start}\n")
    if drop_in is not None:
        folder = root / "etc/systemd/system/bluetooth.service.d"
        folder.mkdir(parents=True)
        (folder / "experimental.conf").write_text(drop_in)
    if main_conf is not None:
        (root / "etc/bluetooth").mkdir(parents=True)
        (root / "etc/bluetooth/main.conf").write_text(main_conf)
    return root


def config(tmp_path: Path, extra: str = "", *, mqtt: str = "enabled = false", url: str | None = None) -> Path:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n[database]\nurl = "{url or f"sqlite:///{tmp_path}/gw.db"}"\n'
                   f"[mqtt]\n{mqtt}\n{extra}")
    return cfg


def checks_of(cfg: Path, probe: doctor.SystemProbe, **kwargs: object) -> dict[str, Check]:
    return {c.name: c for c in doctor.run_checks(doctor.gather(str(cfg), probe, environ={}, **kwargs))}  # type: ignore[arg-type]


RUNNING = ["/usr/libexec/bluetooth/bluetoothd"]


# ---------------------------------------------------------------- the probe reads the machine as laid out


def test_the_probe_reads_adapters_rfkill_and_bluetoothd_from_the_tree(tmp_path):
    root = machine_tree(tmp_path, adapters=("hci0", "hci1"), rfkill_soft=True,
                        bluetoothd=[*RUNNING, "-E", "--noplugin=sap"])
    probe = LinuxProbe(root)
    assert probe.adapters() == ["hci0", "hci1"]
    assert probe.rfkill("hci1") == Rfkill(soft=True, hard=False)
    assert probe.rfkill("hci7") is None
    assert probe.bluetoothd_argv() == [*RUNNING, "-E", "--noplugin=sap"]
    assert probe.bluetooth_exec_start() == RUNNING


def test_a_drop_in_resets_and_replaces_exec_start_as_systemd_does(tmp_path):
    root = machine_tree(tmp_path, drop_in=f"[Service]\nExecStart=\nExecStart={RUNNING[0]} --experimental\n")
    assert LinuxProbe(root).bluetooth_exec_start() == [RUNNING[0], "--experimental"]


def test_a_machine_without_bluetooth_has_no_adapters_and_no_bluetoothd(tmp_path):
    probe = LinuxProbe(tmp_path)
    assert probe.adapters() == [] and probe.bluetoothd_argv() is None and probe.bluetooth_exec_start() is None


# ---------------------------------------------------------------- Bluetooth, on a fake Pi


def test_a_ready_pi_passes_every_bluetooth_check(tmp_path):
    root = machine_tree(tmp_path / "root", bluetoothd=[*RUNNING, "-E"])
    found = checks_of(config(tmp_path), FakeMachine(root))
    for name in ("bluez", "passive", "adapter", "rfkill", "powered", "dbus"):
        assert found[name].status == "OK", found[name]
    assert found["passive"].detail == "BlueZ 5.66; bluetoothd runs with --experimental"


def test_a_missing_adapter_fails_and_names_the_way_out(tmp_path):
    root = machine_tree(tmp_path / "root", adapters=(), bluetoothd=RUNNING)
    found = checks_of(config(tmp_path), FakeMachine(root))
    assert found["adapter"] == Check("adapter", "FAIL", "hci0 not found",
                                     "plug in a USB adapter or set [ble] adapter")
    assert found["adapter"].line() == "FAIL  adapter      hci0 not found -> plug in a USB adapter or set [ble] adapter"
    assert found["rfkill"].status == found["powered"].status == "SKIP"


def test_another_adapter_present_is_named_in_the_fix(tmp_path):
    root = machine_tree(tmp_path / "root", adapters=("hci1",), bluetoothd=RUNNING)
    found = checks_of(config(tmp_path), FakeMachine(root))
    assert found["adapter"].status == "FAIL" and "found hci1" in found["adapter"].detail
    assert "set [ble] adapter to one of hci1" in found["adapter"].fix


def test_a_powered_off_adapter_fails_with_the_command_to_power_it(tmp_path):
    root = machine_tree(tmp_path / "root", bluetoothd=RUNNING)
    found = checks_of(config(tmp_path), FakeMachine(root, powered=False))
    assert found["powered"].status == "FAIL" and "hci0 is powered off" in found["powered"].detail
    assert found["powered"].fix.startswith("bluetoothctl power on")


def test_a_soft_blocked_adapter_fails_with_rfkill_unblock(tmp_path):
    root = machine_tree(tmp_path / "root", rfkill_soft=True, bluetoothd=RUNNING)
    found = checks_of(config(tmp_path), FakeMachine(root, powered=False))
    assert found["rfkill"] == Check("rfkill", "FAIL", "hci0 is soft-blocked", "sudo rfkill unblock bluetooth")


def test_an_old_bluez_warns_that_scanning_will_be_active(tmp_path):
    root = machine_tree(tmp_path / "root", bluetoothd=RUNNING)
    found = checks_of(config(tmp_path), FakeMachine(root, bluez="5.50"))
    assert found["passive"].status == "WARN"
    assert "BlueZ 5.50 is older than 5.56" in found["passive"].detail
    assert "Bookworm" in found["passive"].fix and 'scanning_mode = "active"' in found["passive"].fix
    assert found["bluez"].status == "OK"


def test_bluez_without_experimental_warns_with_the_drop_in_to_add(tmp_path):
    root = machine_tree(tmp_path / "root", bluetoothd=RUNNING)
    found = checks_of(config(tmp_path), FakeMachine(root))
    assert found["passive"].status == "WARN" and "without --experimental" in found["passive"].detail
    assert doctor.DROP_IN in found["passive"].fix and "Experimental = true" in found["passive"].fix


@pytest.mark.parametrize("where", ["drop-in", "main.conf"])
def test_experimental_from_the_unit_or_main_conf_counts_when_bluetoothd_is_stopped(tmp_path, where):
    root = machine_tree(tmp_path / "root",
                        drop_in=f"[Service]\nExecStart=\nExecStart={RUNNING[0]} -E\n" if where == "drop-in" else None,
                        main_conf="[General]\nExperimental = true  # passive scanning\n" if where == "main.conf"
                        else None)
    found = checks_of(config(tmp_path), FakeMachine(root))
    assert found["passive"].status == "OK", found["passive"]
    assert found["bluez"] == Check("bluez", "FAIL", "BlueZ 5.66 installed, bluetoothd not running",
                                   "sudo systemctl enable --now bluetooth")


def test_active_scanning_needs_no_experimental(tmp_path):
    root = machine_tree(tmp_path / "root", bluetoothd=RUNNING)
    found = checks_of(config(tmp_path, '[ble]\nscanning_mode = "active"\n'), FakeMachine(root, bluez="5.50"))
    assert found["passive"].status == "OK"


def test_no_bluez_at_all_fails(tmp_path):
    found = checks_of(config(tmp_path), FakeMachine(tmp_path / "empty", bluez=None))
    assert found["bluez"] == Check("bluez", "FAIL", "BlueZ not found (no bluetoothd or bluetoothctl)",
                                   "sudo apt install bluez")


def test_a_user_outside_the_bluetooth_group_is_told_to_join_it(tmp_path):
    root = machine_tree(tmp_path / "root", bluetoothd=[*RUNNING, "-E"])
    found = checks_of(config(tmp_path), FakeMachine(root, user=(1001, "gateway", {"gateway"})))
    assert found["dbus"].status == "WARN" and "user gateway is not in group bluetooth" in found["dbus"].detail
    assert found["dbus"].fix.startswith("sudo usermod -aG bluetooth gateway")


def test_bluez_refusing_us_over_dbus_fails_the_permission_check(tmp_path):
    root = machine_tree(tmp_path / "root", bluetoothd=[*RUNNING, "-E"])
    denied = "Failed to get property Powered on interface org.bluez.Adapter1: Access denied"
    found = checks_of(config(tmp_path), FakeMachine(root, powered=None, powered_error=denied,
                                                    user=(1001, "gateway", {"gateway"})))
    assert found["dbus"].status == "FAIL" and "Access denied" in found["dbus"].detail
    assert "usermod -aG bluetooth gateway" in found["dbus"].fix
    assert found["powered"].status == "SKIP"


def test_with_ble_disabled_the_bluetooth_checks_are_skipped_not_failed(tmp_path):
    found = checks_of(config(tmp_path, "[ble]\nenabled = false\n"), FakeMachine(tmp_path / "empty", bluez=None))
    for name in ("bluez", "passive", "adapter", "rfkill", "powered", "dbus"):
        assert found[name] == Check(name, "SKIP", "[ble] enabled = false: Bluetooth not checked")


# ---------------------------------------------------------------- the broker and its config, for real


def test_a_reachable_broker_is_ok_and_a_closed_port_fails(tmp_path, mosquitto):
    good = checks_of(config(tmp_path, mqtt=f"port = {mosquitto.port}"), FakeMachine(tmp_path),
                     mosquitto_conf=str(mosquitto.config_file))
    assert good["broker"] == Check("broker", "OK", f"127.0.0.1:{mosquitto.port} answered")
    closed = free_port()
    bad = checks_of(config(tmp_path, mqtt=f"port = {closed}"), FakeMachine(tmp_path))
    assert bad["broker"].status == "FAIL" and f"cannot connect to 127.0.0.1:{closed}" in bad["broker"].detail
    assert "systemctl enable --now mosquitto" in bad["broker"].fix


def test_a_broker_refusing_our_credentials_fails_naming_them(tmp_path, tmp_path_factory, mosquitto):
    from tests.conftest import MosquittoServer

    strict = MosquittoServer(binary=mosquitto.binary, workdir=tmp_path_factory.mktemp("strict"),
                             extra="allow_anonymous false")
    strict.start()
    try:
        found = checks_of(config(tmp_path, mqtt=f'port = {strict.port}\nusername = "gw"\npassword = "hunter2"'),
                          FakeMachine(tmp_path))
    finally:
        strict.stop()
    assert found["broker"].status == "FAIL" and "the broker refused the connection" in found["broker"].detail
    assert "username, password" in found["broker"].fix and "hunter2" not in found["broker"].line()


def test_a_tls_broker_with_a_missing_ca_file_fails_in_one_line(tmp_path):
    found = checks_of(config(tmp_path, mqtt=f'port = {free_port()}\ntls = true\nca_file = "{tmp_path}/none.pem"'),
                      FakeMachine(tmp_path))
    assert found["broker"].status == "FAIL" and "cannot connect" in found["broker"].detail


def test_the_tests_own_broker_config_warns_that_persistence_is_off(tmp_path, mosquitto):
    found = checks_of(config(tmp_path, mqtt=f"port = {mosquitto.port}"), FakeMachine(tmp_path),
                      mosquitto_conf=str(mosquitto.config_file))
    assert found["mosquitto"].status == "WARN"
    assert f"persistence is off ({mosquitto.config_file}:3)" in found["mosquitto"].detail
    assert "add `persistence true`" in found["mosquitto"].fix


def test_a_conf_without_persistence_or_queue_size_names_the_lines_to_add(tmp_path):
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("listener 1883 127.0.0.1\nallow_anonymous true\n")
    c = doctor.check_mosquitto(doctor.Facts(python=(3, 11, 2), mosquitto=doctor.read_mosquitto_conf(conf)))
    assert c.status == "WARN"
    assert "persistence is off" in c.detail and "max_queued_messages is 1000 (the default)" in c.detail
    assert c.fix.startswith("add `persistence true` and add `max_queued_messages 1000000` to " + str(conf))


def test_include_dir_files_are_read_and_a_later_line_wins(tmp_path):
    confd = tmp_path / "conf.d"
    confd.mkdir()
    (confd / "gateway.conf").write_text("persistence true\nmax_queued_messages 1000000  # the guarantee\n")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"persistence false\ninclude_dir {confd}\n")
    c = doctor.check_mosquitto(doctor.Facts(python=(3, 11, 2), mosquitto=doctor.read_mosquitto_conf(conf)))
    assert c == Check("mosquitto", "OK", f"{conf}: persistence true, max_queued_messages 1000000")


def test_the_example_mosquitto_conf_passes():
    c = doctor.check_mosquitto(doctor.Facts(python=(3, 11, 2),
                                            mosquitto=doctor.read_mosquitto_conf(ROOT / "examples/mosquitto.conf")))
    assert c.status == "OK", c


def test_no_local_mosquitto_conf_warns_and_says_how_to_point_at_it(tmp_path):
    c = doctor.check_mosquitto(doctor.Facts(python=(3, 11, 2),
                                            mosquitto=doctor.read_mosquitto_conf(tmp_path / "none.conf")))
    assert c.status == "WARN" and "--mosquitto-conf" in c.fix


# ---------------------------------------------------------------- the database, for real


def test_an_empty_database_fails_and_a_migrated_one_is_ok(db_url, tmp_path):
    empty = Database(db_url)
    with empty.engine.connect():  # the SQLite file exists, with nothing in it
        pass
    empty.dispose()
    cfg = config(tmp_path, url=db_url)
    found = checks_of(cfg, FakeMachine(tmp_path))
    assert found["database"].status == "FAIL" and "has no schema" in found["database"].detail
    assert found["database"].fix.startswith(f"run `gateway db upgrade` --config {cfg}")
    Database(db_url).upgrade()
    found = checks_of(cfg, FakeMachine(tmp_path))
    assert found["database"].status == "OK" and "at the latest schema" in found["database"].detail


def test_a_database_one_migration_behind_warns(db_url, tmp_path):
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(MIGRATIONS)).get_revision("heads")
    db = Database(db_url)
    upgrade(db.engine, revision=str(head.down_revision))
    db.dispose()
    found = checks_of(config(tmp_path, url=db_url), FakeMachine(tmp_path))
    assert found["database"].status == "WARN"
    assert "1 migration(s) behind" in found["database"].detail and head.revision in found["database"].detail
    assert "gateway db upgrade" in found["database"].fix


def test_a_missing_sqlite_file_fails_and_is_not_created(tmp_path):
    found = checks_of(config(tmp_path), FakeMachine(tmp_path))
    assert found["database"].status == "FAIL" and f"no database file at {tmp_path}/gw.db" in found["database"].detail
    assert not (tmp_path / "gw.db").exists()


def test_an_unreachable_postgresql_fails_without_showing_its_password(tmp_path):
    url = f"postgresql+psycopg://gateway:s3cret@127.0.0.1:{free_port()}/gateway"
    found = checks_of(config(tmp_path, url=url), FakeMachine(tmp_path))
    assert found["database"].status == "FAIL" and "check [database] url" in found["database"].fix
    assert "s3cret" not in found["database"].line()


# ---------------------------------------------------------------- disk, token secret, clock, config


def test_free_disk_below_the_threshold_fails_and_above_it_is_ok(tmp_path):
    free, _ = LinuxProbe().disk_usage(tmp_path)
    low = checks_of(config(tmp_path), FakeMachine(tmp_path), fail_free_bytes=free + (1 << 30))
    assert low["disk"].status == "FAIL" and "free some space" in low["disk"].fix
    ok = checks_of(config(tmp_path), FakeMachine(tmp_path), warn_free_bytes=1, fail_free_bytes=0)
    assert ok["disk"].status == "OK" and str(tmp_path / "data") in ok["disk"].detail
    assert not (tmp_path / "data").exists()  # measured on the nearest existing parent, nothing created


def test_a_world_readable_token_secret_fails_with_chmod_600(tmp_path):
    secret = tmp_path / "data" / "token.secret"
    secret.parent.mkdir()
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o644)
    found = checks_of(config(tmp_path), FakeMachine(tmp_path))
    assert found["token"] == Check("token", "FAIL", f"{secret} has mode 0644: other users can forge customer tokens",
                                   f"chmod 600 {secret}")
    secret.chmod(0o600)
    assert checks_of(config(tmp_path), FakeMachine(tmp_path))["token"].status == "OK"


def test_a_config_holding_a_secret_readable_by_others_warns_with_chmod_600(tmp_path):
    cfg = config(tmp_path, '[api]\nadmin_key = "a-long-admin-key"\n')
    cfg.chmod(0o644)
    found = checks_of(cfg, FakeMachine(tmp_path))
    assert found["config"] == Check("config", "WARN", f"{cfg} holds secrets and has mode 0644", f"chmod 600 {cfg}")
    assert "a-long-admin-key" not in found["config"].line()
    cfg.chmod(0o600)
    assert checks_of(cfg, FakeMachine(tmp_path))["config"].status == "OK"


def test_an_unsynchronised_clock_warns(tmp_path):
    found = checks_of(config(tmp_path), FakeMachine(tmp_path, synchronised=False))
    assert found["clock"].status == "WARN" and "timedatectl set-ntp true" in found["clock"].fix


FLOOR = """
[[receivers]]
id = "hci0"
position = [{x}, 1.0]
zones = [{{ name = "entrance", max_m = 3.0 }}]

[[zones]]
name = "entrance"
polygon = [[0, 0], [4, 0], [4, 3], [0, 3]]
"""


def test_a_receiver_outside_every_zone_warns(tmp_path):
    inside = checks_of(config(tmp_path, FLOOR.format(x=1.0)), FakeMachine(tmp_path))["floor"]
    assert inside == Check("floor", "OK", "1 receiver(s), 1 zone(s) on the floor plan")
    outside = checks_of(config(tmp_path, FLOOR.format(x=9.0)), FakeMachine(tmp_path))["floor"]
    assert outside.status == "WARN" and "receiver 'hci0' at [9.0, 1.0] is outside every zone polygon" in outside.detail


def test_a_band_naming_a_zone_not_on_the_floor_plan_fails_the_config_with_its_line(tmp_path):
    cfg = config(tmp_path, FLOOR.format(x=1.0).replace('{ name = "entrance"', '{ name = "shoes"'))
    found = checks_of(cfg, FakeMachine(tmp_path))
    assert found["config"].status == "FAIL"
    assert found["config"].detail == (f"{cfg}, line 10: receivers[0].zones[0].name: not a zone of the floor plan "
                                      "(known: entrance), got 'shoes'")
    assert found["database"] == Check("database", "SKIP", "config invalid")
    assert found["adapter"].status == "SKIP" and found["python"].status == "OK"


def test_an_adapter_whose_receiver_id_is_not_configured_warns(tmp_path):
    found = checks_of(config(tmp_path, '[ble]\nadapter = "hci1"\n' + FLOOR.format(x=1.0)), FakeMachine(tmp_path))
    assert found["floor"].status == "WARN" and "'hci1' matches no [[receivers]] entry" in found["floor"].detail


# ---------------------------------------------------------------- the command


def doctor_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run([sys.executable, "-m", "gateway.app.cli", "doctor", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=env)


def test_the_command_exits_0_with_warnings_and_1_on_a_failure(tmp_path, mosquitto):
    Database(f"sqlite:///{tmp_path}/gw.db").upgrade()
    cfg = config(tmp_path, "[ble]\nenabled = false\n", mqtt=f"port = {mosquitto.port}")
    r = doctor_cli("--config", str(cfg), "--mosquitto-conf", str(mosquitto.config_file))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["python", "config", "bluez", "passive", "adapter", "rfkill",
                                                   "powered", "dbus", "broker", "mosquitto", "database", "disk",
                                                   "clock", "token", "floor"]
    assert f"OK    broker       127.0.0.1:{mosquitto.port} answered" in lines
    assert "SKIP  adapter      [ble] enabled = false: Bluetooth not checked" in lines
    assert any(line.startswith("WARN  mosquitto") and "persistence true" in line for line in lines)
    assert any(line.startswith("OK    database") for line in lines)

    closed = config(tmp_path, "[ble]\nenabled = false\n", mqtt=f"port = {free_port()}")
    r = doctor_cli("--config", str(closed), "--json")
    assert r.returncode == 1
    import json

    answer = json.loads(r.stdout)
    assert answer["ok"] is False
    broker = next(c for c in answer["checks"] if c["name"] == "broker")
    assert broker["status"] == "FAIL" and "mosquitto" in broker["fix"]


def test_the_command_on_a_bad_config_fails_in_one_line_without_a_traceback(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text("[api]\nprot = 1\n")
    r = doctor_cli("--config", str(cfg))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert any(line.startswith("FAIL  config") and "unknown setting(s) prot" in line for line in r.stdout.splitlines())


def test_the_real_probe_answers_on_this_machine_without_raising():
    """Whatever this machine has (here: no Bluetooth, no systemd), each answer has its shape and a reason."""
    import re

    probe = LinuxProbe()
    version = probe.bluez_version()
    assert version is None or re.fullmatch(r"\d+\.\d+", version)
    assert all(re.fullmatch(r"hci\d+", a) for a in probe.adapters())
    powered, why = probe.adapter_powered("hci0")
    assert powered in (True, False) or why
    uid, name, groups = probe.user()
    assert uid == os.geteuid() and name and groups
    assert probe.clock_synchronised() in (True, False, None)
    free, total = probe.disk_usage(Path("."))
    assert 0 <= free <= total
