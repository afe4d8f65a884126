"""Consent per purpose carries its state, time and source (issue 5 item 1): the source given over the
API (where the customer agreed: the app's onboarding, a kiosk, the CRM) is stored with each purpose,
shown on the profile and in the export, and a bad one is refused with a problem+json 422."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.deps import ApiContext
from gateway.clock import VirtualClock
from gateway.delivery.hub import StreamHub
from gateway.profiles.service import GatewayService

T0 = 1_767_261_600.0
ADMIN = {"X-API-Key": "consent-admin-key-0123456789"}


@pytest.fixture
def api(service: GatewayService, clock: VirtualClock) -> Iterator[tuple[TestClient, VirtualClock]]:
    app = create_app(ApiContext(service=service, hub=StreamHub(), admin_key=ADMIN["X-API-Key"],
                                health=lambda: {"status": "ok"}))
    with TestClient(app) as client:
        yield client, clock


def test_each_purpose_keeps_its_state_time_and_source(api: tuple[TestClient, VirtualClock]) -> None:
    client, clock = api
    r = client.post("/v1/profiles", headers=ADMIN, json={
        "external_id": "ann", "consents": {"offers": True, "analytics": True}, "consent_source": "app:onboarding"})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    assert r.json()["consents"]["offers"] == {"granted": True, "updated_at": T0, "source": "app:onboarding"}

    clock.set(T0 + 3600)
    r = client.put(f"/v1/profiles/{pid}/consents", headers=ADMIN,
                   json={"consents": {"offers": False}, "source": "kiosk:store-001/till-2"})
    assert r.status_code == 200, r.text
    consents = r.json()["consents"]
    assert consents["offers"] == {"granted": False, "updated_at": T0 + 3600, "source": "kiosk:store-001/till-2"}
    assert consents["analytics"] == {"granted": True, "updated_at": T0, "source": "app:onboarding"}  # untouched

    clock.set(T0 + 7200)
    r = client.put(f"/v1/profiles/{pid}/consents", headers=ADMIN, json={"consents": {"maintenance": True}})
    assert r.json()["consents"]["maintenance"]["source"] == "api"  # the default when none is given

    export = client.get(f"/v1/profiles/{pid}/export", headers=ADMIN).json()
    assert {c["purpose"]: c["source"] for c in export["consents"]} == {
        "offers": "kiosk:store-001/till-2", "analytics": "app:onboarding", "maintenance": "api"}


@pytest.mark.parametrize("source", ["", "has space", "x" * 65, "<script>"])
def test_a_bad_source_is_refused_and_changes_nothing(api: tuple[TestClient, VirtualClock], source: str) -> None:
    client, _ = api
    r = client.post("/v1/profiles", headers=ADMIN, json={"external_id": "bo", "consents": {"offers": True},
                                                         "consent_source": source})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert client.get("/v1/profiles", headers=ADMIN).json()["items"] == []
