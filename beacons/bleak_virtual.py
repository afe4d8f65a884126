"""A bleak backend over bumble's virtual controller: the real bleak path, without a radio.

``VirtualAir`` is one bumble ``LocalLink``: the air of the shop. Beacons are bumble ``Device``s,
each on its own virtual ``Controller``, advertising raw AD bytes (non-connectable, legacy PDUs).
Adapters (``hci0``...) are bumble ``Device``s whose controller scans. ``VirtualAir.backend()``
returns a ``BaseBleakScanner`` subclass bound to the air, to pass as ``BleakScanner(backend=...)``.

RSSI: bumble's controller reports every advert at -50 dBm and, even when scanning passively,
echoes each advert as a scan response too. So the link here delivers each advertising PDU to
each scanning adapter itself, exactly once, as an HCI LE Advertising Report carrying the RSSI
that the air's *propagation* function returns for (advertiser address, adapter name); ``None``
means the adapter does not hear that advert (out of range, lost). The report crosses bumble's
real HCI path (serialized to bytes, parsed by the adapter's host), bumble emits an
``advertisement`` event, and the backend turns it into bleak's ``AdvertisementData`` the way
bleak's BlueZ backend fills it (manufacturer data by company id, service data by 128-bit UUID).
``simulators/virtual_radio.py`` provides the propagation from the simulator's radio model.

Faults, for the gateway's restart logic: ``VirtualAdapter.unplug()`` (nothing delivered, starts
fail with bleak's "adapter not found"), ``stall()`` (delivery stops silently until the scan is
restarted, as BlueZ sometimes does), ``fail_starts`` (the next N starts raise), and
``VirtualAir(passive_supported=False)`` (a BlueZ without ``--experimental``: passive start refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid as uuidlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from bleak.backends.scanner import AdvertisementData, AdvertisementDataCallback, BaseBleakScanner
from bleak.exc import BleakError
from bleak.uuids import normalize_uuid_16, normalize_uuid_32
from bumble import hci
from bumble.controller import Controller
from bumble.core import AdvertisingData
from bumble.device import Advertisement as BumbleAdvertisement
from bumble.device import AdvertisingType, Device
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

#: (advertiser address, adapter name) -> RSSI in dBm heard by that adapter, or None if not heard.
Propagation = Callable[[str, str], int | None]

#: What BlueZ answers when the AdvertisementMonitor API is missing (bleak's own wording).
PASSIVE_REFUSED = ("passive scanning on Linux requires BlueZ >= 5.56 with --experimental enabled "
                   "and Linux kernel >= 5.10")

_FIXED_RSSI = -60


def _fixed(_address: str, _adapter: str) -> int:
    return _FIXED_RSSI


class _AirLink(LocalLink):
    """A LocalLink that delivers adverts to scanning adapters only, with propagated RSSI."""

    def __init__(self, air: VirtualAir) -> None:
        super().__init__()
        self._air = air

    def send_advertising_pdu(self, sender_controller: Controller, packet: Any) -> None:
        data = getattr(packet, "data", None)
        if data is None:  # connection requests etc.: this air carries adverts only
            return
        address = packet.advertiser_address.to_string(False)
        loop = asyncio.get_running_loop()
        for adapter in self._air.adapters():
            rx = adapter.controller
            if rx is sender_controller or not adapter.delivering:
                continue
            rssi = self._air.propagation(address, adapter.name)
            if rssi is not None:
                loop.call_soon(rx.on_air_advert, packet.advertiser_address, bytes(data), rssi)


class ReceiverController(Controller):
    """A controller that reports each advert once, with the RSSI the air gives it.

    ``duplicate_filter`` mimics the controller-level duplicate filter Linux enables for passive
    scanning: an (address, data) pair is reported once until scanning is enabled again.
    """

    def __init__(self, name: str, link: LocalLink, *, duplicate_filter: bool = False) -> None:
        super().__init__(name, link=link)
        self.duplicate_filter = duplicate_filter
        self._seen: set[tuple[str, bytes]] = set()

    def on_air_advert(self, address: hci.Address, data: bytes, rssi: int) -> None:
        if not self.le_scan_enable:
            return
        if self.duplicate_filter:
            key = (address.to_string(False), data)
            if key in self._seen:
                return
            self._seen.add(key)
        report = hci.HCI_LE_Advertising_Report_Event.Report(
            event_type=hci.HCI_LE_Advertising_Report_Event.EventType.ADV_NONCONN_IND,
            address_type=address.address_type, address=address, data=data,
            rssi=max(-127, min(20, int(rssi))))
        self.send_hci_packet(hci.HCI_LE_Advertising_Report_Event([report]))

    def on_hci_le_set_scan_enable_command(self, command: Any) -> Any:
        self._seen.clear()
        return super().on_hci_le_set_scan_enable_command(command)

    def on_hci_le_set_extended_scan_enable_command(self, command: Any) -> Any:
        self._seen.clear()
        return super().on_hci_le_set_extended_scan_enable_command(command)


def _device(name: str, address: str, controller: Controller) -> Device:
    host = Host(controller, AsyncPipeSink(controller))
    return Device(name=name, address=hci.Address(address), host=host)


class VirtualAdapter:
    """One virtual Bluetooth adapter (``hci0``...): a scanning bumble device plus fault switches."""

    def __init__(self, name: str, device: Device, controller: ReceiverController) -> None:
        self.name = name
        self.device = device
        self.controller = controller
        self.present = True
        self.stalled = False
        self.fail_starts = 0  # the next N scan starts raise, as a busy or resetting adapter does
        self.scan_starts = 0
        self._listeners: list[Callable[[BumbleAdvertisement], None]] = []
        device.on("advertisement", self._dispatch)

    @property
    def delivering(self) -> bool:
        return self.present and not self.stalled and bool(self._listeners) and self.controller.le_scan_enable

    def unplug(self) -> None:
        """The adapter disappears: nothing is delivered and starting a scan fails."""
        self.present = False

    def replug(self) -> None:
        self.present = True

    def stall(self) -> None:
        """Delivery stops without any error, until the scan is restarted."""
        self.stalled = True

    def _dispatch(self, advertisement: BumbleAdvertisement) -> None:
        for listener in list(self._listeners):
            listener(advertisement)

    async def start_scan(self, listener: Callable[[BumbleAdvertisement], None], *, active: bool) -> None:
        if not self.present:
            raise BleakError(f"adapter '{self.name}' not found")
        if self.fail_starts > 0:
            self.fail_starts -= 1
            raise BleakError(f"[org.bluez.Error.Failed] simulated failure of adapter '{self.name}'")
        self._listeners.append(listener)
        self.scan_starts += 1
        self.stalled = False
        if self.device.is_scanning:
            await self.device.stop_scanning()
        await self.device.start_scanning(active=active, filter_duplicates=self.controller.duplicate_filter)

    async def stop_scan(self, listener: Callable[[BumbleAdvertisement], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)
        if not self._listeners and self.device.is_scanning:
            await self.device.stop_scanning()
        if not self.present:
            raise BleakError(f"adapter '{self.name}' not found")


class VirtualBeacon:
    """A simulated tag: a bumble device advertising fixed raw AD bytes at a fixed interval."""

    def __init__(self, address: str, device: Device, controller: Controller, payload: bytes,
                 interval_s: float) -> None:
        self.address = address
        self.device = device
        self.controller = controller
        self.payload = payload
        self.interval_s = interval_s

    async def start(self) -> None:
        ms = max(20.0, min(10_240.0, self.interval_s * 1000.0))  # the spec's legal range
        await self.device.start_advertising(advertising_type=AdvertisingType.UNDIRECTED,
                                            advertising_data=self.payload,
                                            advertising_interval_min=ms, advertising_interval_max=ms)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.device.stop_advertising()


class VirtualAir:
    """The shop's air: one bumble LocalLink carrying beacons' adverts to virtual adapters."""

    def __init__(self, propagation: Propagation | None = None, *, passive_supported: bool = True,
                 duplicate_filter: bool = False) -> None:
        self.propagation: Propagation = propagation or _fixed
        self.passive_supported = passive_supported
        self.duplicate_filter = duplicate_filter
        self.link = _AirLink(self)
        self._adapters: dict[str, VirtualAdapter] = {}
        self._beacons: dict[str, VirtualBeacon] = {}
        self._n = 0

    def _next_address(self, top: int) -> str:
        self._n += 1
        return f"{top:02X}:00:00:00:{(self._n >> 8) & 0xFF:02X}:{self._n & 0xFF:02X}"

    def adapters(self) -> Iterable[VirtualAdapter]:
        return self._adapters.values()

    def beacons(self) -> Iterable[VirtualBeacon]:
        return self._beacons.values()

    async def add_adapter(self, name: str = "hci0") -> VirtualAdapter:
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} already exists")
        controller = ReceiverController(name, self.link, duplicate_filter=self.duplicate_filter)
        device = _device(name, self._next_address(0xF0), controller)
        await device.power_on()
        adapter = self._adapters[name] = VirtualAdapter(name, device, controller)
        return adapter

    def adapter(self, name: str) -> VirtualAdapter:
        """The adapter named ``name``; bleak's BlueZ error when it is absent or unplugged."""
        a = self._adapters.get(name)
        if a is None or not a.present:
            raise BleakError(f"adapter '{name}' not found")
        return a

    async def add_beacon(self, payload: bytes, *, address: str | None = None, interval_s: float = 0.1) -> VirtualBeacon:
        """Start a tag advertising ``payload`` (raw AD structures, at most 31 bytes) every ``interval_s``."""
        if len(payload) > 31:
            raise ValueError(f"a legacy advert carries at most 31 bytes of AD data, got {len(payload)}")
        address = (address or self._next_address(0xC0)).upper()
        if address in self._beacons:
            raise ValueError(f"beacon {address} already advertises")
        controller = Controller(f"tag-{address}", link=self.link)
        device = _device(f"tag-{address}", address, controller)
        await device.power_on()
        beacon = self._beacons[address] = VirtualBeacon(address, device, controller, payload, interval_s)
        await beacon.start()
        return beacon

    async def remove_beacon(self, address: str) -> None:
        beacon = self._beacons.pop(address.upper(), None)
        if beacon is not None:
            await beacon.stop()
            with contextlib.suppress(KeyError):
                self.link.remove_controller(beacon.controller)

    async def close(self) -> None:
        for address in list(self._beacons):
            await self.remove_beacon(address)
        for adapter in self._adapters.values():
            with contextlib.suppress(Exception):
                if adapter.device.is_scanning:
                    await adapter.device.stop_scanning()
        self._adapters.clear()

    def backend(self) -> type[VirtualBleakScanner]:
        """A bleak scanner backend class bound to this air, for ``BleakScanner(backend=...)``."""
        return type("VirtualBleakScanner", (VirtualBleakScanner,), {"air": self})


# ------------------------------------------------------------------- AD -> bleak's dictionaries


def _uuid128(raw: bytes) -> str:
    return str(uuidlib.UUID(bytes=bytes(reversed(raw))))


def advertisement_data(structures: Sequence[tuple[int, bytes]], rssi: int,
                       platform_data: tuple[Any, ...] = ()) -> AdvertisementData:
    """Fill bleak's ``AdvertisementData`` from AD structures as bleak's BlueZ backend would."""
    name: str | None = None
    mfr: dict[int, bytes] = {}
    service_data: dict[str, bytes] = {}
    uuids: list[str] = []
    tx_power: int | None = None
    for ad_type, data in structures:
        t = int(ad_type)
        if t in (0x08, 0x09):
            name = data.decode("utf-8", "replace")
        elif t == 0xFF and len(data) >= 2:
            mfr[int.from_bytes(data[:2], "little")] = bytes(data[2:])
        elif t == 0x16 and len(data) >= 2:
            service_data[normalize_uuid_16(int.from_bytes(data[:2], "little"))] = bytes(data[2:])
        elif t == 0x20 and len(data) >= 4:
            service_data[normalize_uuid_32(int.from_bytes(data[:4], "little"))] = bytes(data[4:])
        elif t == 0x21 and len(data) >= 16:
            service_data[_uuid128(data[:16])] = bytes(data[16:])
        elif t in (0x02, 0x03):
            uuids += [normalize_uuid_16(int.from_bytes(data[i:i + 2], "little")) for i in range(0, len(data) - 1, 2)]
        elif t in (0x04, 0x05):
            uuids += [normalize_uuid_32(int.from_bytes(data[i:i + 4], "little")) for i in range(0, len(data) - 3, 4)]
        elif t in (0x06, 0x07):
            uuids += [_uuid128(data[i:i + 16]) for i in range(0, len(data) - 15, 16)]
        elif t == 0x0A and len(data) == 1:
            tx_power = int.from_bytes(data, "little", signed=True)
    return AdvertisementData(local_name=name, manufacturer_data=mfr, service_data=service_data,
                             service_uuids=uuids, tx_power=tx_power, rssi=rssi, platform_data=platform_data)


def matches_or_patterns(structures: Sequence[tuple[int, bytes]], patterns: Sequence[Any]) -> bool:
    """BlueZ AdvertisementMonitor semantics: some pattern's bytes at its offset in an AD of its type."""
    for start, ad_type, content in patterns:
        want = int(ad_type)
        for t, data in structures:
            if int(t) == want and bytes(data[start:start + len(content)]) == bytes(content):
                return True
    return False


class VirtualBleakScanner(BaseBleakScanner):
    """bleak scanner backend over a ``VirtualAir`` adapter (``bluez={"adapter": "hciN"}``).

    Mirrors the BlueZ backend's contract: passive mode needs ``or_patterns`` and only delivers
    adverts matching one of them; the adapter may be missing or refuse passive scanning.
    """

    air: ClassVar[VirtualAir | None] = None

    def __init__(self, detection_callback: AdvertisementDataCallback | None, service_uuids: list[str] | None,
                 scanning_mode: str = "active", *, bluez: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(detection_callback, service_uuids)
        if self.air is None:
            raise BleakError("VirtualBleakScanner is not bound to a VirtualAir: use VirtualAir.backend()")
        bluez = bluez or {}
        self.scanning_mode = scanning_mode
        self.adapter_name: str = bluez.get("adapter") or "hci0"
        self.or_patterns = list(bluez.get("or_patterns") or [])
        if scanning_mode == "passive" and not self.or_patterns:
            raise BleakError("passive scanning mode requires bluez or_patterns")
        self._adapter: VirtualAdapter | None = None

    async def start(self) -> None:
        assert self.air is not None
        adapter = self.air.adapter(self.adapter_name)
        if self.scanning_mode == "passive" and not self.air.passive_supported:
            raise BleakError(PASSIVE_REFUSED)
        self.seen_devices = {}
        await adapter.start_scan(self._on_advertisement, active=self.scanning_mode == "active")
        self._adapter = adapter

    async def stop(self) -> None:
        adapter, self._adapter = self._adapter, None
        if adapter is not None:
            await adapter.stop_scan(self._on_advertisement)

    def _on_advertisement(self, adv: BumbleAdvertisement) -> None:
        structures = [(int(t), bytes(d)) for t, d in AdvertisingData.from_bytes(adv.data_bytes).ad_structures]
        if self.scanning_mode == "passive" and not matches_or_patterns(structures, self.or_patterns):
            return
        address = adv.address.to_string(False)
        data = advertisement_data(structures, int(adv.rssi), (address, adv.data_bytes))
        if not self.is_allowed_uuid(data.service_uuids):
            return
        device = self.create_or_update_device(address, address, data.local_name,
                                              {"adapter": self.adapter_name}, data)
        self.call_detection_callbacks(device, data)
