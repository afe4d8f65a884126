"""Identifier -> profile lookups, in memory: the hot path asks for every sighting.

The index is loaded from storage at start and kept in step by the service that writes
identifiers. A sighting never creates or merges anything here.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from beacons.remote import app_key
from gateway.storage.models import Identifier


class IdentifierKind(StrEnum):
    """What an identifier is; each kind's values are unique across profiles."""

    BEACON = "beacon"  # a beacon key (ibeacon:<uuid>:<major>:<minor>, ...)
    DEVICE = "device"  # a connected product's id
    APP_INSTALL = "app_install"
    EMAIL_SHA256 = "email_sha256"  # given as the address, kept as its hash


KINDS: tuple[IdentifierKind, ...] = tuple(IdentifierKind)
_CASELESS = frozenset({IdentifierKind.BEACON, IdentifierKind.EMAIL_SHA256, IdentifierKind.DEVICE})


def hash_email(email: str) -> str:
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()


def normalize(kind: str, value: str) -> str:
    """Beacon keys and hashes compare case-insensitively; app install ids are kept as given."""
    if kind == IdentifierKind.EMAIL_SHA256 and "@" in value:
        return hash_email(value)
    return value.strip().lower() if kind in _CASELESS else value.strip()


class IdentityIndex:
    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], int] = {}
        self._beacons: dict[str, int] = {}
        self._apps: dict[str, int] = {}  # app:<profile id> -> profile, for app-reported sightings

    def load(self, session: Session) -> None:
        self._by_key.clear()
        self._beacons.clear()
        for kind, value, pid in session.execute(select(Identifier.kind, Identifier.value, Identifier.profile_id)):
            self.add(kind, value, pid)

    def add(self, kind: str, value: str, profile_id: int) -> None:
        self._by_key[(kind, value)] = profile_id
        if kind == IdentifierKind.BEACON:
            self._beacons[value] = profile_id

    def remove(self, kind: str, value: str) -> None:
        """One identifier detached from its profile (the API's DELETE .../identifiers)."""
        self._by_key.pop((kind, value), None)
        if kind == IdentifierKind.BEACON:
            self._beacons.pop(value, None)

    def remove_profile(self, profile_id: int) -> None:
        self._by_key = {k: v for k, v in self._by_key.items() if v != profile_id}
        self._beacons = {k: v for k, v in self._beacons.items() if v != profile_id}
        self._apps.pop(app_key(profile_id), None)

    def allow_app(self, profile_id: int) -> str:
        """The presence key for a customer whose app (token verified) reports sightings; it resolves
        to that profile from now until the profile is removed. Never a stored identifier."""
        key = app_key(profile_id)
        self._apps[key] = profile_id
        return key

    def beacon(self, key: str) -> int | None:
        if key.startswith("app:"):  # checked first: a registered beacon value can never claim an app key
            return self._apps.get(key)
        return self._beacons.get(key)

    def lookup(self, kind: str, value: str) -> int | None:
        return self._by_key.get((kind, normalize(kind, value)))

    def __len__(self) -> int:
        return len(self._by_key)
