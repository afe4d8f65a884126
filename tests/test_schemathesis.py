"""The OpenAPI document against the real server: schemathesis runs every phase with every check it ships.

A live gateway (uvicorn on loopback) answers. Schemathesis's own engine runs, as ``schemathesis run
--checks all`` does: the examples of the document, the coverage phase (boundaries, wrong types,
missing and repeated parameters, undeclared methods), fuzzing and the stateful phase (links between
operations: create, read, delete, read again). Admin routes get the admin key, ``/v1/me/...`` a
customer's app token (a fresh one if an earlier case revoked it or erased the customer). Bounded:
``EXAMPLES`` cases per operation and phase, a few stateful steps, and ``BUDGET_S`` for the whole run,
which must finish within it.

Checks and what they can see here:

- not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
  response_schema_conformance: every answer is documented (status, media type, headers, body).
- negative_data_rejection: a request the document calls invalid is refused (wrong types, ``true`` for
  a number, ``?from=0`` for a date, a scalar query parameter given twice).
- positive_data_acceptance: a request the document calls valid is accepted, except that the
  operations in ``RULES`` may answer 422 to it: they apply a rule no JSON Schema can state (time
  relative to now, a reference to a row that must exist, a campaign's own grammar).
- missing_required_header, unsupported_method, allow_header_conformance: a 405 with an ``Allow``
  naming every method of the path.
- use_after_free, ensure_resource_availability: the stateful phase (a deleted profile, key, campaign
  or identifier is a 404 afterwards; a created one can be read at once).
- ignored_auth: every protected operation refuses no credential and a wrong one.
- object_level_authorization: runs, but has nothing to compare. It replays one identity's GET of its
  own object as another identity of a WFC auth document; the admin key sees every object by design,
  and no customer route takes an object id (a customer's objects are the token's own), so there is no
  such read to replay. tests/test_authz_matrix.py and tests/test_stream_reach.py check that customers
  never reach each other's data.

Left out: ``GET /v1/me/stream``, an endless event stream a plain request never finishes
(tests/test_sse.py and tests/test_write_timeout.py read it); the WebSocket is not in the document.
``max_response_time`` is not a check of ``--checks all`` and would be a timing assertion.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import StopReason, from_schema
from schemathesis.engine import events as ev

from gateway.app.runtime import Runtime
from tests.live_gateway import ADMIN_KEY, base_url, live_settings

EXAMPLES = 5  # generated cases per operation in the examples and fuzzing phases
STATEFUL_STEPS = 4
BUDGET_S = 240.0  # the whole run (about a minute on a quiet machine) must end within this
SEED = 20260601
EXCLUDED = {"GET /v1/me/stream"}  # an endless event stream: a plain request to it never finishes

RULES = {
    # operation: the rule a schema-valid request can still break (422)
    "POST /v1/campaigns/validate": "a campaign definition's own grammar (gateway/campaigns), beyond its JSON shape",
    "PUT /v1/campaigns/{campaign_id}": "a campaign definition's own grammar (gateway/campaigns), beyond its JSON shape",
    "POST /v1/devices": "owner_profile_id must name an existing profile",
    "PATCH /v1/devices/{device_id}": "owner_profile_id must name an existing profile",
    "POST /v1/profiles/{profile_id}/link": "a profile cannot be linked to itself",
    "PUT /v1/carts/{cart_id}": "updated_at may not be in the future; the profile must exist",
    "POST /v1/me/sightings": "a sighting's time must be within the last 30 s",
    "POST /v1/me/alarms/{alarm_id}/book": "the service slot must be in the future",
    "GET /v1/figures": "the range must not end before it starts, nor span more than the figures allow",
    "POST /v1/me/push-subscriptions": "the endpoint must be a public https URL and the keys a real P-256 point",
}


def _config() -> SchemathesisConfig:
    return SchemathesisConfig.from_dict({
        "seed": SEED,
        "suppress-health-check": ["all"],
        "request-timeout": 10,
        "workers": 1,
        "generation": {"max-examples": EXAMPLES, "database": "none"},
        "phases": {
            "coverage": {"generate-duplicate-query-parameters": True},
            "stateful": {"max-steps": STATEFUL_STEPS},
        },
        "checks": {"enabled": True},  # every check schemathesis ships (--checks all)
        "operations": [
            {"include-name": sorted(EXCLUDED), "enabled": False},
            {"include-name": sorted(RULES),
             "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "3xx", 401, 403, 404, 409, 422,
                                                                           429, "5xx"]}}},
        ],
    })


class Credentials:
    """The admin key for admin routes; for ``/v1/me/...`` an app token, minted over the API and minted
    again (for a new customer if need be) when a case revoked it or erased its customer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.admin = {"X-API-Key": ADMIN_KEY}
        self.profile_id: int | None = None
        self.lock = threading.Lock()

    def token(self) -> str:
        with self.lock:
            for _ in range(3):
                if self.profile_id is None:
                    r = requests.post(f"{self.url}/v1/profiles", headers=self.admin, timeout=10,
                                      json={"name": "Alice", "consents": {"offers": True}})
                    r.raise_for_status()
                    self.profile_id = int(r.json()["id"])
                r = requests.post(f"{self.url}/v1/profiles/{self.profile_id}/tokens", headers=self.admin, timeout=10)
                if r.status_code == 201:
                    return str(r.json()["token"])
                self.profile_id = None  # erased meanwhile: enrol another customer
            r.raise_for_status()
            raise AssertionError(f"no app token: {r.status_code} {r.text}")


def _customer(operation_path: str) -> bool:
    return operation_path.startswith("/v1/me/")


def run(url: str, budget_s: float) -> dict[str, Any]:
    """One schemathesis run against ``url``: what it tested and what it found."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=_config())
    creds = Credentials(url)

    @schema.auth(cache_by_key=lambda case, ctx: _customer(ctx.operation.path))
    class GatewayAuth:
        def get(self, case: Any, ctx: Any) -> tuple[str, str]:
            return ("customer", creds.token()) if _customer(ctx.operation.path) else ("admin", ADMIN_KEY)

        def set(self, case: Any, data: tuple[str, str], ctx: Any) -> None:
            kind, secret = data
            if kind == "customer":
                case.headers["Authorization"] = f"Bearer {secret}"
            else:
                case.headers["X-API-Key"] = secret

    stream = from_schema(schema).execute()
    deadline = time.monotonic() + budget_s
    tested: set[str] = set()
    cases = 0
    failures: list[str] = []
    errors: list[str] = []
    stop: StopReason | None = None
    for event in stream:
        if time.monotonic() > deadline:
            stream.stop()
        if isinstance(event, ev.ScenarioFinished | ev.FuzzScenarioFinished):
            recorder = event.recorder
            cases += len(recorder.cases)
            for node in recorder.cases.values():
                tested.add(node.value.operation.label)
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.failure_info is not None:
                        case = recorder.cases[case_id].value
                        seen = recorder.interactions.get(case_id)
                        answer = seen.response.text[:300] if seen is not None and seen.response is not None else ""
                        failures.append(f"{check.name}: {case.operation.label}: {check.failure_info.failure.title}"
                                        f"\n{check.failure_info.failure.message}\n{check.failure_info.code_sample}"
                                        f"\n-> {answer}")
        elif isinstance(event, ev.NonFatalError):
            errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, ev.FatalError):
            errors.append(f"fatal: {event.exception!r}")
        elif isinstance(event, ev.EngineFinished):
            stop = event.stop_reason
            failures.extend(f"{f.title}\n{f.message}" for f in event.failures)
    return {"tested": tested, "cases": cases, "failures": failures, "errors": errors, "stop": stop}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """A gateway on its own event loop in a thread (schemathesis sends blocking requests)."""
    settings = live_settings(tmp_path_factory.mktemp("schemathesis"))
    settings.api.rate_limit_per_s = 0  # schemathesis sends hundreds of requests a second with one credential
    settings.api.admin_rate_limit_per_s = 0
    loop = asyncio.new_event_loop()
    rt = Runtime(settings, on_outcome=None, tick_s=3600)  # not runtime_factory's: one per module, on this loop
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(rt.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(30), "the gateway did not start"
    try:
        yield rt
    finally:
        asyncio.run_coroutine_threadsafe(rt.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_every_operation_answers_as_documented_under_every_check(live: Runtime) -> None:
    url = base_url(live)
    paths = requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    documented = {f"{m.upper()} {p}" for p, ops in paths.items() for m in ops}
    assert len(documented) >= 60, sorted(documented)
    assert set(RULES) <= documented and documented >= EXCLUDED  # no stale names
    result = run(url, BUDGET_S)
    assert not result["errors"], "\n\n".join(result["errors"])
    assert not result["failures"], f"{len(result['failures'])} failures:\n\n" + "\n\n".join(result["failures"])
    assert result["stop"] == StopReason.COMPLETED, f"the run stopped early: {result['stop']}"
    # The budget covered the whole document, or the run proves less than it says.
    assert documented - EXCLUDED <= result["tested"], sorted(documented - EXCLUDED - result["tested"])
