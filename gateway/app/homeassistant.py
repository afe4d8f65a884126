"""Zone occupancy out to Home Assistant: retained states on the gateway's MQTT connection, announced with
Home Assistant's device-based discovery (``<discovery_prefix>/device/<node_id>/config``).

Two halves. :class:`OccupancyPublisher` is pure: zone counts (and, only when customers are tracked, the
zone of each consenting customer) in, ``(topic, payload, retain)`` out, with the per-zone rate limit on
the injectable clock. :class:`HomeAssistantLink` is the I/O: it reads the presence tracks as the API's
``/v1/presence`` does (a snapshot on the event loop), publishes on the intake's connection, answers Home
Assistant's birth message (``homeassistant/status`` = ``online``) with a fresh announcement, and keeps the
components it announced in the data dir, so a zone taken out of the config is removed from Home Assistant
at the next start. Data flows one way: presence tells the link that something changed; the link never
calls back into a stage.

Availability is the intake's own retained status topic, whose last will says ``offline``: no second
connection, and a killed gateway turns every entity unavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy import select

from devices.mqtt import ExtraSubscription, TelemetryIntake, settings_from_config
from devices.topics import gateway_status_topic
from gateway.app.config import Settings
from gateway.clock import Clock
from gateway.presence.tracker import PresenceEvent
from gateway.storage.db import Database
from gateway.storage.models import Consent, Profile

log = logging.getLogger("gateway.homeassistant")

Message = tuple[str, bytes, bool]
"""One MQTT publish: topic, payload, retain."""

ORIGIN_NAME = "engagement-gateway"
ONLINE, OFFLINE = "online", "offline"
NOT_HOME = "not_home"
STATE_FILE = "homeassistant.json"
REFRESH_S = 1.0  # real seconds between the link's checks for coalesced states, reconnects and erasures
_UNFIT = re.compile(r"[^a-zA-Z0-9_-]+")
HASH_LEN = 6


def _short_hash(text: str, n: int = HASH_LEN) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def fit_id(text: str) -> str:
    """``text`` as an id Home Assistant takes in a discovery topic and a ``unique_id`` (``[a-zA-Z0-9_-]``):
    unchanged when it already is one; otherwise accents folded, the rest replaced by ``_``, and a short hash
    of the original appended, so "Shoes:Kids" and "Shoes/Kids" stay two ids."""
    if text and _UNFIT.search(text) is None:
        return text
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    base = _UNFIT.sub("_", folded).strip("_")
    return f"{base}_{_short_hash(text)}" if base else f"id_{_short_hash(text)}"


def zone_ids(names: Iterable[str]) -> dict[str, str]:
    """Each zone's id, distinct even where two names fit to one id (both then carry their hash)."""
    names = list(dict.fromkeys(names))
    ids = {n: fit_id(n) for n in names}
    taken: dict[str, list[str]] = {}
    for n, i in ids.items():
        taken.setdefault(i, []).append(n)
    for same in taken.values():
        if len(same) > 1:
            for n in same:
                ids[n] = f"{_UNFIT.sub('_', fit_id(n))}_{_short_hash('zone:' + n)}"
    return ids


def occupancy(tracks: Iterable[tuple[str, Any]], profile_of: Callable[[str], int | None]
              ) -> tuple[dict[str, int], dict[int, str]]:
    """People per zone and each enrolled profile's zone, from the presence tracks (key, track with ``zone``).

    An enrolled profile counts once however many of its tags and apps are tracked (as ``/v1/presence``);
    an unknown identity counts as one person."""
    anonymous: dict[str, int] = {}
    where: dict[int, str] = {}
    for key, track in tracks:
        zone = track.zone
        if zone is None:
            continue
        pid = profile_of(key)
        if pid is None:
            anonymous[zone] = anonymous.get(zone, 0) + 1
        else:
            where.setdefault(pid, zone)
    totals = dict(anonymous)
    for zone in where.values():
        totals[zone] = totals.get(zone, 0) + 1
    return totals, where


def package_version() -> str:
    try:
        return metadata.version("engagement-gateway")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class Layout:
    """Where everything goes: state topics under ``<prefix>/<store>/presence/``, the discovery topic."""

    prefix: str
    store_id: str
    node_id: str
    discovery_prefix: str
    availability_topic: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.store_id}/presence"

    @property
    def discovery_topic(self) -> str:
        return f"{self.discovery_prefix}/device/{self.node_id}/config"

    @property
    def birth_topic(self) -> str:
        return f"{self.discovery_prefix}/status"

    def count_topic(self, zid: str) -> str:
        return f"{self.base}/{zid}/count"

    def occupied_topic(self, zid: str) -> str:
        return f"{self.base}/{zid}/occupied"

    def customer_topic(self, alias: str) -> str:
        return f"{self.base}/customers/{alias}/zone"


@dataclass
class Customer:
    """A consenting customer as Home Assistant sees them: a pseudonymous alias and a first name at most."""

    alias: str
    name: str


def customer_alias(node_id: str, profile_id: int) -> str:
    """A stable pseudonym per gateway: neither the profile id nor anything a beacon carries."""
    return "customer_" + hashlib.sha256(f"{node_id}:{profile_id}".encode()).hexdigest()[:12]


def first_name(name: str | None, alias: str) -> str:
    word = (name or "").strip().split(maxsplit=1)
    return word[0][:40] if word else f"Customer {alias[-6:]}"


@dataclass
class OccupancyPublisher:
    """The pure half: what to publish, and when, for zone counts, consenting customers and announcements.

    ``previous`` is what the last run announced (component id -> its platform and state topic): a component
    not announced any more is removed from Home Assistant (a ``{"p": ...}`` stub, then the config without
    it) and its retained state cleared."""

    layout: Layout
    zones: Sequence[str]
    store_name: str = "Store"
    min_interval_s: float = 1.0
    support_url: str = ""
    version: str = field(default_factory=package_version)
    previous: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    customers: dict[int, Customer] = field(default_factory=dict)
    _ids: dict[str, str] = field(init=False)
    _sent: dict[str, tuple[int, float]] = field(init=False, default_factory=dict)  # zone -> (count, when)
    _counts: dict[str, int] = field(init=False, default_factory=dict)
    _where: dict[int, str] = field(init=False, default_factory=dict)
    _placed: dict[int, str] = field(init=False, default_factory=dict)  # customer -> payload last published
    _gone: dict[str, dict[str, str]] = field(init=False, default_factory=dict)  # components to remove

    def __post_init__(self) -> None:
        self._ids = zone_ids(self.zones)
        self._counts = dict.fromkeys(self._ids, 0)
        now = self.components()
        self._gone = {cid: dict(c) for cid, c in self.previous.items() if cid not in now and c.get("p")}

    # ------------------------------------------------------------ discovery

    def components(self) -> dict[str, dict[str, Any]]:
        """Every component announced now, by its unique id (the ``cmps`` of the device config)."""
        lay, node = self.layout, self.layout.node_id
        avty = {"availability_topic": lay.availability_topic, "payload_available": ONLINE,
                "payload_not_available": OFFLINE}
        out: dict[str, dict[str, Any]] = {}
        for zone, zid in self._ids.items():
            occ, cnt = f"{node}_{zid}_occupied", f"{node}_{zid}_count"
            out[occ] = {"p": "binary_sensor", "unique_id": occ, "name": f"{zone} occupied",
                        "device_class": "occupancy", "state_topic": lay.occupied_topic(zid),
                        "payload_on": "ON", "payload_off": "OFF", **avty}
            out[cnt] = {"p": "sensor", "unique_id": cnt, "name": f"{zone} people", "state_class": "measurement",
                        "unit_of_measurement": "people", "icon": "mdi:account-group",
                        "state_topic": lay.count_topic(zid), **avty}
        gw = f"{node}_gateway"
        # No availability of its own: it shows the gateway offline instead of going unavailable.
        out[gw] = {"p": "binary_sensor", "unique_id": gw, "name": "Gateway", "device_class": "connectivity",
                   "entity_category": "diagnostic", "state_topic": lay.availability_topic,
                   "payload_on": ONLINE, "payload_off": OFFLINE}
        for c in self.customers.values():
            cid = f"{node}_{c.alias}"
            out[cid] = {"p": "device_tracker", "unique_id": cid, "name": c.name, "source_type": "bluetooth_le",
                        "state_topic": lay.customer_topic(c.alias), "payload_not_home": NOT_HOME,
                        "payload_reset": "None", **avty}
        return out

    def discovery(self, components: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        node = self.layout.node_id
        origin: dict[str, Any] = {"name": ORIGIN_NAME, "sw_version": self.version}
        if self.support_url:
            origin["support_url"] = self.support_url
        return {"dev": {"identifiers": [node], "name": f"{self.store_name} presence",
                        "manufacturer": "Engagement gateway", "model": "Proximity gateway",
                        "sw_version": self.version},
                "o": origin, "cmps": dict(components), "qos": 1}

    def announced(self) -> dict[str, dict[str, str]]:
        """What to remember for the next run: each component's platform and state topic."""
        return {cid: {"p": c["p"], "state_topic": c["state_topic"]} for cid, c in self.components().items()}

    def announce(self, now: float) -> list[Message]:
        """The device config, then every state as it is now (Home Assistant came online, or we connected).
        Components to remove go first as stubs, then the config without them, as Home Assistant asks."""
        now_cmps = self.components()
        out: list[Message] = []
        if self._gone:
            stubs = {**now_cmps, **{cid: {"p": c["p"]} for cid, c in self._gone.items()}}
            out.append(self._config(stubs))
            out += [(c["state_topic"], b"", True) for c in self._gone.values() if c.get("state_topic")]
            self._gone = {}
        out.append(self._config(now_cmps))
        out += self._zone_states(self._counts, now)
        for pid in self.customers:
            out += self._customer_state(pid, force=True)
        return out

    def _config(self, components: Mapping[str, Mapping[str, Any]]) -> Message:
        body = json.dumps(self.discovery(components), separators=(",", ":"), ensure_ascii=False).encode()
        return (self.layout.discovery_topic, body, True)

    # ------------------------------------------------------------ states

    def _zone_states(self, counts: Mapping[str, int], now: float) -> list[Message]:
        out: list[Message] = []
        for zone, n in counts.items():
            zid = self._ids[zone]
            out.append((self.layout.count_topic(zid), str(n).encode(), True))
            out.append((self.layout.occupied_topic(zid), b"ON" if n > 0 else b"OFF", True))
            self._sent[zone] = (n, now)
        return out

    def update(self, counts: Mapping[str, int], where: Mapping[int, str], now: float) -> list[Message]:
        """What changed since the last publish, for zones whose last publish is ``min_interval_s`` old; the
        others wait (a later ``update``, with the same or newer counts, sends the latest). Zones not in the
        config are ignored; a zone missing from ``counts`` is empty."""
        self._counts = {z: int(counts.get(z, 0)) for z in self._ids}
        self._where = {pid: z for pid, z in where.items() if pid in self.customers}
        due: dict[str, int] = {}
        for zone, n in self._counts.items():
            last = self._sent.get(zone)
            if last is not None and last[0] == n:
                continue
            if last is not None and now - last[1] < self.min_interval_s:
                continue  # coalesced: the latest count goes out once the interval has passed
            due[zone] = n
        out = self._zone_states(due, now)
        for pid in self.customers:
            out += self._customer_state(pid)
        return out

    def pending(self) -> bool:
        """Some zone's count changed and waits for its interval."""
        return any(z not in self._sent or self._sent[z][0] != n for z, n in self._counts.items())

    def _customer_state(self, pid: int, force: bool = False) -> list[Message]:
        c = self.customers[pid]
        payload = self._where.get(pid, NOT_HOME)
        if not force and self._placed.get(pid) == payload:
            return []
        self._placed[pid] = payload
        return [(self.layout.customer_topic(c.alias), payload.encode(), True)]

    # ------------------------------------------------------------ customers

    def set_customers(self, customers: Mapping[int, Customer]) -> bool:
        """The consenting customers now (track_customers on). True if that changes the device config: then
        ``announce`` adds the new ones and removes the gone ones (component and retained state)."""
        if dict(customers) == self.customers:
            return False
        node = self.layout.node_id
        for pid, c in self.customers.items():
            if customers.get(pid) != c:
                self._gone[f"{node}_{c.alias}"] = {"p": "device_tracker",
                                                   "state_topic": self.layout.customer_topic(c.alias)}
                self._placed.pop(pid, None)
                self._where.pop(pid, None)
        self.customers = dict(customers)
        for cid in self.components():  # a customer back (consent given again) is not removed
            self._gone.pop(cid, None)
        return True

    def forget(self, profile_id: int) -> bool:
        """An erased profile: True if it was tracked (``announce`` then clears its entity and state)."""
        if profile_id not in self.customers:
            return False
        return self.set_customers({pid: c for pid, c in self.customers.items() if pid != profile_id})


def consenting_customers(db: Database, purpose: str, node_id: str) -> dict[int, Customer]:
    """Profiles that consented to ``purpose`` now, each with its alias and first name (a database read)."""
    with db.session() as s:
        rows = s.execute(select(Profile.id, Profile.name).join(Consent, Consent.profile_id == Profile.id)
                         .where(Consent.purpose == purpose, Consent.granted.is_(True)))
        out = {}
        for pid, name in rows:
            alias = customer_alias(node_id, pid)
            out[int(pid)] = Customer(alias, first_name(name, alias))
        return out


def _parse_birth(topic: str, payload: bytes, received_at: float) -> str:
    return payload.decode("utf-8", "replace").strip()


class HomeAssistantLink:
    """The I/O half, on the event loop: publishes what :class:`OccupancyPublisher` says, on the intake.

    ``tracks`` gives the presence tracks as they are now (read on the loop); ``profile_of`` resolves a track
    key to an enrolled profile. ``presence_changed`` is the pipeline's hook (its worker thread): it only
    wakes the link."""

    def __init__(self, settings: Settings, intake: TelemetryIntake, clock: Clock, db: Database,
                 tracks: Callable[[], Iterable[tuple[str, Any]]], profile_of: Callable[[str], int | None],
                 zones: Sequence[str]) -> None:
        ha = settings.homeassistant
        self.settings = settings
        self.intake = intake
        self.clock = clock
        self.db = db
        self.tracks = tracks
        self.profile_of = profile_of
        self.track_customers = ha.track_customers
        self.purpose = ha.track_purpose
        store = settings.store.id
        status = getattr(intake, "status_topic", None) or gateway_status_topic(
            store, settings_from_config(settings.mqtt, store).client_id, settings.mqtt.topic_prefix)
        self.layout = Layout(settings.mqtt.topic_prefix, store, ha.node_id or fit_id(store), ha.discovery_prefix,
                             status)
        self.state_file = Path(settings.data_dir) / STATE_FILE
        self.publisher = OccupancyPublisher(self.layout, zones, settings.store.name, ha.min_interval_s,
                                            ha.support_url, previous=self._previous())
        self.births: asyncio.Queue[str] = asyncio.Queue()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._customers_dirty = self.track_customers
        self._gone: list[int] = []
        self._gone_lock = threading.Lock()
        self._connects = 0
        self._last_error: str | None = None
        self.published = 0

    def _previous(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s (%s): components a past run announced are not removed", self.state_file, exc)
            return {}
        if not isinstance(data, dict) or data.get("node_id") != self.layout.node_id:
            return {}
        comps = data.get("components")
        return {str(k): {"p": str(v.get("p", "")), "state_topic": str(v.get("state_topic", ""))}
                for k, v in comps.items() if isinstance(v, dict)} if isinstance(comps, dict) else {}

    def _remember(self) -> None:
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"node_id": self.layout.node_id, "components": self.publisher.announced()},
                                      indent=1, sort_keys=True))
            tmp.replace(self.state_file)
        except OSError as exc:
            log.warning("could not write %s (%s)", self.state_file, exc)

    def subscription(self) -> ExtraSubscription:
        """Home Assistant's birth and last will, on the intake's connection (add it before the intake starts)."""
        return ExtraSubscription("homeassistant", self.layout.birth_topic, _parse_birth, self.births)

    # ------------------------------------------------------------ hooks (any thread)

    def presence_changed(self, events: Sequence[PresenceEvent]) -> None:
        """The pipeline's hook, on its worker: an enter or exit may change a count; wake the link."""
        if any(ev.kind == "enter" or ev.kind == "exit" for ev in events):
            self.poke()

    def profile_changed(self, profile_id: int) -> None:
        """Consents may have changed: the consenting customers are read again."""
        if self.track_customers:
            self._customers_dirty = True
            self.poke()

    def profile_gone(self, profile_id: int) -> None:
        """An erasure: the customer's entity and retained state are cleared."""
        with self._gone_lock:
            self._gone.append(profile_id)
        self.poke()

    def poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(wake.set)

    # ------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Announce once connected, then publish changes; re-announce on Home Assistant's ``online`` and
        after a reconnect (a broker without persistence forgot the retained messages)."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        birth = asyncio.ensure_future(self.births.get())
        try:
            while True:
                waker = asyncio.ensure_future(self._wake.wait())
                done, _ = await asyncio.wait({birth, waker}, timeout=REFRESH_S, return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
                self._wake.clear()
                announce = False
                if birth in done:
                    announce = birth.result() == ONLINE
                    birth = asyncio.ensure_future(self.births.get())
                connects = int(getattr(self.intake, "connects", 1) or 0)
                if connects != self._connects and self._connected():
                    self._connects = connects
                    announce = True
                try:
                    await self._step(announce)
                except Exception as exc:
                    self._failed("publishing occupancy to Home Assistant", exc)
                else:
                    self._last_error = None
        finally:
            birth.cancel()

    def _failed(self, what: str, exc: BaseException) -> None:
        """Logged once per kind of failure, not once a second while it lasts."""
        key = f"{what}: {type(exc).__name__}: {exc}"[:300]
        if key != self._last_error:
            self._last_error = key
            log.warning("%s failed: %s: %s", what, type(exc).__name__, exc)

    def _connected(self) -> bool:
        state = getattr(self.intake, "state", None)
        return state is None or state() == "connected"

    async def _step(self, announce: bool) -> None:
        if self._connects == 0:
            return  # nothing goes out before the first connection, whose announcement says everything
        changed = False
        if self._customers_dirty and self.track_customers:
            self._customers_dirty = False  # a change while reading sets it again
            try:
                customers = await asyncio.to_thread(consenting_customers, self.db, self.purpose,
                                                    self.layout.node_id)
            except Exception as exc:  # the database is down: counts go on; the customers are read again later
                self._customers_dirty = True
                self._failed("reading the consenting customers", exc)
            else:
                changed = self.publisher.set_customers(customers)
        with self._gone_lock:
            gone, self._gone = self._gone, []
        for pid in gone:
            changed = self.publisher.forget(pid) or changed
        counts, where = occupancy(self.tracks(), self.profile_of)
        now = self.clock.now()
        out = self.publisher.update(counts, where, now)
        if announce or changed:
            out = self.publisher.announce(now)
        self._flush(out, remember=announce or changed)

    def _flush(self, messages: list[Message], remember: bool) -> None:
        for topic, payload, retain in messages:
            try:
                self.intake.publish(topic, payload, qos=1, retain=retain)
            except RuntimeError:  # the intake stopped under us (shutdown)
                return
            self.published += 1
        if remember:
            self._remember()
