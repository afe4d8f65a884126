"""The durable state of a store. Times are UTC epoch seconds (floats): the clock's unit, tz-proof.

Everything a profile owns hangs off it with ON DELETE CASCADE, so erasure is one DELETE.
Unknown devices are never stored: there is no table keyed by a BLE address.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Profile(Base):
    __tablename__ = "profiles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)

    identifiers: Mapped[list[Identifier]] = relationship(
        back_populates="profile", cascade="all, delete-orphan", passive_deletes=True, lazy="selectin"
    )
    consents: Mapped[list[Consent]] = relationship(
        back_populates="profile", cascade="all, delete-orphan", passive_deletes=True, lazy="selectin"
    )


class Identifier(Base):
    """Anything that points at a profile: ``beacon`` (a beacon key), ``device``, ``app_install``, ``email_sha256``."""

    __tablename__ = "identifiers"
    __table_args__ = (UniqueConstraint("kind", "value", name="uq_identifier_kind_value"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    value: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[float] = mapped_column(Float)

    profile: Mapped[Profile] = relationship(back_populates="identifiers")


class Consent(Base):
    __tablename__ = "consents"

    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(32), primary_key=True)
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
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | checked_out
    items: Mapped[list[Any]] = mapped_column(JSON, default=list)
    updated_at: Mapped[float] = mapped_column(Float)


class Visit(Base):
    __tablename__ = "visits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"), index=True)
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)
    zones: Mapped[list[Any]] = mapped_column(JSON, default=list)


class Decision(Base):
    """Why a campaign did or did not fire for one profile and one event."""

    __tablename__ = "decisions"
    __table_args__ = (Index("ix_decisions_profile_campaign", "profile_id", "campaign_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"))
    campaign_id: Mapped[str] = mapped_column(String(128))
    event_kind: Mapped[str] = mapped_column(String(32))
    event_key: Mapped[str] = mapped_column(String(256))
    fired: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)


class Notification(Base):
    """A message to one profile, durable in the outbox before any delivery is attempted.

    ``id`` is the SSE event id: monotonic, so a client resumes with Last-Event-ID.
    ``dedup_key`` (campaign, profile, triggering event) makes replays harmless.
    """

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_profile_id_id", "profile_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="CASCADE"))
    campaign_id: Mapped[str] = mapped_column(String(128), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    dedup_key: Mapped[str] = mapped_column(String(400), unique=True)
    title: Mapped[str] = mapped_column(String(300))
    body: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | sent | acked
    acked_at: Mapped[float | None] = mapped_column(Float)


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
    kind: Mapped[str] = mapped_column(String(16))  # delivered | opened | clicked | redeemed | dismissed
    at: Mapped[float] = mapped_column(Float)
