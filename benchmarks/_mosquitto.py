"""Shared by the benchmarks that need a broker: a Mosquitto of their own on a free loopback port.

It queues without limit (``max_queued_messages 0``): nothing a benchmark publishes is dropped by the broker,
so a loss it measures is the gateway's. (The tests' own broker is tests/conftest.py's, with pytest's errors.)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A Mosquitto process on 127.0.0.1:``port``, started at once; ``window``: its max_inflight_messages."""

    def __init__(self, workdir: Path, window: int | None = None) -> None:
        self.port = free_port()
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "max_queued_messages 0\nmax_queued_bytes 0\n"
                        + (f"max_inflight_messages {window}\n" if window is not None else ""))
        self.log = (workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.02)  # a process starting up: polled, bounded by the deadline
        self.stop()
        raise RuntimeError(f"mosquitto did not start; its log: {workdir / 'mosquitto.log'}")

    def cpu_s(self) -> float:
        """The broker's CPU time so far (user + system), from /proc; 0 where there is none."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        self.log.close()
