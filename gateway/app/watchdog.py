"""systemd's notify protocol: READY=1, STATUS=, STOPPING=1, and a watchdog fed only while the gateway works.

Under a ``Type=notify`` unit systemd passes ``NOTIFY_SOCKET`` (and, with ``WatchdogSec=``, ``WATCHDOG_USEC``).
Outside one neither is set, ``Watchdog.from_environ`` gives None and nothing here runs: no thread, no socket.

The ping (``WATCHDOG=1``, every ``WATCHDOG_USEC / 2``) comes from a thread of its own, and only while:

- the event loop answered a heartbeat posted with ``call_soon_threadsafe`` within the watchdog period (a
  loop blocked by a stuck call never does);
- the database answered a probe with ``ok`` (the same probe as ``/health``, on another thread, so a probe
  that hangs does not hold up this decision) within two periods;
- the BLE scanner made progress (delivered adverts, restarted its scan, or at least failed a restart: its
  own counters) within its own cadence: two of its silence watchdogs plus its longest restart delay.

When a condition fails the pings stop, each tick says why on ``STATUS=`` (``systemctl status`` shows it)
and systemd kills and restarts the gateway (``Restart=always``) once ``WatchdogSec=`` has passed.
``verdict`` is that decision, a pure function of the facts and the clock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("gateway.watchdog")

SCANNER_COUNTERS = ("received", "restarts", "start_failures", "watchdog_trips", "stale_restarts")
"""BleakSource's counters: any change is progress (an advert heard, a scan restarted, a restart tried)."""
DEFAULT_RESTART_DELAY_S = 60.0  # the longest wait between an adapter's restarts when the scanner does not say


class Notifier:
    """One datagram per message to ``NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace)."""

    def __init__(self, address: str) -> None:
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        else:
            raise ValueError(f"NOTIFY_SOCKET: not a unix socket address: {address!r}")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._lock = threading.Lock()
        self.failures = 0

    def send(self, *fields: str) -> bool:
        """``fields`` as one message (``READY=1``, ``STATUS=...``); False (logged once) if it cannot be sent."""
        data = "\n".join(fields).encode()
        try:
            with self._lock:
                self._sock.sendto(data, self.address)
            return True
        except OSError as exc:
            if not self.failures:
                log.warning("cannot notify systemd on NOTIFY_SOCKET: %s", exc)
            self.failures += 1
            return False

    def close(self) -> None:
        self._sock.close()


def watchdog_period(environ: Mapping[str, str]) -> float | None:
    """``WATCHDOG_USEC`` in seconds, when it is meant for this process (``WATCHDOG_PID``, if set, is us)."""
    usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        period = int(usec) / 1_000_000
    except ValueError:
        log.warning("WATCHDOG_USEC is not a number of microseconds (%r): the watchdog is not fed", usec)
        return None
    return period if period > 0 else None


@dataclass(frozen=True)
class Facts:
    """What the feeder knows at one tick, each as the monotonic time it was last seen well."""

    loop_answered_at: float
    db_ok_at: float
    db_state: str  # the latest probe's answer (ok, locked, full, down, failing), or "not answering" while one hangs
    scanner_progress_at: float | None = None  # None: no scanner to judge (--no-ble, injection)
    scanner_state: str = ""


@dataclass(frozen=True)
class Limits:
    """How old each fact may be, in seconds, before the watchdog goes unfed."""

    loop_s: float
    db_s: float
    scanner_s: float

    @classmethod
    def for_period(cls, period_s: float, scanner_s: float) -> Limits:
        """The loop must answer within one watchdog period, the database within two (a probe that failed
        once does not restart the gateway); the scanner has its own cadence."""
        return cls(loop_s=period_s, db_s=2 * period_s, scanner_s=scanner_s)


@dataclass(frozen=True)
class Verdict:
    feed: bool
    status: str  # what STATUS= says: "running", or why the watchdog is not fed


def verdict(facts: Facts, limits: Limits, now: float) -> Verdict:
    """Feed the watchdog now? Only if the loop, the database and the scanner were each well recently."""
    problems: list[str] = []
    loop_age = now - facts.loop_answered_at
    if loop_age > limits.loop_s:
        problems.append(f"event loop not answering for {loop_age:.1f} s")
    db_age = now - facts.db_ok_at
    if db_age > limits.db_s:
        problems.append(f"database {facts.db_state} for {db_age:.1f} s")
    if facts.scanner_progress_at is not None:
        scan_age = now - facts.scanner_progress_at
        if scan_age > limits.scanner_s:
            problems.append(f"scanner stuck ({facts.scanner_state}) for {scan_age:.1f} s")
    if problems:
        return Verdict(False, "watchdog not fed: " + "; ".join(problems))
    return Verdict(True, "running")


def _members(scanner: Any) -> list[Any]:
    return list(getattr(scanner, "scanners", None) or [scanner])


def scanner_marks(scanner: Any) -> tuple[int, ...] | None:
    """The scanner's progress counters (each adapter's, for a group); None when it keeps none (injection)."""
    if scanner is None:
        return None
    marks = tuple(v for s in _members(scanner) for name in SCANNER_COUNTERS
                  if isinstance(v := getattr(s, name, None), int))
    return marks or None


def scanner_limit_s(scanner: Any) -> float:
    """Two of the scanner's silence watchdogs plus its longest restart delay: a working scanner, even in an
    empty shop or with its adapter gone, moves a counter within that."""
    limits = [2 * float(getattr(s, "watchdog_s", 30.0))
              + float(getattr(getattr(s, "retry", None), "max_s", DEFAULT_RESTART_DELAY_S))
              for s in _members(scanner)]
    return max(limits, default=2 * 30.0 + DEFAULT_RESTART_DELAY_S)


class ScannerProgress:
    """When the scanner last moved one of its counters, by sampling them (no hook into the scanner)."""

    def __init__(self, scanner: Any, now: float) -> None:
        self.scanner = scanner
        self._marks = scanner_marks(scanner)
        self._at = now

    def at(self, now: float) -> float | None:
        """The time of the latest change seen (sampled at ``now``); None when there is no scanner to judge."""
        marks = scanner_marks(self.scanner)
        if marks is None:
            return None
        if marks != self._marks:
            self._marks, self._at = marks, now
        return self._at


class Watchdog:
    """READY=1 once the runtime has started, STOPPING=1 when it stops, and the pings in between."""

    def __init__(self, notifier: Notifier, period_s: float | None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.notifier = notifier
        self.period_s = period_s
        self._clock = clock
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._probe: Callable[[], str] = lambda: "ok"
        self._scanner: Any = None
        self._answered = self._db_ok = 0.0
        self._progress = ScannerProgress(None, 0.0)
        self._db_state = "ok"
        self._probing_since: float | None = None  # a probe under way since then
        self._status = ""
        self.pings = 0
        self.limits: Limits | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Watchdog | None:
        """The watchdog systemd asked for, or None outside a notify unit (then nothing is ever sent)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        try:
            notifier = Notifier(address)
        except ValueError as exc:
            log.warning("%s: systemd is not notified", exc)
            return None
        return cls(notifier, watchdog_period(env))

    def start(self, loop: asyncio.AbstractEventLoop, db_probe: Callable[[], str], scanner: Any = None) -> None:
        """Say READY=1 (the runtime is up: /health/ready answers 200) and, with a period, start feeding."""
        now = self._clock()
        self._loop, self._probe, self._scanner = loop, db_probe, scanner
        self._answered = self._db_ok = now
        self._progress = ScannerProgress(scanner, now)
        self._status = "running"
        self.notifier.send("READY=1", "STATUS=running")
        if self.period_s is None:
            return
        self.limits = Limits.for_period(self.period_s, scanner_limit_s(scanner))
        log.info("systemd watchdog: a ping every %.1f s while the event loop (%.0f s), the database (%.0f s)%s answer",
                 self.period_s / 2, self.limits.loop_s, self.limits.db_s,
                 f" and the scanner ({self.limits.scanner_s:.0f} s)" if self._progress.at(now) is not None else "")
        for target, name in ((self._feed, "gateway-watchdog"), (self._probe_db, "gateway-watchdog-db")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """STOPPING=1 first (systemd then expects the exit, not a ping), then the threads end. Once."""
        if self._stop.is_set():
            return
        self.notifier.send("STOPPING=1", "STATUS=stopping")
        self._stop.set()
        feeder = next((t for t in self._threads if t.name == "gateway-watchdog"), None)
        if feeder is not None:  # it wakes at once; the database's prober may sit in a hung probe: not waited for
            feeder.join(2.0)
        self._threads.clear()
        if feeder is None or not feeder.is_alive():
            self.notifier.close()

    def facts(self, now: float) -> Facts:
        scanned = self._progress.at(now)
        scanner_state = "" if scanned is None else str(self._scanner.state())
        db = self._db_state
        since = self._probing_since
        if since is not None and self.limits is not None and now - since > self.limits.db_s:
            db = "not answering"  # the probe hangs (a connection that never completes), not merely waits
        return Facts(loop_answered_at=self._answered, db_ok_at=self._db_ok, db_state=db,
                     scanner_progress_at=scanned, scanner_state=scanner_state)

    def tick(self) -> Verdict:
        """One decision, and what it sends: WATCHDOG=1 when fed (STATUS= when it changed), else STATUS=why."""
        assert self.limits is not None
        now = self._clock()
        v = verdict(self.facts(now), self.limits, now)
        if v.feed:
            fields = ["WATCHDOG=1"]
            if v.status != self._status:
                fields.append(f"STATUS={v.status}")
                log.info("watchdog fed again: the gateway is running")
            self.notifier.send(*fields)
            self.pings += 1
        else:
            if not self._status.startswith("watchdog not fed"):
                log.warning("%s: systemd restarts the gateway if this lasts", v.status)
            self.notifier.send(f"STATUS={v.status}")  # every tick: the ages say how long it has lasted
        self._status = v.status
        return v

    def _beat(self) -> None:
        """On the loop: it answered."""
        self._answered = self._clock()

    def _feed(self) -> None:
        assert self.period_s is not None and self._loop is not None
        interval = self.period_s / 2
        self._post_beat()
        while not self._stop.wait(interval):
            self.tick()
            if not self._post_beat():
                return

    def _post_beat(self) -> bool:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._beat)
        except RuntimeError:  # the loop is closed: the process is on its way out
            return False
        return True

    def _probe_db(self) -> None:
        assert self.period_s is not None
        interval = self.period_s / 2
        while not self._stop.is_set():
            self._probing_since = self._clock()
            try:
                state = self._probe()
            except Exception as exc:  # the probe's own failure is the database's state to report
                state = f"probe failed ({type(exc).__name__})"
            self._db_state, self._probing_since = state, None
            if state == "ok":
                self._db_ok = self._clock()
            if self._stop.wait(interval):
                return
