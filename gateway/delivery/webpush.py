"""Web Push: notifications to the browsers customers subscribed with (RFC 8030, 8291, 8292).

A subscription is what the browser's ``PushManager.subscribe()`` returns: an endpoint URL at the
browser vendor's push service and two keys (``p256dh``, ``auth``). The payload is encrypted to
those keys (aes128gcm, RFC 8291), so the push service cannot read it; the request is signed with
our VAPID key (RFC 8292), whose public half the page passed as ``applicationServerKey``.

Headers (RFC 8030 section 5): ``TTL`` (how long an offline browser's message is kept), ``Urgency``
and ``Topic`` (a newer message with the same topic replaces an undelivered older one). Each comes
from the notification's ``data.push`` (``ttl_s``, ``urgency``, ``topic``; a campaign sets them in its
action's data) or falls back to ``[webpush]``: TTL ``ttl_s``, Urgency ``urgency``, Topic the
campaign id (hashed to 32 characters if it does not fit the header's alphabet).

A 404 or 410 from the push service means the subscription is gone for good: its row is deleted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from gateway.clock import Clock, SystemClock
from gateway.delivery.hub import Message, Outcome
from gateway.storage.db import Database
from gateway.storage.models import ChannelName, PushSubscription

if TYPE_CHECKING:  # pywebpush, aiohttp and py_vapid cost ~40 MB and 0.3 s: imported only once Web Push is used
    import aiohttp
    from py_vapid import Vapid

log = logging.getLogger("gateway.delivery.webpush")

URGENCIES = ("very-low", "low", "normal", "high")
TOPIC_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
B64URL_RE = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")
MAX_PLAINTEXT = 3000  # RFC 8291 leaves 3993 bytes for one record; stay well clear of it
VAPID_EXP_S = 12 * 3600  # RFC 8292: at most 24 h; push services reject longer
PRIVATE_KEY_FILE = "vapid_private.pem"
PUBLIC_KEY_FILE = "vapid_public.txt"


@dataclass
class WebPushSettings:
    """Web Push (RFC 8030/8291/8292) to the browsers customers subscribed with."""

    enabled: bool = False
    # a PEM file path or the PEM itself (never shown); empty: data_dir/vapid_private.pem
    vapid_private_key: str = field(default="", repr=False)
    subject: str = ""  # "mailto:ops@brand.example" or an https URL: whom push services contact
    ttl_s: int = 3600  # default TTL header: how long a push service keeps an undelivered message
    urgency: str = "normal"  # default Urgency header: very-low | low | normal | high
    timeout: float = 10.0  # seconds per request to a push service


class SubscriptionError(ValueError):
    """A PushSubscription the gateway cannot use (bad URL, keys that are not P-256 / 16 bytes)."""


class SubscriptionTaken(SubscriptionError):
    """The endpoint belongs to another profile and the keys differ: not the same browser subscription."""


# ---------------------------------------------------------------- VAPID keys


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_vapid(settings: WebPushSettings, data_dir: str | Path) -> Vapid:
    """The VAPID key from the config (PEM text or a path), or data_dir/vapid_private.pem, made if missing."""
    from py_vapid import Vapid

    configured = settings.vapid_private_key.strip()
    if "-----BEGIN" in configured:
        return Vapid.from_pem(configured.encode())
    if configured:
        path = Path(configured)
        if not path.is_file():
            # A key pasted without its BEGIN line must not be echoed: name the path only when it looks like one.
            shown = f" {path}" if "/" in configured or configured.endswith(".pem") else " (the value is not shown)"
            raise FileNotFoundError(f"[webpush] vapid_private_key: not PEM text, and no such file{shown}")
        return Vapid.from_file(str(path))
    return ensure_vapid_key(data_dir)


def ensure_vapid_key(data_dir: str | Path) -> Vapid:
    """Generate a P-256 key pair into data_dir once (private 0600), so subscriptions survive restarts.

    Changing the key orphans every subscription (browsers bind them to the applicationServerKey),
    which is why it is generated once and kept, never per start.
    """
    from py_vapid import Vapid

    directory = Path(data_dir)
    private = directory / PRIVATE_KEY_FILE
    if not private.exists():
        directory.mkdir(parents=True, exist_ok=True)
        vapid = Vapid()
        vapid.generate_keys()
        private.touch(mode=0o600)
        private.write_bytes(vapid.private_pem())
        private.chmod(0o600)
        (directory / PUBLIC_KEY_FILE).write_text(application_server_key(vapid) + "\n")
        log.info("generated a VAPID key pair in %s; applicationServerKey %s", private,
                 application_server_key(vapid))
    return Vapid.from_file(str(private))


def application_server_key(vapid: Vapid) -> str:
    """The public key as the browser's ``PushManager.subscribe({applicationServerKey})`` takes it."""
    from cryptography.hazmat.primitives import serialization

    raw = vapid.public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return b64url(raw)


# ---------------------------------------------------------------- subscriptions


@dataclass(frozen=True)
class Subscription:
    endpoint: str
    p256dh: str
    auth: str


def _private_host(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return not ip.is_global


def validate_subscription(endpoint: str, p256dh: str, auth: str, *, allow_insecure: bool = False) -> Subscription:
    """Check a browser's PushSubscription; raises SubscriptionError saying what is wrong.

    Only https endpoints on public hosts: the gateway POSTs to whatever a customer registers, so
    a loopback or LAN address would let a customer aim it inside the shop's network.
    ``allow_insecure`` is for tests with a push service on loopback.
    """
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise SubscriptionError("endpoint: not a valid URL") from None
    if len(endpoint) > 1024:
        raise SubscriptionError("endpoint: longer than 1024 characters")
    if not allow_insecure:
        if parts.scheme != "https":
            raise SubscriptionError("endpoint: must be an https URL")
        if not parts.hostname or _private_host(parts.hostname):
            raise SubscriptionError("endpoint: must be a public push service host")
    elif parts.scheme not in ("http", "https") or not parts.hostname:
        raise SubscriptionError("endpoint: must be an http(s) URL")
    if not (B64URL_RE.match(p256dh) and B64URL_RE.match(auth)):
        raise SubscriptionError("keys: p256dh and auth must be base64url")
    try:
        point = b64url_decode(p256dh)
        secret = b64url_decode(auth)
    except (binascii.Error, ValueError):
        raise SubscriptionError("keys: p256dh and auth must be base64url") from None
    if len(point) != 65 or point[0] != 4:
        raise SubscriptionError("keys.p256dh: must be an uncompressed P-256 point (65 bytes)")
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        raise SubscriptionError("keys.p256dh: not a point on P-256") from None
    if len(secret) != 16:
        raise SubscriptionError("keys.auth: must be 16 bytes")
    return Subscription(endpoint, b64url(point), b64url(secret))


def subscription_view(row: PushSubscription) -> dict[str, Any]:
    return {"endpoint": row.endpoint, "created_at": row.created_at, "last_success_at": row.last_success_at,
            "failures": row.failures}


def save_subscription(db: Database, profile_id: int, sub: Subscription, now: float) -> tuple[dict[str, Any], bool]:
    """Store (or refresh) a subscription for a profile; returns (view, created).

    The endpoint is unique: a browser that logs into another account moves its subscription to
    that account, since the browser, not the account, receives the push. Moving it takes the same
    auth secret (the same browser subscription): knowing another customer's endpoint URL is not
    enough to take it over (SubscriptionTaken).
    """
    try:
        return _save(db, profile_id, sub, now)
    except IntegrityError:  # the same browser posted twice at once: the other request inserted it
        return _save(db, profile_id, sub, now)


def _save(db: Database, profile_id: int, sub: Subscription, now: float) -> tuple[dict[str, Any], bool]:
    with db.session() as s:
        row = s.scalar(select(PushSubscription).where(PushSubscription.endpoint == sub.endpoint))
        created = row is None
        if row is not None and row.profile_id != profile_id and not hmac.compare_digest(row.auth, sub.auth):
            raise SubscriptionTaken("this endpoint is subscribed by another account with other keys")
        if row is None:
            row = PushSubscription(endpoint=sub.endpoint, created_at=now, failures=0)
            s.add(row)
        row.profile_id, row.p256dh, row.auth = profile_id, sub.p256dh, sub.auth
        s.flush()
        return subscription_view(row), created


def delete_subscription(db: Database, profile_id: int, endpoint: str) -> bool:
    """Remove one of the profile's subscriptions; False when it has none with that endpoint."""
    with db.session() as s:
        result = s.execute(delete(PushSubscription).where(PushSubscription.profile_id == profile_id,
                                                          PushSubscription.endpoint == endpoint))
        return bool(getattr(result, "rowcount", 0))


def list_subscriptions(db: Database, profile_id: int) -> list[dict[str, Any]]:
    with db.session() as s:
        rows = s.scalars(select(PushSubscription).where(PushSubscription.profile_id == profile_id)
                         .order_by(PushSubscription.id))
        return [subscription_view(r) for r in rows]


# ---------------------------------------------------------------- the channel


@dataclass(frozen=True)
class PushOptions:
    ttl: int
    urgency: str
    topic: str | None


def topic_for(campaign: str | None) -> str | None:
    """A Topic header value for a campaign: its id if it fits the header's alphabet, else a hash."""
    if not campaign:
        return None
    if TOPIC_RE.match(campaign):
        return campaign
    return b64url(hashlib.sha256(campaign.encode()).digest())[:32]


def push_options(message: Message, settings: WebPushSettings) -> PushOptions:
    """TTL, Urgency and Topic: the notification's ``data.push`` first, then the configured defaults."""
    data = message.get("data") or {}
    raw = data.get("push")
    push: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    ttl = push.get("ttl_s", settings.ttl_s)
    if not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl < 0:
        log.warning("notification %s: data.push.ttl_s %r is not a number >= 0; using %s", message.get("id"), ttl,
                    settings.ttl_s)
        ttl = settings.ttl_s
    urgency = push.get("urgency", settings.urgency)
    if urgency not in URGENCIES:
        log.warning("notification %s: data.push.urgency %r is not one of %s; using %s", message.get("id"), urgency,
                    URGENCIES, settings.urgency)
        urgency = settings.urgency
    topic = push["topic"] if "topic" in push else topic_for(message.get("campaign"))
    if topic is not None and topic != "" and not (isinstance(topic, str) and TOPIC_RE.match(topic)):
        topic = topic_for(str(topic))
    return PushOptions(int(ttl), str(urgency), topic or None)


def payload(message: Message) -> bytes:
    """What the service worker's ``push`` event gets: the notification, without ``data`` if too big."""
    doc = {"id": message["id"], "campaign": message.get("campaign"), "title": message.get("title"),
           "body": message.get("body"), "data": message.get("data") or {}}
    raw = _json(doc)
    if len(raw) <= MAX_PLAINTEXT:
        return raw
    # The app fetches the whole notification from /v1/me/notifications by id.
    doc.update(data={}, truncated=True, title=str(doc["title"] or "")[:150], body=str(doc["body"] or "")[:300],
               campaign=str(doc["campaign"] or "")[:128])
    return _json(doc)  # at most ~2.5 KB: 578 characters of at most 4 UTF-8 bytes, and the keys


def _json(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


class WebPushChannel:
    """Encrypts and sends each notification to every subscription of the profile, pruning dead ones."""

    name: str = ChannelName.WEBPUSH

    def __init__(self, settings: WebPushSettings, db: Database, vapid: Vapid, *, clock: Clock | None = None
                 ) -> None:
        if not settings.subject.startswith(("mailto:", "https://")):
            raise ValueError("[webpush] subject must be a mailto: address or an https URL (RFC 8292)")
        if settings.urgency not in URGENCIES:
            raise ValueError(f"[webpush] urgency must be one of {', '.join(URGENCIES)}")
        self.settings = settings
        self.db = db
        self.vapid = vapid
        self.clock = clock or SystemClock()
        self._session: aiohttp.ClientSession | None = None

    @property
    def public_key(self) -> str:
        return application_server_key(self.vapid)

    async def deliver(self, profile_id: int, message: Message) -> str:
        with self.db.session() as s:
            subs = [Subscription(r.endpoint, r.p256dh, r.auth) for r in s.scalars(
                select(PushSubscription).where(PushSubscription.profile_id == profile_id)
                .order_by(PushSubscription.id))]
        if not subs:
            return Outcome.NO_LISTENER  # no subscription: the stream replays on connect
        options = push_options(message, self.settings)
        data = payload(message)
        statuses = await asyncio.gather(*(self._send(sub, data, options) for sub in subs))
        self._record(list(zip(subs, statuses, strict=True)))
        if any(st is not None and 200 <= st < 300 for st in statuses):
            return Outcome.DELIVERED
        if any(st is None or st >= 500 or st == 429 for st in statuses):
            return Outcome.RETRY
        return Outcome.GONE if all(st in (404, 410) for st in statuses) else Outcome.DEAD

    def vapid_headers(self, endpoint: str) -> dict[str, str]:
        """The RFC 8292 ``Authorization: vapid t=<JWT>,k=<public key>`` for the endpoint's origin."""
        parts = urlsplit(endpoint)
        claims = {"aud": f"{parts.scheme}://{parts.netloc}", "sub": self.settings.subject,
                  "exp": int(self.clock.now()) + VAPID_EXP_S}
        return dict(self.vapid.sign(claims))

    async def _send(self, sub: Subscription, data: bytes, options: PushOptions) -> int | None:
        import aiohttp
        from pywebpush import WebPusher, WebPushException

        headers = {"Urgency": options.urgency, **self.vapid_headers(sub.endpoint)}
        if options.topic:
            headers["Topic"] = options.topic
        info = {"endpoint": sub.endpoint, "keys": {"p256dh": sub.p256dh, "auth": sub.auth}}
        try:
            resp = await WebPusher(info, aiohttp_session=self._http()).send_async(
                data, headers, ttl=options.ttl, content_encoding="aes128gcm",
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout))
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("web push to %s failed: %s", urlsplit(sub.endpoint).hostname, type(exc).__name__)
            return None
        except WebPushException as exc:
            log.warning("web push to %s refused: %s", urlsplit(sub.endpoint).hostname, exc.message)
            return None
        assert isinstance(resp, aiohttp.ClientResponse)
        return resp.status

    def _record(self, results: list[tuple[Subscription, int | None]]) -> None:
        """Success resets the failure count; 404/410 deletes the subscription; anything else counts."""
        now = self.clock.now()
        gone = [sub.endpoint for sub, st in results if st in (404, 410)]
        with self.db.session() as s:
            if gone:
                s.execute(delete(PushSubscription).where(PushSubscription.endpoint.in_(gone)))
                log.info("pruned %d web push subscription(s) the push service no longer knows", len(gone))
            for sub, st in results:
                if st in (404, 410):
                    continue
                row = s.scalar(select(PushSubscription).where(PushSubscription.endpoint == sub.endpoint))
                if row is None:
                    continue
                if st is not None and 200 <= st < 300:
                    row.failures, row.last_success_at = 0, now
                else:
                    row.failures = (row.failures or 0) + 1

    def _http(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
