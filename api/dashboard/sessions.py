"""Who is signed in to the dashboard: one-time login tokens and server-side sessions, in memory.

Only hashes are kept: a login token's and a session id's SHA-256 (the raw values live in the link the
CLI prints and in the browser's cookie). A restart signs everyone out, which a shop's gateway can bear;
nothing here touches the database. Times are the caller's clock readings, so tests need no sleeping.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass

from gateway.security.auth import Principal

LOGIN_TTL_S = 300.0  # a printed link is for the person at the console now, not for a log file later
SESSION_TTL_S = 8 * 3600.0  # a shift; then sign in again
MAX_SESSIONS = 1000  # the oldest go first past this: a flood of sign-ins cannot grow memory without bound


def digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


class LoginTokens:
    """One-time tokens: each opens one session, once, before it expires."""

    def __init__(self, ttl_s: float = LOGIN_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def issue(self, now: float) -> str:
        raw = secrets.token_urlsafe(32)
        with self._lock:
            self._expiry = {h: t for h, t in self._expiry.items() if t > now}
            self._expiry[digest(raw)] = now + self.ttl_s
        return raw

    def redeem(self, raw: str, now: float) -> bool:
        """True once for a live token; it is spent whether or not it had expired."""
        with self._lock:
            expires = self._expiry.pop(digest(raw), None)
        return expires is not None and now < expires


@dataclass(frozen=True)
class Session:
    principal: Principal
    csrf: str
    """The synchronizer token every state-changing request of this session must carry."""
    expires: float
    key: str | None
    """The API key it was opened with (memory only), checked again on each request so a revoked key
    ends its sessions; None for a login-link session (the config key, which cannot be revoked)."""


class Sessions:
    def __init__(self, ttl_s: float = SESSION_TTL_S, max_sessions: int = MAX_SESSIONS) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._by_hash: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, principal: Principal, now: float, key: str | None = None) -> tuple[str, Session]:
        """A new session's raw id (for the cookie) and the session."""
        raw = secrets.token_urlsafe(32)
        session = Session(principal, secrets.token_urlsafe(32), now + self.ttl_s, key)
        with self._lock:
            self._by_hash = {h: s for h, s in self._by_hash.items() if s.expires > now}
            while len(self._by_hash) >= self.max_sessions:
                del self._by_hash[min(self._by_hash, key=lambda h: self._by_hash[h].expires)]
            self._by_hash[digest(raw)] = session
        return raw, session

    def get(self, raw: str | None, now: float) -> Session | None:
        if not raw:
            return None
        h = digest(raw)
        with self._lock:
            session = self._by_hash.get(h)
            if session is not None and session.expires <= now:
                del self._by_hash[h]
                return None
        return session

    def close(self, raw: str | None) -> None:
        if raw:
            with self._lock:
                self._by_hash.pop(digest(raw), None)

    def __len__(self) -> int:
        return len(self._by_hash)


def same_token(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
