"""The `gateway` command as a user runs it: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GATEWAY = [sys.executable, "-m", "gateway.app.cli"]

# iBeacon advert from Home Assistant's ibeacon-ble test suite (tests/test_parser.py,
# "BLUECHARM_BEACON_SERVICE_INFO"): uuid 426c7565-4368-6172-6d42-6561636f6e73, major 3838, minor 4949, -59 dBm.
BLUECHARM = "0201061aff4c000215426c7565436861726d426561636f6e730efe1355c5"


def gateway(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GATEWAY, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_decode_prints_one_json_object_per_beacon():
    r = gateway("decode", BLUECHARM)
    assert r.returncode == 0, r.stderr
    [line] = r.stdout.splitlines()
    assert json.loads(line) == {"format": "ibeacon", "uuid": "426c7565-4368-6172-6d42-6561636f6e73",
                                "major": 3838, "minor": 4949, "tx_power": -59}


@pytest.mark.parametrize("arg, words", [
    ("not-hex", "malformed hex"),
    ("020", "odd number of digits"),
    ("-0201", "malformed hex"),  # looks like an option: still the decoder's one line, not argparse's usage
    ("0201061aff4c000215426c75", "truncated"),
    ("020106", "no beacon"),
    ("07ff4c0002150102", "no beacon found in 1 AD structures (rejected: ibeacon_length)"),  # a cut iBeacon
])
def test_decode_rejects_bad_input_with_one_line_and_exit_2(arg, words):
    r = gateway("decode", arg)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr
    assert "Traceback" not in r.stderr


def test_simulate_prints_a_summary_table():
    r = gateway("simulate", "--duration", "20m", "--quiet")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for row in ("visits (footfall)", "enrolled, first visit (new)", "enrolled, returning", "anonymous",
                "notifications: shoes-dwell-offer", "suppressed: no_consent"):
        assert row in out, out


def test_simulate_shows_a_progress_bar_that_ends_at_100_percent():
    r = gateway("simulate", "--duration", "2m")
    assert r.returncode == 0, r.stderr
    frames = [f for f in r.stderr.splitlines() if f.strip()]  # text mode reads the bar's \r as a line end
    assert frames and all(f.startswith("[") for f in frames), r.stderr[:300]
    percents = [int(f.split("]")[1].strip().rstrip("%")) for f in frames]
    assert percents == sorted(percents) and percents[-1] == 100 and frames[-1] == "[" + "#" * 40 + "] 100%"
    assert "visits (footfall)" in r.stdout  # the table follows on stdout


def test_ctrl_c_during_a_simulation_stops_it_with_one_line_and_no_traceback():
    proc = subprocess.Popen([*GATEWAY, "simulate", "--duration", "8h"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        assert proc.stderr.read(2) == b"\r["  # the progress bar is drawing: the day is being simulated
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-2000:]
    assert b"Traceback" not in err and err.rstrip().endswith(b"gateway simulate: interrupted")
    assert out == b""


def test_simulate_rejects_a_bad_duration():
    r = gateway("simulate", "--duration", "soon")
    assert r.returncode == 2 and "bad duration" in r.stderr and "Traceback" not in r.stderr


def test_run_without_an_adapter_says_so_in_one_line(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'data_dir = "{tmp_path}"\n[database]\nurl = "sqlite:///{tmp_path}/gw.db"\n'
                   '[api]\nport = 0\n[mqtt]\nenabled = false\n'
                   f'[campaigns]\ndir = "{ROOT / "examples/campaigns"}"\n')
    r = gateway("run", "--config", str(cfg), "--adapter", "hci99")
    assert r.returncode == 3
    assert "Traceback" not in r.stderr
    [line] = [ln for ln in r.stderr.splitlines() if "hci99" in ln]
    assert "--no-ble" in line


def test_run_rejects_a_bad_config_file(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text("[api]\nprot = 1\n")
    r = gateway("run", "--config", str(cfg))
    assert r.returncode == 2 and "unknown setting(s) prot" in r.stderr and "Traceback" not in r.stderr


def test_db_upgrade_creates_the_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'gw.db'}"
    r = gateway("db", "upgrade", "--url", url)
    assert r.returncode == 0, r.stderr
    import sqlite3

    tables = {row[0] for row in sqlite3.connect(tmp_path / "gw.db").execute(
        "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"profiles", "identifiers", "consents", "notifications", "decisions", "alembic_version"} <= tables


def _run_config(tmp_path, extra: str) -> Path:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'data_dir = "{tmp_path}"\n[database]\nurl = "sqlite:///{tmp_path}/gw.db"\n'
                   '[api]\nport = 0\n[mqtt]\nenabled = false\n'
                   f'[campaigns]\ndir = "{ROOT / "examples/campaigns"}"\n' + extra)
    return cfg


RECEIVERS = '[[receivers]]\nid = "hci0"\nzones = [{name = "entrance", max_m = 3.0}]\n'


def test_run_on_another_adapter_warns_that_its_receiver_id_matches_no_receiver(tmp_path):
    r = gateway("run", "--config", str(_run_config(tmp_path, RECEIVERS)), "--adapter", "hci1")
    assert "Traceback" not in r.stderr
    [line] = [ln for ln in r.stderr.splitlines() if "matches no [[receivers]]" in ln]
    assert "'hci1'" in line and "hci0" in line and "[ble] receiver" in line


def test_run_on_another_adapter_with_its_receiver_id_configured_does_not_warn(tmp_path):
    cfg = _run_config(tmp_path, '[ble]\nreceiver = "hci0"\n' + RECEIVERS)
    r = gateway("run", "--config", str(cfg), "--adapter", "hci1")
    assert "Traceback" not in r.stderr
    assert "matches no [[receivers]]" not in r.stderr


def test_the_scanner_carries_the_configured_receiver_id():
    from beacons.scanner import BleakSource
    from gateway.app.cli import ble_scanner
    from gateway.app.config import Settings

    s = Settings()
    s.ble.adapter, s.ble.receiver = "hci1", "rx-door"
    scanner = ble_scanner(s, BleakSource)
    assert (scanner.adapter, scanner.receiver, scanner.stale_after_s) == ("hci1", "rx-door", 4.0)
    s.ble.receiver = ""
    assert ble_scanner(s, BleakSource).receiver == "hci1"  # default: the adapter name


@pytest.mark.parametrize(("extra", "words"), [
    ('[ble]\nscanning_mode = "aggressive"\n', "ble.scanning_mode: expected passive or active"),
    ('[presence]\nrssi_filter = "median"\n', "presence.rssi_filter: expected kalman or ema"),
    ("[presence]\nexit_after_s = -5\n", "presence.exit_after_s: must be positive"),
    ("[presence]\nfade_time_s = -1\n", "presence.fade_time_s: must be positive"),
    ("[presence]\nsmoothing = 2\n", "presence.smoothing"),
    ("[ble]\nstale_after_s = -1\n", "ble.stale_after_s"),
    ('[[receivers]]\nid = "rx"\npath_loss_exponent = 0\n', "path_loss_exponent must be positive"),
    ('[[receivers]]\nid = "rx"\nmeasured_power = 5\n', "measured_power must be in"),
    ('[[receivers]]\nid = "rx"\nzones = [{name = "z", max_m = -1}]\n', "max_m must be positive"),
])
def test_run_rejects_bad_config_values_with_one_line(tmp_path, extra, words):
    r = gateway("run", "--config", str(_run_config(tmp_path, extra)), "--no-ble")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
