"""The operations the API and the CLI call: profiles, consents, carts, catalogue, devices, tokens.

Validation of meaning lives here (the API validates shape), so every door applies the same
rules. Errors are typed so the API can map them to 404, 409 and 422 with a message.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import gateway.delivery.outbox as outbox
import gateway.security.auth as auth
from devices.files import Document
from gateway.campaigns.model import PURPOSES, Campaign, CampaignError, parse_campaign
from gateway.clock import Clock
from gateway.documents import DocumentError, check_document, servable
from gateway.engine.engine import EngineEvent
from gateway.errors import Conflict, Invalid, NotFound
from gateway.profiles.identity import KINDS, IdentifierKind, IdentityIndex, normalize
from gateway.security.tokens import Claims, TokenError, TokenSigner
from gateway.storage.db import Database
from gateway.storage.models import (
    CampaignRecord,
    Cart,
    CartStatus,
    CatalogItem,
    Consent,
    Device,
    Identifier,
    IdHighWater,
    Interaction,
    InteractionKind,
    Notification,
    NotificationStatus,
    Profile,
)

if TYPE_CHECKING:
    from gateway.profiles.rotating import RotatingIdentities

# What the app reports; delivery is its ack, redemption is confirmed by staff.
INTERACTIONS = (InteractionKind.OPENED, InteractionKind.CLICKED, InteractionKind.DISMISSED)
# A code shown at the till is only good for an offer that went out.
_NEVER_SENT = (NotificationStatus.CANCELLED, NotificationStatus.EXPIRED, NotificationStatus.SCHEDULED)


@dataclass
class NewProfile:
    external_id: str | None = None
    name: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    identifiers: Sequence[tuple[str, str]] = ()
    consents: Mapping[str, bool] = field(default_factory=dict)


def _next_profile_id(s: Session) -> int | None:
    """The id for a new profile on SQLite, which would otherwise give an erased (highest) id to the next
    customer enrolled: their webhooks, the runtime's state and old tokens would then meet the newcomer.
    None elsewhere: PostgreSQL's sequence never hands an id out twice."""
    if s.get_bind().dialect.name != "sqlite":
        return None
    top = select(func.coalesce(func.max(Profile.id), 0)).scalar_subquery()
    given = s.execute(update(IdHighWater).where(IdHighWater.name == "profiles")
                      .values(value=func.max(IdHighWater.value, top) + 1).returning(IdHighWater.value)
                      .execution_options(synchronize_session=False)).scalar()
    if given is None:  # a schema made without the migrations (create_all): start the mark here
        given = (s.scalar(select(func.max(Profile.id))) or 0) + 1
        s.add(IdHighWater(name="profiles", value=given))
    return int(given)


def _storable(doc: dict[str, Any], what: str) -> dict[str, Any]:
    """``doc`` once it is fit to store (the checks of gateway/documents.py), else Invalid saying why."""
    try:
        check_document(doc)
    except DocumentError as exc:
        raise Invalid(f"{what}: {exc}") from None
    return doc


def profile_view(p: Profile) -> dict[str, Any]:
    return {
        "id": p.id, "external_id": p.external_id, "name": p.name,
        "attributes": servable(p.attributes, f"profile {p.id} attributes"),
        "created_at": p.created_at,
        "identifiers": [{"kind": i.kind, "value": i.value} for i in p.identifiers],
        "consents": {c.purpose: {"granted": c.granted, "updated_at": c.updated_at, "source": c.source}
                     for c in p.consents},
    }


@dataclass(frozen=True)
class ServiceOptions:
    """What the settings tell the service ([api] token_ttl_s, [store], [interactions], [figures])."""

    token_ttl_s: float = 30 * 86400
    timezone: str = "UTC"
    store_id: str | None = None
    conversion_window_s: float = 7 * 86400.0
    """How long after a notification a checkout converts it."""
    bounce_s: float = 60.0


DryRunner = Callable[[Session, EngineEvent], list[dict[str, Any]]]


@dataclass(frozen=True)
class ServiceHooks:
    """How the service tells its owner (the runtime) what changed; each is optional, so a service alone
    (a test, the CLI) is a plain store."""

    on_campaigns_changed: Callable[[], None] | None = None
    dry_runner: DryRunner | None = None
    """Evaluates an event against the live campaigns and rolls back; None: dry runs are unavailable."""
    on_profile_changed: Callable[[int], None] | None = None
    """A profile's attributes or consents changed, so its live segments are re-evaluated."""
    on_profile_gone: Callable[[int], None] | None = None
    """A profile was erased or linked into another, so in-memory state keyed by its id goes."""


class GatewayService:
    def __init__(self, db: Database, identities: IdentityIndex, clock: Clock, signer: TokenSigner,
                 options: ServiceOptions | None = None, hooks: ServiceHooks | None = None,
                 file_campaigns: Mapping[str, Campaign] | None = None) -> None:
        """``file_campaigns``: the campaigns defined in files, read-only here (the API edits its own)."""
        options = options or ServiceOptions()
        hooks = hooks or ServiceHooks()
        self.db = db
        self.identities = identities
        self.clock = clock
        self.signer = signer
        self.token_ttl_s = options.token_ttl_s
        self.timezone = options.timezone
        self.file_campaigns: dict[str, Campaign] = dict(file_campaigns or {})
        self.on_campaigns_changed = hooks.on_campaigns_changed
        self.dry_runner = hooks.dry_runner
        self.conversion_window_s = options.conversion_window_s
        self.bounce_s = options.bounce_s
        self.store_id = options.store_id
        self.on_profile_changed = hooks.on_profile_changed
        self.on_profile_gone = hooks.on_profile_gone
        self.rotating: RotatingIdentities | None = None
        """Rotating identities' enrolment (gateway/profiles/rotating.py), when the owner runs a resolver."""

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
        attributes = _storable(dict(new.attributes), "attributes")
        now = self.clock.now()
        try:
            with self.db.session() as s:
                profile_id = _next_profile_id(s)  # first: a write, so SQLite takes its lock before the reads
                if new.external_id and s.scalar(select(Profile.id).where(Profile.external_id == new.external_id)):
                    raise Conflict(f"a profile with external_id {new.external_id!r} exists")
                for kind, value in ids:
                    if s.scalar(select(Identifier.id).where(Identifier.kind == kind, Identifier.value == value)):
                        raise Conflict(f"identifier {kind}:{value} already belongs to a profile")
                p = Profile(id=profile_id, external_id=new.external_id, name=new.name,
                            attributes=attributes, created_at=now)
                p.identifiers = [Identifier(kind=k, value=v, created_at=now) for k, v in ids]
                p.consents = [Consent(purpose=purpose, granted=bool(g), updated_at=now, source=source)
                              for purpose, g in new.consents.items()]
                s.add(p)
                s.flush()
                # A device enrolled as an identifier is owned from now on, if it is already registered
                # (if not, the registry sets the owner when it first reports).
                for value in (v for k, v in ids if k == IdentifierKind.DEVICE):  # ids compare case-insensitively
                    s.execute(update(Device).where(func.lower(Device.id) == value).values(profile_id=p.id))
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
            view = profile_view(p)
        self._profile_changed(profile_id)
        return view

    def _profile_changed(self, profile_id: int) -> None:
        if self.on_profile_changed is not None:
            self.on_profile_changed(profile_id)

    def _profile_gone(self, profile_id: int) -> None:
        if self.on_profile_gone is not None:
            self.on_profile_gone(profile_id)

    def update_profile(self, profile_id: int, *, name: str | None = None,
                       attributes: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Change the name or merge attributes (a null value removes one); segments follow at once."""
        with self.db.session() as s:
            p = self._profile(s, profile_id)
            if name is not None:
                p.name = name
            if attributes is not None:
                merged = {**(p.attributes or {}), **attributes}
                p.attributes = _storable({k: v for k, v in merged.items() if v is not None}, "attributes")
            s.flush()
            view = profile_view(p)
        self._profile_changed(profile_id)
        return view

    def link_profiles(self, keep_id: int, other_id: int) -> dict[str, Any]:
        """Explicit linking (the only way two profiles become one; a sighting never merges them): the
        other profile's identifiers, history and devices move to ``keep_id`` and the other is deleted.
        ``keep_id``'s consents win; the other's fill only purposes it has no record of; points add up."""
        from gateway.profiles.privacy import merge_into

        if keep_id == other_id:
            raise Invalid("a profile cannot be linked to itself")
        with self.db.session() as s:
            keep, other = self._profile(s, keep_id), self._profile(s, other_id)
            moved = [(i.kind, i.value) for i in other.identifiers]
            merge_into(s, keep, other)
            s.flush()
            s.expire_all()
            view = profile_view(self._profile(s, keep_id))
        self.identities.remove_profile(other_id)
        for kind, value in moved:
            self.identities.add(kind, value, keep_id)
        if self.rotating is not None:  # the rows moved with the rest: the resolver holds them under keep_id
            self.rotating.forget_profile(other_id)
            self.rotating.reload_profile(keep_id)
        self._profile_gone(other_id)
        self._profile_changed(keep_id)
        return view

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
                    status: str = CartStatus.OPEN) -> dict[str, Any]:
        if status not in tuple(CartStatus):
            raise Invalid(f"status must be {' or '.join(CartStatus)}")
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
                if cart.status == CartStatus.CHECKED_OUT and status == CartStatus.OPEN:
                    raise Conflict(f"cart {cart_id} is checked out; a new cart needs a new id")
                cart.items, cart.status, cart.updated_at = [dict(i) for i in items], status, ts
                cart.abandoned_at = None  # touched again: it can be abandoned (and reminded) anew
            if status == CartStatus.CHECKED_OUT and cart.checked_out_at is None:
                cart.checked_out_at = ts  # the pipeline raises one purchase event for it
            return {"id": cart.id, "profile_id": p.id, "status": cart.status, "items": cart.items,
                    "updated_at": cart.updated_at}

    def import_catalogue_csv(self, text: str) -> int:
        """Columns sku,name[,price,zone,aisle] with a header row; any bad line rejects the whole file."""
        import csv
        import io

        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or not {"sku", "name"} <= {f.strip().lower() for f in reader.fieldnames}:
            raise Invalid("the CSV needs a header row with at least sku and name")
        rows = []
        for line, raw in enumerate(reader, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
            if not row.get("sku") or not row.get("name"):
                raise Invalid(f"line {line}: sku and name are required")
            try:
                price = float(row["price"]) if row.get("price") else None
            except ValueError:
                raise Invalid(f"line {line}: price {row['price']!r} is not a number") from None
            if price is not None and price < 0:
                raise Invalid(f"line {line}: price cannot be negative")
            rows.append({"sku": row["sku"], "name": row["name"], "price": price,
                         "zone": row.get("zone") or None, "aisle": row.get("aisle") or None})
        return self.upsert_catalogue(rows)

    def register_device(self, device_id: str, kind: str | None, owner_profile_id: int | None) -> None:
        with self.db.session() as s:
            d = s.get(Device, device_id) or Device(id=device_id, state={})
            d.kind, d.profile_id = kind, owner_profile_id
            s.add(d)
        if owner_profile_id is not None:
            self.identities.add(IdentifierKind.DEVICE, normalize(IdentifierKind.DEVICE, device_id), owner_profile_id)

    # ------------------------------------------------------------ tokens and the stream

    def issue_token(self, profile_id: int) -> tuple[str, Claims]:
        with self.db.session() as s:
            self._profile(s, profile_id)
            generation = auth.token_generation(s, profile_id)
        return self.signer.issue(profile_id, self.clock.now(), self.token_ttl_s, generation)

    def verify_token(self, token: str) -> Claims:
        claims = self.signer.verify(token, self.clock.now())
        with self.db.session() as s:  # an erased customer's tokens die with the profile
            profile = s.get(Profile, claims.profile_id)
            # SQLite hands an erased profile's id to the next one enrolled: a token older than the
            # profile it names was issued to someone else and must not reach the newcomer's data.
            if profile is None or claims.issued_at < profile.created_at:
                raise TokenError("token for a profile that no longer exists")
            refused = auth.token_refusal(s, claims)
        if refused:
            raise TokenError(refused)
        return claims

    def revoke_token(self, claims: Claims) -> None:
        """Logout: the caller's own token stops working at once (others of the same customer do not)."""
        with self.db.session() as s:
            auth.revoke_token(s, claims, self.clock.now())

    def revoke_tokens(self, profile_id: int) -> int:
        """Every app token issued so far for this customer stops working; new ones work. Returns the generation."""
        with self.db.session() as s:
            self._profile(s, profile_id)
            return auth.revoke_profile_tokens(s, profile_id, self.clock.now())

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

    # ------------------------------------------------------------ interactions

    def record_interaction(self, profile_id: int, notification_id: int, kind: str) -> dict[str, Any]:
        """Opened, clicked or dismissed, from the customer's own app; repeated reports count once."""
        if kind not in INTERACTIONS:
            raise Invalid(f"kind must be one of {', '.join(INTERACTIONS)}")
        now = self.clock.now()
        with self.db.session() as s:
            n = s.get(Notification, notification_id)
            if n is None or n.profile_id != profile_id:
                raise NotFound(f"notification {notification_id} not found")
            seen = s.scalar(select(Interaction.id).where(Interaction.notification_id == n.id, Interaction.kind == kind))
            if seen is None:
                s.add(Interaction(notification_id=n.id, kind=kind, at=now))
            return {"notification_id": n.id, "kind": kind, "recorded": seen is None}

    def redeem(self, code: str) -> dict[str, Any]:
        """Staff at the till confirm an offer's code: once per code, never for a withdrawn notification."""
        now = self.clock.now()
        with self.db.session() as s:
            n = s.scalars(select(Notification).where(Notification.redemption_code == code.strip().upper())).first()
            if n is None:
                raise NotFound("no offer with this code")
            if n.status in _NEVER_SENT:
                raise Conflict(f"this offer was never sent ({n.status})")
            if s.scalar(select(Interaction.id).where(Interaction.notification_id == n.id,
                                                     Interaction.kind == InteractionKind.REDEEMED)) is not None:
                raise Conflict("this code was already redeemed")
            s.add(Interaction(notification_id=n.id, kind=InteractionKind.REDEEMED, at=now))
            return {"notification_id": n.id, "campaign": n.campaign_id, "profile_id": n.profile_id,
                    "offer": n.data.get("offer"), "redeemed_at": now}

    # ------------------------------------------------------------ privacy and explanations

    def export_profile(self, profile_id: int) -> dict[str, Any]:
        from gateway.profiles.privacy import export_profile

        with self.db.session() as s:
            data = export_profile(s, profile_id)
        if data is None:
            raise NotFound(f"profile {profile_id} not found")
        return data

    def erase_profile(self, profile_id: int) -> None:
        from gateway.profiles.privacy import erase_profile

        with self.db.session() as s:
            if not erase_profile(s, profile_id):
                raise NotFound(f"profile {profile_id} not found")
        self.identities.remove_profile(profile_id)
        if self.rotating is not None:  # the keys went with the row; the resolver's table rows go now
            self.rotating.forget_profile(profile_id)
        self._profile_gone(profile_id)

    def decisions(self, profile_id: int, campaign_id: str | None, limit: int) -> list[dict[str, Any]]:
        from gateway.engine.explain import why

        with self.db.session() as s:
            self._profile(s, profile_id)
            return why(s, profile_id, campaign_id, limit)

    def recent_decisions(self, limit: int = 50) -> list[dict[str, Any]]:
        """This store's latest decisions for every profile, newest first (the dashboard's feed on a reload)."""
        from gateway.engine.explain import recent

        with self.db.session() as s:
            return recent(s, limit, self.store_id)

    def consenting_names(self, profile_ids: Iterable[int], purpose: str) -> dict[int, str | None]:
        """Of these profiles, the ones that granted ``purpose``, with their names (None: no name given): who the
        dashboard may show by name. One query, off the event loop."""
        ids = sorted(set(profile_ids))
        if not ids:
            return {}
        with self.db.session() as s:
            rows = s.execute(select(Profile.id, Profile.name).join(Consent, Consent.profile_id == Profile.id)
                             .where(Profile.id.in_(ids), Consent.purpose == purpose, Consent.granted.is_(True)))
            return {pid: name for pid, name in rows}

    def decision_counts(self, since: float) -> dict[str, dict[str, int]]:
        """Per campaign, this store's decisions since ``since``: fired and suppressed."""
        from gateway.engine.explain import counts

        with self.db.session() as s:
            return counts(s, since, self.store_id)

    def figures(self, day_from: str | None, day_to: str | None, timezone: str, *, zone: str | None = None,
                campaign: str | None = None, store: str | None = None) -> dict[str, Any]:
        """Figures for local days ``day_from`` to ``day_to``: by default today, in the store's timezone (what
        a marketer means by "today"); ``day_to`` defaults to ``day_from``."""
        from gateway.engine.figures import figures

        if day_from is None:
            day_from = dt.datetime.fromtimestamp(self.clock.now(), ZoneInfo(timezone)).date().isoformat()
        day_to = day_to or day_from
        try:
            with self.db.session() as s:
                return figures(s, day_from, day_to, timezone, conversion_window_s=self.conversion_window_s,
                               bounce_s=self.bounce_s, zone=zone, campaign=campaign, store=store)
        except (ValueError, OverflowError) as exc:  # 9999-12-31 has no next day
            raise Invalid(str(exc)) from None

    def dry_run(self, profile_id: int, kind: str, zone: str | None, dwell_s: float,
                facts: Mapping[str, Any]) -> list[dict[str, Any]]:
        """What the engine would decide for a synthetic event now; nothing is sent or stored."""
        if self.dry_runner is None:
            raise Invalid("dry runs need the running gateway's campaigns")
        with self.db.session() as s:
            self._profile(s, profile_id)
            event = EngineEvent(kind, profile_id, self.clock.now(), f"dry-run:{secrets.token_hex(6)}", zone,
                                dwell_s, dict(facts))
            return self.dry_runner(s, event)

    # ------------------------------------------------------------ campaigns over the API

    def api_campaigns(self) -> list[Campaign]:
        with self.db.session() as s:
            return [parse_campaign(r.definition, f"campaign {r.id}") for r in s.scalars(select(CampaignRecord))]

    def list_campaigns(self) -> list[dict[str, Any]]:
        out = [{**_summary(c), "source": "file"} for c in self.file_campaigns.values()]
        out += [{**_summary(c), "source": "api"} for c in self.api_campaigns()]
        return sorted(out, key=lambda c: c["id"])

    def get_campaign(self, campaign_id: str) -> dict[str, Any]:
        if campaign_id in self.file_campaigns:
            return {**_summary(self.file_campaigns[campaign_id]), "source": "file"}
        with self.db.session() as s:
            r = s.get(CampaignRecord, campaign_id)
            if r is None:
                raise NotFound(f"campaign {campaign_id!r} not found")
            return {"id": r.id, "source": "api", "updated_at": r.updated_at,
                    "definition": servable(r.definition, f"campaign {r.id} definition")}

    @staticmethod
    def validate_campaign(definition: Mapping[str, Any], doc: Document | None = None) -> Campaign:
        """``doc``: the YAML or JSON text it was read from, so each problem names its line."""
        try:
            return parse_campaign(dict(definition), "campaign", doc)
        except (CampaignError, TypeError, ValueError, KeyError) as exc:
            raise Invalid(str(exc)) from None

    def put_campaign(self, campaign_id: str, definition: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create or replace an API campaign; returns (its view, created)."""
        if campaign_id in self.file_campaigns:
            raise Conflict(f"campaign {campaign_id!r} is defined in a file; edit the file instead")
        body = {**definition, "id": definition.get("id", campaign_id)}
        if body["id"] != campaign_id:
            raise Invalid("the id in the body differs from the id in the path")
        self.validate_campaign(_storable(body, "campaign"))
        with self.db.session() as s:
            r = s.get(CampaignRecord, campaign_id)
            created = r is None
            if r is None:
                s.add(CampaignRecord(id=campaign_id, definition=body, updated_at=self.clock.now()))
            else:
                r.definition, r.updated_at = body, self.clock.now()
        self._campaigns_changed()
        return self.get_campaign(campaign_id), created

    def set_campaign_enabled(self, campaign_id: str, enabled: bool) -> dict[str, Any]:
        view = self.get_campaign(campaign_id)
        if view["source"] == "file":
            raise Conflict(f"campaign {campaign_id!r} is defined in a file; set enabled there")
        return self.put_campaign(campaign_id, {**view["definition"], "enabled": enabled})[0]

    def delete_campaign(self, campaign_id: str) -> None:
        if campaign_id in self.file_campaigns:
            raise Conflict(f"campaign {campaign_id!r} is defined in a file; remove the file instead")
        with self.db.session() as s:
            r = s.get(CampaignRecord, campaign_id)
            if r is None:
                raise NotFound(f"campaign {campaign_id!r} not found")
            s.delete(r)
        self._campaigns_changed()

    def _campaigns_changed(self) -> None:
        if self.on_campaigns_changed is not None:
            self.on_campaigns_changed()


def _summary(c: Campaign) -> dict[str, Any]:
    return {"id": c.id, "name": c.name, "purpose": c.purpose, "trigger": c.trigger.type, "zone": c.trigger.zone,
            "priority": c.priority, "enabled": c.enabled}
