"""Upward events: the topic layout and the versioned JSON schema (pure: rows in, dicts out, and back).

Topic: ``<prefix>/<store>/hq/v1/<kind>``. Body (schema version 1)::

    {"v": 1, "id": "<store>:<kind>:<key>", "store": "<store>", "kind": "<kind>", "data": {...}}

``id`` is stable for one fact (a row id, or a footfall row's key), so head office keeps each event once
whatever the redeliveries. ``data`` holds the row's columns as the store has them (times in Unix seconds);
profiles travel as the store's own id only (no names, no identifiers).

Rows that change after they went up (a device, an hour's rollup, an alarm, a cart, a notification's status)
are sent again under the same id; head office keeps the version that is later by the kind's own order
(``alarm_version``, ``cart_version``, ``NOTIFICATION_ORDER``, the larger ``count``), so a redelivered older
one changes nothing. Kinds are additive within v1: an older head office drops a kind it does not know as a
schema error (counted under ``kind``) and applies the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

VERSION = 1
KINDS = ("visit", "zone_stay", "decision", "notification", "interaction", "footfall_day", "footfall_hour",
         "device", "reading_hour", "alarm", "cart", "erasure")
MAX_BODY = 64 * 1024


class EventError(ValueError):
    """An upward event that does not follow the schema; the message names the field."""


def topic(prefix: str, store: str, kind: str) -> str:
    return f"{prefix}/{store}/hq/v{VERSION}/{kind}"


def subscription(prefix: str) -> str:
    """Head office's filter: every store's events of this schema version."""
    return f"{prefix}/+/hq/v{VERSION}/#"


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    store: str
    kind: str
    data: dict[str, Any]

    def body(self) -> bytes:
        return json.dumps({"v": VERSION, "id": self.id, "store": self.store, "kind": self.kind, "data": self.data},
                          separators=(",", ":"), sort_keys=True).encode()


def event(store: str, kind: str, key: str | int, data: dict[str, Any]) -> Event:
    return Event(f"{store}:{kind}:{key}", store, kind, data)


_TIME: tuple[type, ...] = (float, int, type(None))
_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "visit": {"id": (int,), "profile_id": (int,), "started_at": (float, int), "ended_at": (float, int, type(None)),
              "zones": (list,)},
    "zone_stay": {"id": (int,), "profile_id": (int,), "visit_id": (int, type(None)), "zone": (str,),
                  "entered_at": (float, int), "exited_at": (float, int, type(None))},
    "decision": {"id": (int,), "at": (float, int), "profile_id": (int,), "campaign_id": (str,),
                 "event_kind": (str,), "event_key": (str,), "fired": (bool,), "reason": (str,),
                 "detail": (str, type(None)), "variant": (str, type(None))},
    "notification": {"id": (int,), "profile_id": (int,), "campaign_id": (str,), "purpose": (str,),
                     "dedup_key": (str,), "created_at": (float, int), "status": (str,),
                     "deliver_at": (float, int, type(None)), "variant": (str, type(None)), "data": (dict,)},
    "interaction": {"id": (int,), "notification_id": (int,), "kind": (str,), "at": (float, int)},
    "footfall_day": {"day": (str,), "zone": (str,), "anonymous_visits": (int,), "anonymous_dwell_s": (float, int),
                     "anonymous_ended": (int,), "anonymous_bounces": (int,)},
    "footfall_hour": {"day": (str,), "hour": (int,), "zone": (str,), "anonymous_visits": (int,)},
    "device": {"id": (str,), "kind": (str, type(None)), "device_profile": (str, type(None)),
               "profile_id": (int, type(None)), "firmware": (str, type(None)),
               "registered_at": (float, int, type(None))},
    "reading_hour": {"device_id": (str,), "start": (float, int), "metric": (str,), "count": (int,),
                     "sum": (float, int), "min": (float, int), "max": (float, int), "last": (float, int),
                     "last_ts": (float, int), "profile_id": (int, type(None))},
    "alarm": {"id": (int,), "device_id": (str,), "profile_id": (int, type(None)), "rule_id": (str,), "name": (str,),
              "severity": (str,), "status": (str,), "created_at": (float, int), "updated_at": (float, int),
              "count": (int,), "last_value": (float, int, type(None)), "cleared_at": _TIME, "prompted_at": _TIME,
              "notification_id": (int, type(None)), "acknowledged_at": _TIME, "booked_at": _TIME,
              "booked_for": _TIME, "resolved_at": _TIME},
    "cart": {"id": (str,), "profile_id": (int,), "status": (str,), "items": (list,), "updated_at": (float, int),
             "abandoned_at": _TIME, "checked_out_at": _TIME, "purchase_handled_at": _TIME},
    "erasure": {"profile_id": (int,)},  # the store's profile is gone: head office removes its rows
}
_ITEM = {"sku": (str,), "qty": (int, float), "price": (float, int, type(None))}  # a cart's item: nothing typed

# A notification's status only moves forward: head office takes a later one, never an earlier one.
NOTIFICATION_ORDER = {"scheduled": 0, "pending": 1, "sent": 2, "acked": 3, "cancelled": 3, "expired": 3}


def alarm_version(d: dict[str, Any]) -> tuple[float, ...]:
    """An alarm's versions in the order the store makes them: it ends (cleared or resolved) once; while it
    lasts its device's time and count grow; the prompt, the acknowledgement and a booking are only ever
    set (a booking again later). A later version is larger; the same one is equal."""
    times = ("prompted_at", "acknowledged_at", "booked_at")
    return (float(d["status"] != "active"), float(d["updated_at"]), float(d["count"]),
            float(sum(d.get(t) is not None for t in times)), float(d.get("booked_at") or 0.0))


def cart_version(d: dict[str, Any]) -> tuple[float, ...]:
    """A cart's versions in order: checked out once, its purchase handled once, otherwise its feed's
    ``updated_at`` grows (a touch clears ``abandoned_at``), and abandonment is only ever set after that."""
    return (float(d["status"] == "checked_out"), float(d.get("purchase_handled_at") is not None),
            float(d["updated_at"]), float(d.get("abandoned_at") is not None))


def parse(topic_name: str, payload: bytes) -> Event:
    """One message back into an Event, checked against the schema; EventError names what is wrong."""
    if len(payload) > MAX_BODY:
        raise EventError(f"body: {len(payload)} bytes, at most {MAX_BODY}")
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EventError(f"body: not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise EventError("body: expected an object")
    if body.get("v") != VERSION:
        raise EventError(f"v: expected {VERSION}, got {body.get('v')!r}")
    for key in ("id", "store", "kind"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise EventError(f"{key}: expected a non-empty string")
    kind, store = body["kind"], body["store"]
    if kind not in _FIELDS:
        raise EventError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    parts = topic_name.split("/")
    if len(parts) < 4 or parts[-1] != kind or parts[-4] != store:
        raise EventError(f"topic {topic_name!r} does not match store {store!r} and kind {kind!r}")
    if not body["id"].startswith(f"{store}:{kind}:"):
        raise EventError(f"id: expected to begin with {store}:{kind}:")
    data = body.get("data")
    if not isinstance(data, dict):
        raise EventError("data: expected an object")
    _check(data, _FIELDS[kind], "data.")
    if kind == "cart":
        for i, item in enumerate(data["items"]):
            if not isinstance(item, dict):
                raise EventError(f"data.items[{i}]: expected an object")
            _check(item, _ITEM, f"data.items[{i}].")
    return Event(body["id"], store, kind, data)


def _check(data: dict[str, Any], fields: dict[str, tuple[type, ...]], where: str) -> None:
    for name, types in fields.items():
        value = data.get(name)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise EventError(f"{where}{name}: expected {' or '.join(t.__name__ for t in types)}, got {value!r}")
