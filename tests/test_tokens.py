"""Customer app tokens: they round-trip, expire on time, and any change to them is refused.

Time is a VirtualClock, so expiry is checked at the exact second without waiting for it.
"""

from __future__ import annotations

import base64
import json

import pytest

from gateway.clock import VirtualClock
from gateway.security.tokens import Claims, TokenError, TokenSigner

SECRET = b"a-test-secret-of-32-bytes-length"
TTL = 3600.0


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def signer() -> TokenSigner:
    return TokenSigner(SECRET)


def test_a_token_round_trips_to_its_claims(signer: TokenSigner, clock: VirtualClock) -> None:
    token, claims = signer.issue(42, clock.now(), TTL)

    assert claims == Claims(profile_id=42, expires_at=clock.now() + TTL, token_id=claims.token_id,
                            generation=0, issued_at=clock.now())
    assert signer.verify(token, clock.now()) == claims
    # Another signer holding the same secret (a restarted gateway) accepts it too.
    assert TokenSigner(SECRET).verify(token, clock.now()) == claims
    # Each token has its own id, even for the same profile at the same instant.
    other, other_claims = signer.issue(42, clock.now(), TTL)
    assert other != token and other_claims.token_id != claims.token_id


def test_a_token_expires_exactly_at_its_expiry(signer: TokenSigner, clock: VirtualClock) -> None:
    token, claims = signer.issue(7, clock.now(), TTL)

    clock.advance(TTL - 1)
    assert signer.verify(token, clock.now()).profile_id == 7
    clock.advance(1)  # now == expires_at: no longer valid
    assert clock.now() == claims.expires_at
    with pytest.raises(TokenError, match="expired"):
        signer.verify(token, clock.now())
    clock.advance(86400)
    with pytest.raises(TokenError, match="expired"):
        signer.verify(token, clock.now())


def test_changing_the_body_is_refused(signer: TokenSigner, clock: VirtualClock) -> None:
    token, _ = signer.issue(1, clock.now(), TTL)
    version, body, sig = token.split(".")
    claims = json.loads(_unb64(body))

    # Claim someone else's profile, or a longer life, keeping the original signature.
    for change in ({"sub": 2}, {"exp": claims["exp"] + 365 * 86400}, {"jti": "0" * 16}):
        forged = _b64(json.dumps({**claims, **change}, separators=(",", ":")).encode())
        with pytest.raises(TokenError, match="signature"):
            signer.verify(f"{version}.{forged}.{sig}", clock.now())
    # A single flipped character anywhere in the body.
    for i in range(len(body)):
        flipped = body[:i] + ("A" if body[i] != "A" else "B") + body[i + 1:]
        with pytest.raises(TokenError):
            signer.verify(f"{version}.{flipped}.{sig}", clock.now())


def test_changing_the_signature_is_refused(signer: TokenSigner, clock: VirtualClock) -> None:
    token, _ = signer.issue(1, clock.now(), TTL)
    version, body, sig = token.split(".")

    for i in range(len(sig)):
        flipped = sig[:i] + ("A" if sig[i] != "A" else "B") + sig[i + 1:]
        with pytest.raises(TokenError, match="signature"):
            signer.verify(f"{version}.{body}.{flipped}", clock.now())
    for bad in ("", sig[:-1], sig + "A", sig.upper()):
        with pytest.raises(TokenError):
            signer.verify(f"{version}.{body}.{bad}", clock.now())


@pytest.mark.parametrize("garbage", [
    "", "v1", "v1..", "v2.e30.AAAA", "not-a-token", "v1.a.b.c", "Bearer v1.a.b", "v1.!!!.???",
    "v1.abc.\u00e9\u00e9", "v1.\u00e9.abc", "v1.abc.\U0001f600",  # non-ASCII once crashed compare_digest
])
def test_malformed_tokens_are_refused_with_a_token_error(signer: TokenSigner, clock: VirtualClock,
                                                          garbage: str) -> None:
    with pytest.raises(TokenError):
        signer.verify(garbage, clock.now())


def test_a_token_signed_correctly_over_a_broken_body_is_refused(signer: TokenSigner, clock: VirtualClock) -> None:
    # Only the secret holder could produce these, but the verifier still must not crash on them.
    for payload in (b"not json", b"[]", b'{"sub": 1}', b'{"sub": "x", "exp": 1, "jti": "a"}'):
        body = _b64(payload)
        with pytest.raises(TokenError, match="malformed"):
            signer.verify(f"v1.{body}.{signer._sign(body)}", clock.now())


def test_a_token_from_another_secret_is_refused(signer: TokenSigner, clock: VirtualClock) -> None:
    other = TokenSigner(b"another-secret-entirely-32-bytes")
    token, _ = other.issue(1, clock.now(), TTL)

    assert other.verify(token, clock.now()).profile_id == 1
    with pytest.raises(TokenError, match="signature"):
        signer.verify(token, clock.now())


def test_no_secret_material_is_inside_a_token(signer: TokenSigner, clock: VirtualClock) -> None:
    token, claims = signer.issue(99, clock.now(), TTL)
    _, body, sig = token.split(".")

    decoded = json.loads(_unb64(body))
    assert decoded == {"sub": 99, "exp": claims.expires_at, "jti": claims.token_id, "iat": clock.now()}
    for form in (SECRET.decode(), SECRET.hex(), _b64(SECRET), base64.b64encode(SECRET).decode()):
        assert form not in token
        assert form not in _unb64(body).decode()
    assert SECRET not in _unb64(body) and SECRET not in _unb64(sig)
    assert len(_unb64(sig)) == 32  # an HMAC-SHA256 tag, not anything longer


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        TokenSigner(b"too-short")


def test_the_revocation_generation_is_signed_into_the_token(signer: TokenSigner, clock: VirtualClock) -> None:
    token, claims = signer.issue(5, clock.now(), TTL, generation=3)
    assert claims.generation == 3 and signer.verify(token, clock.now()).generation == 3
    version, body, sig = token.split(".")
    # Raising the generation (to outlive a "revoke all") breaks the signature.
    forged = _b64(json.dumps({**json.loads(_unb64(body)), "gen": 99}, separators=(",", ":")).encode())
    with pytest.raises(TokenError, match="signature"):
        signer.verify(f"{version}.{forged}.{sig}", clock.now())


def test_a_token_issued_before_generations_existed_counts_as_generation_0(signer: TokenSigner,
                                                                           clock: VirtualClock) -> None:
    body = _b64(json.dumps({"sub": 8, "exp": clock.now() + 60, "jti": "00ff00ff00ff00ff"}).encode())
    claims = signer.verify(f"v1.{body}.{signer._sign(body)}", clock.now())
    assert (claims.profile_id, claims.generation, claims.issued_at) == (8, 0, 0.0)


def test_a_derived_key_is_stable_per_secret_and_purpose_and_is_not_the_secret() -> None:
    a, b = TokenSigner(SECRET), TokenSigner(SECRET)
    assert a.derive_key("idempotency") == b.derive_key("idempotency")
    assert len(a.derive_key("idempotency")) == 32
    assert a.derive_key("idempotency") != a.derive_key("other")
    assert a.derive_key("idempotency") != TokenSigner(b"another-secret-entirely-32-bytes").derive_key("idempotency")
    assert SECRET not in a.derive_key("idempotency")
