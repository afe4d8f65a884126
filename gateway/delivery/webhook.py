"""The webhook channel: each notification is POSTed, signed, to the brand's own push backend.

The brand already knows how to reach its app (its own FCM/APNs project, its CRM); the gateway
only has to hand it the notification in a way it can trust and deduplicate:

* ``X-Gateway-Signature: t=<unix ts>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`` (the scheme
  Stripe uses): the receiver recomputes it with :func:`verify_signature`, and the timestamp lets
  it refuse a captured request replayed later.
* ``Idempotency-Key`` (and ``X-Gateway-Notification-Id``) are the same on every retry of one
  notification, so a receiver that answered too slowly and sees it again can drop the copy.

Retries here are short and in-call (5xx, 429, timeouts, connection errors, with exponential
backoff and jitter); after ``max_attempts`` the channel says ``retry`` and the outbox schedules a
later, durable attempt. A 4xx other than 408/429 is the receiver saying no: never retried.
A URL that answers ``410 Gone`` ``disable_after_gone`` times in a row is disabled, and the
``webhook_endpoints`` table remembers it across restarts.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from gateway.clock import Clock, SystemClock
from gateway.delivery.backoff import Backoff
from gateway.delivery.hub import Message, Outcome
from gateway.storage.db import Database
from gateway.storage.models import ChannelName, Profile, WebhookEndpoint

if TYPE_CHECKING:  # httpx (with its CLI's rich and pygments) is imported once the channel is enabled
    import httpx

log = logging.getLogger("gateway.delivery.webhook")

SIGNATURE_HEADER = "X-Gateway-Signature"
SCHEME = "v1"
DEFAULT_TOLERANCE_S = 300.0
RETRYABLE_4XX = frozenset({408, 425, 429})

Sleep = Callable[[float], Awaitable[None]]


@dataclass
class WebhookSettings:
    """The brand's own push backend: every notification is POSTed to it, signed (see docs/delivery.md)."""

    enabled: bool = False
    url: list[str] = field(default_factory=list)  # one URL or several; each gets every notification
    # HMAC-SHA256 key shared with the receiver; required when enabled, never logged nor shown
    secret: str = field(default="", repr=False)
    timeout: float = 5.0  # seconds per attempt
    max_attempts: int = 3  # attempts within one delivery (5xx, 429, timeouts); the outbox retries later
    backoff_base_s: float = 0.5  # first wait between attempts; doubles each time, with jitter
    backoff_max_s: float = 8.0
    disable_after_gone: int = 3  # consecutive 410 Gone answers before a URL is disabled (kept in the db)


class SignatureError(ValueError):
    """The request is not from the gateway, was altered, or is too old (a replay)."""


def sign(secret: str | bytes, body: bytes, timestamp: int) -> str:
    """The ``X-Gateway-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds)."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},{SCHEME}={digest}"


def verify_signature(secret: str | bytes, header: str | None, body: bytes, now: float,
                     tolerance_s: float = DEFAULT_TOLERANCE_S) -> int:
    """Check a webhook request as a receiver must; returns its timestamp, raises SignatureError.

    ``body`` is the raw request body (before any JSON parsing: re-serialising changes bytes).
    Several ``v1=`` values are accepted, so a sender can sign with an old and a new secret
    while they rotate it. ``tolerance_s`` bounds how far the timestamp may be from ``now``.
    """
    if not header:
        raise SignatureError(f"no {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureError("the timestamp is not an integer") from None
        elif key == SCHEME:
            candidates.append(value)
    if timestamp is None:
        raise SignatureError("the signature header has no timestamp")
    if not candidates:
        raise SignatureError(f"the signature header has no {SCHEME} signature")
    expected = sign(secret, body, timestamp).rsplit("=", 1)[1]
    if not any(hmac.compare_digest(expected, c) for c in candidates):
        raise SignatureError("the signature does not match the body")
    if abs(now - timestamp) > tolerance_s:
        raise SignatureError(f"the timestamp is {abs(now - timestamp):.0f} s away from now (a replay?)")
    return timestamp


def redact(url: str) -> str:
    """What a log line may say about a URL: scheme, host and path, never credentials or a query token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


@dataclass
class Attempt:
    status: int | None  # None: no HTTP answer (timeout, refused connection)
    error: str | None = None
    retry_after_s: float | None = None


class WebhookChannel:
    """Signs and POSTs each notification to every configured URL; see the module doc for the contract."""

    name: str = ChannelName.WEBHOOK

    def __init__(self, settings: WebhookSettings, db: Database, *, store_id: str = "store",
                 clock: Clock | None = None, sleep: Sleep = asyncio.sleep, rng: random.Random | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not settings.secret:
            raise ValueError("[webhook] secret is required when the webhook channel is enabled")
        if not settings.url:
            raise ValueError("[webhook] url is required when the webhook channel is enabled")
        if settings.max_attempts < 1 or settings.disable_after_gone < 1:
            raise ValueError("[webhook] max_attempts and disable_after_gone must be at least 1")
        for url in settings.url:
            if urlsplit(url).scheme not in ("http", "https"):
                raise ValueError(f"[webhook] url must be http(s): {redact(url)}")
        self.settings = settings
        self.urls: Sequence[str] = list(settings.url)
        self.db = db
        self.store_id = store_id
        self.clock = clock or SystemClock()
        self.sleep = sleep
        self.rng = rng or random.Random()
        self._backoff = Backoff(settings.backoff_base_s, settings.backoff_max_s, jitter=0.5, rng=self.rng.random)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    # ------------------------------------------------------------ the channel

    async def deliver(self, profile_id: int, message: Message) -> str:
        body = self.body(profile_id, message)
        outcomes = [await self._deliver_to(url, message["id"], body) for url in self.urls]
        if Outcome.RETRY in outcomes:
            return Outcome.RETRY  # receivers dedup by Idempotency-Key, so resending to the others is harmless
        if Outcome.DELIVERED in outcomes:
            return Outcome.DELIVERED
        return Outcome.GONE if all(o == Outcome.GONE for o in outcomes) else Outcome.DEAD

    def body(self, profile_id: int, message: Message) -> bytes:
        """The JSON the receiver gets; the same bytes on every attempt of one notification."""
        with self.db.session() as s:
            profile = s.get(Profile, profile_id)
            external_id = profile.external_id if profile is not None else None
        doc: dict[str, Any] = {
            "type": "notification", "store": self.store_id, "id": message["id"],
            "idempotency_key": self.idempotency_key(message["id"]),
            "profile": {"id": profile_id, "external_id": external_id},
            "campaign": message.get("campaign"), "purpose": message.get("purpose"),
            "title": message.get("title"), "body": message.get("body"), "data": message.get("data") or {},
            "created_at": message.get("created_at"),
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    def idempotency_key(self, notification_id: int) -> str:
        return f"{self.store_id}:notification:{notification_id}"

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------ one URL

    async def _deliver_to(self, url: str, notification_id: int, body: bytes) -> str:
        if self._disabled(url):
            return Outcome.DEAD
        attempt = Attempt(None)
        for n in range(1, self.settings.max_attempts + 1):
            attempt = await self._post(url, notification_id, body, n)
            if not self._transient(attempt) or n == self.settings.max_attempts:
                break
            await self.sleep(self.backoff(n, attempt.retry_after_s))
        outcome = self._outcome(attempt)
        self._remember(url, attempt, outcome)
        if outcome != Outcome.DELIVERED:
            log.warning("webhook %s: notification %s %s (%s)", redact(url), notification_id, outcome,
                        attempt.error or attempt.status)
        return outcome

    async def _post(self, url: str, notification_id: int, body: bytes, attempt: int) -> Attempt:
        import httpx

        ts = int(self.clock.now())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "engagement-gateway-webhook/1",
            SIGNATURE_HEADER: sign(self.settings.secret, body, ts),
            "Idempotency-Key": self.idempotency_key(notification_id),
            "X-Gateway-Notification-Id": str(notification_id),
            "X-Gateway-Delivery-Attempt": str(attempt),
        }
        try:
            r = await self._http().post(url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            return Attempt(None, f"timeout ({type(exc).__name__})")
        except httpx.TransportError as exc:
            return Attempt(None, f"connection error ({type(exc).__name__})")
        return Attempt(r.status_code, None, _retry_after(r.headers.get("Retry-After")))

    def backoff(self, failures: int, retry_after_s: float | None = None) -> float:
        """The shared backoff, up to half of each step taken off at random; a Retry-After wins if longer."""
        delay = self._backoff.delay(failures)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.settings.backoff_max_s))
        return delay

    @staticmethod
    def _transient(a: Attempt) -> bool:
        return a.status is None or a.status >= 500 or a.status in RETRYABLE_4XX

    @staticmethod
    def _outcome(a: Attempt) -> str:
        if a.status is not None and 200 <= a.status < 300:
            return Outcome.DELIVERED
        if a.status == 410:
            return Outcome.GONE
        return Outcome.RETRY if WebhookChannel._transient(a) else Outcome.DEAD

    def _http(self) -> httpx.AsyncClient:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.settings.timeout, transport=self._transport,
                                             follow_redirects=False)
        return self._client

    # ------------------------------------------------------------ durable per-URL state

    def _disabled(self, url: str) -> bool:
        with self.db.session() as s:
            row = s.get(WebhookEndpoint, url)
            return row is not None and row.disabled_at is not None

    def _remember(self, url: str, attempt: Attempt, outcome: str) -> None:
        now = self.clock.now()
        with self.db.session() as s:
            row = s.get(WebhookEndpoint, url)
            if row is None:
                row = WebhookEndpoint(url=url, consecutive_gone=0)
                s.add(row)
            row.last_status, row.last_attempt_at = attempt.status, now
            if outcome == Outcome.DELIVERED:
                row.consecutive_gone, row.last_success_at = 0, now
            elif outcome == Outcome.GONE:
                row.consecutive_gone = (row.consecutive_gone or 0) + 1
                if row.consecutive_gone >= self.settings.disable_after_gone and row.disabled_at is None:
                    row.disabled_at = now
                    log.error("webhook %s disabled after %d consecutive 410 Gone answers; "
                              "re-enable it with gateway.delivery.webhook.enable_endpoint", redact(url),
                              row.consecutive_gone)
            else:
                row.consecutive_gone = 0


def enable_endpoint(db: Database, url: str) -> bool:
    """Turn a disabled URL back on (the brand fixed its endpoint); True when it was disabled."""
    with db.session() as s:
        row = s.get(WebhookEndpoint, url)
        if row is None or row.disabled_at is None:
            return False
        row.disabled_at, row.consecutive_gone = None, 0
        return True


def endpoint_states(db: Database) -> dict[str, dict[str, Any]]:
    """Per URL: whether it is disabled, its last status and times (health and support)."""
    with db.session() as s:
        return {r.url: {"disabled": r.disabled_at is not None, "disabled_at": r.disabled_at,
                        "consecutive_gone": r.consecutive_gone, "last_status": r.last_status,
                        "last_attempt_at": r.last_attempt_at, "last_success_at": r.last_success_at}
                for r in s.query(WebhookEndpoint)}


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: the backoff cap bounds the wait anyway
