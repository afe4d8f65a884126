"""`gateway service install | uninstall` into a scratch root: the files a shop gets, their modes and owner, a
config the gateway loads, a unit `systemd-analyze verify` accepts, and a shop's config never overwritten.

useradd and systemctl go through a recording runner (the host's accounts and systemd must not change); it
writes the passwd and group lines useradd would, so ownership is checked against the ids they carry.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.app.config import load_settings
from gateway.app.service import (
    CONFIG,
    CONFIG_DIR,
    DATA_DIR,
    MASK,
    UNIT,
    UNIT_PATH,
    Layout,
    ServiceError,
    install,
    uninstall,
)

ROOT = Path(__file__).resolve().parents[1]
UID = 64_321  # what the fake useradd hands out: no account on the host has it
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="install writes and chowns files as root")


class FakeAccounts:
    """Records every command; for groupadd/useradd --prefix DIR, appends the line the real one would."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def __call__(self, cmd: Sequence[str]) -> None:
        cmd = list(cmd)
        self.commands.append(cmd)
        if cmd[0] not in ("groupadd", "useradd"):
            return
        prefix = Path(cmd[cmd.index("--prefix") + 1]) if "--prefix" in cmd else Path("/")
        assert prefix != Path("/"), "a test must never add an account to the host"
        etc = prefix / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        name = cmd[-1]
        if cmd[0] == "groupadd":
            with open(etc / "group", "a") as f:
                f.write(f"{name}:x:{UID - 1}:\n")
        else:
            with open(etc / "group", "a") as f:
                f.write(f"{name}:x:{UID}:\n")
            with open(etc / "passwd", "a") as f:
                f.write(f"{name}:x:{UID}:{UID}:engagement gateway:{DATA_DIR}:/usr/sbin/nologin\n")


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: `make ensure-systemd` installs Debian's systemd package")
    return found


def verify(unit: Path) -> None:
    """`systemd-analyze verify` accepts the unit: exit 0 and not one line about it (systemd only warns, exit 0,
    on an unknown key or a value it cannot parse). Lines about other units (a missing target) are not ours."""
    r = subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if str(unit) in line or UNIT in line]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def install_into(root: Path, runner: FakeAccounts | None = None, user: str = "engagement-gateway",
                 ) -> tuple[FakeAccounts, str]:
    runner = runner or FakeAccounts()
    out = io.StringIO()
    install(Layout(root=root, user=user, prefix=Path(sys.prefix)), runner=runner, out=out)
    return runner, out.getvalue()


@as_root
def test_install_writes_a_private_config_the_gateway_loads_a_data_dir_and_a_unit_systemd_accepts(tmp_path: Path):
    runner, out = install_into(tmp_path)
    assert runner.commands == [
        ["groupadd", "--system", "--prefix", str(tmp_path), "bluetooth"],
        ["useradd", "--system", "--prefix", str(tmp_path), "--user-group", "--groups", "bluetooth",
         "--home-dir", DATA_DIR, "--no-create-home", "--shell", "/usr/sbin/nologin", "--comment",
         "engagement gateway", "engagement-gateway"],
        ["systemctl", f"--root={tmp_path}", "enable", UNIT],
    ]
    config = tmp_path / CONFIG.lstrip("/")
    st = config.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, UID, UID)
    data = (tmp_path / DATA_DIR.lstrip("/")).stat()
    assert (data.st_mode & 0o777, data.st_uid) == (0o750, UID)

    settings = load_settings(config, environ={})  # the gateway's own loader: it runs with this file
    assert settings.data_dir == DATA_DIR
    assert settings.database.url == f"sqlite:///{DATA_DIR}/gateway.db"
    assert settings.campaigns.dir == f"{CONFIG_DIR}/campaigns"
    assert settings.device_rules.dir == f"{CONFIG_DIR}/device-rules"
    assert settings.devices.profiles_dir == f"{CONFIG_DIR}/device-profiles"
    assert len(settings.api.admin_key) >= 32 and len(settings.api.token_secret) >= 32
    assert settings.api.admin_key != settings.api.token_secret
    assert settings.api.admin_key not in out and settings.api.token_secret not in out  # never shown
    assert not list((tmp_path / CONFIG_DIR.lstrip("/") / "campaigns").iterdir())  # no example offers in a shop
    assert sorted(p.name for p in (tmp_path / CONFIG_DIR.lstrip("/") / "device-profiles").iterdir()) == sorted(
        p.name for p in (ROOT / "examples/device-profiles").iterdir())

    unit = tmp_path / UNIT_PATH.lstrip("/")
    assert unit.stat().st_mode & 0o777 == 0o644
    verify(unit)
    u = unit_settings(unit.read_text())
    assert u["ExecStart"] == [f"{sys.prefix}/bin/gateway run --config {CONFIG}"]
    assert (u["Type"], u["NotifyAccess"], u["WatchdogSec"], u["Restart"]) == (["notify"], ["main"], ["30"], ["always"])
    assert u["After"] == u["Wants"] == ["bluetooth.target network-online.target"]
    assert (u["User"], u["Group"], u["SupplementaryGroups"]) == (["engagement-gateway"], ["engagement-gateway"],
                                                                  ["bluetooth"])
    assert u["StateDirectory"] == u["ConfigurationDirectory"] == ["engagement-gateway"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("StandardOutput", "journal")):
        assert u[key] == [value], key
    assert u["CapabilityBoundingSet"] == u["AmbientCapabilities"] == [""]  # no capability at all


@as_root
def test_the_unit_is_hardened_by_systemds_own_measure(tmp_path: Path):
    install_into(tmp_path)
    r = subprocess.run([systemd_analyze(), "security", "--offline=yes", str(tmp_path / UNIT_PATH.lstrip("/"))],
                       capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", r.stdout + r.stderr)
    assert found, r.stdout + r.stderr
    assert float(found[1]) <= 3.0, r.stdout  # 1.7 "OK" with systemd 252; 10 is an unprotected service


@as_root
def test_a_second_install_keeps_the_shops_config_and_each_new_one_gets_its_own_secrets(tmp_path: Path):
    first = tmp_path / "shop"
    install_into(first)
    config = first / CONFIG.lstrip("/")
    config.write_text(config.read_text().replace('id = "store-001"', 'id = "paris-7"'))  # the shop's edit
    before = config.read_bytes()
    runner, out = install_into(first)
    assert config.read_bytes() == before
    assert f"kept {CONFIG}: an existing config is never overwritten" in out
    assert [c[0] for c in runner.commands] == ["systemctl"]  # the group and the user exist: not added again

    other = tmp_path / "other"
    install_into(other)
    a, b = (load_settings(r / CONFIG.lstrip("/"), environ={}).api for r in (first, other))
    assert a.admin_key != b.admin_key and a.token_secret != b.token_secret


@as_root
def test_an_existing_user_keeps_its_own_primary_group(tmp_path: Path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "group").write_text("bluetooth:x:112:\nstaff:x:50:\n")
    (etc / "passwd").write_text(f"shopbox:x:{UID}:50::/home/shopbox:/bin/sh\n")
    runner, _ = install_into(tmp_path, user="shopbox")
    assert [c[0] for c in runner.commands] == ["systemctl"]
    u = unit_settings((tmp_path / UNIT_PATH.lstrip("/")).read_text())
    assert (u["User"], u["Group"]) == (["shopbox"], ["staff"])
    assert (tmp_path / CONFIG.lstrip("/")).stat().st_uid == UID


def test_dry_run_writes_and_runs_nothing_and_prints_a_unit_systemd_accepts(tmp_path: Path):
    root = tmp_path / "root"
    r = subprocess.run([sys.executable, "-m", "gateway.app.cli", "service", "install", "--dry-run",
                        "--root", str(root)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert not root.exists()
    assert "would run: useradd --system" in r.stdout and f"would run: systemctl --root={root} enable {UNIT}" in r.stdout
    assert f'admin_key = "{MASK}"' in r.stdout and f'token_secret = "{MASK}"' in r.stdout
    unit = re.search(rf"^--- would write {UNIT_PATH} .*?\n(.*?)^--- end$", r.stdout, re.S | re.M)
    assert unit, r.stdout
    path = tmp_path / UNIT
    path.write_text(unit[1])
    verify(path)


@as_root
def test_uninstall_removes_the_unit_and_keeps_config_and_data_unless_asked(tmp_path: Path):
    install_into(tmp_path)
    unit, config_dir, data = (tmp_path / p.lstrip("/") for p in (UNIT_PATH, CONFIG_DIR, DATA_DIR))
    (data / "gateway.db").write_bytes(b"the shop's data")

    out = io.StringIO()
    uninstall(Layout(root=tmp_path), dry_run=True, out=out)
    assert unit.exists() and f"would remove {UNIT_PATH}" in out.getvalue()

    runner = FakeAccounts()
    uninstall(Layout(root=tmp_path), runner=runner, out=io.StringIO())
    assert runner.commands == [["systemctl", f"--root={tmp_path}", "disable", UNIT]]
    assert not unit.exists() and (config_dir / "gateway.toml").exists() and (data / "gateway.db").exists()

    install_into(tmp_path)
    uninstall(Layout(root=tmp_path), purge=True, runner=FakeAccounts(), out=io.StringIO())
    assert not config_dir.exists() and (data / "gateway.db").read_bytes() == b"the shop's data"

    uninstall(Layout(root=tmp_path), purge_data=True, runner=FakeAccounts(), out=io.StringIO())
    assert not data.exists()


@pytest.mark.parametrize("layout, words", [
    (lambda tmp: Layout(root=tmp, prefix=tmp / "nowhere"), "no gateway command at"),
    (lambda tmp: Layout(root=tmp, user="Bad User", prefix=Path(sys.prefix)), "--user: not a valid"),
    (lambda tmp: Layout(root=tmp, prefix=Path("/home/someone/venv")), "no gateway command at"),
])
def test_bad_input_is_one_clear_error_and_changes_nothing(tmp_path: Path, layout, words):
    runner = FakeAccounts()
    root = tmp_path / "root"
    with pytest.raises(ServiceError, match=words):
        install(layout(root), runner=runner, out=io.StringIO())
    assert runner.commands == [] and not root.exists()


@as_root
def test_a_prefix_under_home_is_refused_because_protect_home_would_hide_it(tmp_path: Path, monkeypatch):
    home = Path("/home/gateway-service-test")
    monkeypatch.setattr(os, "access", lambda path, mode: True)  # as if a venv were there; nothing is created
    with pytest.raises(ServiceError, match="ProtectHome=yes hides"):
        install(Layout(root=tmp_path / "root", prefix=home / "venv"), runner=FakeAccounts(), out=io.StringIO())
    assert not (tmp_path / "root").exists()
