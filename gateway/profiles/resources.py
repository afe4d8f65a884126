"""Reads and small writes behind the admin collections: profiles, identifiers, carts, catalogue.

Every list is one page (``limit``/``offset``, newest or sorted first) plus the total that matched,
so the API can say where the next page starts. Identifier changes go through the same checks as
enrolment and update the in-memory index at once, so the next advertisement already resolves.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute

from gateway.documents import servable
from gateway.errors import Conflict, Invalid, NotFound
from gateway.profiles.identity import KINDS, normalize
from gateway.profiles.service import GatewayService, profile_view
from gateway.storage.models import Cart, CatalogItem, Identifier, Profile

Page = tuple[list[dict[str, Any]], int]


def _contains(column: ColumnElement[Any] | InstrumentedAttribute[Any], text: str) -> ColumnElement[bool]:
    """``column`` holds ``text``, any case, with LIKE's wildcards (``%``, ``_``) and the escape character
    in ``text`` matched literally: a search for ``%`` finds a percent sign, not every row."""
    return func.lower(column).contains(text.lower(), autoescape=True)


def list_profiles(svc: GatewayService, *, q: str | None = None, external_id: str | None = None,
                  identifier_kind: str | None = None, consent: str | None = None, limit: int = 50,
                  offset: int = 0) -> Page:
    """Newest first. ``q`` matches the name or external id (substring, any case, ``%`` and ``_`` taken
    literally); ``consent`` keeps profiles that granted that purpose; ``identifier_kind`` those with such
    an identifier."""
    from gateway.storage.models import Consent

    where = []
    if q:
        where.append(or_(_contains(Profile.name, q), _contains(Profile.external_id, q)))
    if external_id is not None:
        where.append(Profile.external_id == external_id)
    if identifier_kind is not None:
        where.append(Profile.id.in_(select(Identifier.profile_id).where(Identifier.kind == identifier_kind)))
    if consent is not None:
        where.append(Profile.id.in_(select(Consent.profile_id).where(Consent.purpose == consent,
                                                                     Consent.granted.is_(True))))
    with svc.db.session() as s:
        total = s.scalar(select(func.count()).select_from(Profile).where(*where)) or 0
        rows = s.scalars(select(Profile).where(*where).order_by(Profile.id.desc()).limit(limit).offset(offset))
        return [profile_view(p) for p in rows], int(total)


def _identifier_view(i: Identifier) -> dict[str, Any]:
    return {"kind": i.kind, "value": i.value, "created_at": i.created_at}


def list_identifiers(svc: GatewayService, profile_id: int) -> list[dict[str, Any]]:
    with svc.db.session() as s:
        if s.get(Profile, profile_id) is None:
            raise NotFound(f"profile {profile_id} not found")
        rows = s.scalars(select(Identifier).where(Identifier.profile_id == profile_id).order_by(Identifier.id))
        return [_identifier_view(i) for i in rows]


def add_identifier(svc: GatewayService, profile_id: int, kind: str, value: str) -> tuple[dict[str, Any], bool]:
    """Attach an identifier; (its view, created). The same one again is a no-op; another profile's, 409."""
    if kind not in KINDS:
        raise Invalid(f"unknown identifier kind {kind!r}; known: {', '.join(KINDS)}")
    norm = normalize(kind, value)
    if not norm:
        raise Invalid(f"empty {kind} identifier")
    with svc.db.session() as s:
        if s.get(Profile, profile_id) is None:
            raise NotFound(f"profile {profile_id} not found")
        existing = s.scalars(select(Identifier).where(Identifier.kind == kind, Identifier.value == norm)).first()
        if existing is not None:
            if existing.profile_id != profile_id:
                raise Conflict(f"identifier {kind}:{norm} already belongs to another profile")
            return _identifier_view(existing), False
        row = Identifier(profile_id=profile_id, kind=kind, value=norm, created_at=svc.clock.now())
        s.add(row)
        s.flush()
        view = _identifier_view(row)
    svc.identities.add(kind, norm, profile_id)
    return view, True


def remove_identifier(svc: GatewayService, profile_id: int, kind: str, value: str) -> None:
    """Detach one identifier: from now on that beacon or device is anonymous again."""
    norm = normalize(kind, value) if kind in KINDS else value
    with svc.db.session() as s:
        row = s.scalars(select(Identifier).where(Identifier.profile_id == profile_id, Identifier.kind == kind,
                                                 Identifier.value == norm)).first()
        if row is None:
            raise NotFound(f"profile {profile_id} has no {kind} identifier {norm!r}")
        s.delete(row)
    svc.identities.remove(kind, norm)


def _cart_view(c: Cart) -> dict[str, Any]:
    return {"id": c.id, "profile_id": c.profile_id, "status": c.status,
            "items": servable(c.items, f"cart {c.id} items"),
            "updated_at": c.updated_at, "abandoned_at": c.abandoned_at, "checked_out_at": c.checked_out_at}


def get_cart(svc: GatewayService, cart_id: str) -> dict[str, Any]:
    with svc.db.session() as s:
        c = s.get(Cart, cart_id)
        if c is None:
            raise NotFound(f"cart {cart_id} not found")
        return _cart_view(c)


def list_carts(svc: GatewayService, *, profile_id: int | None = None, status: str | None = None,
               abandoned: bool | None = None, limit: int = 50, offset: int = 0) -> Page:
    """Most recently updated first; ``abandoned`` keeps carts the gateway has (or has not) seen abandoned."""
    where = []
    if profile_id is not None:
        where.append(Cart.profile_id == profile_id)
    if status is not None:
        where.append(Cart.status == status)
    if abandoned is not None:
        where.append(Cart.abandoned_at.is_not(None) if abandoned else Cart.abandoned_at.is_(None))
    with svc.db.session() as s:
        total = s.scalar(select(func.count()).select_from(Cart).where(*where)) or 0
        rows = s.scalars(select(Cart).where(*where).order_by(Cart.updated_at.desc(), Cart.id)
                         .limit(limit).offset(offset))
        return [_cart_view(c) for c in rows], int(total)


def _item_view(i: CatalogItem) -> dict[str, Any]:
    return {"sku": i.sku, "name": i.name, "price": i.price, "zone": i.zone, "aisle": i.aisle}


def get_catalogue_item(svc: GatewayService, sku: str) -> dict[str, Any]:
    with svc.db.session() as s:
        i = s.get(CatalogItem, sku)
        if i is None:
            raise NotFound(f"no catalogue item with sku {sku!r}")
        return _item_view(i)


def list_catalogue(svc: GatewayService, *, zone: str | None = None, q: str | None = None, limit: int = 50,
                   offset: int = 0) -> Page:
    """By sku; ``zone`` keeps the items shelved there, ``q`` matches the name (substring, any case,
    ``%`` and ``_`` taken literally)."""
    where = []
    if zone is not None:
        where.append(CatalogItem.zone == zone)
    if q:
        where.append(_contains(CatalogItem.name, q))
    with svc.db.session() as s:
        total = s.scalar(select(func.count()).select_from(CatalogItem).where(*where)) or 0
        rows = s.scalars(select(CatalogItem).where(*where).order_by(CatalogItem.sku).limit(limit).offset(offset))
        return [_item_view(i) for i in rows], int(total)


# ------------------------------------------------------------------ notifications, deliveries, webhook endpoints


def page(items: list[dict[str, Any]], total: int, limit: int, offset: int) -> dict[str, Any]:
    """The one page shape every admin list returns."""
    more = offset + len(items) < total and bool(items)
    return {"items": items, "total": total, "limit": limit, "offset": offset,
            "next_offset": offset + len(items) if more else None}


def list_notifications(svc: GatewayService, **filters: Any) -> Page:
    import gateway.delivery.outbox as outbox

    with svc.db.session() as s:
        return outbox.list_notifications(s, **filters)


def get_notification(svc: GatewayService, notification_id: int) -> dict[str, Any]:
    import gateway.delivery.outbox as outbox

    with svc.db.session() as s:
        view = outbox.notification_detail(s, notification_id)
    if view is None:
        raise NotFound(f"notification {notification_id} not found")
    return view


def list_deliveries(svc: GatewayService, **filters: Any) -> Page:
    import gateway.delivery.outbox as outbox

    with svc.db.session() as s:
        return outbox.list_delivery_states(s, **filters)


def replay_dead_letters(svc: GatewayService, channel: str, notification_id: int | None = None) -> list[int]:
    """Requeue dead letters (one, or all of a channel) for the retry loop; 404/409 when there is nothing to."""
    import gateway.delivery.outbox as outbox

    try:
        with svc.db.session() as s:
            return outbox.requeue(s, svc.clock.now(), channel=channel, notification_id=notification_id)
    except outbox.ReplayRefused as exc:
        raise Conflict(str(exc)) from None
    except LookupError as exc:
        raise NotFound(str(exc)) from None


def webhook_endpoints(svc: GatewayService) -> list[dict[str, Any]]:
    from gateway.delivery.webhook import endpoint_states, redact

    return [{"url": redact(url), **{k: state.get(k) for k in (
        "disabled_at", "consecutive_gone", "last_status", "last_attempt_at", "last_success_at")}}
        for url, state in sorted(endpoint_states(svc.db).items())]


def enable_webhook(svc: GatewayService, url: str, replay: bool) -> dict[str, Any]:
    """Turn a disabled webhook URL back on and (by default) requeue what was dead-lettered on the webhook."""
    from gateway.delivery.webhook import enable_endpoint, endpoint_states, redact

    urls = list(endpoint_states(svc.db))
    full = next((u for u in urls if u == url), None) or next((u for u in urls if redact(u) == url), None)
    if full is None:
        raise NotFound("no webhook endpoint with this URL has been used")
    was_disabled = enable_endpoint(svc.db, full)
    requeued: list[int] = []
    if replay:
        import gateway.delivery.outbox as outbox

        with svc.db.session() as s:
            requeued = outbox.requeue(s, svc.clock.now(), channel="webhook")
    return {"url": redact(full), "was_disabled": was_disabled, "requeued": requeued}
