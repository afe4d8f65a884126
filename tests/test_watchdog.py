"""systemd's watchdog as the gateway feeds it: READY=1, then WATCHDOG=1 only while the event loop, the database
and the scanner work; STATUS= says why when it stops; STOPPING=1 at the end.

The decision is a pure function (``verdict``) tested on its facts and a clock. Then a real ``gateway run``
with ``NOTIFY_SOCKET`` on a socket the test binds (systemd as PID 1 cannot exist here: the test plays its
part), its SQLite file locked by another process; and a live runtime whose event loop the test blocks.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from beacons.bleak_virtual import VirtualAir
from beacons.scanner import BleakSource, InjectionScanner, ScannerGroup
from gateway.app.ble import ble_retry
from gateway.app.watchdog import (
    Facts,
    Limits,
    Notifier,
    ScannerProgress,
    Watchdog,
    scanner_limit_s,
    scanner_marks,
    verdict,
    watchdog_period,
)
from gateway.delivery.backoff import Backoff
from simulators.scenario import Radio, Receiver
from simulators.virtual_radio import RadioPropagation
from tests.conftest import free_port
from tests.faults import postgresql_refusing, sqlite_locked
from tests.fixtures import RuntimeFactory
from tests.live_gateway import live_settings

ROOT = Path(__file__).resolve().parents[1]
LIMITS = Limits(loop_s=30.0, db_s=60.0, scanner_s=120.0)
WAIT_S = 60.0  # a bound on each wait for a message, never a timing claim


def facts(**kw: float | str | None) -> Facts:
    base: dict[str, object] = {"loop_answered_at": 100.0, "db_ok_at": 100.0, "db_state": "ok",
                               "scanner_progress_at": 100.0, "scanner_state": "running (passive)"}
    return Facts(**{**base, **kw})  # type: ignore[arg-type]


# ---------------------------------------------------------------- the decision


def test_fed_while_the_loop_the_database_and_the_scanner_were_each_well_within_their_limits():
    assert verdict(facts(), LIMITS, 100.0).feed
    assert verdict(facts(loop_answered_at=70.0, db_ok_at=40.0, scanner_progress_at=-20.0), LIMITS, 100.0).feed


def test_a_stuck_event_loop_stops_the_pings_and_says_so():
    v = verdict(facts(loop_answered_at=60.0), LIMITS, 100.0)
    assert not v.feed and v.status == "watchdog not fed: event loop not answering for 40.0 s"


def test_a_database_that_has_not_answered_ok_stops_the_pings_naming_its_state():
    v = verdict(facts(db_ok_at=20.0, db_state="locked"), LIMITS, 100.0)
    assert not v.feed and v.status == "watchdog not fed: database locked for 80.0 s"


def test_a_scanner_with_no_progress_stops_the_pings_but_no_scanner_is_never_judged():
    v = verdict(facts(scanner_progress_at=-30.0, scanner_state="restarting"), LIMITS, 100.0)
    assert not v.feed and v.status == "watchdog not fed: scanner stuck (restarting) for 130.0 s"
    assert verdict(facts(scanner_progress_at=None, scanner_state=""), LIMITS, 100.0).feed


def test_every_failing_condition_is_named_at_once():
    v = verdict(facts(loop_answered_at=0.0, db_ok_at=0.0, db_state="down", scanner_progress_at=-100.0), LIMITS, 100.0)
    assert v.status == ("watchdog not fed: event loop not answering for 100.0 s; database down for 100.0 s; "
                        "scanner stuck (running (passive)) for 200.0 s")


def test_the_limits_follow_watchdog_sec_and_the_scanners_own_cadence():
    assert Limits.for_period(30.0, 120.0) == Limits(loop_s=30.0, db_s=60.0, scanner_s=120.0)
    bleak = BleakSource("hci0", retry=ble_retry())  # 30 s silence watchdog, restarts backed off up to 60 s
    assert scanner_limit_s(bleak) == 2 * 30.0 + 60.0
    assert scanner_limit_s(ScannerGroup([bleak, BleakSource("hci1", retry=ble_retry(), watchdog_s=90.0)])) == 240.0


def test_scanner_progress_is_any_counter_moving():
    bleak = BleakSource("hci0", retry=ble_retry())
    progress = ScannerProgress(bleak, now=10.0)
    assert progress.at(50.0) == 10.0  # nothing moved
    bleak.start_failures += 1  # the adapter is gone, yet its supervisor keeps trying: progress
    assert progress.at(60.0) == 60.0
    bleak.received += 5
    assert progress.at(70.0) == 70.0 and progress.at(200.0) == 70.0
    assert scanner_marks(InjectionScanner()) is None and ScannerProgress(None, 0.0).at(5.0) is None


# ---------------------------------------------------------------- the environment


def test_nothing_runs_outside_a_notify_unit_and_a_watchdog_meant_for_another_pid_is_not_fed():
    assert Watchdog.from_environ({}) is None
    assert Watchdog.from_environ({"NOTIFY_SOCKET": "relative/path"}) is None
    assert watchdog_period({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_period({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert watchdog_period({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_period({"WATCHDOG_USEC": "soon"}) is None and watchdog_period({"WATCHDOG_USEC": "0"}) is None


class Listener:
    """The test's side of NOTIFY_SOCKET: an abstract-namespace datagram socket, read on a thread."""

    def __init__(self) -> None:
        self.name = f"@gateway-test-{secrets.token_hex(6)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.messages: list[str] = []
        self.changed = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            with self.changed:
                self.messages.append(data.decode())
                self.changed.notify_all()

    def wait(self, found: Callable[[list[str]], bool], what: str) -> list[str]:
        """Wait (bounded) until ``found`` holds for the messages so far; return them."""
        with self.changed:
            if not self.changed.wait_for(lambda: found(self.messages), WAIT_S):
                raise AssertionError(f"no {what} in {self.messages[-20:]}")
            return list(self.messages)

    def since(self, n: int) -> list[str]:
        with self.changed:
            return self.messages[n:]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener():
    ear = Listener()
    yield ear
    ear.close()


def count(messages: list[str], field: str) -> int:
    return sum(field in m.split("\n") for m in messages)


def not_fed(messages: list[str], why: str) -> int:
    return sum(any(f.startswith("STATUS=watchdog not fed:") and why in f for f in m.split("\n")) for m in messages)


def test_the_notifier_reaches_an_abstract_socket(listener: Listener):
    n = Notifier(listener.name)
    assert n.send("READY=1", "STATUS=hello")
    assert listener.wait(lambda ms: "READY=1\nSTATUS=hello" in ms, "message")
    n.close()


# ---------------------------------------------------------------- a real gateway


def run_config(tmp_path: Path) -> Path:
    (tmp_path / "campaigns").mkdir()
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'data_dir = "{tmp_path}"\n[database]\nurl = "sqlite:///{tmp_path}/gw.db"\n'
                   f'[api]\nhost = "127.0.0.1"\nport = {free_port()}\n[mqtt]\nenabled = false\n'
                   f'[campaigns]\ndir = "{tmp_path / "campaigns"}"\n')
    return cfg


def test_gateway_run_says_ready_pings_stops_pinging_while_its_database_is_locked_and_says_stopping(
        tmp_path: Path, listener: Listener):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "WATCHDOG_"))}
    env.update(NOTIFY_SOCKET=listener.name, WATCHDOG_USEC="400000")  # a ping every 0.2 s
    proc = subprocess.Popen([sys.executable, "-m", "gateway.app.cli", "run", "--config", str(run_config(tmp_path)),
                             "--no-ble"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        seen = listener.wait(lambda ms: count(ms, "WATCHDOG=1") >= 3, "three pings")
        assert seen[0] == "READY=1\nSTATUS=running"  # nothing before READY=1

        with sqlite_locked(tmp_path / "gw.db"):  # another process holds the write lock: the probe says locked
            start = len(listener.wait(lambda ms: not_fed(ms, "database locked") > 0, "a not-fed status"))
            listener.wait(lambda ms: not_fed(ms[start:], "database locked") >= 3, "three more not-fed ticks")
            assert count(listener.since(start), "WATCHDOG=1") == 0  # none since the first not-fed tick
        back = len(listener.messages)
        after = listener.wait(lambda ms: count(ms[back:], "WATCHDOG=1") >= 2, "pings after the lock went")
        assert "WATCHDOG=1\nSTATUS=running" in after[back:]

        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert listener.wait(lambda ms: "STOPPING=1\nSTATUS=stopping" in ms, "STOPPING=1")[-1] == \
        "STOPPING=1\nSTATUS=stopping"
    assert "Traceback" not in err


async def test_a_blocked_event_loop_stops_the_pings_until_it_answers_again(tmp_path: Path, listener: Listener,
                                                                           runtime_factory: RuntimeFactory):
    await runtime_factory(live_settings(tmp_path), watchdog=Watchdog(Notifier(listener.name), 0.4))
    await asyncio.to_thread(listener.wait, lambda ms: count(ms, "WATCHDOG=1") >= 2, "pings")

    start = len(listener.messages)
    # This coroutine now holds the loop (a blocking wait on it): nothing else runs there until three
    # not-fed ticks have come, and from the first of them on no ping may come.
    listener.wait(lambda ms: not_fed(ms[start:], "event loop not answering") >= 3, "not-fed ticks")
    held = listener.since(start)
    first = next(i for i, m in enumerate(held) if "not fed" in m)
    assert count(held[first:], "WATCHDOG=1") == 0, held

    await asyncio.sleep(0)  # the loop answers again
    back = len(listener.messages)
    again = await asyncio.to_thread(listener.wait, lambda ms: count(ms[back:], "WATCHDOG=1") >= 2, "pings again")
    assert "WATCHDOG=1\nSTATUS=running" in again[back:]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_an_unreachable_postgresql_stops_the_pings_until_it_takes_connections_again(
        tmp_path: Path, listener: Listener, runtime_factory: RuntimeFactory, db_url: str):
    settings = live_settings(tmp_path)
    settings.database.url = db_url
    await runtime_factory(settings, watchdog=Watchdog(Notifier(listener.name), 0.4))
    await asyncio.to_thread(listener.wait, lambda ms: count(ms, "WATCHDOG=1") >= 2, "pings")

    refusing = postgresql_refusing(db_url)  # its open connections cut, new ones refused
    await asyncio.to_thread(refusing.__enter__)
    try:
        seen = await asyncio.to_thread(listener.wait, lambda ms: not_fed(ms, "database down") > 0, "not fed")
        start = len(seen)
        await asyncio.to_thread(listener.wait, lambda ms: not_fed(ms[start:], "database down") >= 3, "more ticks")
        assert count(listener.since(start), "WATCHDOG=1") == 0
    finally:
        await asyncio.to_thread(refusing.__exit__, None, None, None)
    back = len(listener.messages)
    again = await asyncio.to_thread(listener.wait, lambda ms: count(ms[back:], "WATCHDOG=1") >= 2, "pings again")
    assert "WATCHDOG=1\nSTATUS=running" in again[back:]


class HangingStop(asyncio.Event):
    """What a bleak backend's stop() sometimes does on a wedged BlueZ: never return (until the test says)."""


def hanging_backend(air: VirtualAir, hang: HangingStop) -> type:
    base = air.backend()

    async def stop(self: object) -> None:
        await hang.wait()
        await base.stop(self)  # type: ignore[arg-type]

    return type("HangingVirtualScanner", (base,), {"stop": stop})


async def test_a_scanner_whose_restart_hangs_stops_the_pings_until_it_scans_again(
        tmp_path: Path, listener: Listener, runtime_factory: RuntimeFactory):
    rx = Receiver(id="rx", position=(0.0, 0.0), zones=(), measured_power=-59, path_loss_exponent=2.0)
    air = VirtualAir(RadioPropagation({"hci0": rx}, Radio(tx_power=-59, shadowing_sigma_db=0.0,
                                                          advert_interval_s=0.05, loss=0.0), clock=time.time))
    await air.add_adapter("hci0")
    hang = HangingStop()
    # The real BleakSource and bleak over bumble's virtual controller; only the adapter is virtual. Silence for
    # 0.2 s makes its own watchdog restart the scan, and the restart's stop() hangs.
    scanner = BleakSource("hci0", "active", backend=hanging_backend(air, hang), receiver="rx", watchdog_s=0.2,
                          retry=Backoff(base_s=0.05, max_s=0.1, max_attempts=1_000_000))
    try:
        await runtime_factory(live_settings(tmp_path), scanner=scanner,
                              watchdog=Watchdog(Notifier(listener.name), 0.4))
        seen = await asyncio.to_thread(listener.wait, lambda ms: not_fed(ms, "scanner stuck (restarting)") > 0,
                                       "a stuck scanner")
        start = len(seen)
        await asyncio.to_thread(listener.wait, lambda ms: not_fed(ms[start:], "scanner stuck") >= 3, "more ticks")
        assert count(listener.since(start), "WATCHDOG=1") == 0
    finally:
        hang.set()
    back = len(listener.messages)
    again = await asyncio.to_thread(listener.wait, lambda ms: count(ms[back:], "WATCHDOG=1") >= 2, "pings again")
    assert "WATCHDOG=1\nSTATUS=running" in again[back:]  # the restart went through: the scanner moved again


def test_a_standby_says_so_to_systemd_and_is_ready_only_once_it_holds_the_lease(tmp_path: Path, listener: Listener):
    """The unit's start has no time limit (TimeoutStartSec=infinity) because a standby waits for the store's
    lease before READY=1; `systemctl status` shows why it waits."""
    from gateway.storage.lease import Lease

    cfg = run_config(tmp_path)
    held = Lease(f"sqlite:///{tmp_path}/gw.db", "store-001")  # another gateway of the store, this process
    assert held.try_acquire()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "WATCHDOG_"))}
    env.update(NOTIFY_SOCKET=listener.name, WATCHDOG_USEC="400000")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.app.cli", "run", "--config", str(cfg), "--no-ble"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = listener.wait(lambda ms: any(m.startswith("STATUS=standby:") for m in ms), "a standby status")
        assert not count(seen, "READY=1")
        held.release()  # the other gateway went: this one takes over and only now says it is ready
        listener.wait(lambda ms: count(ms, "READY=1") == 1, "READY=1 after the lease")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        held.release()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
