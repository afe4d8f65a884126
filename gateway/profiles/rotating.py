"""Rotating identities on the gateway: enrolment with the keys encrypted at rest, and the resolver the
pipeline asks before presence.

Three kinds (the formats are beacons/rotating.py's, docs/identities.md):

- ``eid``: an Eddystone-EID beacon: its 16-byte identity key, the rotation exponent K and the epoch (the Unix
  second its clock counts from);
- ``irk``: a phone or wearable's identity resolving key: any resolvable private address it uses;
- ``app``: the shop's app's rotating iBeacon: the gateway draws a 32-byte secret at enrolment and hands it
  back once; the app derives each window's major/minor from it.

The key of each is stored AES-GCM encrypted under the ``[identities]`` key (``key_file``, or one generated
once in the data dir): a copy of the database alone resolves nobody. A keyed fingerprint (HMAC of the key)
refuses the same key enrolled twice without decrypting anything.

The resolver maps a sighting of any of them to the profile's app key (``app:<profile id>``: the same
presence identity as the app's own reports), so presence, visits and campaigns see one person across
rotations, and erasure's machinery (the identity index, the presence track, trace scrubbing) already knows
it. Its table is rebuilt by the tick with the pipeline's now (no clock here); lookups are dict hits; RPAs go
through a bounded in-memory cache. Nothing here stores or passes on an address.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select
from sqlalchemy.orm import Session

from beacons import rotating as proto
from beacons.remote import app_key
from beacons.types import Advertisement
from gateway.clock import Clock
from gateway.errors import ConfigError, Conflict, Invalid, NotFound
from gateway.profiles.identity import IdentityIndex
from gateway.storage.db import Database
from gateway.storage.models import Profile, RotatingIdentity

log = logging.getLogger("gateway.identities")

KINDS = ("eid", "irk", "app")
KEY_FILE = "identities.key"
SECRET_BYTES = 32  # the app's secret
_AAD = b"rotating-identity:"  # + kind: a row's ciphertext cannot be passed off as another kind's
_ENTRY_BYTES = 250  # an Entry (slots) and its secret
_ADDRESS_BYTES = 100  # an address string in the resolver's own by-address dicts, and its slot
_MEMO_MAX = 65536  # frame keys remembered between refreshes (rotating or not): a flood costs a clear


# ------------------------------------------------------------ the key at rest


def _key_bytes(raw: bytes, where: str) -> bytes:
    if len(raw) == 32:
        return raw
    text = raw.decode("ascii", "replace").strip()
    try:
        key = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        key = b""
    if len(key) != 32:
        raise ConfigError(f"identities.key_file: {where}: expected 32 bytes (raw, 64 hex digits or base64), "
                          f"got {len(raw)} byte(s) that are none of these")
    return key


def load_key(key_file: str, data_dir: str) -> bytes:
    """``[identities] key_file``, or one generated once in the data dir (mode 0600), as ``token_secret``."""
    configured = key_file
    path = Path(configured) if configured else Path(data_dir) / KEY_FILE
    if not path.exists():
        if configured:
            raise ConfigError(f"identities.key_file: {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    try:
        return _key_bytes(path.read_bytes(), str(path))
    except OSError as exc:
        raise ConfigError(f"identities.key_file: {path}: {exc.strerror}") from None


class SecretBox:
    """AES-GCM under the ``[identities]`` key: a fresh 12-byte nonce per secret, the kind as associated data."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._mac = hashlib.sha256(b"rotating-identity-fingerprint:" + key).digest()

    def seal(self, kind: str, plain: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plain, _AAD + kind.encode())

    def open(self, kind: str, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], _AAD + kind.encode())
        except InvalidTag:
            raise ValueError("cannot be decrypted with this key (another key file?)") from None

    def fingerprint(self, kind: str, plain: bytes) -> str:
        """Equal for the same key, useless without the box's key: uniqueness without decrypting every row."""
        return hmac.new(self._mac, kind.encode() + b":" + plain, hashlib.sha256).hexdigest()


# ------------------------------------------------------------ the resolver


@dataclass(frozen=True, slots=True)
class Entry:
    """One enrolled identity with its key in the clear: memory only, the resolver's."""

    id: int
    profile_id: int
    kind: str
    secret: bytes = field(repr=False)
    k: int = 0  # eid: the rotation exponent
    epoch: int = 0  # eid: the Unix second the beacon's clock counts from
    period_s: int = 900  # app: one window


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a resolved sighting carries on to the guard and presence: the profile's stable key."""

    key: str
    ref_power: int | None
    format: ClassVar[str] = "rotating"

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "key": self.key}


Pair = tuple[Advertisement, Any]
_PASS = object()  # a memo entry: not a rotating identity (or one nobody enrolled): the frame goes on as it is
_GONE = object()  # an address resolved to an identity removed since


class Resolver:
    """Rotating identifier -> the profile's app key, for a drain of parsed adverts.

    Run on the pipeline's worker only (``apply`` of the service brings enrolments there). ``resolve`` costs
    one dict lookup per frame (a memo by the frame's key, cleared when the windows move or an enrolment
    changes) and, for an advert without a frame from a random address while IRKs are enrolled, one RPA cache
    lookup; whatever the memo or the cache do not know costs a table lookup or one AES pass per IRK, once.
    """

    def __init__(self, identities: IdentityIndex, *, app_uuid: str, rpa_cache_size: int = 65536) -> None:
        self.app_uuid = app_uuid.lower()
        self.identities = identities
        self._entries: dict[int, Entry] = {}
        self._table: proto.RotatingTable[int] = proto.RotatingTable()
        self._rpa: proto.RpaCache[int] = proto.RpaCache(max_entries=rpa_cache_size)
        self._memo: dict[str, Any] = {}
        self._frames: dict[int, Resolved] = {}  # profile id -> its frame (one per profile: one person)
        # In front of the RPA cache, for the hot path: an address resolved to an enrolled IRK -> its profile's
        # frame, and the addresses that matched none (or are not resolvable). Both cleared at the cache's bound
        # (their addresses come back through the cache), the second when an IRK is enrolled, the first when one
        # is removed.
        self._rpa_known: dict[str, Any] = {}
        self._nobody: set[str] = set()
        self._matched = 0  # addresses matched to an enrolled IRK
        self.figures: dict[str, int] = dict.fromkeys(("eid", "app", "rpa", "unknown_rotating"), 0)

    # ------------------------------------------------------------ the table

    def load(self, entries: Iterable[Entry], now: float) -> None:
        """Every enrolled identity (at start): the table built for the windows around ``now``."""
        self._entries = {e.id: e for e in entries}
        self._table.build([t for t in map(_table_entry, self._entries.values()) if t is not None], now)
        self._rpa = proto.RpaCache({e.id: e.secret for e in self._entries.values() if e.kind == "irk"},
                                   max_entries=self._rpa.max_entries, ttl_s=self._rpa.ttl_s)
        self._rpa_known.clear()
        self._nobody.clear()
        self._memo.clear()
        for e in self._entries.values():
            self.identities.allow_app(e.profile_id)

    def add(self, entry: Entry, now: float) -> None:
        """One enrolment: its windows computed now (the others' stay)."""
        self._entries[entry.id] = entry
        t = _table_entry(entry)
        if t is None:
            self._rpa.add(entry.id, entry.secret)
            self._nobody.clear()  # an address that matched nobody may be this IRK's
            self._rpa_known.clear()  # a replaced IRK's addresses may be nobody's now
        else:
            self._table.add(t, now)
        self._memo.clear()
        self.identities.allow_app(entry.profile_id)

    def remove(self, identity_id: int) -> None:
        e = self._entries.pop(identity_id, None)
        if e is None:
            return
        if e.kind == "irk":
            self._rpa.remove(identity_id)
            self._rpa_known.clear()  # the other IRKs' addresses come back through the RPA cache
        else:
            self._table.remove(identity_id)
        self._memo.clear()

    def remove_profile(self, profile_id: int) -> None:
        """An erased (or linked-away) profile: its keys and table rows go now."""
        for e in [e for e in self._entries.values() if e.profile_id == profile_id]:
            self.remove(e.id)
        self._frames.pop(profile_id, None)

    def refresh(self, now: float) -> None:
        """The tick: windows that moved are computed afresh (the table's own incremental refresh), and the
        memo forgets the frame keys of the identifiers that entered or left, the rest staying answered."""
        changed: list[Any] = []
        if not self._table.refresh(now, changed=changed) and not changed:
            return
        memo = self._memo
        if len(changed) >= len(memo):
            memo.clear()
            return
        app = f"ibeacon:{self.app_uuid}:"
        pop = memo.pop
        for key in changed:
            pop(f"eddystone_eid:{key.hex()}" if type(key) is bytes else f"{app}{key >> 16}:{key & 0xFFFF}", None)

    def __len__(self) -> int:
        return len(self._entries)

    def size_bytes(self) -> int:
        """The table's memory, the RPA cache's (about 200 bytes an address) and the memo's (frame keys)."""
        return (self._table.size_bytes() + self._rpa.size_bytes() + sys.getsizeof(self._memo)
                + sys.getsizeof(self._rpa_known) + sys.getsizeof(self._nobody)
                + (len(self._rpa_known) + len(self._nobody)) * _ADDRESS_BYTES
                + sys.getsizeof(self._entries) + len(self._entries) * _ENTRY_BYTES)

    def holds(self, profile_id: int) -> bool:
        return any(e.profile_id == profile_id for e in self._entries.values())

    # ------------------------------------------------------------ the hot path

    def resolve(self, batch: Sequence[Advertisement], parse: Callable[[Sequence[Advertisement]], list[Pair]]
                ) -> list[Pair]:
        """The drain as (advert, frame) pairs for the guard: ``parse`` (parse_adverts) of it, with every
        rotating identity the gateway resolves replaced by its profile's frame. An advert from an address
        already resolved to an enrolled IRK is that profile whatever it carries, so it is not parsed; a
        frameless advert (the parser's ``frameless``) from an address not known yet is matched with the
        drain's others, once (``RpaCache.resolve_many``).

        Each source stays in time order (the adverts resolved by address, then the parsed ones, then those
        matched now), so every identity's sightings are in order unless one profile is heard both by an RPA
        and by a frame within one drain: then they are out of order by at most the drain's span, which the
        tracker's reorder allowance (2 s) absorbs for any drain shorter than that (the runtime's hold what
        arrived while the worker was busy)."""
        if not self._entries:
            return parse(batch)
        if not self._rpa.irk_count:
            return self._swap(parse(batch))
        known = self._rpa_known
        get = known.get
        rest: list[Advertisement] = []
        out: list[Any] = []
        to_parse, resolved = rest.append, out.append
        for adv in batch:  # one loop: measured cheaper than a map and two comprehensions over the drain
            m = get(adv.address)
            if m is None:
                to_parse(adv)
            else:
                resolved((adv, m))
        if out:
            self.figures["rpa"] += len(out)
            parsed = self._swap(parse(rest)) if rest else []
            out += parsed
        else:
            out = parsed = self._swap(parse(rest))
        frameless = getattr(parsed, "frameless", None)
        if frameless is None:  # a parser that does not say: the adverts that gave no pair
            framed = {id(adv) for adv, _ in parsed}
            frameless = [adv for adv in rest if id(adv) not in framed]
        nobody = self._nobody
        new = [adv for adv in frameless if adv.address not in nobody]
        if new:
            idents = self._rpa.resolve_many([adv.address for adv in new], batch[-1].time)
            if len(nobody) + len(new) > self._rpa.max_entries:
                nobody.clear()  # addresses come back through the RPA cache, which has its own bound
            for adv, ident in zip(new, idents, strict=True):
                address = adv.address
                first = address not in known
                f = _GONE if ident is None else self._by_identity(ident, address)
                if f is _GONE:
                    nobody.add(address)
                else:
                    self.figures["rpa"] += 1
                    self._matched += first
                    out.append((adv, f))
        return out

    def _swap(self, pairs: list[Pair]) -> list[Pair]:
        """Each frame that is a rotating identity the gateway resolves replaced by its profile's frame, in
        place (the parser's list, with its ``frameless``, is the resolver's to keep)."""
        memo = self._memo
        get = memo.get
        for i, (adv, frame) in enumerate(pairs):
            r = get(frame.key)
            if r is None:
                r = self._frame(frame)
            if r is not _PASS:
                pairs[i] = (adv, r)
        if len(memo) > _MEMO_MAX:
            memo.clear()
        return pairs

    def _frame(self, frame: Any) -> Any:
        """A frame the memo does not know: an EID or an app beacon looked up in the table, else passed on."""
        key = frame.key
        if key is None:
            return _PASS  # TLM: no identity, the guard leaves it out
        fmt = frame.format
        ident: int | None = None
        if fmt == "eddystone_eid":
            ident = self._table.lookup_eid(bytes.fromhex(frame.eid))
            what = "eid"
        elif fmt == "ibeacon" and frame.uuid == self.app_uuid:
            ident = self._table.lookup_app(frame.major, frame.minor)
            what = "app"
        else:
            self._memo[key] = _PASS
            return _PASS
        e = self._entries.get(ident) if ident is not None else None
        if e is None:
            self.figures["unknown_rotating"] += 1
            self._memo[key] = _PASS  # an identifier nobody enrolled: anonymous, as any unknown beacon
            return _PASS
        self.figures[what] += 1
        r = self._memo[key] = self._resolved(e.profile_id, frame.ref_power)
        return r

    def _by_identity(self, ident: int, address: str) -> Any:
        """An address resolved to an IRK: its profile's frame (remembered for the address), or _GONE when the
        identity was removed since."""
        e = self._entries.get(ident)
        if e is None:
            return _GONE
        known = self._rpa_known
        if len(known) >= self._rpa.max_entries:
            known.clear()  # addresses come back through the RPA cache, which has its own bound
        f = known[address] = self._resolved(e.profile_id, None)
        return f

    def _resolved(self, profile_id: int, ref_power: int | None) -> Resolved:
        r = self._frames.get(profile_id)
        if r is None or r.ref_power != ref_power:
            r = self._frames[profile_id] = Resolved(app_key(profile_id), ref_power)
        return r

    def stats(self) -> dict[str, Any]:
        return {**self.figures, "enrolled": len(self._entries), "table_bytes": self.size_bytes(),
                "addresses_known": len(self._rpa), "addresses_resolved": self._matched,
                "aes_passes": self._rpa.aes_passes}


def _table_entry(e: Entry) -> proto.EidEntry[int] | proto.AppEntry[int] | None:
    """The table's entry for an EID or an app identity; None for an IRK (the RPA cache's)."""
    if e.kind == "eid":
        return proto.EidEntry(e.id, e.secret, e.k, e.epoch)
    if e.kind == "app":
        return proto.AppEntry(e.id, e.secret, e.period_s)
    return None


# ------------------------------------------------------------ storage and enrolment


def read_entries(session: Session, box: SecretBox, profile_id: int | None = None) -> list[Entry]:
    """Enrolled identities with their keys decrypted (all, or one profile's); a row this key cannot open is
    logged by id and left out, so one bad row does not stop the gateway."""
    q = select(RotatingIdentity)
    if profile_id is not None:
        q = q.where(RotatingIdentity.profile_id == profile_id)
    out = []
    for row in session.scalars(q.order_by(RotatingIdentity.id)):
        try:
            secret = box.open(row.kind, row.secret)
        except ValueError as exc:
            log.error("rotating identity %d (profile %d, %s): %s; not resolved", row.id, row.profile_id, row.kind,
                      exc)
            continue
        out.append(_entry(row, secret))
    return out


def _entry(row: RotatingIdentity, secret: bytes) -> Entry:
    return Entry(row.id, row.profile_id, row.kind, secret, k=row.rotation_exponent or 0, epoch=row.epoch or 0,
                 period_s=row.period_s or 900)


def view(row: RotatingIdentity) -> dict[str, Any]:
    """What the API shows of an enrolment: never the key."""
    out: dict[str, Any] = {"id": row.id, "profile_id": row.profile_id, "kind": row.kind, "created_at": row.created_at}
    if row.kind == "eid":
        out.update(k=row.rotation_exponent, epoch=row.epoch)
    elif row.kind == "app":
        out.update(period_s=row.period_s)
    return out


def _identity_key(text: str | None) -> bytes:
    """An EID identity key as typed: the forms ``parse_irk`` reads (hex, maybe separated, or base64), taken
    in the order given (an identity key has no over-the-air byte order)."""
    if not text:
        raise Invalid("identity_key: required for an eid (16 bytes, as 32 hex digits or base64)")
    try:
        return proto.parse_irk(text, byte_order="msb")
    except ValueError as exc:
        raise Invalid("identity_key" + str(exc).removeprefix("irk")) from None


Apply = Callable[[Callable[[], None]], None]


def _now(fn: Callable[[], None]) -> None:
    fn()


class RotatingIdentities:
    """Enrol, list and remove a profile's rotating identities (the API's and the demo's door).

    ``apply`` runs a change of the resolver where the resolver lives (the runtime: on the pipeline's worker;
    alone: at once). The database row is committed first, so the change is durable before it resolves."""

    def __init__(self, db: Database, box: SecretBox, clock: Clock, resolver: Resolver, *, period_s: int = 900,
                 apply: Apply = _now) -> None:
        self.db = db
        self.box = box
        self.clock = clock
        self.resolver = resolver
        self.period_s = period_s
        self.app_uuid = resolver.app_uuid
        self.apply = apply

    def enrol(self, profile_id: int, kind: str, *, identity_key: str | None = None, k: int | None = None,
              epoch: int | None = None, irk: str | None = None) -> dict[str, Any]:
        """The enrolment's view; for ``app`` also ``secret`` (hex), ``uuid`` and ``period_s``: the only time
        the secret leaves the gateway."""
        if kind not in KINDS:
            raise Invalid(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        period: int | None = None
        if kind == "eid":
            secret = _identity_key(identity_key)
            if k is None or not 0 <= k <= 15:
                raise Invalid(f"k: the rotation exponent, 0 to 15, is required for an eid, got {k!r}")
            if irk is not None:
                raise Invalid("irk: not for an eid")
        elif kind == "irk":
            if irk is None:
                raise Invalid("irk: required (16 bytes as 32 hex digits, most significant byte first, or base64)")
            if identity_key is not None or k is not None:
                raise Invalid("identity_key, k: not for an irk")
            try:
                secret = proto.parse_irk(irk)
            except ValueError as exc:
                raise Invalid(f"irk: {exc}") from None
        else:
            if identity_key is not None or k is not None or irk is not None:
                raise Invalid("identity_key, k, irk: not for an app identity (the gateway issues its secret)")
            secret, period = secrets.token_bytes(SECRET_BYTES), self.period_s
        fingerprint = self.box.fingerprint(kind, secret)
        now = self.clock.now()
        with self.db.session() as s:
            if s.get(Profile, profile_id) is None:
                raise NotFound(f"profile {profile_id} not found")
            if s.scalar(select(RotatingIdentity.id).where(RotatingIdentity.fingerprint == fingerprint)):
                raise Conflict(f"this {kind} key is already enrolled")
            row = RotatingIdentity(profile_id=profile_id, kind=kind, secret=self.box.seal(kind, secret),
                                   fingerprint=fingerprint, rotation_exponent=k if kind == "eid" else None,
                                   period_s=period, epoch=(epoch or 0) if kind == "eid" else 0, created_at=now)
            s.add(row)
            s.flush()
            out = view(row)
            entry = _entry(row, secret)
        self.apply(lambda: self.resolver.add(entry, self.clock.now()))
        log.info("profile %d: a rotating %s identity enrolled (id %d)", profile_id, kind, entry.id)
        if kind == "app":
            out.update(secret=secret.hex(), uuid=self.app_uuid)
        return out

    def list(self, profile_id: int) -> list[dict[str, Any]]:
        with self.db.session() as s:
            if s.get(Profile, profile_id) is None:
                raise NotFound(f"profile {profile_id} not found")
            rows = s.scalars(select(RotatingIdentity).where(RotatingIdentity.profile_id == profile_id)
                             .order_by(RotatingIdentity.id))
            return [view(r) for r in rows]

    def remove(self, profile_id: int, identity_id: int) -> None:
        """The row and its key go; the resolver forgets it with the next job on the worker."""
        with self.db.session() as s:
            row = s.get(RotatingIdentity, identity_id)
            if row is None or row.profile_id != profile_id:
                raise NotFound(f"profile {profile_id} has no rotating identity {identity_id}")
            s.delete(row)
        self.apply(lambda: self.resolver.remove(identity_id))

    def forget_profile(self, profile_id: int) -> None:
        """An erasure (its rows went with the profile's, by cascade) or a link: the resolver drops it."""
        self.apply(lambda: self.resolver.remove_profile(profile_id))

    def reload_profile(self, profile_id: int) -> None:
        """After a link moved rows to ``profile_id``: the resolver holds them under it."""
        with self.db.session() as s:
            entries = read_entries(s, self.box, profile_id)

        def again() -> None:
            for e in entries:
                self.resolver.remove(e.id)
                self.resolver.add(e, self.clock.now())

        self.apply(again)

    def load(self, now: float) -> None:
        """At start (on the worker): every enrolment decrypted into the resolver."""
        with self.db.session() as s:
            entries = read_entries(s, self.box)
        self.resolver.load(entries, now)
