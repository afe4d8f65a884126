"""Where advertisements come from: one interface, several sources (as bleak has backends).

- ``InjectionScanner``: the simulator or a test hands advertisements in directly.
- ``BleakSource``: a real adapter through bleak (BlueZ on a Pi), passive with or_patterns, kept
  alive by a watchdog and restarts with backoff; any bleak backend, e.g. ``beacons.bleak_virtual``.
- ``ScannerGroup``: several sources (one per adapter) behind one interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from beacons.types import Advertisement

log = logging.getLogger("gateway.scanner")

Sink = Callable[[Advertisement], None]


class ScannerUnavailable(RuntimeError):
    """The radio cannot be used; the message says which adapter and what to do."""


class Scanner(Protocol):
    name: str

    async def start(self, sink: Sink) -> None: ...

    async def stop(self) -> None: ...

    def state(self) -> str: ...


class InjectionScanner:
    """Direct injection: the same door as a radio, without one."""

    name = "injection"

    def __init__(self) -> None:
        self._sink: Sink | None = None

    async def start(self, sink: Sink) -> None:
        self._sink = sink

    async def stop(self) -> None:
        self._sink = None

    def state(self) -> str:
        return "running" if self._sink is not None else "stopped"

    def inject(self, adverts: Iterable[Advertisement]) -> int:
        sink = self._sink
        if sink is None:
            raise RuntimeError("the scanner is not started")
        n = 0
        for adv in adverts:
            sink(adv)
            n += 1
        return n


def _or_patterns() -> list[Any]:
    """Advertisement prefixes BlueZ should pass to us in passive mode: the beacon formats we parse."""
    from bleak.args.bluez import OrPattern
    from bleak.assigned_numbers import AdvertisementDataType

    return [
        OrPattern(0, AdvertisementDataType.MANUFACTURER_SPECIFIC_DATA, b"\x4c\x00\x02\x15"),  # iBeacon
        OrPattern(2, AdvertisementDataType.MANUFACTURER_SPECIFIC_DATA, b"\xbe\xac"),  # AltBeacon
        OrPattern(0, AdvertisementDataType.SERVICE_DATA_UUID16, b"\xaa\xfe"),  # Eddystone
    ]


class RetryDelays(Protocol):
    """How long a failed restart waits: ``delay(attempts)`` seconds after ``attempts`` failures in a row (1 for
    the first). The entry points pass the gateway's one backoff (``gateway.delivery.backoff.Backoff``)."""

    def delay(self, attempts: int) -> float: ...


Sleep = Callable[[float], Awaitable[Any]]


def receiver_check(receiver: str, configured: Iterable[str]) -> str | None:
    """A warning when an adapter's receiver id matches no ``[[receivers]]`` entry, else None.

    Presence drops sightings from unknown receivers (``unknown_receiver``), so a mismatch would
    silently make the gateway blind; say so once, at start.
    """
    ids = sorted(set(configured))
    if not ids or receiver in ids:
        return None
    return (f"BLE receiver id {receiver!r} matches no [[receivers]] entry ({', '.join(ids)}): its sightings "
            "will be dropped; set [ble] receiver to one of them")


STALE_TRACK_S = 30.0  # staleness check: tags reported within this long count as being tracked
HEARD_MAX = 4096  # ... at most this many addresses


class BleakSource:
    """The gateway's own adapter through bleak, kept alive.

    - Passive scanning with ``or_patterns`` needs BlueZ's AdvertisementMonitor (BlueZ >= 5.56 with
      ``--experimental``, kernel >= 5.10); when it is refused we scan actively and say so at start.
    - A watchdog restarts the scan when nothing arrives for ``watchdog_s`` (BlueZ can stop delivering
      without any error); a restart that fails (adapter gone, busy, resetting) is retried after
      ``retry``'s delays (the entry points give a capped exponential backoff with jitter) until it works
      or the source is stopped.
    - ``sleep`` and ``clock`` are injectable so tests drive the watchdog and backoff without waiting.

    Only the first start fails loudly (``ScannerUnavailable``), so ``gateway run`` exits with a clear
    message on a box without a usable adapter instead of retrying forever in silence.
    """

    name = "bleak"

    def __init__(self, adapter: str = "hci0", scanning_mode: str = "passive",
                 backend: type[Any] | None = None, *, retry: RetryDelays, receiver: str | None = None,
                 watchdog_s: float = 30.0, sleep: Sleep | None = None, clock: Callable[[], float] | None = None,
                 stale_after_s: float = 0.0) -> None:
        if scanning_mode not in ("passive", "active"):
            raise ValueError(f"scanning_mode must be 'passive' or 'active', not {scanning_mode!r}")
        if watchdog_s <= 0:
            raise ValueError("watchdog_s must be > 0")
        if stale_after_s < 0:
            raise ValueError("stale_after_s must be >= 0")
        self.stale_after_s = float(stale_after_s)
        self._heard: dict[str, float] = {}  # address -> last report (passive staleness check), bounded
        self._opened_at = 0.0
        self.stale_restarts = 0
        self.adapter = adapter
        self.receiver = receiver or adapter
        self.scanning_mode = scanning_mode
        self.backend = backend
        self.watchdog_s = float(watchdog_s)
        self.retry = retry
        self._sleep: Sleep = sleep or asyncio.sleep
        self._clock = clock or time.time
        self._scanner: Any = None
        self._sink: Sink | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._state = "stopped"
        self.mode: str | None = None  # the mode actually scanning: "passive" or "active"
        self._last_seen = 0.0
        self.received = 0
        self.watchdog_trips = 0
        self.restarts = 0
        self.start_failures = 0
        self.delays: list[float] = []  # backoff delays slept, most recent last (bounded)

    def state(self) -> str:
        return self._state

    def _make(self, mode: str) -> Any:
        from bleak import BleakScanner

        bluez: dict[str, Any] = {"adapter": self.adapter}
        if mode == "passive":
            bluez["or_patterns"] = _or_patterns()
        else:
            # BlueZ signals ManufacturerData/ServiceData (and so a fresh RSSI) for every advert only with
            # DuplicateData=True; bleak's default (False) reports a beacon's unchanging bytes once.
            bluez["filters"] = {"DuplicateData": True}
        kwargs: dict[str, Any] = {"scanning_mode": mode, "bluez": bluez}
        if self.backend is not None:
            kwargs["backend"] = self.backend
        return BleakScanner(self._on_advert, **kwargs)

    def _on_advert(self, device: Any, data: Any) -> None:
        sink = self._sink
        if sink is None:
            return
        now = self._clock()
        self._last_seen = now
        self.received += 1
        if self.stale_after_s:
            heard = self._heard
            if len(heard) < HEARD_MAX or device.address in heard:
                heard[device.address] = now
        sink(Advertisement(address=device.address, rssi=int(data.rssi), time=now, receiver=self.receiver,
                           manufacturer_data=dict(data.manufacturer_data), service_data=dict(data.service_data)))

    async def _open(self) -> str:
        """Start scanning in the preferred mode, falling back to active; the mode used, or raise the last error."""
        modes = [self.scanning_mode] + (["active"] if self.scanning_mode == "passive" else [])
        last: BaseException | None = None
        for mode in modes:
            scanner = None
            try:
                scanner = self._make(mode)
                await scanner.start()
            except Exception as exc:
                last = exc
                log.debug("scanning %s on %s failed: %r", mode, self.adapter, exc)
                if scanner is not None:
                    with contextlib.suppress(Exception):
                        await scanner.stop()
                continue
            self._scanner = scanner
            if mode != self.mode:
                if mode == "passive":
                    log.info("scanning on %s: passive mode (BlueZ advertisement monitor with or_patterns)",
                             self.adapter)
                elif self.scanning_mode == "passive":
                    log.warning("scanning on %s: active mode, because passive was refused (%s)", self.adapter, last)
                else:
                    log.info("scanning on %s: active mode", self.adapter)
            self.mode = mode
            self._last_seen = self._opened_at = self._clock()
            self._state = f"running ({mode})"
            return mode
        assert last is not None
        raise last

    async def start(self, sink: Sink) -> None:
        self._sink = sink
        try:
            await self._open()
        except Exception as last:
            self._state = "unavailable"
            self._sink = None
            if isinstance(last, FileNotFoundError):
                cause = "BlueZ is not reachable (no D-Bus system bus: is bluetoothd running?)"
            else:
                cause = f"{type(last).__name__}: {last}"
            raise ScannerUnavailable(
                f"Bluetooth adapter {self.adapter!r} cannot scan: {cause}; check `bluetoothctl list`, "
                "choose another with --adapter hciN, or run without BLE using --no-ble"
            ) from last
        self._supervisor = asyncio.create_task(self._supervise(), name=f"scanner-{self.adapter}")

    async def _close_scanner(self) -> None:
        scanner, self._scanner = self._scanner, None
        if scanner is not None:
            try:
                await scanner.stop()
            except Exception as exc:  # a vanished adapter cannot be stopped cleanly; we start afresh anyway
                log.debug("stopping the scanner on %s: %s", self.adapter, exc)

    async def _supervise(self) -> None:
        """The watchdog: restart the scan after ``watchdog_s`` of silence, or when tags go stale (passive)."""
        check = self.watchdog_s / 4.0
        if self.stale_after_s:
            check = min(check, self.stale_after_s / 2.0)
        while True:
            await self._sleep(check)
            idle = self._clock() - self._last_seen
            if idle >= self.watchdog_s:
                self.watchdog_trips += 1
                log.warning("nothing received on %s for %.0f s: restarting the scan", self.adapter, idle)
                await self.restart()
            elif self._stale():
                self.stale_restarts += 1
                log.info("most tags on %s went quiet for %.0f s (the controller's duplicate filter?): restarting "
                         "the scan", self.adapter, self.stale_after_s)
                await self.restart()

    def _stale(self) -> bool:
        """Passive scans on Linux filter duplicates in the controller: each tag is reported once per scan.

        The sign is tags heard recently that stopped being reported while the scan runs. When at
        least half of those heard in the last ``STALE_TRACK_S`` have been quiet for ``stale_after_s``,
        a restart (which clears the filter) is cheaper than letting presence exit them all.
        """
        if not self.stale_after_s or self.mode != "passive" or self._scanner is None:
            return False
        now = self._clock()
        heard = self._heard
        for address in [a for a, t in heard.items() if now - t > STALE_TRACK_S]:
            del heard[address]
        if not heard or now - self._opened_at < self.stale_after_s:
            return False
        quiet = sum(1 for t in heard.values() if now - t >= self.stale_after_s)
        return quiet * 2 >= len(heard)

    async def restart(self) -> None:
        """Stop and start the scan again, retrying with backoff until it works (or we are cancelled)."""
        self._state = "restarting"
        await self._close_scanner()
        attempt = 0
        while True:
            try:
                await self._open()
            except Exception as exc:
                self.start_failures += 1
                attempt += 1
                delay = self.retry.delay(attempt)
                self.delays = [*self.delays[-31:], delay]
                self._state = f"retrying ({type(exc).__name__}: {exc})"
                log.warning("adapter %s cannot scan (%s: %s): retry %d in %.1f s",
                            self.adapter, type(exc).__name__, exc, attempt, delay)
                await self._sleep(delay)
                continue
            self.restarts += 1
            log.info("scan restarted on %s after %d failed attempt(s)", self.adapter, attempt)
            return

    async def stop(self) -> None:
        task, self._supervisor = self._supervisor, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close_scanner()
        self._sink = None
        self._state = "stopped"


class ScannerGroup:
    """Several scanners behind one ``Scanner``: e.g. one ``BleakSource`` per adapter."""

    name = "group"

    def __init__(self, scanners: Iterable[Scanner]) -> None:
        self.scanners = list(scanners)
        self._started: list[Scanner] = []

    async def start(self, sink: Sink) -> None:
        try:
            for s in self.scanners:
                await s.start(sink)
                self._started.append(s)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        started, self._started = self._started, []
        for s in reversed(started):
            await s.stop()

    def state(self) -> str:
        return ", ".join(f"{getattr(s, 'receiver', s.name)}: {s.state()}" for s in self.scanners)
