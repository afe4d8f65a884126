"""Carts' lifecycle as events: an open cart idle past the limit is abandoned, a checked-out one is a purchase.

Each cart raises each event once: the mark (``abandoned_at``, ``purchase_handled_at``) is written in the
transaction that judges it, so a rolled-back try raises it again.
"""

from __future__ import annotations

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from gateway.engine.engine import EngineEvent
from gateway.storage.db import shift_stamps
from gateway.storage.models import Cart, CartStatus

SCAN_LIMIT = 500  # carts per kind per scan: a backlog is worked off over the next scans
_IDLE = select(Cart).where(Cart.status == CartStatus.OPEN, Cart.abandoned_at.is_(None),
                           Cart.updated_at <= bindparam("cutoff")).limit(SCAN_LIMIT)
_BOUGHT = select(Cart).where(Cart.checked_out_at.is_not(None), Cart.purchase_handled_at.is_(None)).limit(SCAN_LIMIT)


def abandoned(session: Session, now: float, abandon_after_s: float) -> list[EngineEvent]:
    """Open carts untouched for ``abandon_after_s``, marked abandoned; keyed by the cart's last touch, so a
    cart touched again can be abandoned (and reminded) anew."""
    events = []
    for cart in session.scalars(_IDLE, {"cutoff": now - abandon_after_s}):
        cart.abandoned_at = now
        events.append(EngineEvent("cart_abandoned", cart.profile_id, now, f"cart:{cart.id}:{cart.updated_at:.3f}"))
    return events


def purchased(session: Session, now: float) -> list[EngineEvent]:
    """Checked-out carts not yet raised as a purchase, marked raised."""
    events = []
    for cart in session.scalars(_BOUGHT):
        cart.purchase_handled_at = now
        events.append(EngineEvent("purchase", cart.profile_id, now, f"purchase:{cart.id}"))
    return events


def wall_stepped(session: Session, after: float, upto: float, by: float) -> int:
    """The wall clock stepped by ``by``: open carts not yet abandoned whose last change is stamped in
    (``after``, ``upto``], on the clock as it was, move by the step, so a cart touched 5 minutes before a
    step forward is not an hour idle at once, nor abandoned an hour late after a step back. (Stamps before a
    step are the gateway's, or the shop's when it agreed with the gateway within 5 minutes: ``upsert_cart``
    refuses later ones.)"""
    return shift_stamps(session, Cart.updated_at, after, upto, by, Cart.status == CartStatus.OPEN,
                        Cart.abandoned_at.is_(None))
