"""The durable state of a store. Times are UTC epoch seconds (floats): the clock's unit, tz-proof.

Everything a profile owns hangs off it with ON DELETE CASCADE, so erasure is one DELETE.
Unknown devices are never stored: there is no table keyed by a BLE address.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# The store a row belongs to when nothing says otherwise: [store] id's default, so a single-store gateway that
# never set one keeps its history (migration 0012 gives it to rows older than the column unless told the id).
DEFAULT_STORE_ID = "store-001"


def _store_column() -> Mapped[str]:
    """Which store's gateway wrote the row: figures filter by it when stores share one database."""
    return mapped_column(String(64), server_default=DEFAULT_STORE_ID)


# The closed sets of values some columns hold, each defined once. Members are strings, so a row, a JSON body
# and a comparison see the same text as before; the columns stay plain VARCHARs (no migration).


class Purpose(StrEnum):
    """What a customer consents to, one purpose at a time: every campaign and notification has one."""

    OFFERS = "offers"
    CART_REMINDERS = "cart_reminders"
    MAINTENANCE = "maintenance"
    HEALTH = "health"  # wearable regime nudges
    ANALYTICS = "analytics"
    PRESENCE_SHARING = "presence_sharing"  # their zone shown by name: to staff, to home automation


class ChannelName(StrEnum):
    """The channels a notification can go out on (a campaign may name some of them)."""

    SSE = "sse"  # the app's live streams (SSE and WebSocket) and its inbox
    WEBHOOK = "webhook"
    WEBPUSH = "webpush"


class CartStatus(StrEnum):
    """A cart as its feed reports it; abandonment is a time the gateway notes, not a status."""

    OPEN = "open"
    CHECKED_OUT = "checked_out"


class NotificationStatus(StrEnum):
    """A notification's life in the outbox."""

    SCHEDULED = "scheduled"  # delayed, or held for quiet hours: ``deliver_at`` says when
    PENDING = "pending"  # committed, no channel has taken it yet
    SENT = "sent"  # a channel took it
    ACKED = "acked"  # the app confirmed it has it
    CANCELLED = "cancelled"  # withdrawn before it went out
    EXPIRED = "expired"  # its ttl passed before it went out


class InteractionKind(StrEnum):
    """What happened to a notification on the customer's side (each kind counts once)."""

    DELIVERED = "delivered"  # the app acked it, or a remote service accepted it
    OPENED = "opened"
    CLICKED = "clicked"
    REDEEMED = "redeemed"  # staff confirmed its code at the till
    DISMISSED = "dismissed"


class ChannelState(StrEnum):
    """Where one notification stands on one channel (``DeliveryState.state``)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"  # gave up: a dead letter


class AlarmStatus(StrEnum):
    """A device rule's alarm: raised, then cleared by the rule or resolved by a service event."""

    ACTIVE = "active"
    CLEARED = "cleared"
    RESOLVED = "resolved"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Profile(Base):
    __tablename__ = "profiles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    points: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # loyalty, earned per visit

    identifiers: Mapped[list[Identifier]] = relationship(
        back_populates="profile", cascade="all, delete-orphan", passive_deletes=True, lazy="selectin"
    )
    consents: Mapped[list[Consent]] = relationship(
        back_populates="profile", cascade="all, delete-orphan", passive_deletes=True, lazy="selectin"
    )


class Identifier(Base):
    """Anything that points at a profile: ``kind`` is an IdentifierKind (gateway/profiles/identity.py)."""

    __tablename__ = "identifiers"
    __table_args__ = (UniqueConstraint("kind", "value", name="uq_identifier_kind_value"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    value: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[float] = mapped_column(Float)

    profile: Mapped[Profile] = relationship(back_populates="identifiers")


class RotatingIdentity(Base):
    """A rotating identity enrolled for a profile (gateway/profiles/rotating.py): ``kind`` is eid, irk or app;
    ``secret`` is its key (Eddystone-EID identity key, IRK, the app's secret) encrypted with AES-GCM under
    the ``[identities]`` key (nonce + ciphertext + tag). K, the period and the epoch are not secret."""

    __tablename__ = "rotating_identities"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    secret: Mapped[bytes] = mapped_column(LargeBinary)
    # HMAC-SHA256 of the key under a key derived from the [identities] key: the same key enrolled twice is
    # refused without decrypting every row, and it says nothing without the key file.
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    rotation_exponent: Mapped[int | None] = mapped_column(Integer, nullable=True)  # EID: K (2^K s per EID)
    period_s: Mapped[int | None] = mapped_column(Integer, nullable=True)  # app: one beacon window
    epoch: Mapped[int] = mapped_column(BigInteger, default=0)  # EID: the beacon clock's 0 in Unix seconds
    created_at: Mapped[float] = mapped_column(Float)


class Consent(Base):
    __tablename__ = "consents"

    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(32), primary_key=True)  # a Purpose
    granted: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[float] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(64), default="api")

    profile: Mapped[Profile] = relationship(back_populates="consents")


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str | None] = mapped_column(String(64))
    profile_id: Mapped[int | None] = mapped_column(
        ForeignKey("profiles.id", ondelete="SET NULL"), index=True
    )
    last_seen: Mapped[float | None] = mapped_column(Float)
    state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The registry (gateway/profiles/devices.py): which device profile validates it, where it reports, its health.
    device_profile: Mapped[str | None] = mapped_column(String(64))  # None: the profile named like its kind
    store_id: Mapped[str | None] = mapped_column(String(64))  # from its topic; commands go back there
    firmware: Mapped[str | None] = mapped_column(String(64))
    online: Mapped[bool | None] = mapped_column(Boolean)  # None: never heard a status or a reading
    status_at: Mapped[float | None] = mapped_column(Float)  # when ``online`` last changed
    quarantined: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    registered_at: Mapped[float | None] = mapped_column(Float)


class CatalogItem(Base):
    __tablename__ = "catalogue"

    sku: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    price: Mapped[float | None] = mapped_column(Float)
    zone: Mapped[str | None] = mapped_column(String(64))
    aisle: Mapped[str | None] = mapped_column(String(32))


class Cart(Base):
    __tablename__ = "carts"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=CartStatus.OPEN)  # a CartStatus
    items: Mapped[list[Any]] = mapped_column(JSON, default=list)
    updated_at: Mapped[float] = mapped_column(Float)
    # Lifecycle events the engine has seen, so each is raised once, durably (restart-safe).
    abandoned_at: Mapped[float | None] = mapped_column(Float)
    checked_out_at: Mapped[float | None] = mapped_column(Float)
    purchase_handled_at: Mapped[float | None] = mapped_column(Float)


class Visit(Base):
    __tablename__ = "visits"
    __table_args__ = (Index("ix_visits_store_started", "store_id", "started_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), index=True)
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)
    zones: Mapped[list[Any]] = mapped_column(JSON, default=list)
    store_id: Mapped[str] = _store_column()


class Decision(Base):
    """Why a campaign did or did not fire for one profile and one event."""

    __tablename__ = "decisions"
    __table_args__ = (Index("ix_decisions_profile_campaign", "profile_id", "campaign_id"),
                      Index("ix_decisions_store_at", "store_id", "at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"))
    campaign_id: Mapped[str] = mapped_column(String(128))
    event_kind: Mapped[str] = mapped_column(String(32))
    event_key: Mapped[str] = mapped_column(String(256))
    fired: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)
    variant: Mapped[str | None] = mapped_column(String(64))  # experiment arm, "holdout" included
    store_id: Mapped[str] = _store_column()


class Notification(Base):
    """A message to one profile, durable in the outbox before any delivery is attempted.

    ``id`` is the SSE event id: monotonic, so a client resumes with Last-Event-ID.
    ``dedup_key`` (campaign, profile, triggering event) makes replays harmless.
    """

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_profile_id_id", "profile_id", "id"),
                      Index("ix_notifications_store_created", "store_id", "created_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"))
    campaign_id: Mapped[str] = mapped_column(String(128), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    dedup_key: Mapped[str] = mapped_column(String(400), unique=True)
    title: Mapped[str] = mapped_column(String(300))
    body: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default=NotificationStatus.PENDING)  # a NotificationStatus
    acked_at: Mapped[float | None] = mapped_column(Float)
    deliver_at: Mapped[float | None] = mapped_column(Float, index=True)  # set while scheduled
    expires_at: Mapped[float | None] = mapped_column(Float)
    variant: Mapped[str | None] = mapped_column(String(64))  # the experiment arm it was sent under
    redemption_code: Mapped[str | None] = mapped_column(String(32), unique=True)  # offers: shown at the till
    # A delayed or held send, when released: the highest notification id committed at that moment. A stream
    # resuming after Last-Event-ID L replays it when this is >= L, though its own id is older (see outbox.replay).
    released_after: Mapped[int | None] = mapped_column(Integer)
    store_id: Mapped[str] = _store_column()


class Delivery(Base):
    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    notification_id: Mapped[int] = mapped_column(
        ForeignKey("notifications.id", ondelete="CASCADE"), index=True
    )
    channel: Mapped[str] = mapped_column(String(32))
    at: Mapped[float] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String(32))


class Interaction(Base):
    __tablename__ = "interactions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    notification_id: Mapped[int] = mapped_column(
        ForeignKey("notifications.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(16))  # an InteractionKind
    at: Mapped[float] = mapped_column(Float)


class DeliveryState(Base):
    """Where one notification stands on one channel: the dispatcher's durable retry schedule.

    ``state`` (a ChannelState) is ``pending`` (retried at ``next_attempt_at``; NULL: nothing scheduled, e.g. a
    stream with no listener, which replays on connect), ``delivered`` or ``dead`` (gave up: dead-lettered).
    Kept in the database so retries survive a restart.
    """

    __tablename__ = "delivery_states"
    __table_args__ = (Index("ix_delivery_states_due", "state", "next_attempt_at"),)

    notification_id: Mapped[int] = mapped_column(
        ForeignKey("notifications.id", ondelete="CASCADE"), primary_key=True
    )
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))  # a ChannelState
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[float] = mapped_column(Float)


class PushSubscription(Base):
    """A browser's Web Push subscription (RFC 8030): where to POST and the keys to encrypt to (RFC 8291).

    The endpoint is unique: a browser that logs into another account moves its subscription along.
    A 404/410 from the push service deletes the row, so stale subscriptions never pile up.
    """

    __tablename__ = "push_subscriptions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), index=True)
    endpoint: Mapped[str] = mapped_column(String(1024), unique=True)
    p256dh: Mapped[str] = mapped_column(String(128))
    auth: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    last_success_at: Mapped[float | None] = mapped_column(Float)
    failures: Mapped[int] = mapped_column(Integer, default=0)  # consecutive transient failures


class WebhookEndpoint(Base):
    """What the webhook channel remembers about each configured URL, so a restart keeps a disabled one off."""

    __tablename__ = "webhook_endpoints"

    url: Mapped[str] = mapped_column(String(1024), primary_key=True)
    consecutive_gone: Mapped[int] = mapped_column(Integer, default=0)
    disabled_at: Mapped[float | None] = mapped_column(Float)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_attempt_at: Mapped[float | None] = mapped_column(Float)
    last_success_at: Mapped[float | None] = mapped_column(Float)


class ZoneStay(Base):
    """One enrolled customer's time in one zone: dwell per zone and bounce rate come from here."""

    __tablename__ = "zone_stays"
    __table_args__ = (Index("ix_zone_stays_zone_entered", "zone", "entered_at"),
                      Index("ix_zone_stays_store_entered", "store_id", "entered_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), index=True)
    visit_id: Mapped[int | None] = mapped_column(ForeignKey("visits.id", ondelete="CASCADE"), index=True)
    zone: Mapped[str] = mapped_column(String(64))
    entered_at: Mapped[float] = mapped_column(Float)
    exited_at: Mapped[float | None] = mapped_column(Float)
    store_id: Mapped[str] = _store_column()


class FootfallCount(Base):
    """Anonymous visits per store, local day and zone: counts only, no identity and no address."""

    __tablename__ = "footfall_counts"

    store_id: Mapped[str] = mapped_column(String(64), primary_key=True, server_default=DEFAULT_STORE_ID)
    day: Mapped[str] = mapped_column(String(10), primary_key=True)  # YYYY-MM-DD, store time
    zone: Mapped[str] = mapped_column(String(64), primary_key=True)  # "" for the store as a whole
    anonymous_visits: Mapped[int] = mapped_column(Integer, default=0)
    anonymous_dwell_s: Mapped[float] = mapped_column(Float, default=0.0)
    # Of the stays (a zone's row) or visits (the store's, by the day they began) that ended and were judged
    # (anonymous_ended), those under [figures] bounce_s having seen at most one zone. Rows counted before
    # migration 0013 have 0 of both: not judged, so they are left out of bounce rates.
    anonymous_ended: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    anonymous_bounces: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class FootfallHour(Base):
    """Anonymous visits per store, local day, hour and zone: counts only, no identity and no address.

    ``hour`` counts whole hours from the local day's midnight (0-23; 0-22 on the day the clocks go forward,
    0-24 on the day they go back), so each of the day's hours, the repeated one too, has its own row. A zone's
    visit counts in the hour it ended (as its daily row, so the hours add up to the day); the store's in the
    hour it began."""

    __tablename__ = "footfall_hours"

    store_id: Mapped[str] = mapped_column(String(64), primary_key=True, server_default=DEFAULT_STORE_ID)
    day: Mapped[str] = mapped_column(String(10), primary_key=True)  # YYYY-MM-DD, store time
    hour: Mapped[int] = mapped_column(Integer, primary_key=True)
    zone: Mapped[str] = mapped_column(String(64), primary_key=True)  # "" for the store as a whole
    anonymous_visits: Mapped[int] = mapped_column(Integer, default=0)


class CampaignRecord(Base):
    """A campaign managed over the API (file campaigns live in the campaigns directory)."""

    __tablename__ = "campaigns"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    definition: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[float] = mapped_column(Float)


class ApiKey(Base):
    """An admin API key: only the SHA-256 of the key is kept (it is 256 random bits, so no slow hash is needed).

    Revoked keys stay listed (revoked_at set) so an audit can still name them.
    """

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # public: the key is "gk_<id>_<secret>"
    name: Mapped[str] = mapped_column(String(100))
    secret_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float)
    last_used_at: Mapped[float | None] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)


class RevokedToken(Base):
    """A customer app token revoked before its expiry (logout); kept until it would have expired anyway."""

    __tablename__ = "revoked_tokens"

    jti: Mapped[str] = mapped_column(String(32), primary_key=True)
    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), index=True)
    expires_at: Mapped[float] = mapped_column(Float, index=True)
    revoked_at: Mapped[float] = mapped_column(Float)


class TokenGeneration(Base):
    """Revoking all of a profile's tokens bumps its generation; tokens carry the one they were issued under."""

    __tablename__ = "token_generations"

    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[float] = mapped_column(Float)


class IdempotencyKey(Base):
    """The first response to a creating POST with an ``Idempotency-Key``, replayed to a retry of the same caller.

    ``status`` is NULL while the first request runs (a claim: the unique key keeps a concurrent duplicate out).
    The body is sealed (AES-GCM, a key derived from the token secret): it may hold a new token or API key.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("principal", "method", "path", "key", name="uq_idempotency_request"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    principal: Mapped[str] = mapped_column(String(64))  # "key:<id>", "key:config" or "profile:<id>"
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    profile_id: Mapped[int | None] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), index=True)
    status: Mapped[int | None] = mapped_column(Integer)
    content_type: Mapped[str | None] = mapped_column(String(128))
    body: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float, index=True)


# -- telemetry (gateway/telemetry/store.py writes these; one transaction per MQTT batch) -----------------
# Readings of an owned device are its owner's data (a wearable's are health data): each row carries the
# owner at the time, ON DELETE CASCADE, so erasing the profile removes them too.

_RowId = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements only an INTEGER primary key


class ReadingRecord(Base):
    """One telemetry message, stored once: ``key`` is the device's seq (``s12``) or its ts (``t1767...``)."""

    __tablename__ = "readings"
    __table_args__ = (UniqueConstraint("device_id", "key", name="uq_readings_device_key"),
                      Index("ix_readings_device_ts", "device_id", "ts"))

    id: Mapped[int] = mapped_column(_RowId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(40))
    ts: Mapped[float] = mapped_column(Float, index=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    received_at: Mapped[float] = mapped_column(Float)
    profile_id: Mapped[int | None] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), index=True)


class ReadingRollup(Base):
    """count/sum/min/max/last of one metric of one device over one minute (period 60) or hour (3600)."""

    __tablename__ = "reading_rollups"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    period: Mapped[int] = mapped_column(Integer, primary_key=True)
    start: Mapped[float] = mapped_column(Float, primary_key=True)
    metric: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    sum: Mapped[float] = mapped_column(Float)
    min: Mapped[float] = mapped_column(Float)
    max: Mapped[float] = mapped_column(Float)
    last: Mapped[float] = mapped_column(Float)
    last_ts: Mapped[float] = mapped_column(Float)
    profile_id: Mapped[int | None] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), index=True)


class DeviceEventRecord(Base):
    """A device's event message (error code, button, on-site service), stored once per (device, ts, type)."""

    __tablename__ = "device_events"
    __table_args__ = (UniqueConstraint("device_id", "ts", "type", name="uq_device_events_device_ts_type"),)

    id: Mapped[int] = mapped_column(_RowId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    ts: Mapped[float] = mapped_column(Float)
    type: Mapped[str] = mapped_column(String(32))
    code: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    received_at: Mapped[float] = mapped_column(Float)
    profile_id: Mapped[int | None] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), index=True)


class DeadLetter(Base):
    """An MQTT message the gateway could not use, kept with the reason (and a prefix of its payload)."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(_RowId, primary_key=True, autoincrement=True)
    received_at: Mapped[float] = mapped_column(Float, index=True)
    topic: Mapped[str] = mapped_column(String(512))
    device_id: Mapped[str | None] = mapped_column(String(128), index=True)
    reason: Mapped[str] = mapped_column(String(48))
    detail: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[bytes | None] = mapped_column(LargeBinary)
    profile_id: Mapped[int | None] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), index=True)


# -- device rules (gateway/telemetry/alarms.py writes these, inside the telemetry batch's transaction) -------------
# An owned device's rule state and alarms are its owner's data (a wearable's are about their health): each
# row carries the owner at the time, ON DELETE CASCADE, so erasing the profile removes them too.


class RuleStateRecord(Base):
    """One device rule's memory for one device (devices/rules.RuleState as JSON): streaks, ``for`` timers,
    counters since the last service. ``due_at`` is when a timer fires if no reading comes first."""

    __tablename__ = "rule_states"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    rule_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    profile_id: Mapped[int | None] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), index=True)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    due_at: Mapped[float | None] = mapped_column(Float, index=True)
    updated_at: Mapped[float] = mapped_column(Float)


class Alarm(Base):
    """A raised device rule: updated while it lasts, never duplicated (one active per device and rule).

    It is also the maintenance case: prompted (the owner's notification), acknowledged or booked by the
    owner, then resolved by a service event; ``resolved_at - prompted_at`` is the time to resolution.
    ``status`` (an AlarmStatus): active | cleared (the rule's clear condition) | resolved (a service event).
    """

    __tablename__ = "alarms"
    __table_args__ = (
        Index("uq_alarms_one_active", "device_id", "rule_id", unique=True,
              sqlite_where=text(f"status = '{AlarmStatus.ACTIVE}'"),
              postgresql_where=text(f"status = '{AlarmStatus.ACTIVE}'")),
        Index("ix_alarms_status_created", "status", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    profile_id: Mapped[int | None] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), index=True)
    rule_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    severity: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=AlarmStatus.ACTIVE)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    count: Mapped[int] = mapped_column(Integer, default=1)
    last_value: Mapped[float | None] = mapped_column(Float)
    detail: Mapped[str | None] = mapped_column(Text)
    cleared_at: Mapped[float | None] = mapped_column(Float)
    clear_reason: Mapped[str | None] = mapped_column(Text)
    prompted_at: Mapped[float | None] = mapped_column(Float)
    notification_id: Mapped[int | None] = mapped_column(Integer)  # no FK: one tie to the customer is enough
    acknowledged_at: Mapped[float | None] = mapped_column(Float)
    booked_at: Mapped[float | None] = mapped_column(Float)
    booked_for: Mapped[float | None] = mapped_column(Float)  # the service slot the owner asked for
    resolved_at: Mapped[float | None] = mapped_column(Float)
    service_event_id: Mapped[int | None] = mapped_column(Integer)


class ServiceEvent(Base):
    """A service done on a device (over the admin API): resets its rules' counters, resolves its alarms."""

    __tablename__ = "service_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    at: Mapped[float] = mapped_column(Float)
    note: Mapped[str | None] = mapped_column(Text)
    counters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # rule -> counters before the reset


class SegmentMembership(Base):
    """A profile currently in a live segment, since when: a new row is a ``segment_entered`` event."""

    __tablename__ = "segment_memberships"

    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), primary_key=True)
    segment_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    entered_at: Mapped[float] = mapped_column(Float)


class IdHighWater(Base):
    """The highest id ever given, per table whose deleted ids SQLite would hand out again (it gives the
    highest rowid + 1): an erased profile's id never goes to the next customer enrolled."""

    __tablename__ = "id_high_water"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(Integer)


class HqUplinkMark(Base):
    """A store's uplink: per kind of upward event, the last row id read and acknowledged by the broker
    (gateway/hq/uplink.py); advanced only after PUBACK, so nothing is lost across restarts or outages."""

    __tablename__ = "hq_uplink_marks"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_id: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[float] = mapped_column(Float)


class HqUplinkOpen(Base):
    """A row the uplink read while still open (a visit not ended yet...): published once it settles."""

    __tablename__ = "hq_uplink_open"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    row_id: Mapped[int] = mapped_column(Integer, primary_key=True)


class HqEvent(Base):
    """Head office's ledger: every upward event applied, once, by its id (gateway/hq/consumer.py). ``row_id``
    is the row it became here; an event whose parent has not arrived yet waits with its ``payload``."""

    __tablename__ = "hq_events"

    event_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    store_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    row_id: Mapped[int | None] = mapped_column(Integer)
    received_at: Mapped[float] = mapped_column(Float)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # set while waiting for its parent


class HqUplinkProfile(Base):
    """A profile whose rows the uplink has published: once it is gone (erased, or merged into another),
    an erasure goes upward and head office removes its rows too."""

    __tablename__ = "hq_uplink_profiles"

    profile_id: Mapped[int] = mapped_column(Integer, primary_key=True)
