"""Facts a campaign's conditions and templates read, built from rows the engine's store read: pure
functions, no session, no clock (the event's time is an argument)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

DAY_S = 86400.0


class ProfileLike(Protocol):
    id: int
    external_id: str | None
    name: str | None
    attributes: dict[str, Any] | None
    points: int | None


def profile_facts(profile: ProfileLike, consents: set[str]) -> dict[str, Any]:
    name = profile.name or ""
    return {
        "id": profile.id, "external_id": profile.external_id, "name": name,
        "first_name": name.split()[0] if name else "there",
        "attributes": dict(profile.attributes or {}), "consents": sorted(consents),
    }


def tier_for(points: int, tiers: Sequence[tuple[str, int]]) -> str | None:
    best = None
    for name, min_points in sorted(tiers, key=lambda t: t[1]):
        if points >= min_points:
            best = name
    return best


NO_CART: dict[str, Any] = {"abandoned": False, "reminded": False, "item_count": 0, "items": [], "zones": []}


def cart_facts(cart: Any, where: Mapping[str, Any], reminded: bool, now: float,
               abandon_after_s: float) -> dict[str, Any]:
    """The profile's most recent open cart (a row with id, items, updated_at; None: no cart), with where each
    item is in the shop (``where``: catalogue rows by sku). ``reminded``: a cart reminder went out (or waits)
    since the cart was last touched."""
    if cart is None:
        return {**NO_CART, "items": [], "zones": []}
    items = []
    for it in cart.items:
        cat = where.get(str(it.get("sku")))
        items.append({
            "sku": it.get("sku"), "name": it.get("name") or (cat.name if cat else it.get("sku")),
            "quantity": it.get("quantity", 1), "price": it.get("price"),
            "zone": cat.zone if cat else None, "aisle": cat.aisle if cat else None,
        })

    def describe(i: dict[str, Any]) -> str:
        qty = f" x{i['quantity']}" if i["quantity"] and i["quantity"] != 1 else ""
        place = ", ".join(p for p in (i["zone"], f"aisle {i['aisle']}" if i["aisle"] else None) if p)
        return f"{i['name']}{qty} ({place})" if place else f"{i['name']}{qty}"

    return {
        "id": cart.id,
        "reminded": reminded,
        "abandoned": now - cart.updated_at >= abandon_after_s,
        "idle_s": now - cart.updated_at,
        "item_count": sum(int(i["quantity"] or 1) for i in items),
        "items": items,
        "items_where": "; ".join(describe(i) for i in items),
        "zones": sorted({i["zone"] for i in items if i["zone"]}),
    }


class VisitsWithin(Mapping[str, int]):
    """``behaviour.visits_in_days.N``: visits that began in the last N days, for any N from 1 to 365."""

    def __init__(self, starts: Sequence[float], now: float) -> None:
        self._ages = sorted(now - t for t in starts)

    def _days(self, key: object) -> int | None:
        try:
            n = int(str(key))
        except ValueError:
            return None
        return n if 1 <= n <= 365 else None

    def __contains__(self, key: object) -> bool:
        return self._days(key) is not None

    def __getitem__(self, key: str) -> int:
        n = self._days(key)
        if n is None:
            raise KeyError(key)
        return sum(1 for age in self._ages if age <= n * DAY_S)

    def __iter__(self) -> Any:
        return iter(("7", "30", "90", "365"))

    def __len__(self) -> int:
        return 4


def behaviour_facts(history: Iterable[tuple[str, float, float | None, str | None]], now: float) -> dict[str, Any]:
    """Visit, dwell and purchase history as facts: what segments like "frequent" or "occasional" are made of.

    ``history``: (kind, a, b, zone) rows as of ``now``: "v" visits (started, ended or None) of the last year,
    "z" finished zone stays (entered, exited) of the last 90 days, "c" purchases (checked out)."""
    rows: list[tuple[float, float | None]] = []
    by_zone: dict[str, list[float]] = {}
    bought_at: list[float] = []
    for kind, a, b, zone in history:
        if kind == "v":
            rows.append((a, b))
        elif kind == "z":
            assert b is not None and zone is not None
            by_zone.setdefault(zone, []).append(b - a)
        elif a is not None:
            bought_at.append(float(a))
    past = [r for r in rows if r[0] < now - 1]  # the visit that just began is not history
    ended = [b - a for a, b in rows if b is not None and a >= now - 90 * DAY_S]
    last = max((r[0] for r in past), default=None)
    dwell = [d for ds in by_zone.values() for d in ds]
    bought = sorted(bought_at)
    within = VisitsWithin([r[0] for r in rows], now)
    return {
        "visits_7d": within["7"], "visits_30d": within["30"], "visits_90d": within["90"],
        "visits_365d": len(rows), "visits_in_days": within,
        "days_since_last_visit": None if last is None else round((now - last) / DAY_S, 2),
        "avg_visit_s": round(sum(ended) / len(ended), 1) if ended else None,
        "avg_dwell_s": round(sum(dwell) / len(dwell), 1) if dwell else None,
        "avg_dwell_s_by_zone": {z: round(sum(d) / len(d), 1) for z, d in sorted(by_zone.items())},
        "purchases_365d": sum(1 for t in bought if t >= now - 365 * DAY_S),
        "last_purchase_at": bought[-1] if bought else None,
        "days_since_last_purchase": round((now - bought[-1]) / DAY_S, 2) if bought else None,
    }
