"""The server does what its OpenAPI document says, on a live gateway (real uvicorn on loopback).

A 405 names every method of its path in ``Allow`` and a literal path is not read as a template's
parameter; a body that is not JSON is a 400 problem on every operation that takes one (and the
document says so); ``true`` is not a number nor 1 a boolean; a day is YYYY-MM-DD; a scalar query
parameter given twice is a 422 that names it. tests/test_schemathesis.py fuzzes the same promises.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.problem import PROBLEM
from gateway.app.runtime import Runtime
from tests.live_gateway import ADMIN_KEY, base_url, enrol, live_settings, running

ADMIN = {"X-API-Key": ADMIN_KEY}
METHODS = ("get", "put", "post", "delete", "patch")


@dataclass
class Live:
    rt: Runtime
    http: httpx.AsyncClient
    doc: dict[str, Any]
    profile_id: int
    token: str

    def auth(self, path: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if path.startswith("/v1/me/") else ADMIN

    def fill(self, path: str) -> str:
        """A concrete URL for a templated path (the resource need not exist)."""
        values = {"profile_id": str(self.profile_id), "kind": "beacon", "value": "ibeacon:x:1:1"}
        out = path
        while "{" in out:
            name = out[out.index("{") + 1:out.index("}")]
            out = out.replace("{" + name + "}", values.get(name, "1"), 1)
        return out


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    settings = live_settings(tmp_path)
    settings.api.rate_limit_per_s = 0
    settings.api.admin_rate_limit_per_s = 0
    async with running(settings) as rt, httpx.AsyncClient(base_url=base_url(rt), timeout=10) as http:
        pid, token = enrol(rt, "alice", 1)
        doc = (await http.get("/openapi.json")).json()
        yield Live(rt, http, doc, pid, token)


def problem_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.request.method, str(r.request.url), r.status_code, r.text)
    assert r.headers["content-type"].split(";")[0] == PROBLEM, r.headers["content-type"]
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["detail"]
    return body


async def test_a_405_names_every_method_of_its_path(live: Live) -> None:
    multi = 0
    for path, ops in live.doc["paths"].items():
        declared = {m.upper() for m in ops if m in METHODS}
        multi += len(declared) > 1
        url = live.fill(path)
        for method in ("OPTIONS", *(m.upper() for m in METHODS if m not in ops)):
            r = await live.http.request(method, url, headers=live.auth(path))
            problem_of(r, 405)
            allow = {m.strip() for m in r.headers["allow"].split(",")}
            assert allow == declared, (method, path, r.headers["allow"])
    assert multi >= 11  # the paths with more than one method, whose Allow once named only the first route's


async def test_a_literal_path_is_not_a_templates_parameter(live: Live) -> None:
    """/v1/campaigns/validate is POST only; GET on it is not a read of a campaign named "validate"."""
    for method in ("GET", "PUT", "DELETE"):
        r = await live.http.request(method, "/v1/campaigns/validate", headers=ADMIN, json={})
        problem_of(r, 405)
        assert r.headers["allow"] == "POST"
    r = await live.http.post("/v1/campaigns/validate", headers=ADMIN, json={"purpose": "nonsense"})
    problem_of(r, 422)  # the route itself still answers
    assert (await live.http.get("/v1/campaigns/welcome", headers=ADMIN)).status_code == 200


@pytest.mark.parametrize("raw", [b"{not json", b'{"a": 1', b"\xff\xfe\x00junk"],
                         ids=["syntax", "truncated", "not-utf8"])
async def test_a_body_that_is_not_json_is_a_documented_400_problem(live: Live, raw: bytes) -> None:
    with_body = [(path, method) for path, ops in live.doc["paths"].items() for method, op in ops.items()
                 if isinstance(op, dict) and "requestBody" in op]
    assert len(with_body) >= 13
    for path, method in with_body:
        responses = live.doc["paths"][path][method]["responses"]
        assert PROBLEM in responses.get("400", {}).get("content", {}), f"{method.upper()} {path}: 400 undocumented"
        r = await live.http.request(method.upper(), live.fill(path), content=raw,
                                    headers={**live.auth(path), "Content-Type": "application/json"})
        body = problem_of(r, 400)
        assert "JSON" in body["detail"] or "parsing the body" in body["detail"], body


@pytest.mark.parametrize(("method", "url", "body"), [
    ("PUT", "/v1/catalogue", [{"sku": "A", "name": "a", "price": False}]),
    ("PUT", "/v1/catalogue", [{"sku": "A", "name": "a", "price": "12"}]),
    ("PUT", "/v1/carts/c1", {"profile_external_id": "alice", "items": [{"sku": "A", "quantity": True}]}),
    ("POST", "/v1/decisions/dry-run", {"profile_id": 1, "event": {"kind": "dwell", "zone": "shop", "dwell_s": False}}),
    ("POST", "/v1/devices", {"id": "d1", "owner_profile_id": True}),
    ("PUT", "/v1/profiles/{pid}/consents", {"consents": {"offers": 1}}),
    ("POST", "/v1/webhook-endpoints/enable", {"url": "https://push.example/x", "replay": "yes"}),
], ids=["price-false", "price-text", "quantity-true", "dwell-false", "owner-true", "consent-1", "replay-yes"])
async def test_a_boolean_is_not_a_number_nor_a_number_a_boolean(live: Live, method: str, url: str, body: Any) -> None:
    r = await live.http.request(method, url.format(pid=live.profile_id), headers=ADMIN, json=body)
    problem_of(r, 422)


async def test_a_number_field_takes_any_json_number(live: Live) -> None:
    """Strict about booleans and text, not about 3 for a float or 2.0 for an integer (JSON Schema's view)."""
    r = await live.http.put("/v1/catalogue", headers=ADMIN, json=[{"sku": "A", "name": "a", "price": 3}])
    assert r.status_code == 200, r.text
    r = await live.http.put("/v1/carts/c1", headers=ADMIN,
                            json={"profile_external_id": "alice", "items": [{"sku": "A", "quantity": 2.0}]})
    assert r.status_code == 200, r.text
    assert r.json()["items"][0]["quantity"] == 2
    r = await live.http.put(f"/v1/profiles/{live.profile_id}/consents", headers=ADMIN,
                            json={"consents": {"offers": True}})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("day", ["0", "20260601", "2026-06-01T00:00", "2026-6-1", " 2026-06-01", "true"])
async def test_a_day_is_yyyy_mm_dd_and_nothing_else(live: Live, day: str) -> None:
    body = problem_of(await live.http.get("/v1/figures", headers=ADMIN, params={"from": day}), 422)
    assert body["detail"].startswith("query.from:"), body


async def test_a_day_as_documented_is_accepted(live: Live) -> None:
    params = live.doc["paths"]["/v1/figures"]["get"]["parameters"]
    given = next(p for p in params if p["name"] == "from")["schema"]  # optional: today by default
    schema = next(s for s in given.get("anyOf", [given]) if s.get("type") == "string")
    assert schema["format"] == "date"  # RFC 3339 full-date: YYYY-MM-DD
    r = await live.http.get("/v1/figures", headers=ADMIN, params={"from": "2026-06-01", "to": "2026-06-02"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("url", "name", "who"), [
    ("/v1/profiles?limit=1&limit=500", "limit", "admin"),
    ("/v1/profiles?q=al&q=bo", "q", "admin"),
    ("/v1/figures?from=2026-06-01&from=2026-06-02", "from", "admin"),
    ("/v1/devices/d1/readings?since=1&since=2", "since", "admin"),
    ("/v1/me/notifications?after=1&after=2", "after", "customer"),
])
async def test_a_scalar_query_parameter_given_twice_is_a_422_naming_it(live: Live, url: str, name: str,
                                                                      who: str) -> None:
    headers = ADMIN if who == "admin" else {"Authorization": f"Bearer {live.token}"}
    body = problem_of(await live.http.get(url, headers=headers), 422)
    assert body["detail"] == f"query.{name}: given 2 times; this parameter takes one value", body
    once = url.rsplit("&", 1)[0]
    assert (await live.http.get(once, headers=headers)).status_code in (200, 404)


def _walk(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        found = [f"{path}/{k}" for k in node if k in ("ge", "le", "gt", "lt", "strict", "allow_inf_nan")]
        return found + [p for k, v in node.items() if k != "properties" for p in _walk(v, f"{path}/{k}")] + [
            p for v in (node.get("properties") or {}).values() for p in _walk(v, f"{path}/properties")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _walk(v, f"{path}/{i}")]
    return []


async def test_the_document_speaks_json_schema_only(live: Live) -> None:
    """A bound pydantic cannot express as JSON Schema is written under its own name (``ge``), which a
    client or a fuzzer ignores: the server would refuse what the document seems to allow."""
    assert _walk(live.doc) == []
