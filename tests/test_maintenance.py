"""The maintenance loop over the real HTTP API: prompt -> acknowledge or book -> service -> time to resolution.

A Runtime serves the API with uvicorn on a free loopback port; the e-bike rule and campaign are the
shipped examples (examples/device-rules/ebike.yaml, examples/campaigns/ebike-chain-service.yaml).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.app.runtime import Runtime
from gateway.clock import VirtualClock
from gateway.profiles.service import NewProfile
from tests.fixtures import RuntimeFactory, runtime_settings
from tests.test_alarms import T0, feed

ROOT = Path(__file__).resolve().parent.parent
ADMIN = {"X-API-Key": "maintenance-test-admin-key-0123456789"}


@pytest.fixture
async def loop_gw(tmp_path: Path, clock: VirtualClock,
                  runtime_factory: RuntimeFactory) -> AsyncIterator[tuple[Runtime, VirtualClock, httpx.AsyncClient]]:
    s = runtime_settings(tmp_path)
    s.api.admin_key = ADMIN["X-API-Key"]
    s.campaigns.dir = str(ROOT / "examples/campaigns")
    s.device_rules.dir = str(ROOT / "examples/device-rules")
    s.devices.profiles_dir = str(ROOT / "examples/device-profiles")
    rt = await runtime_factory(s)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.api.port}", timeout=10) as client:
        yield rt, clock, client


def enrol(rt: Runtime, who: str, bike: str) -> tuple[int, dict[str, str]]:
    pid: int = rt.service.create_profile(NewProfile(external_id=who, name=who.title(),
                                                    consents={"maintenance": True}))["id"]
    rt.service.register_device(bike, "ebike", pid)
    token, _ = rt.service.issue_token(pid)
    return pid, {"Authorization": f"Bearer {token}"}


def ride(rt: Runtime, bike: str, start: float, km: list[float]) -> None:
    for i, odo in enumerate(km):
        feed(rt, bike, start + 60 * i, chain_km=odo, battery_pct=80.0)


async def test_prompt_book_service_resolves_and_reports_time_to_resolution(
        loop_gw: tuple[Runtime, VirtualClock, httpx.AsyncClient]) -> None:
    rt, clock, http = loop_gw
    bruno, bruno_app = enrol(rt, "bruno", "bike-bruno")
    cara, cara_app = enrol(rt, "cara", "bike-cara")
    ride(rt, "bike-bruno", T0, [2000, 2600, 3010])  # 1010 km counted: the chain rule raises
    ride(rt, "bike-cara", T0, [500, 1600])  # 1100 km

    # The prompt reached the owner through the engine, naming the alarm.
    r = await http.get("/v1/me/notifications", headers=bruno_app)
    (prompt,) = [n for n in r.json() if n["campaign"] == "ebike-chain-service"]
    assert "1010 km" in prompt["body"]
    alarm_id = prompt["data"]["alarm"]["id"]
    mine = (await http.get("/v1/me/alarms", headers=bruno_app)).json()
    assert [a["id"] for a in mine] == [alarm_id] and mine[0]["prompted_at"] == T0 + 120
    staff = (await http.get("/v1/alarms", params={"status": "active"}, headers=ADMIN)).json()
    assert {a["device_id"] for a in staff} == {"bike-bruno", "bike-cara"}

    # Bruno books a slot; Cara acknowledges. Nobody can touch someone else's alarm.
    clock.set(T0 + 3600)
    r = await http.post(f"/v1/me/alarms/{alarm_id}/book", json={"slot": T0 + 86400}, headers=bruno_app)
    assert r.status_code == 200, r.text
    assert r.json()["booked_for"] == T0 + 86400 and r.json()["acknowledged_at"] == T0 + 3600
    r = await http.post(f"/v1/me/alarms/{alarm_id}/ack", headers=cara_app)
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
    cara_alarm = (await http.get("/v1/me/alarms", headers=cara_app)).json()[0]["id"]
    assert (await http.post(f"/v1/me/alarms/{cara_alarm}/ack", headers=cara_app)).status_code == 200
    r = await http.post(f"/v1/me/alarms/{alarm_id}/book", json={"slot": T0}, headers=bruno_app)
    assert r.status_code == 422 and "past" in r.json()["detail"]

    # Staff record the service: counters restart from zero, the alarm is resolved.
    clock.set(T0 + 90000)
    r = await http.post("/v1/devices/bike-bruno/service", json={"note": "new chain"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["alarms_resolved"] == [alarm_id]
    assert body["counters_reset"]["ebike-chain-service"] == {"km_since_service": 1010.0}
    rules = {x["rule"]: x for x in (await http.get("/v1/devices/bike-bruno/rules", headers=ADMIN)).json()}
    assert rules["ebike-chain-service"]["counters"] == {"km_since_service": 0.0}
    assert rules["ebike-chain-service"]["active"] is None
    (a,) = (await http.get("/v1/me/alarms", headers=bruno_app)).json()
    assert (a["status"], a["resolved_at"], a["service_event_id"]) == ("resolved", T0 + 90000, body["id"])
    r = await http.post(f"/v1/me/alarms/{alarm_id}/book", json={}, headers=bruno_app)
    assert r.status_code == 409

    # Counting restarts after the service: 300 km more is no alarm; 1000 km more is a new one.
    ride(rt, "bike-bruno", T0 + 90060, [3020, 3320])
    assert len((await http.get("/v1/me/alarms", headers=bruno_app)).json()) == 1
    ride(rt, "bike-bruno", T0 + 90300, [4100])
    alarms = (await http.get("/v1/me/alarms", headers=bruno_app)).json()
    assert [x["status"] for x in alarms] == ["active", "resolved"]

    # Time to resolution: Bruno's one resolved alarm, prompt at T0+120, service at T0+90000.
    clock.set(T0 + 100000)
    await http.post("/v1/devices/bike-cara/service", json={}, headers=ADMIN)
    fig = (await http.get("/v1/maintenance/figures", headers=ADMIN)).json()
    assert fig["resolved"] == 2 and fig["active"] == 1 and fig["booked"] == 1 and fig["acknowledged"] == 2
    ttr = fig["prompt_to_resolution_s"]
    assert ttr["count"] == 2
    assert ttr["mean"] == pytest.approx(((90000 - 120) + (100000 - 60)) / 2, abs=0.1)
    assert ttr["p90"] == 100000 - 60
    assert bruno != cara


async def test_bad_requests_get_a_clear_4xx_and_change_nothing(
        loop_gw: tuple[Runtime, VirtualClock, httpx.AsyncClient]) -> None:
    rt, _, http = loop_gw
    _, app = enrol(rt, "bruno", "bike-bruno")
    r = await http.post("/v1/devices/no-such-bike/service", json={}, headers=ADMIN)
    assert r.status_code == 404 and "no-such-bike" in r.json()["detail"]
    r = await http.post("/v1/devices/bike-bruno/service", json={"note": "x", "extra": 1}, headers=ADMIN)
    assert r.status_code == 422
    r = await http.post("/v1/me/alarms/12345/ack", headers=app)
    assert r.status_code == 404
    r = await http.post("/v1/devices/bike-bruno/service", json={}, headers=app)  # a customer is not staff
    assert r.status_code in (401, 403)
    assert (await http.get("/v1/alarms", headers=app)).status_code in (401, 403)
    fig = (await http.get("/v1/maintenance/figures", headers=ADMIN)).json()
    assert fig["alarms"] == 0 and fig["prompt_to_resolution_s"] == {"count": 0, "mean": None, "p90": None}
