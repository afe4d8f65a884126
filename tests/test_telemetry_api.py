"""The devices API in process: registry round trips, readings and chart rollups, dead letters, errors as
problem+json, and enrolment over POST /v1/profiles making the customer the device's owner."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import PROBLEM, create_app
from api.deps import ApiContext
from devices.payloads import Reading, Rejected, TelemetryBatch
from devices.profiles import load_profiles
from gateway.clock import VirtualClock
from gateway.delivery.hub import StreamHub
from gateway.profiles.devices import DeviceRegistry
from gateway.profiles.service import GatewayService
from gateway.storage.models import Device
from gateway.telemetry.store import TelemetrySettings, TelemetryStore

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_767_261_600.0
KEY = "devices-test-admin-key-0123456789"
ADMIN = {"X-API-Key": KEY}


class World:
    def __init__(self, service: GatewayService, clock: VirtualClock) -> None:
        self.service, self.db, self.identities, self.clock = service, service.db, service.identities, clock
        self.profiles = load_profiles(ROOT / "examples/device-profiles")
        self.registry = DeviceRegistry(self.db, self.identities, self.clock, self.profiles)
        self.store = TelemetryStore(TelemetrySettings(unknown_policy="quarantine"), self.profiles,
                                    owner_of=lambda d: self.identities.lookup("device", d))
        self.app = create_app(ApiContext(service=self.service, hub=StreamHub(), admin_key=KEY,
                                         health=lambda: {"status": "ok"}, devices=self.registry))

    def ingest(self, batch: TelemetryBatch) -> list[Reading]:
        with self.db.session() as s:
            return self.store.write(s, batch, self.clock.now())


@pytest.fixture
def world(service: GatewayService, clock: VirtualClock) -> World:
    return World(service, clock)


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with TestClient(world.app) as c:
        yield c


def problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].split(";")[0] == PROBLEM
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["detail"]
    return body


def test_register_read_update_and_list_devices(world: World, client: TestClient) -> None:
    owner = client.post("/v1/profiles", headers=ADMIN, json={"external_id": "alice"}).json()["id"]
    r = client.post("/v1/devices", headers=ADMIN, json={"id": "mower-alice", "kind": "robot_mower",
                                                        "owner_profile_id": owner, "firmware": "2.4.1"})
    assert r.status_code == 201, r.text
    assert r.json() | {"registered_at": None} == {
        "id": "mower-alice", "kind": "robot_mower", "device_profile": None, "owner_profile_id": owner,
        "store_id": None, "firmware": "2.4.1", "status": "unknown", "status_at": None, "last_seen": None,
        "registered_at": None, "state": {}}
    assert r.json()["registered_at"] == T0
    problem(client.post("/v1/devices", headers=ADMIN, json={"id": "mower-alice"}), 409)

    r = client.patch("/v1/devices/mower-alice", headers=ADMIN, json={"device_profile": "robot_mower",
                                                                     "owner_profile_id": None})
    assert r.status_code == 200 and r.json()["device_profile"] == "robot_mower"
    assert r.json()["owner_profile_id"] is None and r.json()["firmware"] == "2.4.1"  # untouched
    assert client.get("/v1/devices/mower-alice", headers=ADMIN).json()["device_profile"] == "robot_mower"
    assert [d["id"] for d in client.get("/v1/devices", headers=ADMIN).json()] == ["mower-alice"]
    assert client.get("/v1/devices?status=online", headers=ADMIN).json() == []


def test_bad_requests_get_a_problem_and_change_nothing(world: World, client: TestClient) -> None:
    problem(client.get("/v1/devices/nope", headers=ADMIN), 404)
    problem(client.post("/v1/devices", headers=ADMIN, json={"id": "a/b"}), 422)
    problem(client.post("/v1/devices", headers=ADMIN, json={"id": "m1", "device_profile": "toaster"}), 422)
    problem(client.post("/v1/devices", headers=ADMIN, json={"id": "m1", "owner_profile_id": 999}), 422)
    problem(client.post("/v1/devices", headers=ADMIN, json={"id": "m1", "colour": "red"}), 422)
    problem(client.patch("/v1/devices/nope", headers=ADMIN, json={"kind": "x"}), 404)
    problem(client.get("/v1/devices?status=sleeping", headers=ADMIN), 422)
    problem(client.get("/v1/devices"), 401)
    with world.db.session() as s:
        assert s.query(Device).count() == 0


def test_quarantine_then_accept_then_readings_and_rollups_for_charts(world: World, client: TestClient) -> None:
    first = TelemetryBatch(readings=[Reading("watch-9", "s1", T0, {"steps": 100.0, "heart_rate": 70.0}, 1)])
    assert world.ingest(first) == []  # unknown: quarantined, its data held back
    [held] = client.get("/v1/devices?status=quarantined", headers=ADMIN).json()
    assert held["id"] == "watch-9"
    [dead] = client.get("/v1/dead-letters?reason=quarantined", headers=ADMIN).json()
    assert dead["topic"] == "stores/s1/devices/watch-9/telemetry" and '"steps":100.0' in dead["payload"]

    r = client.patch("/v1/devices/watch-9", headers=ADMIN, json={"quarantined": False, "kind": "fitness_watch"})
    assert r.json()["status"] == "unknown"
    batch = TelemetryBatch(readings=[Reading("watch-9", "s1", T0 + i * 20, {"steps": 100.0 + i, "heart_rate": 60 + i},
                                             i + 2) for i in range(6)])  # 2 minutes
    assert len(world.ingest(batch)) == 6
    readings = client.get("/v1/devices/watch-9/readings", headers=ADMIN).json()
    assert [x["metrics"]["steps"] for x in readings] == [105, 104, 103, 102, 101, 100]  # newest first
    assert [x["ts"] for x in client.get(f"/v1/devices/watch-9/readings?since={T0 + 40}&until={T0 + 80}",
                                        headers=ADMIN).json()] == [T0 + 60, T0 + 40]
    minutes = client.get("/v1/devices/watch-9/rollups?metric=heart_rate", headers=ADMIN).json()
    assert [(m["start"], m["count"], m["min"], m["max"], m["mean"], m["last"]) for m in minutes] == [
        (T0, 3, 60, 62, 61, 62), (T0 + 60, 3, 63, 65, 64, 65)]
    [hour] = client.get("/v1/devices/watch-9/rollups?period=hour&metric=steps", headers=ADMIN).json()
    assert (hour["count"], hour["min"], hour["max"], hour["period_s"]) == (6, 100, 105, 3600)
    assert client.get("/v1/devices/watch-9", headers=ADMIN).json()["status"] == "online"

    # Out of the fitness_watch profile: dead-lettered with the reason, listed for the operator.
    world.ingest(TelemetryBatch(readings=[Reading("watch-9", "s1", T0 + 200, {"heart_rate": 400.0}, 99)],
                                rejects=[Rejected("stores/s1/devices/watch-9/telemetry", "not_json", "not JSON",
                                                  b"{oops", T0, "watch-9")]))
    reasons = [d["reason"] for d in client.get("/v1/dead-letters?device_id=watch-9", headers=ADMIN).json()]
    assert reasons == ["out_of_range", "not_json", "quarantined"]
    problem(client.get("/v1/devices/watch-9/rollups?period=week", headers=ADMIN), 422)
    problem(client.get("/v1/devices/ghost/readings", headers=ADMIN), 404)


def test_a_device_enrolled_over_post_profiles_gets_its_owner(world: World, client: TestClient) -> None:
    # Already registered (it reported before the customer enrolled it), under another case.
    client.post("/v1/devices", headers=ADMIN, json={"id": "Mower-7", "kind": "robot_mower"})
    r = client.post("/v1/profiles", headers=ADMIN, json={
        "external_id": "carla", "identifiers": [{"kind": "device", "value": "mower-7"},
                                                {"kind": "device", "value": "watch-7"}],
        "consents": {"maintenance": True}})
    assert r.status_code == 201, r.text
    carla = r.json()["id"]
    assert client.get("/v1/devices/Mower-7", headers=ADMIN).json()["owner_profile_id"] == carla

    # Not registered yet: owned from its first reading (accept policy), and so are its readings.
    world.store.settings.unknown_policy = "accept"
    world.ingest(TelemetryBatch(readings=[Reading("watch-7", "s1", T0, {"steps": 5.0}, 1)]))
    assert client.get("/v1/devices/watch-7", headers=ADMIN).json()["owner_profile_id"] == carla
