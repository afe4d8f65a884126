"""`gateway run` prints a one-time dashboard link that signs in once; its token never reaches the logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "dashboard (a one-time sign-in link): "


def run_config(tmp_path: Path, port: int) -> Path:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'data_dir = "{tmp_path}"\n[database]\nurl = "sqlite:///{tmp_path}/gw.db"\n'
                   f'[api]\nhost = "127.0.0.1"\nport = {port}\n[mqtt]\nenabled = false\n[ble]\nenabled = false\n'
                   f'[campaigns]\ndir = "{ROOT / "examples/campaigns"}"\n')
    return cfg


@contextmanager
def running_gateway(cfg: Path, **env: str) -> Iterator[tuple[subprocess.Popen[str], list[str], list[str]]]:
    """`gateway run` in a process of its own, once it printed its dashboard line: (the process, its stdout
    lines so far, and its stderr once it stopped). The caller stops it (SIGINT); a leftover is killed."""
    proc = subprocess.Popen([sys.executable, "-m", "gateway.app.cli", "run", "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    lines: list[str] = []
    err: list[str] = []
    seen = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("dashboard"):
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert seen.wait(30), "gateway run printed no dashboard line"  # a bound, not a timing claim
        yield proc, lines, err
    finally:
        if proc.poll() is None:
            proc.kill()
        err.append(proc.communicate(timeout=30)[1])


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)


def test_run_prints_a_link_that_signs_in_once(tmp_path: Path) -> None:
    port = free_port()
    with running_gateway(run_config(tmp_path, port)) as (proc, lines, err):
        [link] = [line[len(PREFIX):].strip() for line in lines if line.startswith(PREFIX)]
        assert link.startswith(f"http://127.0.0.1:{port}/dashboard/login?token=")
        first = httpx.get(link, timeout=10)
        assert first.status_code == 303 and first.headers["location"] == "/dashboard"
        cookie = first.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/dashboard" in cookie
        assert httpx.get(link, timeout=10).status_code == 401  # spent
        stop(proc)
    assert proc.returncode == 0, err[0][-2000:]
    token = link.split("token=")[1]
    assert token not in err[0] and "Traceback" not in err[0]


def test_under_systemd_the_journal_gets_no_sign_in_link(tmp_path: Path) -> None:
    """systemd sets JOURNAL_STREAM when stdout is the journal, which keeps what it is given: a one-time link
    printed there would be a token in the logs. The address alone goes out; staff sign in with a key."""
    port = free_port()
    with running_gateway(run_config(tmp_path, port), JOURNAL_STREAM="8:12345") as (proc, lines, err):
        stop(proc)
    printed = "".join(lines) + err[0]
    assert f"dashboard: http://127.0.0.1:{port}/dashboard (sign in with an admin API key)" in printed
    assert "token=" not in printed and "one-time" not in printed


def test_a_broken_walks_file_stops_run_with_one_line_naming_it(tmp_path: Path) -> None:
    walks = tmp_path / "dashboard" / "walks.json"
    walks.parent.mkdir()
    walks.write_text('{"walks": [\n oops\n]}\n')
    r = subprocess.run([sys.executable, "-m", "gateway.app.cli", "run", "--config", str(run_config(tmp_path, 0))],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"gateway run: {walks}:2: not JSON" in r.stderr
    assert walks.read_text() == '{"walks": [\n oops\n]}\n'  # left as it was
