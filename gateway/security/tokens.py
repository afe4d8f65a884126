"""Per-customer app tokens: HMAC-SHA256 signed, expiring, revocable; they reach one profile's data only.

Format: ``v1.<base64url(json claims)>.<base64url(signature)>``. Nothing secret is inside;
the signature is checked in constant time. Tokens are never logged.

Revocation is not the signer's business (it needs the database, see gateway/security/auth.py): the token
carries its id (``jti``) for a single logout and the profile's token generation (``gen``) at issue,
so "revoke all of this customer's tokens" is one counter bump.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass


class TokenError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Claims:
    profile_id: int
    expires_at: float
    token_id: str
    generation: int = 0
    issued_at: float = 0.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the token secret needs at least 16 bytes")
        self._secret = secret

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._secret, f"v1.{body}".encode(), hashlib.sha256).digest())

    def derive_key(self, label: str) -> bytes:
        """A 32-byte key for another purpose (sealing stored responses), independent of the signing key."""
        return hmac.new(self._secret, f"derive:{label}".encode(), hashlib.sha256).digest()

    def issue(self, profile_id: int, now: float, ttl_s: float, generation: int = 0) -> tuple[str, Claims]:
        claims = Claims(profile_id, now + ttl_s, secrets.token_hex(8), generation, now)
        fields = {"sub": profile_id, "exp": claims.expires_at, "jti": claims.token_id, "iat": now}
        if generation:
            fields["gen"] = generation
        body = _b64(json.dumps(fields, separators=(",", ":")).encode())
        return f"v1.{body}.{self._sign(body)}", claims

    def verify(self, token: str, now: float) -> Claims:
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != "v1":
            raise TokenError("malformed token")
        _, body, sig = parts
        if not hmac.compare_digest(sig.encode(), self._sign(body).encode()):  # bytes: any text is refused, not a crash
            raise TokenError("bad token signature")
        try:
            data = json.loads(_unb64(body))
            claims = Claims(int(data["sub"]), float(data["exp"]), str(data["jti"]), int(data.get("gen", 0)),
                            float(data.get("iat", 0.0)))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TokenError("malformed token") from None
        if claims.expires_at <= now:
            raise TokenError("token expired")
        return claims
