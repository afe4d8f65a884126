"""Where advertisements come from: one interface, several sources (as bleak has backends).

- ``InjectionScanner``: the simulator or a test hands advertisements in directly.
- ``BleakSource``: a real adapter through bleak (BlueZ on a Pi), passive with or_patterns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
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


class BleakSource:
    """The gateway's own adapter through bleak.

    Passive scanning needs BlueZ's experimental AdvertisementMonitor (BlueZ >= 5.56 with
    ``--experimental``); when it is refused we fall back to active scanning and say so.
    """

    name = "bleak"

    def __init__(self, adapter: str = "hci0", scanning_mode: str = "passive",
                 backend: type[Any] | None = None) -> None:
        self.adapter = adapter
        self.scanning_mode = scanning_mode
        self.backend = backend
        self._scanner: Any = None
        self._state = "stopped"

    def state(self) -> str:
        return self._state

    def _make(self, sink: Sink, mode: str) -> Any:
        from bleak import BleakScanner

        def on_advert(device: Any, data: Any) -> None:
            sink(Advertisement(address=device.address, rssi=int(data.rssi), time=_now(),
                               receiver=self.adapter, manufacturer_data=dict(data.manufacturer_data),
                               service_data=dict(data.service_data)))

        bluez: dict[str, Any] = {"adapter": self.adapter}
        if mode == "passive":
            bluez["or_patterns"] = _or_patterns()
        kwargs: dict[str, Any] = {"scanning_mode": mode, "bluez": bluez}
        if self.backend is not None:
            kwargs["backend"] = self.backend
        return BleakScanner(on_advert, **kwargs)

    async def start(self, sink: Sink) -> None:
        modes = [self.scanning_mode] + (["active"] if self.scanning_mode == "passive" else [])
        last: BaseException | None = None
        for mode in modes:
            try:
                self._scanner = self._make(sink, mode)
                await self._scanner.start()
            except Exception as exc:
                last = exc
                log.debug("scanning %s on %s failed: %r", mode, self.adapter, exc)
                continue
            self._state = f"running ({mode})"
            log.info("scanning on %s, %s mode", self.adapter, mode)
            return
        self._state = "unavailable"
        if isinstance(last, FileNotFoundError):
            cause = "BlueZ is not reachable (no D-Bus system bus: is bluetoothd running?)"
        else:
            cause = f"{type(last).__name__}: {last}"
        raise ScannerUnavailable(
            f"Bluetooth adapter {self.adapter!r} cannot scan: {cause}; "
            "check `bluetoothctl list`, choose another with --adapter hciN, or run without BLE using --no-ble"
        )

    async def stop(self) -> None:
        if self._scanner is not None:
            try:
                await self._scanner.stop()
            except Exception as exc:
                log.debug("stopping the scanner: %s", exc)
        self._scanner = None
        self._state = "stopped"


def _now() -> float:
    import time

    return time.time()
