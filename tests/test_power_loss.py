"""Power loss in a loop: the gateway is killed with SIGKILL fifty times while it writes, and restarted on
the same SQLite file each time.

What the shop relies on after each of those power cuts:

- the database file is sound (``PRAGMA integrity_check`` says ``ok``; WAL recovery does its job);
- every API write the gateway answered (a ``201`` for a new profile) is in the database: it answers only
  after the commit;
- every telemetry reading the broker took from a device ends in the database exactly once: the gateway
  acknowledges a message to the broker only after its commit, so what a kill cuts short the broker
  (persistent session, fixed client id) hands to the next run; a redelivery is a counted duplicate, not
  a second row.

Real parts: the suite's Mosquitto, a gateway subprocess (tests/power_gateway.py: Runtime, uvicorn,
intake), a paho publisher with a persistent session, an httpx client. Each round is bounded (the kill
comes within 0.2 s of the run's first answered write, while both writers keep going), so fifty rounds
take about half a minute on an idle machine.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import random
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devices.topics import telemetry_topic
from tests.conftest import MosquittoServer, free_port
from tests.power_gateway import ADMIN_KEY

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = int(os.environ.get("POWER_LOSS_ROUNDS", "50"))
DEVICES = 10
T0 = 1_767_261_600.0


class Publisher(threading.Thread):
    """A device fleet: QoS 1 readings with a sequence number, as fast as the broker takes them, until
    stopped. ``acked`` holds the sequence numbers the broker acknowledged (paho's is_published)."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        super().__init__(daemon=True)
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"pub-{secrets.token_hex(4)}", protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(50)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect(host, port, keepalive=10, clean_start=False, properties=props)
        self.client.loop_start()
        self.prefix = prefix
        self.infos: list[tuple[int, mqtt.MQTTMessageInfo]] = []
        self.running = threading.Event()
        self.stopped = threading.Event()
        self.seq = 0

    def run(self) -> None:
        while not self.stopped.is_set():
            if not self.running.wait(0.05):
                continue
            i = self.seq
            body = json.dumps({"ts": T0 + i, "seq": i, "metrics": {"battery_pct": i % 100}})
            info = self.client.publish(telemetry_topic("s1", f"dev-{i % DEVICES}", self.prefix), body, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                time.sleep(0.01)
                continue
            self.infos.append((i, info))
            self.seq += 1
            if i % 20 == 19:  # a paced stream, not thousands queued in paho's memory
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(0.5)

    def acked(self) -> set[int]:
        return {i for i, info in list(self.infos) if info.is_published()}

    def close(self) -> None:
        self.stopped.set()
        self.join(5)
        self.client.disconnect()
        self.client.loop_stop()


class ApiWriter(threading.Thread):
    """The API's clients: new profiles, one after another, while ``running``; ``acked`` holds the external
    ids the gateway answered 201 for (a request the kill cut off may or may not have been committed)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2.0,
                                 headers={"X-API-Key": ADMIN_KEY})
        self.running = threading.Event()
        self.stopped = threading.Event()
        self.acked: set[str] = set()
        self.errors: list[str] = []
        self.n = 0

    def run(self) -> None:
        while not self.stopped.is_set():
            if not self.running.wait(0.05):
                continue
            ext = f"p{self.n}"
            self.n += 1
            try:
                r = self.http.post("/v1/profiles", json={"external_id": ext, "consents": {"offers": True}})
            except httpx.HTTPError as exc:
                self.errors.append(repr(exc))
                time.sleep(0.01)
                continue
            if r.status_code == 201:
                self.acked.add(ext)
            else:
                self.errors.append(f"{r.status_code} {r.text[:200]}")

    def answered_more_than(self, n: int) -> bool:
        return len(self.acked) > n

    def close(self) -> None:
        self.stopped.set()
        self.join(5)
        self.http.close()


class Gateway:
    """tests/power_gateway.py: one process that has loaded the code, forking a gateway per run."""

    def __init__(self, args: list[str], err: Path) -> None:
        self._err = err.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.power_gateway", *args], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.pid = 0
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, out: IO[str]) -> None:
        for line in out:
            self.lines.put(line.strip())

    def _line(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return ""

    def start(self, timeout: float = 30.0) -> None:
        """A new gateway on the same database, port and MQTT session; back when it is ready."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("start\n")
        self.proc.stdin.flush()
        line = self._line(timeout)
        assert line.startswith("PID "), f"no gateway forked ({line!r}): {self.errors()}"
        self.pid = int(line.split()[1])
        line = self._line(timeout)
        assert line == "READY", f"gateway not ready ({line!r}): {self.errors()}"

    def errors(self) -> str:
        self._err.flush()
        return Path(self._err.name).read_text()[-2000:]

    def kill9(self) -> None:
        """The power cut: SIGKILL, then wait until the process is gone."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            line = self._line(10)
            assert line == "EXIT", f"the gateway did not die ({line!r})"
            self.pid = 0

    def close(self) -> None:
        self.kill9()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._err.close()


def read_db(db: Path) -> tuple[str, set[str], list[int]]:
    """integrity_check's verdict, the profiles' external ids, and every stored reading's sequence number."""
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
        profiles = {row[0] for row in conn.execute("SELECT external_id FROM profiles")}
        seqs = [int(row[0][1:]) for row in conn.execute("SELECT key FROM readings")]
    return verdict, profiles, seqs


def stored_all(db: Path, seqs: set[int]) -> bool:
    return seqs <= set(read_db(db)[2])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_fifty_power_cuts_during_writes_keep_the_database_sound_and_lose_nothing_acknowledged(
    tmp_path: Path, mosquitto: MosquittoServer, record_property: Any
) -> None:
    db, port, prefix = tmp_path / "gw.db", free_port(), f"p{secrets.token_hex(3)}"
    args = ["--db", str(db), "--port", str(port), "--data-dir", str(tmp_path), "--prefix", prefix,
            "--broker", f"{mosquitto.host}:{mosquitto.port}", "--client-id", f"gw-{secrets.token_hex(4)}"]
    rng = random.Random(7)
    publisher, writer = Publisher(mosquitto.host, mosquitto.port, prefix), ApiWriter(port)
    publisher.start()
    writer.start()
    gateway = Gateway(args, tmp_path / "gateway.err")
    started = time.monotonic()
    try:
        for n in range(ROUNDS):
            gateway.start()
            if n:  # what the broker took before the last cut reaches the database after the restart
                before = publisher.acked()
                wait_until(functools.partial(stored_all, db, before), 20,
                           f"round {n}: the readings acknowledged before the cut to be stored")
            posted = len(writer.acked)
            publisher.running.set()
            writer.running.set()
            wait_until(functools.partial(writer.answered_more_than, posted), 20, f"round {n}: an answered write")
            time.sleep(rng.uniform(0.0, 0.2))  # writes in flight (the writer never pauses), then the power goes
            gateway.kill9()
            writer.running.clear()
            publisher.running.clear()
            verdict, profiles, seqs = read_db(db)
            assert verdict == "ok", f"round {n}: {verdict}"
            lost = writer.acked - profiles
            assert not lost, f"round {n}: answered 201 but not in the database: {sorted(lost)}"
            assert len(seqs) == len(set(seqs)), f"round {n}: a reading stored twice"
        gateway.start()  # the last run drains what the broker kept
        wait_until(lambda: publisher.acked() <= set(read_db(db)[2]), 30, "every acknowledged reading stored")
        verdict, profiles, seqs = read_db(db)
    finally:
        writer.close()
        publisher.close()
        gateway.close()
    record_property("power_loss_rounds_s", round(time.monotonic() - started, 1))
    assert verdict == "ok"
    assert writer.acked <= profiles
    assert sorted(seqs) == sorted(set(seqs)) and publisher.acked() <= set(seqs)
    assert len(publisher.acked()) > ROUNDS and len(writer.acked) > ROUNDS, writer.errors[:3]  # real work in every run
