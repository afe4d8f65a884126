"""Rotating identities, the protocol half: pure functions and resolver tables (no clock, no I/O).

Three identifiers change over time so that a scanner without the keys cannot follow a customer; the
gateway, holding the keys, resolves each one locally (docs/identities.md, "Formats"):

- Eddystone-EID: an 8-byte ephemeral id from an identity key, a rotation exponent K and the beacon's clock.
- Bluetooth resolvable private addresses (RPA): a 48-bit address whose hash half is ``ah(IRK, prand)``.
- The shop app's rotating iBeacon: (major, minor) from HMAC-SHA256 of a per-profile secret and the window.

Interface (what the enrolment, storage and pipeline code builds on)::

    eid(identity_key: bytes, k: int, time_s: int) -> bytes           # 8 bytes; time_s is the beacon's clock
    eid_window_start(time_s: int, k: int) -> int                     # time_s with its low k bits cleared
    rpa_hash(irk: bytes, prand: bytes) -> bytes                      # ah(): 3 bytes, both MSB-first
    is_rpa(address: str) -> bool                                     # "AA:BB:..": top two bits 0b01
    rpa_matches(irk: bytes, address: str) -> bool
    parse_irk(text: str, *, byte_order: str = "auto") -> bytes       # hex or base64 -> MSB-first; ValueError
    app_beacon(secret: bytes, window: int) -> tuple[int, int]        # (major, minor)
    app_window(time_s: float, period_s: int = 900) -> int            # floor(unix time / period)

    RpaCache(irks: Mapping[I, bytes] = {}, *, max_entries=65536, ttl_s=900.0)
        .resolve(address, now) -> I | None      # once per address per ttl; unknown addresses remembered
        .resolve_many(addresses, now) -> list[I | None]   # the same for a drain, new addresses batched per IRK
        .add(ident, irk) / .remove(ident) / .size_bytes() / .aes_passes / .hits / .misses / len()
    EidEntry(ident, identity_key, k, epoch=0)    # beacon time = floor(unix now) - epoch
    AppEntry(ident, secret, period_s=900)
    RotatingTable(*, eid_slack_s=600, max_eid_windows=8)
        .build(entries, now) / .add(entry, now) / .refresh(now, max_windows=None, changed=None) -> int (windows
            computed; ``changed`` gets the keys that entered or left)
        .lookup_eid(eid: bytes) -> I | None / .lookup_app(major, minor) -> I | None
        .eid_offset(ident, eid) -> int | None   # seconds the heard EID's window is from the expected one
        .remove(ident) / .size_bytes() / len() / .rows / .collisions

``I`` is whatever hashable id the caller uses (a rotating identity's row id). The functions validate
their arguments and raise ValueError naming the field; the lookups never raise on what the radio hears.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import math
import re
import sys
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

__all__ = [
    "APP_PERIOD_S",
    "AppEntry",
    "EidEntry",
    "RotatingTable",
    "RpaCache",
    "app_beacon",
    "app_window",
    "eid",
    "eid_window_start",
    "is_rpa",
    "parse_irk",
    "rpa_hash",
    "rpa_matches",
]

I = TypeVar("I", bound=Hashable)  # noqa: E741 - the caller's identity id

APP_PERIOD_S = 900
"""The app beacon's default window: 15 minutes, the interval phones rotate their own addresses at."""

_TEMP_KEY_SALT = b"\x00" * 11 + b"\xff" + b"\x00" * 2
_PAD11 = b"\x00" * 11
_PAD13 = b"\x00" * 13
_ADDRESS = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")


def _encryptor(key: bytes) -> CipherContext:
    """An AES-128 ECB context: one block in, one block out; it is reused, since ECB keeps no state."""
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor()


def _key16(value: bytes, field: str) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != 16:
        raise ValueError(f"{field}: expected 16 bytes (an AES-128 key), got {_describe(value)}")
    return bytes(value)


def _describe(value: object) -> str:
    return f"{len(value)} bytes" if isinstance(value, bytes | bytearray) else type(value).__name__


def _check_k(k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 15:
        raise ValueError(f"k: the rotation exponent must be an integer 0 to 15, got {k!r}")
    return k


def _check_time(time_s: int) -> int:
    if not isinstance(time_s, int) or isinstance(time_s, bool) or not 0 <= time_s < 1 << 32:
        raise ValueError(f"time_s: the beacon clock is a 32-bit count of seconds (0 to 2^32-1), got {time_s!r}")
    return time_s


# ---------------------------------------------------------------------------------------------- Eddystone-EID

def eid_window_start(time_s: int, k: int) -> int:
    """The first second of the EID window ``time_s`` falls in: its low ``k`` bits cleared."""
    return _check_time(time_s) & ~((1 << _check_k(k)) - 1)


def _temporary_key(identity_key: bytes, time_s: int) -> bytes:
    """AES(identity key, 0x00*11 | 0xFF | 0x00 0x00 | top 16 bits of the time): changes every 65536 s."""
    return _encryptor(identity_key).update(_TEMP_KEY_SALT + (time_s >> 16).to_bytes(2, "big"))


def _eid_with(temporary_key: bytes, k: int, window_start: int) -> bytes:
    return _encryptor(temporary_key).update(_PAD11 + bytes((k,)) + window_start.to_bytes(4, "big"))[:8]


def eid(identity_key: bytes, k: int, time_s: int) -> bytes:
    """Eddystone-EID for beacon time ``time_s`` and rotation exponent ``k`` (google/eddystone
    eddystone-eid/eid-computation.md): a temporary key AES-128(identity key, 0x00*11 | 0xFF | 0x00*2 |
    time >> 16 as 2 bytes big-endian), then the first 8 bytes of AES-128(temporary key, 0x00*11 | k |
    the time with its low k bits cleared, 4 bytes big-endian). A new EID every 2^k seconds."""
    key = _key16(identity_key, "identity_key")
    start = eid_window_start(time_s, k)
    return _eid_with(_temporary_key(key, start), k, start)


# ----------------------------------------------------------------------------- resolvable private addresses

def _address_bytes(address: str) -> bytes | None:
    """"AA:BB:CC:DD:EE:FF" (BlueZ and bleak print addresses MSB-first) as 6 bytes, or None if not one."""
    if type(address) is not str or len(address) != 17 or _ADDRESS.fullmatch(address) is None:
        return None
    return bytes.fromhex(address.replace(":", ""))


def is_rpa(address: str) -> bool:
    """Whether an address has the resolvable private form: the top two bits of its first (most
    significant) byte are 0b01. Random static (0b11) and non-resolvable (0b00) addresses are not."""
    raw = _address_bytes(address)
    return raw is not None and raw[0] & 0xC0 == 0x40


def rpa_hash(irk: bytes, prand: bytes) -> bytes:
    """The Core spec's ah() (Vol 3 Part H 2.2.2): e(IRK, 0x00*13 | prand), the low 24 bits.

    Everything is MSB-first, as the spec writes it and as AES takes it: ``irk`` as the spec's sample
    prints it (ec0234a3...), ``prand`` as the address's first three bytes, and the hash returned is
    the address's last three bytes. The low 24 bits of the MSB-first output are its last 3 bytes."""
    key = _key16(irk, "irk")
    if not isinstance(prand, bytes | bytearray) or len(prand) != 3:
        raise ValueError(f"prand: expected 3 bytes, got {_describe(prand)}")
    return _encryptor(key).update(_PAD13 + bytes(prand))[13:]


def rpa_matches(irk: bytes, address: str) -> bool:
    """Whether ``address`` ("70:81:94:0D:FB:AA", prand = the first 3 bytes, hash = the last 3) was made
    with ``irk`` (16 bytes MSB-first: what ``parse_irk`` returns)."""
    raw = _address_bytes(address)
    if raw is None or raw[0] & 0xC0 != 0x40:
        return False
    return rpa_hash(irk, raw[:3]) == raw[3:]


_HEX_SEPARATORS = re.compile(r"[\s:\-]")


def parse_irk(text: str, *, byte_order: str = "auto") -> bytes:
    """An IRK as typed or exported, to the 16 bytes MSB-first that ``rpa_hash`` takes.

    Hex: 32 digits, with an optional ``0x`` and spaces, colons or dashes between bytes. Base64: 24
    characters ending ``==``, the padding optional (the form macOS Keychain and iOS tools export). An ``irk:`` prefix is
    dropped. ``byte_order``: ``"auto"`` reads hex as MSB-first (how the Core spec, ESPresense and Home
    Assistant print it) and base64 as LSB-first (Apple stores the key in its over-the-air order, least
    significant byte first; Home Assistant reverses it too); ``"msb"`` or ``"lsb"`` force one order for
    both, for keys from an Android btsnoop log or BlueZ, which are little-endian however they are written.
    Raises ValueError saying what was wrong; the key itself is never echoed.
    """
    if byte_order not in ("auto", "msb", "lsb"):
        raise ValueError(f"byte_order: expected 'auto', 'msb' or 'lsb', got {byte_order!r}")
    if not isinstance(text, str):
        raise ValueError(f"irk: expected text (hex or base64), got {type(text).__name__}")
    value = text.strip()
    if value[:4].lower() == "irk:":
        value = value[4:].strip()
    if not value:
        raise ValueError("irk: empty")
    compact = _HEX_SEPARATORS.sub("", value)
    if compact[:2].lower() == "0x":
        compact = compact[2:]
    raw: bytes
    if re.fullmatch(r"[0-9A-Fa-f]*", compact):
        if len(compact) != 32:
            raise ValueError(f"irk: hex must have 32 digits (16 bytes), got {len(compact)} digits")
        raw, lsb = bytes.fromhex(compact), byte_order == "lsb"
    else:
        try:
            raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)  # padding optional
        except (binascii.Error, ValueError):
            raise ValueError("irk: neither 32 hex digits nor valid base64") from None
        if len(raw) != 16:
            raise ValueError(f"irk: base64 must decode to 16 bytes, got {len(raw)}")
        lsb = byte_order != "msb"
    if raw == bytes(16):
        raise ValueError("irk: all zeros (a device that does not use privacy distributes no IRK)")
    return raw[::-1] if lsb else raw


# ------------------------------------------------------------------------------------- the app's iBeacon

def app_window(time_s: float, period_s: int = APP_PERIOD_S) -> int:
    """The app beacon's window number: floor(Unix time / period)."""
    if not isinstance(period_s, int) or isinstance(period_s, bool) or period_s <= 0:
        raise ValueError(f"period_s: expected a positive number of seconds, got {period_s!r}")
    if not math.isfinite(time_s):
        raise ValueError(f"time_s: expected a finite time, got {time_s!r}")
    return int(time_s // period_s)


def app_beacon(secret: bytes, window: int) -> tuple[int, int]:
    """(major, minor) the app advertises in ``window``: HMAC-SHA256(secret, window as 8 bytes big-endian
    unsigned); major = bytes 0-1, minor = bytes 2-3, both big-endian. Any value 0 to 65535 is allowed,
    0 included (the iBeacon format reserves none)."""
    if not isinstance(secret, bytes | bytearray) or len(secret) < 16:
        raise ValueError(f"secret: expected at least 16 bytes, got {_describe(secret)}")
    if not isinstance(window, int) or isinstance(window, bool) or not 0 <= window < 1 << 64:
        raise ValueError(f"window: expected an integer 0 to 2^64-1, got {window!r}")
    digest = hmac.new(secret, window.to_bytes(8, "big"), hashlib.sha256).digest()
    return digest[0] << 8 | digest[1], digest[2] << 8 | digest[3]


_HMAC_STATE_BYTES = 800  # a keyed HMAC-SHA256 in OpenSSL, outside Python's heap (measured as resident memory)
_AES_STATE_BYTES = 1100  # an AES-128 ECB context in OpenSSL, likewise


def _app_mac(secret: bytes) -> Any:
    """The HMAC keyed once per secret; each window copies it (half the cost of keying again)."""
    return hmac.new(secret, None, hashlib.sha256)


def _app_key(mac: Any, window: int) -> int:
    """major << 16 | minor for one window, from a pre-keyed HMAC: the table's int key."""
    h = mac.copy()
    h.update(window.to_bytes(8, "big"))
    return int.from_bytes(h.digest()[:4], "big")


# ---------------------------------------------------------------------------------------------- RPA cache

class RpaCache(Generic[I]):
    """Resolves addresses to enrolled IRKs, each address once per ``ttl_s``.

    A new address costs one AES pass per enrolled IRK (``aes_passes`` counts them); its answer, the
    matching id or None for no match, is remembered until ``now + ttl_s``, so a phone's address costs one
    pass per IRK per rotation and a flood of random addresses one per address, then dictionary hits.
    Addresses that are not resolvable private ones (random static, public) are answered None without any
    AES and not stored. At most ``max_entries`` answers are kept; beyond that the oldest are dropped first
    (all share one ttl, so insertion order is expiry order). Enrolling an IRK forgets the remembered
    misses (one may be its address); removing one drops its answers at once.
    """

    __slots__ = ("_entries", "_irks", "aes_passes", "hits", "max_entries", "misses", "ttl_s")

    def __init__(self, irks: Mapping[I, bytes] | None = None, *, max_entries: int = 65536,
                 ttl_s: float = 900.0) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries: expected at least 1, got {max_entries!r}")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s: expected a positive number of seconds, got {ttl_s!r}")
        self.max_entries = max_entries
        self.ttl_s = float(ttl_s)
        self._irks: dict[I, CipherContext] = {}
        self._entries: dict[str, tuple[I | None, float]] = {}
        self.aes_passes = 0
        self.hits = 0
        self.misses = 0
        for ident, irk in (irks or {}).items():
            self.add(ident, irk)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def irk_count(self) -> int:
        return len(self._irks)

    def add(self, ident: I, irk: bytes) -> None:
        """Enrol (or replace) one IRK, 16 bytes MSB-first."""
        self._irks[ident] = _encryptor(_key16(irk, "irk"))
        self._entries = {a: v for a, v in self._entries.items() if v[0] is not None and v[0] != ident}

    def remove(self, ident: I) -> None:
        """Forget one IRK and every address resolved to it."""
        if self._irks.pop(ident, None) is not None:
            self._entries = {a: v for a, v in self._entries.items() if v[0] != ident}

    def clear(self) -> None:
        self._entries.clear()

    def size_bytes(self) -> int:
        """Memory held: the remembered answers and one AES context per IRK (an estimate, as the table's)."""
        size = sys.getsizeof(self._entries) + sys.getsizeof(self._irks)
        size += len(self._entries) * (sys.getsizeof("AA:BB:CC:DD:EE:FF") + sys.getsizeof((None, 0.0))
                                      + sys.getsizeof(0.0))
        return size + sum(sys.getsizeof(i) + sys.getsizeof(c) + _AES_STATE_BYTES for i, c in self._irks.items())

    def resolve(self, address: str, now: float) -> I | None:
        """The id whose IRK made ``address``, or None; AES only for an address not seen within ttl."""
        entry = self._entries.get(address)
        if entry is not None and entry[1] > now:
            self.hits += 1
            return entry[0]
        raw = _address_bytes(address)
        if raw is None or raw[0] & 0xC0 != 0x40:
            return None
        self.misses += 1
        block, want = _PAD13 + raw[:3], raw[3:]
        found: I | None = None
        passes = 0
        for ident, enc in self._irks.items():
            passes += 1
            if enc.update(block)[13:] == want:
                found = ident
                break
        self.aes_passes += passes
        self._store(address, found, now)
        return found

    def resolve_many(self, addresses: Sequence[str], now: float) -> list[I | None]:
        """``resolve`` for a drain of addresses: the same answers and counts of misses, but the addresses the
        cache does not know go through each IRK in one AES call, so a flood of new addresses costs a few
        nanoseconds per address and IRK instead of a Python loop turn each (``aes_passes`` still counts
        one per address and IRK)."""
        out: list[I | None] = [None] * len(addresses)
        entries = self._entries
        pending: dict[str, list[int]] = {}
        raws: list[bytes] = []
        for i, address in enumerate(addresses):
            entry = entries.get(address)
            if entry is not None and entry[1] > now:
                self.hits += 1
                out[i] = entry[0]
                continue
            waiting = pending.get(address)
            if waiting is not None:
                waiting.append(i)
                continue
            raw = _address_bytes(address)
            if raw is None or raw[0] & 0xC0 != 0x40:
                continue
            pending[address] = [i]
            raws.append(raw)
        if not raws:
            return out
        if len(raws) < 4:  # too few to be worth the batch's set-up
            for address, where in pending.items():
                found = self.resolve(address, now)
                for i in where:
                    out[i] = found
            return out
        self.misses += len(raws)
        results = self._search(raws)
        for (address, where), found in zip(pending.items(), results, strict=True):
            self._store(address, found, now)
            for i in where:
                out[i] = found
        return out

    def _search(self, raws: list[bytes]) -> list[I | None]:
        """Each address's IRK, every IRK tried on all the addresses at once: one AES call over the blocks,
        then the three hash bytes of every block compared as three big integers, a zero byte in their XOR
        meaning a match (the classic has-a-zero-byte test, exact about whether one exists)."""
        n = len(raws)
        plain = b"".join([_PAD13 + raw[:3] for raw in raws])
        want = [int.from_bytes(bytes([raw[j] for raw in raws]), "big") for j in (3, 4, 5)]
        ones = int.from_bytes(b"\x01" * n, "big")
        highs = ones * 0x80
        found: list[I | None] = [None] * n
        left = n
        passes = 0
        for ident, enc in self._irks.items():
            passes += n
            ct = enc.update(plain)
            z = ((int.from_bytes(ct[13::16], "big") ^ want[0]) | (int.from_bytes(ct[14::16], "big") ^ want[1])
                 | (int.from_bytes(ct[15::16], "big") ^ want[2]))
            if (z - ones) & ~z & highs:
                diff = z.to_bytes(n, "big")
                j = diff.find(0)
                while j >= 0:
                    if found[j] is None:
                        found[j] = ident
                        left -= 1
                    j = diff.find(0, j + 1)
                if not left:
                    break
        self.aes_passes += passes
        return found

    def _store(self, address: str, found: I | None, now: float) -> None:
        entries = self._entries
        if address in entries:
            del entries[address]  # expired: re-inserted at the young end
        elif len(entries) >= self.max_entries:
            self._evict(now)
        entries[address] = (found, now + self.ttl_s)

    def _evict(self, now: float) -> None:
        """Drop the expired answers, or, when none is, the oldest eighth (amortised: not one per insert)."""
        entries = self._entries
        expired = [a for a, (_, until) in entries.items() if until <= now]
        if not expired:
            expired = [a for a, _ in zip(entries, range(max(1, self.max_entries // 8)), strict=False)]
        for a in expired:
            del entries[a]


# ------------------------------------------------------------------------------------------ rotating table

@dataclass(frozen=True, slots=True)
class EidEntry(Generic[I]):
    """An enrolled Eddystone-EID beacon: its identity key, K, and ``epoch``, the Unix second its clock read
    0 (beacon time = floor(unix now) - epoch)."""

    ident: I
    identity_key: bytes
    k: int
    epoch: int = 0

    def __post_init__(self) -> None:
        _key16(self.identity_key, "identity_key")
        _check_k(self.k)
        if not isinstance(self.epoch, int) or isinstance(self.epoch, bool):
            raise ValueError(f"epoch: expected an integer Unix second, got {self.epoch!r}")


@dataclass(frozen=True, slots=True)
class AppEntry(Generic[I]):
    """An enrolled app: its secret and window length."""

    ident: I
    secret: bytes
    period_s: int = APP_PERIOD_S

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) < 16:
            raise ValueError(f"secret: expected at least 16 bytes, got {_describe(self.secret)}")
        if not isinstance(self.period_s, int) or isinstance(self.period_s, bool) or self.period_s <= 0:
            raise ValueError(f"period_s: expected a positive number of seconds, got {self.period_s!r}")


class _Ambiguous:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<ambiguous>"


_AMBIGUOUS: Any = _Ambiguous()  # a key two identities produce: resolved to neither


class _Slot:
    """What the table holds for one identity: how to compute it, the windows it has in, their keys."""

    __slots__ = ("app_mac", "due", "entry", "first", "keys", "last", "temp", "temp_hi")

    def __init__(self, entry: EidEntry[Any] | AppEntry[Any]) -> None:
        self.entry = entry
        self.first = 0  # windows [first, last] are in the table (none when last < first)
        self.last = -1
        self.keys: dict[int, Any] = {}  # window -> the key it put in the table
        self.temp: bytes = b""  # EID: the temporary key for time >> 16 == temp_hi
        self.temp_hi = -1
        self.app_mac: Any = _app_mac(entry.secret) if isinstance(entry, AppEntry) else None
        self.due = 0  # the sequence number of this slot's one live heap entry


class RotatingTable(Generic[I]):
    """Precomputed rotating identifiers around now: {eid bytes -> id} and {major << 16 | minor -> id}.

    Each app secret has its previous, current and next window in; each EID beacon the windows that
    overlap its clock +- ``eid_slack_s`` (the clock error the resolver tolerates; 600 s is 46 days of the
    spec's worst-case 150 ppm drift), at least the previous, current and next, at most
    ``max_eid_windows`` (the nearest, for small K). ``refresh(now)`` moves them as windows pass, computing
    only the windows that enter (a heap orders identities by when their next window starts, so a refresh
    with nothing due is one comparison). A key two identities produce is resolved to neither (counted in ``collisions``)
    until one leaves. Lookups are one dictionary hit and never raise.
    """

    def __init__(self, *, eid_slack_s: int = 600, max_eid_windows: int = 8) -> None:
        if eid_slack_s < 0:
            raise ValueError(f"eid_slack_s: expected 0 or more seconds, got {eid_slack_s!r}")
        if max_eid_windows < 3:
            raise ValueError(f"max_eid_windows: expected at least 3, got {max_eid_windows!r}")
        self.eid_slack_s = int(eid_slack_s)
        self.max_eid_windows = int(max_eid_windows)
        self._eids: dict[bytes, I] = {}
        self._apps: dict[int, I] = {}
        self._shared: dict[Any, list[I]] = {}  # key -> every id holding it, for keys held more than once
        self._slots: dict[I, _Slot] = {}
        self._due: list[tuple[float, int, I]] = []  # (when the next window starts, tiebreak, id)
        self._seq = 0
        self._changed: list[Any] | None = None  # refresh's ``changed``, while it runs
        self.now = 0.0

    # -- building

    def build(self, entries: Iterable[EidEntry[I] | AppEntry[I]], now: float) -> None:
        """Replace everything with ``entries``' windows around ``now``."""
        self._eids, self._apps, self._shared, self._slots, self._due = {}, {}, {}, {}, []
        self.now = now
        for entry in entries:
            self.add(entry, now)

    def add(self, entry: EidEntry[I] | AppEntry[I], now: float) -> None:
        """Add (or replace) one identity with its windows around ``now``."""
        self.now = now
        if entry.ident in self._slots:
            self.remove(entry.ident)
        slot = _Slot(entry)
        self._slots[entry.ident] = slot
        self._move(slot, now)

    def remove(self, ident: I) -> None:
        """Drop an identity's rows at once (erasure); its heap entry is skipped when it comes up."""
        slot = self._slots.pop(ident, None)
        if slot is None:
            return
        table: dict[Any, I] = self._eids if isinstance(slot.entry, EidEntry) else self._apps
        for key in slot.keys.values():
            self._drop(table, key, ident)
        slot.keys.clear()

    def refresh(self, now: float, max_windows: int | None = None, changed: list[Any] | None = None) -> int:
        """Move every identity whose windows changed by ``now``; returns how many windows were computed.

        ``max_windows`` bounds one call's work: the identities left over stay due and the next call takes
        them. The next window of every identity is already in the table when its window starts, so
        spreading a window edge's work (every app secret moves at once) over a few calls costs no lookups.
        ``changed``, when given, receives every key that entered or left (an EID's bytes, an app beacon's
        ``major << 16 | minor``): a caller's memo of lookups can forget just those.
        """
        self.now = now
        self._changed = changed
        due, computed = self._due, 0
        try:
            while due and due[0][0] <= now:
                if max_windows is not None and computed >= max_windows:
                    break
                _, seq, ident = heapq.heappop(due)
                slot = self._slots.get(ident)
                if slot is not None and slot.due == seq:  # else removed, or replaced since it was pushed
                    computed += self._move(slot, now)
        finally:
            self._changed = None
        return computed

    @property
    def pending(self) -> int:
        """Identities whose windows are due to move (what a bounded ``refresh`` left), stale entries included."""
        now = self.now
        return sum(1 for until, _, _ in self._due if until <= now)

    # -- lookups (the hot path)

    def lookup_eid(self, eid_value: bytes) -> I | None:
        found = self._eids.get(eid_value)
        return None if found is _AMBIGUOUS else found

    def lookup_app(self, major: int, minor: int) -> I | None:
        found = self._apps.get(major << 16 | minor)
        return None if found is _AMBIGUOUS else found

    def eid_offset(self, ident: I, eid_value: bytes) -> int | None:
        """How far from the window the beacon's clock should be in (per its epoch) ``eid_value`` is, in
        seconds (a multiple of 2^K: 0 on time, +1024 one K = 10 window fast), or None if it is not one of
        ``ident``'s EIDs in the table: a caller can follow a beacon's drift by moving its epoch."""
        slot = self._slots.get(ident)
        if slot is None or not isinstance(slot.entry, EidEntry):
            return None
        entry = slot.entry
        expected = max(0, math.floor(self.now) - entry.epoch) >> entry.k
        for window, key in slot.keys.items():
            if key == eid_value:
                return (window - expected) << entry.k
        return None

    # -- figures

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def rows(self) -> int:
        return len(self._eids) + len(self._apps)

    @property
    def collisions(self) -> int:
        return len(self._shared)

    def size_bytes(self) -> int:
        """Memory the table holds: its dicts, keys, slots, heap and pre-keyed HMACs (the entries themselves
        excluded: the caller holds those anyway). An estimate from ``sys.getsizeof`` plus OpenSSL's state,
        which Python cannot see (``_HMAC_STATE_BYTES``)."""
        size = sum(sys.getsizeof(d) for d in (self._eids, self._apps, self._slots, self._due, self._shared))
        size += sum(map(sys.getsizeof, self._eids)) + sum(map(sys.getsizeof, self._apps))
        size += len(self._due) * (sys.getsizeof((0.0, 0, 0)) + sys.getsizeof(1.0) + sys.getsizeof(1 << 40))
        slot_size = sys.getsizeof(_Slot.__new__(_Slot))
        for ident, slot in self._slots.items():
            size += sys.getsizeof(ident) + slot_size + sys.getsizeof(slot.keys) + sys.getsizeof(slot.temp)
            if slot.app_mac is not None:
                size += sys.getsizeof(slot.app_mac) + _HMAC_STATE_BYTES
        return size

    # -- internals

    def _windows(self, slot: _Slot, now: float) -> tuple[int, int, float]:
        """The windows wanted at ``now`` (first, last) and when that set next changes (Unix seconds)."""
        entry = slot.entry
        if isinstance(entry, AppEntry):
            period = entry.period_s
            w = int(now // period)
            return max(0, w - 1), w + 1, (w + 1) * period
        size = 1 << entry.k
        t = math.floor(now) - entry.epoch
        lo = max(0, (t - self.eid_slack_s) >> entry.k)
        hi = (t + self.eid_slack_s) >> entry.k
        cur = max(0, t) >> entry.k
        lo, hi = min(lo, max(0, cur - 1)), max(hi, cur + 1)
        if hi - lo + 1 > self.max_eid_windows:  # small K: the windows nearest now
            half = self.max_eid_windows // 2
            lo = max(0, cur - half)
            hi = min(lo + self.max_eid_windows - 1, ((1 << 32) - 1) >> entry.k)
            if 2 * self.eid_slack_s // size >= self.max_eid_windows:
                # The slack spans more windows than are kept at any t: the set moves with cur alone.
                return lo, hi, float((max(0, t) // size + 1) * size + entry.epoch)
        hi = min(hi, ((1 << 32) - 1) >> entry.k)
        # The set changes when t + slack enters a new window or t - slack leaves one, or cur moves on.
        nxt = min(((t + self.eid_slack_s) // size + 1) * size - self.eid_slack_s,
                  ((t - self.eid_slack_s) // size + 1) * size + self.eid_slack_s,
                  (max(0, t) // size + 1) * size)
        return lo, hi, float(nxt + entry.epoch)

    def _move(self, slot: _Slot, now: float) -> int:
        entry = slot.entry
        ident: I = entry.ident
        first, last, until = self._windows(slot, now)
        table: dict[Any, I] = self._eids if isinstance(entry, EidEntry) else self._apps
        keys = slot.keys
        changed = self._changed
        for w in [w for w in keys if w < first or w > last]:
            key = keys.pop(w)
            self._drop(table, key, ident)
            if changed is not None:
                changed.append(key)
        computed = 0
        for w in range(first, last + 1):
            if w not in keys:
                key = self._key(slot, w)
                keys[w] = key
                self._put(table, key, ident)
                computed += 1
                if changed is not None:
                    changed.append(key)
        slot.first, slot.last = first, last
        self._seq += 1
        slot.due = self._seq
        heapq.heappush(self._due, (until, self._seq, ident))
        return computed

    @staticmethod
    def _key(slot: _Slot, window: int) -> Any:
        entry = slot.entry
        if isinstance(entry, AppEntry):
            return _app_key(slot.app_mac, window)
        start = window << entry.k
        hi = start >> 16
        if hi != slot.temp_hi:
            slot.temp, slot.temp_hi = _temporary_key(entry.identity_key, start), hi
        return _eid_with(slot.temp, entry.k, start)

    def _put(self, table: dict[Any, I], key: Any, ident: I) -> None:
        held = table.get(key)
        if held is None:
            table[key] = ident
            return
        owners = self._shared.get(key)
        if owners is None:
            owners = self._shared[key] = [held]
        owners.append(ident)
        table[key] = owners[0] if all(o == owners[0] for o in owners) else _AMBIGUOUS

    def _drop(self, table: dict[Any, I], key: Any, ident: I) -> None:
        owners = self._shared.get(key)
        if owners is None:
            if table.get(key) == ident:
                del table[key]
            return
        owners.remove(ident)
        if len(owners) == 1:
            del self._shared[key]
        table[key] = owners[0] if all(o == owners[0] for o in owners) else _AMBIGUOUS
