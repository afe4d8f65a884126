"""The guard between parsing and presence: floods, rotating addresses and passers-by are limited here.

The rules follow Home Assistant's iBeacon integration (homeassistant/components/ibeacon,
``const.py`` and ``coordinator.py``), re-implemented for a shop:

- An address that advertises ``MAX_IDS`` (10) distinct identities is sending garbage (some
  devices put sensor data in major/minor); HA adds it to an ignore list. Here the address is
  ignored while it keeps talking and forgotten after ``forget_after_s`` of silence.
- An identity heard from ``MAX_IDS`` distinct addresses is rotating its address (a phone's
  random private address); HA then stops tracking it per address and tracks the group
  (uuid, major, minor) alone. Here the identity keeps flowing, its address set is dropped and
  never grows again: the per-identity address cap.
- A uuid that shows more than ``MAX_IDS_PER_UUID`` (50) major/minor pairs is spewing random
  ids; HA ignores the uuid. Here only identities nobody enrolled are limited by it (a shop
  may give every customer tag the same uuid).
- HA holds back "transient" devices until seen ``MIN_SEEN_TRANSIENT_NEW`` times (16 polls of
  60 s, for a home). A shop needs seconds, not minutes: an identity passes once heard
  ``stable_after`` times within ``stable_window_s`` (a phone or tag at 1 Hz or faster), or once
  heard for ``stable_window_s`` without a gap longer than twice that (a slow tag, every 5-20 s),
  so someone walking past the window is ignored. Enrolled identities (``trusted``) pass at once:
  presence's own hysteresis decides whether they are in a zone.

State is in memory only, bounded (``max_addresses``, ``max_identities``) and expiring
(``forget_after_s`` of silence, by the advertisements' own timestamps, never a wall clock):
nothing here is stored or passed on by address. Every drop is counted with its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

from beacons.types import Advertisement, Sighting

if TYPE_CHECKING:
    from beacons.types import Frame

__all__ = ["DROP_REASONS", "Guard", "GuardSettings"]

DROP_REASONS = ("address_flood", "uuid_flood", "transient")


@dataclass(frozen=True, slots=True)
class GuardSettings:
    max_ids_per_address: int = 10  # HA MAX_IDS
    max_addresses_per_identity: int = 10  # HA MAX_IDS, applied to a group's addresses
    max_ids_per_uuid: int = 50  # HA MAX_IDS_PER_UUID; 0 disables
    stable_after: int = 3  # sightings within stable_window_s before an identity passes
    stable_window_s: float = 10.0
    forget_after_s: float = 180.0  # HA UNAVAILABLE_TIMEOUT
    max_addresses: int = 65536
    max_identities: int = 65536

    def __post_init__(self) -> None:
        if self.max_ids_per_address < 1 or self.max_addresses_per_identity < 1 or self.stable_after < 1:
            raise ValueError("guard limits must be at least 1")
        if self.max_addresses < 2 or self.max_identities < 2:
            raise ValueError("guard tables need room for at least 2 entries")
        if self.stable_window_s <= 0 or self.forget_after_s <= 0:
            raise ValueError("guard windows must be positive")


class _Address:
    """One sender. ``keys`` is None once the address is ignored as a flood."""

    __slots__ = ("key", "keys", "last")

    def __init__(self, key: str, last: float) -> None:
        self.key = key  # the identity it sent last: the common case is one identity forever
        self.keys: set[str] | None = {key}
        self.last = last


class _Identity:
    """One identity. ``addresses`` is None once it is known to rotate (tracked by identity alone)."""

    __slots__ = ("address", "addresses", "count", "last", "run_start", "stable", "uuid", "window_start")

    def __init__(self, address: str, now: float, uuid: str | None) -> None:
        self.address = address
        self.addresses: set[str] | None = {address}
        self.count = 0  # the first sighting is counted by Guard._prove
        self.window_start = now
        self.run_start = now  # since when it has been heard without a long gap
        self.last = now
        self.stable = False
        self.uuid = uuid


class Guard:
    """``sightings(pairs)`` turns a parsed drain into the sightings that may go on to presence;
    ``admit(address, frame, time)`` says it for one frame.

    ``trusted(key)`` is True for the identities of enrolled customers: they are exempt from
    the uuid flood rule and from the transient rule, and nothing else. Read ``dropped`` and ``figures`` (or ``stats()``)
    for the counters.
    """

    def __init__(self, settings: GuardSettings | None = None,
                 trusted: Callable[[str], bool] | None = None) -> None:
        self.settings = s = settings or GuardSettings()
        self.trusted = trusted
        self._addresses: dict[str, _Address] = {}
        self._identities: dict[str, _Identity] = {}
        self._uuid_keys: dict[str, set[str]] = {}  # uuid -> the untrusted identities seen with it
        self._ignored_uuids: dict[str, float] = {}  # uuid -> last heard
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.figures: dict[str, int] = dict.fromkeys(
            ("admitted", "ignored_addresses", "ignored_uuids", "rotating_identities", "stable_identities",
             "expired", "evicted"), 0)
        self._max_ids = s.max_ids_per_address
        self._max_addrs = s.max_addresses_per_identity
        self._stable_after = s.stable_after
        self._window = s.stable_window_s
        self._next_sweep = float("-inf")

    # ------------------------------------------------------------ the hot path

    def admit(self, address: str, frame: Any, now: float) -> bool:
        """True when the frame's identity may go on: a drain of one. A False has been counted in ``dropped``,
        unless the frame has no identity (TLM), which never goes on."""
        return bool(self.sightings(((Advertisement(address, 0, now, ""), frame),)))

    def sightings(self, pairs: Iterable[tuple[Advertisement, Frame]]) -> list[Sighting]:
        """A parsed drain, in order: a Sighting for each pair whose identity may go on (a frame without an
        identity, such as TLM, is left out). The address stops here.

        The usual advert (its address last sent this identity, a settled identity last heard from this
        address) costs two lookups; whatever else an address or an identity needs is ``_sender``'s and
        ``_identity``'s, which may run housekeeping and so replace the tables.
        """
        out: list[Sighting] = []
        append, make = out.append, tuple.__new__  # make: a Sighting without a Python call
        sender, identity = self._sender, self._identity
        addresses, identities = self._addresses, self._identities
        admitted = 0
        for adv, frame in pairs:
            key = frame.key
            if key is None:
                continue
            address, now = adv.address, adv.time
            a = addresses.get(address)
            if a is not None and a.key == key:
                a.last = now
            else:
                ok = sender(a, address, key, now)
                addresses, identities = self._addresses, self._identities
                if not ok:
                    continue
            i = identities.get(key)
            if i is not None and i.stable and i.address == address:
                i.last = now
                admitted += 1
            else:
                ok = identity(i, key, address, frame, now)
                addresses, identities = self._addresses, self._identities
                if not ok:
                    continue
            append(make(Sighting, (key, adv.receiver, adv.rssi, now, frame.ref_power)))
        self.figures["admitted"] += admitted
        return out

    def _sender(self, a: _Address | None, address: str, key: str, now: float) -> bool:
        """A new address, or one sending another identity than last time: False (counted) for a flood."""
        if a is None:
            if now >= self._next_sweep or len(self._addresses) >= self.settings.max_addresses:
                self._housekeeping(now)
            self._addresses[address] = _Address(key, now)
            return True
        ok = self._address_sends(a, key, now)
        a.last = now
        if not ok:
            self.dropped["address_flood"] += 1
        return ok

    def _identity(self, i: _Identity | None, key: str, address: str, frame: Any, now: float) -> bool:
        """A new identity, one not settled yet, or one heard from another address: may it go on?"""
        if i is None:
            i = self._new_identity(key, address, frame, now)
            if i is None:
                self.dropped["uuid_flood"] += 1
                return False
            prev = now
        else:
            if i.address != address:
                self._identity_heard_from(i, address)
            prev, i.last = i.last, now
        if i.stable:
            self.figures["admitted"] += 1
            return True
        return self._prove(i, key, now, prev)

    def _address_sends(self, a: _Address, key: str, now: float) -> bool:
        """A second identity from one address: fine up to the cap, a flood after it."""
        if now - a.last > self.settings.forget_after_s:  # silent long enough: a fresh start
            a.keys, a.key = {key}, key
            return True
        keys = a.keys
        if keys is None:
            return False
        keys.add(key)
        if len(keys) >= self._max_ids:
            a.keys = None  # ignored from now on; the identities it sent keep their own state
            a.key = ""  # no identity key is empty, so every advert takes the slow path and is dropped
            self.figures["ignored_addresses"] += 1
            return False
        a.key = key
        return True

    def _identity_heard_from(self, i: _Identity, address: str) -> None:
        i.address = address
        addrs = i.addresses
        if addrs is None:
            return
        addrs.add(address)
        if len(addrs) >= self._max_addrs:
            i.addresses = None  # rotating: tracked by identity alone, its addresses no longer kept
            self.figures["rotating_identities"] += 1

    def _prove(self, i: _Identity, key: str, now: float, prev: float) -> bool:
        if now - prev > 2.0 * self._window:
            i.run_start = now
        if now - i.window_start > self._window:
            i.window_start, i.count = now, 1
        else:
            i.count += 1
        if (i.count >= self._stable_after or now - i.run_start >= self._window
                or (self.trusted is not None and self.trusted(key))):
            i.stable = True
            self.figures["stable_identities"] += 1
            self.figures["admitted"] += 1
            return True
        self.dropped["transient"] += 1
        return False

    def _new_identity(self, key: str, address: str, frame: Any, now: float) -> _Identity | None:
        uuid: str | None = None
        if self.settings.max_ids_per_uuid and frame.format == "ibeacon" and not (
                self.trusted is not None and self.trusted(key)):
            uuid = frame.uuid
            if not self._uuid_allows(uuid, key, now):
                return None
        if len(self._identities) >= self.settings.max_identities:
            self._housekeeping(now)
        return self._identities.setdefault(key, _Identity(address, now, uuid))

    def _uuid_allows(self, uuid: str, key: str, now: float) -> bool:
        ignored = self._ignored_uuids
        if uuid in ignored:
            ignored[uuid] = now
            return False
        keys = self._uuid_keys.get(uuid)
        if keys is None:
            keys = self._uuid_keys[uuid] = set()
        keys.add(key)
        if len(keys) > self.settings.max_ids_per_uuid:
            del self._uuid_keys[uuid]
            if len(ignored) >= self.settings.max_identities:
                self._ignored_uuids = ignored = self._newest(ignored, self.settings.max_identities // 2)
            ignored[uuid] = now
            self.figures["ignored_uuids"] += 1
            for k in keys:  # as HA purges the uuid's trackers: they must not pass any more
                self._identities.pop(k, None)
            return False
        return True

    # ------------------------------------------------------------ bounds

    def _housekeeping(self, now: float) -> None:
        """Forget what has been silent for ``forget_after_s``; if a table is still full, halve it.

        Runs at most every quarter of ``forget_after_s`` of advert time, or when a table is
        full, so its O(n) cost is spread over many adverts.
        """
        s = self.settings
        self._next_sweep = now + s.forget_after_s / 4
        horizon = now - s.forget_after_s
        n = len(self._addresses) + len(self._identities)
        self._addresses = {k: a for k, a in self._addresses.items() if a.last >= horizon}
        identities = {k: i for k, i in self._identities.items() if i.last >= horizon}
        self.figures["expired"] += n - len(self._addresses) - len(identities)
        if len(self._addresses) >= s.max_addresses:  # oldest first seen go: only flood counts are lost
            addresses = self._addresses
            self._addresses = dict(islice(addresses.items(), len(addresses) - s.max_addresses // 2, None))
            self.figures["evicted"] += len(addresses) - len(self._addresses)
        if len(identities) >= s.max_identities:
            # Passers-by go first, so a flood of fresh identities never pushes out the customers inside.
            keep = {k: i for k, i in identities.items() if i.stable}
            self.figures["evicted"] += len(identities) - len(keep)
            identities = self._evict(keep, s.max_identities // 2) if len(keep) > s.max_identities // 2 else keep
        self._identities = identities
        uuid_keys: dict[str, set[str]] = {}
        for uuid, keys in self._uuid_keys.items():
            alive = {k for k in keys if k in identities}
            if alive:
                uuid_keys[uuid] = alive
        self._uuid_keys = uuid_keys
        self._ignored_uuids = {u: t for u, t in self._ignored_uuids.items() if t >= horizon}

    def _evict(self, table: dict[str, Any], keep: int) -> dict[str, Any]:
        kept = dict(sorted(table.items(), key=lambda kv: kv[1].last)[len(table) - keep:])
        self.figures["evicted"] += len(table) - len(kept)
        return kept

    @staticmethod
    def _newest(times: dict[str, float], keep: int) -> dict[str, float]:
        return dict(sorted(times.items(), key=lambda kv: kv[1])[len(times) - keep:])

    # ------------------------------------------------------------ reading

    def state_size(self) -> dict[str, int]:
        """Entries held, per table (bounded by the settings' caps)."""
        return {"addresses": len(self._addresses), "identities": len(self._identities),
                "uuids": len(self._uuid_keys) + len(self._ignored_uuids)}

    def stats(self) -> dict[str, Any]:
        return {"dropped": dict(self.dropped), **self.figures, "state": self.state_size()}
