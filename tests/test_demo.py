"""`gateway demo` as a user runs it: its scenario fires the three example campaigns within its first
minute, and Ctrl-C stops it cleanly (exit 0, no traceback) while it is deciding and sending.

The minute is checked in virtual time (the same scenario, campaigns, seed and dwell interval as the
demo, through the same pipeline), so the test does not wait a minute of wall time; the real-time
run is the subprocess test below, stopped by SIGINT once its first notification fired."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

from gateway.app.config import Settings
from gateway.app.simulate import simulate
from gateway.campaigns.model import load_campaigns
from simulators.scenario import load_scenario
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("shoes-dwell-offer", "abandoned-cart-reminder", "mower-blade-service")  # issue 2's three kinds
DEMO_SEED = 1  # gateway.app.demo.run_demo's default
DEMO_DWELL_EVERY_S = 5.0  # what run_demo sets


def test_the_demo_scenario_fires_all_three_example_campaigns_within_a_minute() -> None:
    scenario = load_scenario(ROOT / "examples/store.yaml")
    settings = Settings()
    settings.presence.dwell_every_s = DEMO_DWELL_EVERY_S
    s = simulate(scenario, 60, campaigns_dir=str(ROOT / "examples/campaigns"), seed=DEMO_SEED, settings=settings)
    fired = {(who, c) for who, c, reason in s.decisions if reason == "fired"}
    assert {c for _, c in fired} >= set(EXAMPLES), sorted(fired)
    # Nobody without consent for the purpose gets anything, in that minute either.
    consents = {p.id: set(p.consents) for p in scenario.people}
    purposes = {c.id: c.purpose for c in load_campaigns(ROOT / "examples/campaigns")}
    assert all(purposes[c] in consents[who] for who, c in fired)
    assert {who for who, _, reason in s.decisions if reason == "no_consent"} >= {"ivan", "julia"}


def test_ctrl_c_stops_the_demo_cleanly_while_it_decides(tmp_path: Path, mosquitto) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "gateway.app.cli", "demo", "--port", str(port), "--mqtt-port", str(mosquitto.port),
           "--data-dir", str(tmp_path / "demo")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines: list[str] = []
    fired = threading.Event()

    def read_stderr() -> None:  # the decision log goes to stderr; watch it for the first send
        assert proc.stderr is not None
        for line in proc.stderr:
            err_lines.append(line)
            if " FIRED " in line:
                fired.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert fired.wait(60), "no campaign fired:\n" + "".join(err_lines[-20:])  # a bound, not a timing claim
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    reader.join(10)
    err = "".join(err_lines)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "Traceback" not in out, err[-2000:]
    assert f"MQTT: using the MQTT broker at 127.0.0.1:{mosquitto.port}" in out  # says which broker
    assert f"API:    http://127.0.0.1:{port}" in out and "curl -N -H 'Authorization: Bearer " in out
    assert "Admin key" in out
    assert out.rstrip().endswith("stopped.")
