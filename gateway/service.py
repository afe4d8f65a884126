"""The operations the API and the CLI call: profiles, consents, carts, catalogue, devices, tokens.

Validation of meaning lives here (the API validates shape), so every door applies the same
rules. Errors are typed so the API can map them to 404, 409 and 422 with a message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gateway import outbox
from gateway.campaigns import PURPOSES
from gateway.clock import Clock
from gateway.identity import KINDS, IdentityIndex, normalize
from gateway.storage.db import Database
from gateway.storage.models import Cart, CatalogItem, Consent, Device, Identifier, Profile
from gateway.tokens import Claims, TokenSigner


class NotFound(LookupError):
    pass


class Conflict(ValueError):
    pass


class Invalid(ValueError):
    pass


@dataclass
class NewProfile:
    external_id: str | None = None
    name: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    identifiers: Sequence[tuple[str, str]] = ()
    consents: Mapping[str, bool] = field(default_factory=dict)


def profile_view(p: Profile) -> dict[str, Any]:
    return {
        "id": p.id, "external_id": p.external_id, "name": p.name, "attributes": p.attributes,
        "created_at": p.created_at,
        "identifiers": [{"kind": i.kind, "value": i.value} for i in p.identifiers],
        "consents": {c.purpose: {"granted": c.granted, "updated_at": c.updated_at, "source": c.source}
                     for c in p.consents},
    }


class GatewayService:
    def __init__(self, db: Database, identities: IdentityIndex, clock: Clock, signer: TokenSigner,
                 token_ttl_s: float = 30 * 86400) -> None:
        self.db = db
        self.identities = identities
        self.clock = clock
        self.signer = signer
        self.token_ttl_s = token_ttl_s

    # ------------------------------------------------------------ profiles

    def _check_consents(self, consents: Mapping[str, bool]) -> None:
        bad = set(consents) - set(PURPOSES)
        if bad:
            raise Invalid(f"unknown consent purpose(s) {', '.join(sorted(bad))}; known: {', '.join(PURPOSES)}")

    def create_profile(self, new: NewProfile, source: str = "api") -> dict[str, Any]:
        self._check_consents(new.consents)
        ids = [(k, normalize(k, v)) for k, v in new.identifiers]
        for kind, value in ids:
            if kind not in KINDS:
                raise Invalid(f"unknown identifier kind {kind!r}; known: {', '.join(KINDS)}")
            if not value:
                raise Invalid(f"empty {kind} identifier")
        now = self.clock.now()
        try:
            with self.db.session() as s:
                if new.external_id and s.scalar(select(Profile.id).where(Profile.external_id == new.external_id)):
                    raise Conflict(f"a profile with external_id {new.external_id!r} exists")
                for kind, value in ids:
                    if s.scalar(select(Identifier.id).where(Identifier.kind == kind, Identifier.value == value)):
                        raise Conflict(f"identifier {kind}:{value} already belongs to a profile")
                p = Profile(external_id=new.external_id, name=new.name, attributes=dict(new.attributes),
                            created_at=now)
                p.identifiers = [Identifier(kind=k, value=v, created_at=now) for k, v in ids]
                p.consents = [Consent(purpose=purpose, granted=bool(g), updated_at=now, source=source)
                              for purpose, g in new.consents.items()]
                s.add(p)
                s.flush()
                view = profile_view(p)
        except IntegrityError:
            raise Conflict("profile or identifier already exists") from None
        for kind, value in ids:
            self.identities.add(kind, value, view["id"])
        return view

    def _profile(self, s: Session, profile_id: int) -> Profile:
        p = s.get(Profile, profile_id)
        if p is None:
            raise NotFound(f"profile {profile_id} not found")
        return p

    def get_profile(self, profile_id: int) -> dict[str, Any]:
        with self.db.session() as s:
            return profile_view(self._profile(s, profile_id))

    def resolve_profile(self, s: Session, *, profile_id: int | None, external_id: str | None) -> Profile:
        if profile_id is not None:
            return self._profile(s, profile_id)
        if external_id:
            p = s.scalars(select(Profile).where(Profile.external_id == external_id)).first()
            if p is None:
                raise NotFound(f"no profile with external_id {external_id!r}")
            return p
        raise Invalid("give profile_id or profile_external_id")

    def set_consents(self, profile_id: int, consents: Mapping[str, bool], source: str = "api") -> dict[str, Any]:
        self._check_consents(consents)
        now = self.clock.now()
        with self.db.session() as s:
            p = self._profile(s, profile_id)
            current = {c.purpose: c for c in p.consents}
            for purpose, granted in consents.items():
                c = current.get(purpose)
                if c is None:
                    p.consents.append(Consent(purpose=purpose, granted=granted, updated_at=now, source=source))
                else:
                    c.granted, c.updated_at, c.source = granted, now, source
            s.flush()
            return profile_view(p)

    # ------------------------------------------------------------ catalogue, carts, devices

    def upsert_catalogue(self, items: Iterable[Mapping[str, Any]]) -> int:
        n = 0
        with self.db.session() as s:
            for it in items:
                s.merge(CatalogItem(sku=str(it["sku"]), name=str(it["name"]), price=it.get("price"),
                                    zone=it.get("zone"), aisle=it.get("aisle")))
                n += 1
        return n

    def upsert_cart(self, cart_id: str, *, profile_id: int | None, external_id: str | None,
                    items: Sequence[Mapping[str, Any]], updated_at: float | None,
                    status: str = "open") -> dict[str, Any]:
        if status not in ("open", "checked_out"):
            raise Invalid("status must be open or checked_out")
        now = self.clock.now()
        ts = now if updated_at is None else float(updated_at)
        if ts > now + 300:
            raise Invalid("updated_at is in the future")
        with self.db.session() as s:
            p = self.resolve_profile(s, profile_id=profile_id, external_id=external_id)
            cart = s.get(Cart, cart_id)
            if cart is None:
                cart = Cart(id=cart_id, profile_id=p.id, status=status, items=[dict(i) for i in items],
                            updated_at=ts)
                s.add(cart)
            else:
                if cart.profile_id != p.id:
                    raise Conflict(f"cart {cart_id} belongs to another profile")
                cart.items, cart.status, cart.updated_at = [dict(i) for i in items], status, ts
            return {"id": cart.id, "profile_id": p.id, "status": cart.status, "items": cart.items,
                    "updated_at": cart.updated_at}

    def register_device(self, device_id: str, kind: str | None, owner_profile_id: int | None) -> None:
        with self.db.session() as s:
            d = s.get(Device, device_id) or Device(id=device_id, state={})
            d.kind, d.profile_id = kind, owner_profile_id
            s.add(d)
        if owner_profile_id is not None:
            self.identities.add("device", normalize("device", device_id), owner_profile_id)

    # ------------------------------------------------------------ tokens and the stream

    def issue_token(self, profile_id: int) -> tuple[str, Claims]:
        with self.db.session() as s:
            self._profile(s, profile_id)
        return self.signer.issue(profile_id, self.clock.now(), self.token_ttl_s)

    def verify_token(self, token: str) -> Claims:
        return self.signer.verify(token, self.clock.now())

    def replay(self, profile_id: int, after_id: int) -> list[dict[str, Any]]:
        with self.db.session() as s:
            return outbox.replay(s, profile_id, after_id)

    def ack(self, profile_id: int, notification_id: int) -> dict[str, Any]:
        with self.db.session() as s:
            try:
                n = outbox.ack(s, profile_id, notification_id, self.clock.now())
            except outbox.AckError as exc:
                raise NotFound(str(exc)) from None
            return outbox.message(n)
