"""A customer's data: export all of it, erase all of it, and forget presence data past retention.

Erasure is one DELETE of the profile row: every table that holds a profile's data references it
with ON DELETE CASCADE (devices keep existing, unowned). The in-memory identity index is updated by
the caller, so a sighting of the erased customer's beacon is anonymous from then on.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, inspect, select, update
from sqlalchemy.orm import Session

from gateway.documents import servable
from gateway.storage.models import (
    Base,
    Cart,
    Consent,
    Decision,
    Delivery,
    Device,
    Identifier,
    Interaction,
    Notification,
    Profile,
    RotatingIdentity,
    Visit,
    ZoneStay,
)


def _servable_row(table: str, row: dict[str, Any]) -> dict[str, Any]:
    """The row with each JSON document that cannot be served (stored before the checks at the door)
    replaced by a marker, so one such row does not make the whole export fail."""
    for key, value in row.items():
        if isinstance(value, (dict, list)):
            row[key] = servable(value, f"{table} row {row.get('id', '-')} {key}")
    return row


def _row(obj: Any) -> dict[str, Any]:
    mapper = inspect(obj).mapper
    return _servable_row(mapper.local_table.name, {c.key: getattr(obj, c.key) for c in mapper.column_attrs})


def export_profile(session: Session, profile_id: int) -> dict[str, Any] | None:
    """Everything stored about one profile, table by table (GDPR art. 15/20)."""
    p = session.get(Profile, profile_id)
    if p is None:
        return None
    out: dict[str, Any] = {"profile": _row(p)}
    for name, model in (("identifiers", Identifier), ("consents", Consent), ("carts", Cart),
                        ("visits", Visit), ("decisions", Decision), ("notifications", Notification),
                        ("devices", Device)):
        out[name] = [_row(r) for r in session.scalars(select(model).where(model.profile_id == profile_id))]
    # Rotating identities without their keys: the export says what is enrolled, never the secret (encrypted
    # or not), which would let its holder follow the customer.
    out["rotating_identities"] = [{k: v for k, v in _row(r).items() if k not in ("secret", "fingerprint")}
                                  for r in session.scalars(select(RotatingIdentity)
                                                           .where(RotatingIdentity.profile_id == profile_id))]
    nids = [n["id"] for n in out["notifications"]]
    out["deliveries"] = [_row(r) for r in session.scalars(select(Delivery).where(Delivery.notification_id.in_(nids)))]
    out["interactions"] = [_row(r) for r in session.scalars(
        select(Interaction).where(Interaction.notification_id.in_(nids)))]
    # Tables added later that reference profiles (push subscriptions, ...) are exported too.
    known = {"profiles", "identifiers", "consents", "carts", "visits", "decisions", "notifications", "devices",
             "deliveries", "interactions", "rotating_identities"}
    for table in Base.metadata.sorted_tables:
        if table.name in known or "profile_id" not in table.c:
            continue
        rows = session.execute(select(table).where(table.c.profile_id == profile_id)).mappings()
        out[table.name] = [_servable_row(table.name, dict(r)) for r in rows]
    return out


def erase_profile(session: Session, profile_id: int) -> bool:
    """Delete the profile and, by cascade, everything that was its data. True if it existed."""
    result = session.execute(delete(Profile).where(Profile.id == profile_id))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def purge_presence(session: Session, before: float) -> dict[str, int]:
    """Retention: visits, zone stays and decisions older than ``before`` go (an open visit stays until it
    ends); notifications stay (they are receipts). The runtime runs it hourly with ``[privacy]``."""
    stays = session.execute(delete(ZoneStay).where(ZoneStay.entered_at < before, ZoneStay.exited_at.is_not(None)))
    visits = session.execute(delete(Visit).where(Visit.started_at < before, Visit.ended_at.is_not(None)))
    decisions = session.execute(delete(Decision).where(Decision.at < before))
    return {"visits": visits.rowcount, "zone_stays": stays.rowcount,  # type: ignore[attr-defined]
            "decisions": decisions.rowcount}  # type: ignore[attr-defined]


# Not the profile's rows: the profiles themselves, and the uplink's note of whose rows went up to head office
# (kept under the merged id, so head office hears that profile is gone and drops its copy of it).
NOT_MOVED = ("profiles", "hq_uplink_profiles")


def merge_into(session: Session, keep: Profile, other: Profile) -> None:
    """Move every row of ``other`` to ``keep`` (explicit linking), then delete ``other``.

    Generic over the schema: any table with a ``profile_id`` moves, so a table added later is not
    left behind. Where the profile is part of the key (consents, segment memberships, token
    generations) ``keep``'s row wins and ``other``'s is dropped."""
    points = (keep.points or 0) + (other.points or 0)
    attributes = {**(other.attributes or {}), **(keep.attributes or {})}
    keep_id, other_id = keep.id, other.id
    for table in Base.metadata.sorted_tables:
        if table.name in NOT_MOVED or "profile_id" not in table.c:
            continue
        col = table.c.profile_id
        if col.primary_key:
            others = [c for c in table.primary_key.columns if c.name != "profile_id"]
            if others:  # drop the other's rows that would collide with keep's
                mine = select(*others).where(col == keep_id)
                key = others[0] if len(others) == 1 else None
                if key is not None:
                    session.execute(delete(table).where(col == other_id, key.in_(mine)))
                else:
                    session.execute(delete(table).where(col == other_id))
            else:
                session.execute(delete(table).where(col == other_id))
        session.execute(table.update().where(col == other_id).values(profile_id=keep_id))
    session.execute(delete(Profile).where(Profile.id == other_id))
    session.execute(update(Profile).where(Profile.id == keep_id).values(points=points, attributes=attributes))
