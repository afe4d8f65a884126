"""The shop's e-commerce side: the cart bodies it would POST to the gateway's cart API."""

from __future__ import annotations

from typing import Any

from simulators.scenario import Scenario


def cart_upserts(scenario: Scenario, now: float) -> list[dict[str, Any]]:
    """One upsert body per scenario cart, last touched ``idle_s`` before ``now`` (epoch s).

    Names and prices come from the catalogue, as the shop would send them, so the gateway
    never needs the catalogue to word a cart reminder.
    """
    bodies: list[dict[str, Any]] = []
    for cart in scenario.carts:
        items = []
        for line in cart.items:
            item = scenario.item(line.sku)
            items.append({"sku": item.sku, "name": item.name, "price": item.price, "quantity": line.quantity})
        bodies.append({
            "cart_id": cart.id,
            "profile_external_id": cart.owner,
            "items": items,
            "updated_at": now - cart.idle_s,
        })
    return bodies
