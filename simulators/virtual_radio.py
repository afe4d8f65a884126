"""Glue between the store simulator and the bumble air: where tags are, what each adapter hears.

``RadioPropagation`` is the ``VirtualAir`` propagation function: it maps an advertiser address to
the tag's simulated position (at the moment the advert is on the air, from an injectable clock)
and an adapter name to a scenario receiver, then asks the simulator's ``RadioModel`` (log-distance
path loss, shadowing noise, per-receiver offset, random loss) for the RSSI. One seeded model per
receiver keeps each receiver's noise independent and reproducible.

``VirtualStore`` drives a ``StoreSimulator`` on that air in real time: every walker present gets a
bumble beacon advertising its real AD bytes (``StoreSimulator.payload_for``), from its visit's
address, and loses it when the walker leaves. One virtual adapter per receiver (``hci0``...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from beacons.bleak_virtual import VirtualAir
from beacons.scanner import BleakSource
from simulators.people import Walker
from simulators.radio import RadioModel
from simulators.scenario import Radio, Receiver
from simulators.store_sim import StoreSimulator

Position = Callable[[float], tuple[float, float] | None]


class RadioPropagation:
    """(advertiser address, adapter) -> RSSI from the radio model, or None when not heard."""

    def __init__(self, receivers: dict[str, Receiver], radio: Radio, *, clock: Callable[[], float],
                 seed: int | str = 0) -> None:
        self.receivers = dict(receivers)
        self.clock = clock
        self._models = {name: RadioModel.for_radio(radio, f"virtual/{seed}/{rx.id}") for name, rx in receivers.items()}
        self._positions: dict[str, Position] = {}

    def place(self, address: str, position: Position | tuple[float, float]) -> None:
        """Where ``address`` is: a fixed point, or a function of the clock's time."""
        if isinstance(position, tuple):
            point = (float(position[0]), float(position[1]))
            self._positions[address.upper()] = lambda _t: point
        else:
            self._positions[address.upper()] = position

    def forget(self, address: str) -> None:
        self._positions.pop(address.upper(), None)

    def __call__(self, address: str, adapter: str) -> int | None:
        where = self._positions.get(address.upper())
        rx = self.receivers.get(adapter)
        if where is None or rx is None:
            return None  # an unknown transmitter, or an adapter outside the model: not heard
        xy = where(self.clock())
        if xy is None:
            return None
        d = math.hypot(xy[0] - rx.position[0], xy[1] - rx.position[1])
        return self._models[adapter].rssi(d, rx)


def _walker_position(walker: Walker, start: float) -> Position:
    return lambda t: walker.position(t - start)


class VirtualStore:
    """A simulated store's tags as bumble beacons on a ``VirtualAir``, kept in step with the clock."""

    def __init__(self, sim: StoreSimulator, *, clock: Callable[[], float], passive_supported: bool = True) -> None:
        self.sim = sim
        self.clock = clock
        self.adapter_of = {rx.id: f"hci{i}" for i, rx in enumerate(sim.scenario.receivers)}
        receivers = {self.adapter_of[rx.id]: rx for rx in sim.scenario.receivers}
        self.propagation = RadioPropagation(receivers, sim.scenario.radio, clock=clock, seed=sim.seed)
        self.air = VirtualAir(self.propagation, passive_supported=passive_supported)
        self._live: dict[tuple[str, int], str] = {}  # (walker key, visit number) -> address

    async def start(self) -> None:
        for name in self.adapter_of.values():
            await self.air.add_adapter(name)

    def sources(self, **kwargs: Any) -> list[BleakSource]:
        """One gateway ``BleakSource`` per receiver, through this air's bleak backend."""
        backend = self.air.backend()
        return [BleakSource(adapter, backend=backend, receiver=rx_id, **kwargs)
                for rx_id, adapter in self.adapter_of.items()]

    async def sync(self) -> None:
        """Start beacons for walkers who arrived, stop those of walkers who left."""
        sim, now = self.sim, self.clock()
        rel = now - sim.start
        want: dict[tuple[str, int], tuple[Walker, str]] = {}
        for walker in sim.people_present(now):
            visit = walker.visit_at(rel)
            if visit is not None:
                want[(walker.key, visit.number)] = (walker, visit.address)
        for key in [k for k in self._live if k not in want]:
            address = self._live.pop(key)
            self.propagation.forget(address)
            await self.air.remove_beacon(address)
        interval = sim.scenario.radio.advert_interval_s
        live_addresses = set(self._live.values())
        for key, (walker, address) in want.items():
            if key in self._live or address.upper() in live_addresses:
                continue  # already advertising (an address collision would be a second tag: skip it)
            self.propagation.place(address, _walker_position(walker, sim.start))
            await self.air.add_beacon(sim.payload_at(walker, now), address=address, interval_s=interval)
            self._live[key] = address.upper()
            live_addresses.add(address.upper())

    async def close(self) -> None:
        await self.air.close()
