"""Cross-store limits: head office's sends, down to every store, as the engine's send history.

Head office republishes every notification it receives whose customer the stores share (the profile's
``external_id``) on ``<prefix>/hq/v1/sends``. A store records another store's send as a notification row of
that store (``store_id``), already acknowledged, with an empty text and a ``hq:<event id>`` dedup key:
never dispatched nor replayed (it is not live), left out of this store's figures and uplink (another
store's id), but read by the engine's cooldowns, frequency caps and per-customer limits as any send.
Recording is idempotent (the dedup key), so redeliveries change nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.hq.events import MAX_BODY, VERSION, EventError
from gateway.storage.db import upsert_insert
from gateway.storage.models import Notification, NotificationStatus, Profile


def sends_topic(prefix: str) -> str:
    return f"{prefix}/hq/v{VERSION}/sends"


@dataclass(frozen=True, slots=True)
class Send:
    id: str  # the upward notification event's id: <store>:notification:<row id>
    store: str
    customer: str
    campaign_id: str
    purpose: str
    at: float

    def body(self) -> bytes:
        return json.dumps({"v": VERSION, "id": self.id, "store": self.store, "customer": self.customer,
                           "campaign_id": self.campaign_id, "purpose": self.purpose, "at": self.at},
                          separators=(",", ":"), sort_keys=True).encode()


def parse_send(topic_name: str, payload: bytes, received_at: float = 0.0) -> Send:
    """One downward send, checked; EventError names the field."""
    if len(payload) > MAX_BODY:
        raise EventError(f"body: {len(payload)} bytes, at most {MAX_BODY}")
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EventError(f"body: not JSON ({exc})") from None
    if not isinstance(body, dict) or body.get("v") != VERSION:
        raise EventError(f"v: expected {VERSION}")
    for key in ("id", "store", "customer", "campaign_id", "purpose"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise EventError(f"{key}: expected a non-empty string")
    at = body.get("at")
    if not isinstance(at, int | float) or isinstance(at, bool):
        raise EventError("at: expected a number")
    return Send(body["id"], body["store"], body["customer"], body["campaign_id"], body["purpose"], float(at))


def record_sends(s: Session, store_id: str, sends: Sequence[Send]) -> int:
    """Other stores' sends to customers this store knows, as acknowledged notifications of theirs; returns
    how many were new. This store's own sends (coming back) and unknown customers are skipped."""
    theirs = [x for x in sends if x.store != store_id]
    if not theirs:
        return 0
    known = {ext: pid for ext, pid in s.execute(select(Profile.external_id, Profile.id).where(
        Profile.external_id.in_({x.customer for x in theirs})))}
    new = 0
    for x in theirs:
        pid = known.get(x.customer)
        if pid is None:
            continue
        done = s.execute(upsert_insert(s, Notification).values(
            profile_id=pid, campaign_id=x.campaign_id, purpose=x.purpose, dedup_key=f"hq:{x.id}", title="", body="",
            data={"store": x.store}, created_at=x.at, status=NotificationStatus.ACKED, acked_at=x.at,
            store_id=x.store).on_conflict_do_nothing(index_elements=["dedup_key"]).returning(Notification.id)).first()
        new += done is not None
    return new
