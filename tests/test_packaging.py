"""The package as a user installs it: a wheel built from the tracked files, run from a directory that is
not the checkout. ``gateway simulate`` and ``gateway demo`` must find their default scenario,
campaigns, device profiles and rules in the installed package (the examples ship as package data).

The wheel is built without build isolation (no download) and unpacked into a folder of its own; it
runs on the system interpreter with the project venv's site-packages as a plain path entry, so the
venv's editable install of the checkout is not seen.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MosquittoServer, free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """(a directory outside the checkout, the environment that runs the installed gateway there)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        origin = ROOT / name
        if origin.is_symlink():
            target.symlink_to(os.readlink(origin))
        elif origin.is_file():
            shutil.copy2(origin, target)
    dist = tmp / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("*.whl")
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{sysconfig.get_paths()['purelib']}",
           "PYTHONNOUSERSITE": "1"}
    yield elsewhere, env


def gateway(*args: str) -> list[str]:
    """The installed console script's entry point, on the base interpreter (not the venv's)."""
    return [sys._base_executable, "-c", "import sys; from gateway.app.cli import main; sys.exit(main())", *args]


def test_the_wheel_carries_the_examples_and_runs_the_installed_copy(installed: tuple[Path, dict[str, str]]) -> None:
    where, env = installed
    probe = subprocess.run([sys._base_executable, "-c", "import gateway.app.config as c; print(c.__file__); "
                            "print(c.Settings().campaigns.dir)"], cwd=where, env=env, capture_output=True,
                           text=True, check=True)
    module, campaigns = probe.stdout.split()
    assert not module.startswith(str(ROOT))  # the installed copy, not the checkout
    assert campaigns.startswith(str(Path(module).parent.parent)) and Path(campaigns, "shoes-dwell-offer.yaml").is_file()


def test_simulate_with_its_default_scenario_runs_from_any_directory(installed: tuple[Path, dict[str, str]]) -> None:
    where, env = installed
    out = subprocess.run(gateway("simulate", "--duration", "10m", "--quiet", "--seed", "1"), cwd=where, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "visits (footfall)" in out.stdout and "advertisements" in out.stdout


def test_demo_runs_from_any_directory_and_stops_cleanly(installed: tuple[Path, dict[str, str]],
                                                        mosquitto: MosquittoServer) -> None:
    where, env = installed
    proc = subprocess.Popen(gateway("demo", "--port", str(free_port()), "--mqtt-port", str(mosquitto.port)),
                            cwd=where, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("Decisions follow"):
                break
        assert any(line.startswith("Admin key") for line in seen), "".join(seen)[-3000:]
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, rest[-3000:]
    assert "stopped." in rest
    assert (where / "data" / "demo" / "gateway.db").exists()  # its data went under the directory it ran in
