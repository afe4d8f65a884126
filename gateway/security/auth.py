"""Who may call the API, how often, and which creating requests were already answered.

- Admin API keys: ``gk_<id>_<secret>``, 256 random bits, so a SHA-256 of the whole key is enough to
  store (a slow hash protects guessable passwords, not random keys). The id is public and finds the
  row; the hash is compared in constant time. Each key holds scopes; ``admin`` implies all of them.
  The key configured as ``[api] admin_key`` is a full-scope key held only as its hash, in memory.
- App token revocation: a revoked token id (logout), or a profile's token generation bumped past
  the one a token was issued under (revoke them all).
- Rate limits: a token bucket per credential (admin key id, app token id), on the injectable clock.
- Idempotency keys: the first 2xx/3xx answer to a POST, sealed and kept for a day, replayed to a
  retry with the same body; a claim row keeps a concurrent duplicate from running at all.

Nothing here logs a key or a token: only key ids, profile ids and reasons.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gateway.clock import Clock
from gateway.security.tokens import Claims
from gateway.storage.db import Database
from gateway.storage.models import ApiKey, IdempotencyKey, RevokedToken, TokenGeneration

log = logging.getLogger("gateway.security.auth")

SCOPES = ("read", "write", "campaigns", "privacy", "admin")
"""read: GET of admin resources; write: create/change profiles, carts, catalogue, devices, redemptions;
campaigns: manage campaigns; privacy: export and erase; admin: everything, including key management."""
ALL_SCOPES = frozenset(SCOPES)
KEY_PREFIX = "gk"
CONFIG_KEY_ID = "config"
LAST_USED_EVERY_S = 60.0  # last_used_at is written at most this often per key, not on every request
_KEY_RE = re.compile(r"^gk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


class AuthError(Exception):
    """A refused credential: HTTP status, a detail safe to show, and the reason for the log."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: ``key:<id>`` with scopes, or ``profile:<id>`` with a token (rate-limited by token id)."""

    id: str
    scopes: frozenset[str]
    profile_id: int | None = None
    limit_key: str = ""  # the rate-limit bucket: the key id or the app token id

    def allows(self, needed: Iterable[str]) -> bool:
        return "admin" in self.scopes or any(s in self.scopes for s in needed)


def parse_scopes(scopes: Iterable[str] | str) -> list[str]:
    """``"read,write"`` or a list; unknown or no scopes are an error (a key that can do nothing is a mistake)."""
    items = scopes.split(",") if isinstance(scopes, str) else list(scopes)
    wanted = {s.strip().lower() for s in items if s.strip()}
    unknown = sorted(wanted - ALL_SCOPES)
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(SCOPES)}")
    if not wanted:
        raise ValueError(f"at least one scope is needed: {', '.join(SCOPES)}")
    return [s for s in SCOPES if s in wanted]


def hash_secret(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


# ------------------------------------------------------------------ admin API keys


def key_view(row: ApiKey) -> dict[str, Any]:
    """What may be shown of a key: never the key itself, nor its hash."""
    return {"id": row.id, "prefix": f"{KEY_PREFIX}_{row.id}_", "name": row.name, "scopes": list(row.scopes),
            "created_at": row.created_at, "expires_at": row.expires_at, "last_used_at": row.last_used_at,
            "revoked_at": row.revoked_at}


def create_key(s: Session, name: str, scopes: Iterable[str] | str, now: float,
               expires_at: float | None = None) -> tuple[str, dict[str, Any]]:
    """A new key: (the raw key, to show once, and its view). Only its hash is stored."""
    granted = parse_scopes(scopes)
    name = name.strip()[:100] or "unnamed"
    key_id = secrets.token_hex(6)
    raw = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    row = ApiKey(id=key_id, name=name, secret_hash=hash_secret(raw), scopes=granted, created_at=now,
                 expires_at=expires_at)
    s.add(row)
    s.flush()
    log.info("api key created: id=%s name=%r scopes=%s", key_id, name, ",".join(granted))
    return raw, key_view(row)


def list_keys(s: Session) -> list[dict[str, Any]]:
    return [key_view(k) for k in s.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id))]


def get_key(s: Session, key_id: str) -> dict[str, Any] | None:
    row = s.get(ApiKey, key_id)
    return key_view(row) if row else None


def revoke_key(s: Session, key_id: str, now: float) -> dict[str, Any] | None:
    """Revoked at once and for good; None if there is no such key. Revoking twice keeps the first time."""
    row = s.get(ApiKey, key_id)
    if row is None:
        return None
    if row.revoked_at is None:
        row.revoked_at = now
        log.info("api key revoked: id=%s", key_id)
    return key_view(row)


def key_id_of(raw: str) -> str | None:
    """The public id inside a well-formed key, for logs and lookups; None for anything else."""
    m = _KEY_RE.match(raw)
    return m.group(1) if m else None


def authenticate_key(s: Session, raw: str, now: float) -> Principal:
    key_id = key_id_of(raw)
    row = s.get(ApiKey, key_id) if key_id else None
    # Compare even when there is no row, so a wrong id and a wrong secret take the same path.
    ok = hmac.compare_digest(hash_secret(raw), row.secret_hash if row else "0" * 64)
    if row is None or not ok:
        log.info("admin key refused: id=%s reason=unknown", key_id or "-")
        raise AuthError(401, "unknown API key")
    if row.revoked_at is not None:
        log.info("admin key refused: id=%s reason=revoked", key_id)
        raise AuthError(401, "this API key was revoked")
    if row.expires_at is not None and row.expires_at <= now:
        log.info("admin key refused: id=%s reason=expired", key_id)
        raise AuthError(401, "this API key has expired")
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY_S:
        row.last_used_at = now
    return Principal(f"key:{row.id}", frozenset(row.scopes), limit_key=f"key:{row.id}")


# ------------------------------------------------------------------ app token revocation


def token_generation(s: Session, profile_id: int) -> int:
    row = s.get(TokenGeneration, profile_id)
    return row.generation if row else 0


def token_refusal(s: Session, claims: Claims) -> str | None:
    """Why a validly signed token is no longer good (None: it is)."""
    if claims.generation < token_generation(s, claims.profile_id):
        return "token revoked"
    if s.get(RevokedToken, claims.token_id[:32]) is not None:
        return "token revoked"
    return None


def revoke_token(s: Session, claims: Claims, now: float) -> None:
    """Logout: this token only. Kept until it would have expired, then purged."""
    if s.get(RevokedToken, claims.token_id[:32]) is None:
        s.add(RevokedToken(jti=claims.token_id[:32], profile_id=claims.profile_id, expires_at=claims.expires_at,
                           revoked_at=now))
    log.info("app token revoked: profile=%s jti=%s", claims.profile_id, claims.token_id)


def revoke_profile_tokens(s: Session, profile_id: int, now: float) -> int:
    """Every token issued so far for this profile stops working; returns the new generation."""
    row = s.get(TokenGeneration, profile_id)
    if row is None:
        row = TokenGeneration(profile_id=profile_id, generation=0, updated_at=now)
        s.add(row)
    row.generation += 1
    row.updated_at = now
    log.info("all app tokens revoked: profile=%s generation=%s", profile_id, row.generation)
    return row.generation


# ------------------------------------------------------------------ rate limits


class TokenBucket:
    """Per-credential token buckets: ``rate`` requests per second on average, ``burst`` at once.

    Memory is bounded: past ``max_keys`` the least recently used buckets go (a forgotten bucket
    starts full again, which only ever errs towards letting a request through).
    """

    def __init__(self, rate_per_s: float, burst: int, max_keys: int = 50_000) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate_per_s > 0 and burst >= 1")
        self.rate, self.burst, self.max_keys = float(rate_per_s), float(burst), max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: str, now: float) -> float:
        """0.0 if the request may go ahead (one token taken), else the seconds until one is available."""
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        if tokens >= 1.0:
            wait, tokens = 0.0, tokens - 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


def retry_after(wait_s: float) -> str:
    """Retry-After in whole seconds, never 0 for a refused request."""
    return str(max(1, math.ceil(wait_s)))


# ------------------------------------------------------------------ idempotency keys

IDEMPOTENCY_KEY_MAX = 255
STALE_CLAIM_S = 60.0  # a claim this old belongs to a request that died with its process: it may be retried
_IDEM_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII, like the IETF draft's sf-string contents


def valid_idempotency_key(value: str) -> bool:
    return bool(_IDEM_KEY_RE.match(value))


def request_hash(method: str, path: str, query: str, body: bytes) -> str:
    h = hashlib.sha256()
    for part in (method.encode(), path.encode(), query.encode()):
        h.update(len(part).to_bytes(4, "big") + part)
    h.update(body)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Stored:
    status: int
    content_type: str | None
    body: bytes


@dataclass(frozen=True, slots=True)
class Claim:
    """What a POST with an Idempotency-Key may do: run (``claimed``), get the stored answer, or be refused."""

    outcome: Literal["claimed", "replay", "mismatch", "in_progress"]
    row_id: int | None = None
    stored: Stored | None = None


class Sealer:
    """AES-GCM over stored response bodies, bound to their row's request (so rows cannot be swapped)."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, plain: bytes, context: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plain, context.encode())

    def open(self, sealed: bytes, context: str) -> bytes | None:
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], context.encode())
        except (InvalidTag, ValueError):
            return None


class IdempotencyStore:
    """Keys per (caller, method, path, key), in the database so a restart or a second worker sees them."""

    def __init__(self, db: Database, sealer: Sealer, ttl_s: float = 86400.0) -> None:
        self.db, self.sealer, self.ttl_s = db, sealer, ttl_s

    @staticmethod
    def _context(row: IdempotencyKey) -> str:
        return f"{row.principal}\n{row.method}\n{row.path}\n{row.key}\n{row.request_hash}"

    def claim(self, principal: str, method: str, path: str, key: str, req_hash: str, now: float) -> Claim:
        where = (IdempotencyKey.principal == principal, IdempotencyKey.method == method,
                 IdempotencyKey.path == path, IdempotencyKey.key == key)
        for _ in range(3):  # a lost race to insert becomes a read of the winner's row
            try:
                with self.db.session() as s:
                    row = s.scalars(select(IdempotencyKey).where(*where)).first()
                    if row is not None:
                        expired = row.expires_at <= now
                        stale = row.status is None and now - row.created_at >= STALE_CLAIM_S
                        if not (expired or stale):
                            return self._answer(row, req_hash)
                        s.delete(row)
                        s.flush()
                    row = IdempotencyKey(principal=principal, method=method, path=path, key=key,
                                         request_hash=req_hash, created_at=now, expires_at=now + self.ttl_s)
                    s.add(row)
                    s.flush()
                    return Claim("claimed", row.id)
            except IntegrityError:
                continue
        return Claim("in_progress")

    def _answer(self, row: IdempotencyKey, req_hash: str) -> Claim:
        if not hmac.compare_digest(row.request_hash, req_hash):
            return Claim("mismatch")
        if row.status is None:
            return Claim("in_progress")
        body = self.sealer.open(row.body or b"", self._context(row))
        if body is None:  # sealed under another secret (rotated): cannot replay, so refuse rather than rerun
            return Claim("in_progress")
        return Claim("replay", row.id, Stored(row.status, row.content_type, body))

    def complete(self, row_id: int, status: int, content_type: str | None, body: bytes,
                 profile_id: int | None) -> None:
        """Keep the answer. ``profile_id`` ties it to a customer, so erasure removes it too."""
        with self.db.session() as s:
            row = s.get(IdempotencyKey, row_id)
            if row is None:
                return
            row.status, row.content_type = status, (content_type or "")[:128] or None
            row.body = self.sealer.seal(body, self._context(row))
            row.profile_id = profile_id
        # An FK failure (the profile was erased meanwhile) propagates: the caller drops the claim.

    def release(self, row_id: int) -> None:
        """The request failed or changed nothing (4xx/5xx): a retry with this key runs afresh."""
        with self.db.session() as s:
            s.execute(delete(IdempotencyKey).where(IdempotencyKey.id == row_id, IdempotencyKey.status.is_(None)))


def purge_expired(s: Session, now: float) -> dict[str, int]:
    """Idempotency keys past their day, revoked tokens past their own expiry: nothing kept longer than needed."""
    idem = s.execute(delete(IdempotencyKey).where(IdempotencyKey.expires_at <= now))
    revoked = s.execute(delete(RevokedToken).where(RevokedToken.expires_at <= now))
    return {"idempotency_keys": int(getattr(idem, "rowcount", 0) or 0),
            "revoked_tokens": int(getattr(revoked, "rowcount", 0) or 0)}


# ------------------------------------------------------------------ logs

_TOKEN_IN_QUERY = re.compile(r"(access_token=)[^&\s\"]+")


class RedactTokens(logging.Filter):
    """Blanks ``access_token=`` in log lines (uvicorn's access log shows the query, where EventSource puts it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(_TOKEN_IN_QUERY.sub(r"\1[redacted]", a) if isinstance(a, str) else a
                                for a in record.args)
        if isinstance(record.msg, str) and "access_token=" in record.msg:
            record.msg = _TOKEN_IN_QUERY.sub(r"\1[redacted]", record.msg)
        return True


def install_log_redaction(names: Iterable[str] = ("uvicorn.access", "uvicorn.error")) -> None:
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())


# ------------------------------------------------------------------ the guard the API consults


@dataclass(frozen=True)
class AuthPolicy:
    """Limits from ``[api]``: rates (0 means no limit), the idempotency window, request body sizes."""

    customer_rate_per_s: float = 0.0
    customer_burst: int = 0
    admin_rate_per_s: float = 0.0
    admin_burst: int = 0
    idempotency_ttl_s: float = 86400.0
    purge_every_s: float = 3600.0
    max_body_bytes: int = 1 << 20
    catalogue_max_body_bytes: int = 8 << 20

    @classmethod
    def from_settings(cls, api: Any) -> AuthPolicy:
        """From ``[api]`` (gateway.app.config.ApiSettings)."""
        return cls(api.rate_limit_per_s, api.rate_limit_burst, api.admin_rate_limit_per_s, api.admin_rate_limit_burst,
                   api.idempotency_ttl_s, max_body_bytes=api.max_body_bytes,
                   catalogue_max_body_bytes=api.catalogue_max_body_bytes)


class Guard:
    """Authentication, rate limits and the idempotency store for one app."""

    def __init__(self, db: Database, clock: Clock, config_key: str, sealing_key: bytes,
                 policy: AuthPolicy | None = None) -> None:
        self.db, self.clock = db, clock
        self.policy = policy or AuthPolicy()
        self._config_key_hash = hash_secret(config_key) if config_key else None  # the raw key is not kept
        p = self.policy
        self.customer_limit = TokenBucket(p.customer_rate_per_s, p.customer_burst) \
            if p.customer_rate_per_s > 0 else None
        self.admin_limit = TokenBucket(p.admin_rate_per_s, p.admin_burst) if p.admin_rate_per_s > 0 else None
        self.idempotency = IdempotencyStore(db, Sealer(sealing_key), p.idempotency_ttl_s)
        self._last_purge: float | None = None

    def admin(self, raw: str) -> Principal:
        """The key's principal, or AuthError(401). Scopes are checked by the caller, per route."""
        if self._config_key_hash is not None and hmac.compare_digest(hash_secret(raw), self._config_key_hash):
            return Principal(f"key:{CONFIG_KEY_ID}", ALL_SCOPES, limit_key=f"key:{CONFIG_KEY_ID}")
        now = self.clock.now()
        with self.db.session() as s:
            return authenticate_key(s, raw, now)

    @staticmethod
    def customer(claims: Claims) -> Principal:
        return Principal(f"profile:{claims.profile_id}", frozenset(), claims.profile_id,
                         limit_key=f"token:{claims.token_id}")

    def throttle(self, principal: Principal) -> float:
        """0.0, or the seconds the caller must wait (their bucket is empty)."""
        bucket = self.customer_limit if principal.profile_id is not None else self.admin_limit
        if bucket is None:
            return 0.0
        wait = bucket.take(principal.limit_key, self.clock.now())
        if wait:
            log.info("rate limited: %s for %.2f s", principal.limit_key, wait)
        return wait

    def create_key(self, name: str, scopes: Iterable[str] | str,
                   expires_in_s: float | None = None) -> tuple[str, dict[str, Any]]:
        now = self.clock.now()
        with self.db.session() as s:
            return create_key(s, name, scopes, now, None if expires_in_s is None else now + expires_in_s)

    def keys(self) -> list[dict[str, Any]]:
        with self.db.session() as s:
            return list_keys(s)

    def key(self, key_id: str) -> dict[str, Any] | None:
        with self.db.session() as s:
            return get_key(s, key_id)

    def revoke_key(self, key_id: str) -> dict[str, Any] | None:
        now = self.clock.now()
        with self.db.session() as s:
            return revoke_key(s, key_id, now)

    def maybe_purge(self) -> None:
        now = self.clock.now()
        if self._last_purge is not None and now - self._last_purge < self.policy.purge_every_s:
            return
        self._last_purge = now
        with self.db.session() as s:
            gone = purge_expired(s, now)
        if any(gone.values()):
            log.info("purged expired auth rows: %s", gone)

