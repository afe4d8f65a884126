"""The device registry's operations for the API: list, read, register, update; readings, rollups, dead letters.

The meaning checks live here (a profile that exists, an owner that exists, an id that fits a topic
level); the API only checks shapes. Errors are the service's typed ones, so the API maps them to
404/409/422 problem+json like every other route.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from devices.payloads import LinkState
from devices.profiles import ProfileSet
from gateway.clock import Clock
from gateway.errors import Conflict, Invalid, NotFound
from gateway.profiles.identity import IdentifierKind, IdentityIndex, normalize
from gateway.storage.db import Database
from gateway.storage.models import DeadLetter, Device, Profile, ReadingRecord, ReadingRollup

PERIODS = {"minute": 60, "hour": 3600}
UNSET: Any = object()


class DeviceStatus(StrEnum):
    """A registered device as the API shows it: its last status message, unless an operator has yet
    to accept it."""

    ONLINE = LinkState.ONLINE.value
    OFFLINE = LinkState.OFFLINE.value
    UNKNOWN = "unknown"  # never heard a status or a reading
    QUARANTINED = "quarantined"


def device_status(d: Device) -> DeviceStatus:
    if d.quarantined:
        return DeviceStatus.QUARANTINED
    if d.online is None:
        return DeviceStatus.UNKNOWN
    return DeviceStatus.ONLINE if d.online else DeviceStatus.OFFLINE


def device_view(d: Device) -> dict[str, Any]:
    status = device_status(d)
    return {"id": d.id, "kind": d.kind, "device_profile": d.device_profile, "owner_profile_id": d.profile_id,
            "store_id": d.store_id, "firmware": d.firmware, "status": status, "status_at": d.status_at,
            "last_seen": d.last_seen, "registered_at": d.registered_at, "state": dict(d.state or {})}


def _check_id(device_id: str) -> str:
    if not device_id or any(c in device_id for c in "/+#\x00") or len(device_id) > 128:
        raise Invalid(f"device id {device_id[:40]!r} must be one MQTT topic level (no / + # NUL), 1-128 characters")
    return device_id


class DeviceRegistry:
    def __init__(self, db: Database, identities: IdentityIndex, clock: Clock, profiles: ProfileSet) -> None:
        self.db = db
        self.identities = identities
        self.clock = clock
        self.profiles = profiles

    def _device(self, s: Session, device_id: str) -> Device:
        d = s.get(Device, device_id)
        if d is None:
            raise NotFound(f"device {device_id!r} not found")
        return d

    def _check(self, s: Session, device_profile: str | None, owner: int | None) -> None:
        if device_profile is not None and self.profiles.get(device_profile) is None:
            known = ", ".join(sorted(self.profiles.profiles)) or "none loaded"
            raise Invalid(f"unknown device profile {device_profile!r}; known: {known}")
        if owner is not None and s.get(Profile, owner) is None:
            raise Invalid(f"owner profile {owner} does not exist")

    def list_devices(self, status: str | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        q = select(Device).order_by(Device.id).limit(limit).offset(offset)
        if status == DeviceStatus.QUARANTINED:
            q = q.where(Device.quarantined.is_(True))
        elif status in (DeviceStatus.ONLINE, DeviceStatus.OFFLINE):
            q = q.where(Device.quarantined.is_(False), Device.online.is_(status == DeviceStatus.ONLINE))
        elif status == DeviceStatus.UNKNOWN:
            q = q.where(Device.quarantined.is_(False), Device.online.is_(None))
        with self.db.session() as s:
            return [device_view(d) for d in s.scalars(q)]

    def get_device(self, device_id: str) -> dict[str, Any]:
        with self.db.session() as s:
            return device_view(self._device(s, device_id))

    def register(self, device_id: str, *, kind: str | None = None, device_profile: str | None = None,
                 owner_profile_id: int | None = None, firmware: str | None = None,
                 store_id: str | None = None) -> dict[str, Any]:
        """Register a device ahead of its first message (accepted, not quarantined); 409 if it exists."""
        _check_id(device_id)
        with self.db.session() as s:
            self._check(s, device_profile, owner_profile_id)
            if s.get(Device, device_id) is not None:
                raise Conflict(f"device {device_id!r} is already registered (PATCH it to change it)")
            d = Device(id=device_id, kind=kind, device_profile=device_profile, profile_id=owner_profile_id,
                       firmware=firmware, store_id=store_id, state={}, quarantined=False,
                       registered_at=self.clock.now())
            s.add(d)
            s.flush()
            view = device_view(d)
        if owner_profile_id is not None:
            self.identities.add(IdentifierKind.DEVICE, normalize(IdentifierKind.DEVICE, device_id), owner_profile_id)
        return view

    def update(self, device_id: str, *, kind: Any = UNSET, device_profile: Any = UNSET,
               owner_profile_id: Any = UNSET, firmware: Any = UNSET, quarantined: Any = UNSET) -> dict[str, Any]:
        """Change what is given; ``quarantined=False`` accepts a quarantined device."""
        with self.db.session() as s:
            d = self._device(s, device_id)
            self._check(s, None if device_profile is UNSET else device_profile,
                        None if owner_profile_id is UNSET else owner_profile_id)
            if kind is not UNSET:
                d.kind = kind
            if device_profile is not UNSET:
                d.device_profile = device_profile
            if owner_profile_id is not UNSET:
                d.profile_id = owner_profile_id
            if firmware is not UNSET:
                d.firmware = firmware
            if quarantined is not UNSET:
                d.quarantined = bool(quarantined)
            view = device_view(d)
        if owner_profile_id is not UNSET and owner_profile_id is not None:
            self.identities.add(IdentifierKind.DEVICE, normalize(IdentifierKind.DEVICE, device_id), owner_profile_id)
        return view

    def readings(self, device_id: str, since: float | None, until: float | None,
                 limit: int = 500) -> list[dict[str, Any]]:
        """Raw readings, newest first."""
        with self.db.session() as s:
            self._device(s, device_id)
            q = select(ReadingRecord).where(ReadingRecord.device_id == device_id)
            if since is not None:
                q = q.where(ReadingRecord.ts >= since)
            if until is not None:
                q = q.where(ReadingRecord.ts < until)
            rows = s.scalars(q.order_by(ReadingRecord.ts.desc()).limit(limit))
            return [{"ts": r.ts, "key": r.key, "metrics": r.metrics, "received_at": r.received_at} for r in rows]

    def rollups(self, device_id: str, period: str, metric: str | None, since: float | None,
                until: float | None, limit: int = 1000) -> list[dict[str, Any]]:
        """Per-minute or per-hour buckets for charts, oldest first."""
        seconds = PERIODS[period]
        with self.db.session() as s:
            self._device(s, device_id)
            q = select(ReadingRollup).where(ReadingRollup.device_id == device_id, ReadingRollup.period == seconds)
            if metric is not None:
                q = q.where(ReadingRollup.metric == metric)
            if since is not None:
                q = q.where(ReadingRollup.start >= since)
            if until is not None:
                q = q.where(ReadingRollup.start < until)
            rows = s.scalars(q.order_by(ReadingRollup.start, ReadingRollup.metric).limit(limit))
            return [{"start": r.start, "period_s": r.period, "metric": r.metric, "count": r.count,
                     "min": r.min, "max": r.max, "mean": r.sum / r.count if r.count else None, "last": r.last}
                    for r in rows]

    def dead_letters(self, device_id: str | None, reason: str | None, limit: int = 100) -> list[dict[str, Any]]:
        """Refused messages, newest first, with the reason and the start of the payload."""
        q = select(DeadLetter)
        if device_id is not None:
            q = q.where(DeadLetter.device_id == device_id)
        if reason is not None:
            q = q.where(DeadLetter.reason == reason)
        with self.db.session() as s:
            rows = s.scalars(q.order_by(DeadLetter.id.desc()).limit(limit))
            return [{"id": r.id, "received_at": r.received_at, "topic": r.topic, "device_id": r.device_id,
                     "reason": r.reason, "detail": r.detail,
                     "payload": (r.payload or b"")[:256].decode("utf-8", errors="replace")} for r in rows]
