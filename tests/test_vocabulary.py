"""The closed sets of words (statuses, kinds, purposes) are each defined once, as a StrEnum or a tuple in
the module that owns it; the API documents and accepts exactly those words.

The expected lists below are what the database held and the API accepted before the sets became enums:
a typo in a member, or a member added without a decision, fails here."""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import select, text

from api.app import create_app
from api.deps import ApiContext
from api.schemas import CartStatus as CartStatusField
from api.schemas import InteractionIn
from devices.payloads import DeviceStatus as StatusMessage
from devices.payloads import LinkState, TelemetryBatch
from devices.profiles import parse_profiles
from devices.rules import SEVERITIES
from gateway.campaigns.model import CHANNELS, PURPOSES, TRIGGERS
from gateway.delivery.hub import Outcome, StreamHub
from gateway.health import DbState, Health, Liveness, Readiness, SchemaState
from gateway.profiles.devices import PERIODS, DeviceStatus
from gateway.profiles.identity import KINDS, IdentifierKind
from gateway.profiles.service import INTERACTIONS
from gateway.security.auth import SCOPES
from gateway.storage.db import Database
from gateway.storage.models import (
    AlarmStatus,
    Cart,
    CartStatus,
    ChannelName,
    ChannelState,
    DeadLetter,
    InteractionKind,
    NotificationStatus,
    Profile,
    Purpose,
)
from gateway.telemetry.store import TelemetrySettings, TelemetryStore

BEFORE: list[tuple[type[StrEnum], list[str]]] = [
    (NotificationStatus, ["scheduled", "pending", "sent", "acked", "cancelled", "expired"]),
    (ChannelState, ["pending", "delivered", "dead"]),
    (CartStatus, ["open", "checked_out"]),
    (AlarmStatus, ["active", "cleared", "resolved"]),
    (InteractionKind, ["delivered", "opened", "clicked", "redeemed", "dismissed"]),
    (Purpose, ["offers", "cart_reminders", "maintenance", "health", "analytics", "presence_sharing"]),
    (ChannelName, ["sse", "webhook", "webpush"]),
    (IdentifierKind, ["beacon", "device", "app_install", "email_sha256"]),
    (DeviceStatus, ["online", "offline", "unknown", "quarantined"]),
    (LinkState, ["online", "offline"]),
    (Outcome, ["streamed", "delivered", "no_listener", "retry", "error", "dead", "gone"]),
    (Health, ["ok", "degraded"]),
    (Readiness, ["ready", "not_ready"]),
    (Liveness, ["alive"]),
    (DbState, ["ok", "locked", "full", "down", "failing", "timeout", "unknown"]),
    (SchemaState, ["current", "behind", "unknown"]),
]


@pytest.mark.parametrize(("enum", "words"), BEFORE, ids=[e.__name__ for e, _ in BEFORE])
def test_each_enum_holds_exactly_the_words_stored_and_accepted_before(enum: type[StrEnum], words: list[str]) -> None:
    assert [m.value for m in enum] == words
    assert all(m == m.value and f"{m}" == m.value for m in enum)  # a member is its word: rows and JSON unchanged


def test_the_core_tuples_are_the_enums_members() -> None:
    assert tuple(Purpose) == PURPOSES
    assert tuple(ChannelName) == CHANNELS
    assert tuple(IdentifierKind) == KINDS
    assert list(INTERACTIONS) == ["opened", "clicked", "dismissed"]  # the kinds the app may report


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    app = create_app(ApiContext(service=None, hub=StreamHub(), admin_key="x", health=dict))  # type: ignore[arg-type]
    return app.openapi()


def _param(doc: dict[str, Any], method: str, path: str, name: str) -> list[str]:
    [param] = [p for p in doc["paths"][path][method]["parameters"] if p["name"] == name]
    schema = param["schema"]
    [options] = [o for o in schema.get("anyOf", [schema]) if o.get("type") == "string"]
    return list(options["enum"])


def _prop(doc: dict[str, Any], model: str, *keys: str) -> list[str]:
    node = doc["components"]["schemas"][model]["properties"]
    for key in keys:
        node = node[key]
    return list(node["enum"]) if "enum" in node else [node["const"]]


def test_the_openapi_document_lists_each_sets_words_from_its_one_definition(doc: dict[str, Any]) -> None:
    assert _param(doc, "get", "/v1/notifications", "status") == list(NotificationStatus)
    assert _param(doc, "get", "/v1/deliveries", "state") == list(ChannelState)
    assert _param(doc, "get", "/v1/carts", "status") == list(CartStatus) == _prop(doc, "CartIn", "status")
    assert _param(doc, "get", "/v1/alarms", "status") == list(AlarmStatus) == _prop(doc, "AlarmOut", "status")
    assert _param(doc, "get", "/v1/devices", "status") == list(DeviceStatus) == _prop(doc, "DeviceOut", "status")
    assert _param(doc, "get", "/v1/devices/{device_id}/rollups", "period") == list(PERIODS)
    assert _param(doc, "get", "/v1/profiles", "consent") == list(Purpose)
    assert _prop(doc, "ProfileIn", "consents", "propertyNames") == list(Purpose)
    assert _prop(doc, "ConsentsIn", "consents", "propertyNames") == list(Purpose)
    assert _param(doc, "get", "/v1/profiles", "identifier_kind") == list(IdentifierKind)
    assert _param(doc, "delete", "/v1/profiles/{profile_id}/identifiers/{kind}/{value}", "kind") == list(IdentifierKind)
    assert _prop(doc, "IdentifierIn", "kind") == list(IdentifierKind)
    assert _prop(doc, "InteractionIn", "kind") == list(INTERACTIONS)
    assert _prop(doc, "SyntheticEvent", "kind") == list(TRIGGERS)
    assert _prop(doc, "AlarmOut", "severity") == list(SEVERITIES)
    assert _prop(doc, "KeyIn", "scopes", "items") == list(SCOPES)
    assert _prop(doc, "HealthOut", "status") == list(Health)
    assert _prop(doc, "ReadyOut", "status") == list(Readiness)
    assert _prop(doc, "LiveOut", "status") == list(Liveness)


def test_the_words_are_inline_as_a_literal_had_them_with_no_component_per_enum(doc: dict[str, Any]) -> None:
    """A client generated from the document sees the same schema as before the enums."""
    assert doc["components"]["schemas"]["CartIn"]["properties"]["status"] == {
        "default": "open", "enum": ["open", "checked_out"], "title": "Status", "type": "string"}
    names = {e.__name__ for e, _ in BEFORE}
    assert not names & set(doc["components"]["schemas"])


def test_a_word_outside_the_set_is_refused_naming_the_set() -> None:
    assert TypeAdapter(CartStatusField).validate_python("checked_out") == CartStatus.CHECKED_OUT
    with pytest.raises(ValidationError, match="Input should be 'open' or 'checked_out'"):
        TypeAdapter(CartStatusField).validate_python("closed")
    with pytest.raises(ValidationError, match="Input should be 'opened', 'clicked' or 'dismissed'"):
        InteractionIn.model_validate({"kind": "redeemed"})  # staff confirm redemptions, the app cannot


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.upgrade()
    yield database
    database.dispose()


def test_a_member_is_stored_as_its_word_and_finds_rows_written_with_the_word(db: Database) -> None:
    """No migration: the column holds the same text, and SQL written with a bare word still matches."""
    with db.session() as s:
        s.add(Profile(id=1, created_at=0.0, attributes={}))
        s.flush()
        s.add_all([Cart(id="c1", profile_id=1, items=[], updated_at=0.0),  # the column's default: CartStatus.OPEN
                   Cart(id="c2", profile_id=1, items=[], updated_at=0.0, status=CartStatus.CHECKED_OUT)])
    with db.session() as s:
        assert s.execute(text("SELECT id FROM carts WHERE status = 'open'")).scalars().all() == ["c1"]
        assert s.scalars(select(Cart.id).where(Cart.status == CartStatus.CHECKED_OUT)).all() == ["c2"]
        assert type(s.get(Cart, "c1").status) is str  # type: ignore[union-attr]  # read back: the plain word


def test_a_refused_status_message_is_dead_lettered_with_its_own_word(db: Database) -> None:
    ts = TelemetryStore(TelemetrySettings(unknown_policy="reject"), parse_profiles([]))
    batch = TelemetryBatch(statuses=[StatusMessage("a", "s1", 0.0, True), StatusMessage("b", "s1", 0.0, False)])
    with db.session() as s:
        ts.write(s, batch, 10.0)
    with db.session() as s:
        assert s.scalars(select(DeadLetter.payload).order_by(DeadLetter.device_id)).all() == [b"online", b"offline"]
