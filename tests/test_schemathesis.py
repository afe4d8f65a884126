"""The OpenAPI document against the real server: schemathesis generates requests for every operation.

A live gateway (uvicorn on loopback) answers; each generated case is sent with an admin key (admin
routes) or a customer's app token (``/v1/me/...``), and every answer must be no server error, a
documented status, a documented content type, and a body that matches its documented schema.
Bounded: a few examples per operation and a deadline for the whole run. The SSE stream never ends
by design, so it is left out here (test_api and test_dispatcher read it); the WebSocket is not in
the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.runtime import Runtime
from tests.live_gateway import ADMIN_KEY, base_url, enrol, live_settings

EXAMPLES = 6  # per operation
BUDGET_S = 50.0  # the whole run stops generating after this
SKIP = {("GET", "/v1/me/stream")}  # an endless event stream: a plain request would never finish
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Runtime, str]]:
    """A gateway on its own event loop in a thread (schemathesis calls it with blocking requests)."""
    tmp = tmp_path_factory.mktemp("schemathesis")
    loop = asyncio.new_event_loop()
    rt = Runtime(live_settings(tmp), on_outcome=None, tick_s=3600)
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(rt.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(30), "the gateway did not start"
    _, token = enrol(rt, "alice", 1)
    try:
        yield rt, token
    finally:
        asyncio.run_coroutine_threadsafe(rt.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _order(op: Any) -> tuple[int, str, str]:
    """Customer routes first (erasing a profile later must not turn them all into 401s), deletes last."""
    return (0 if op.path.startswith("/v1/me") else 2 if op.method.upper() == "DELETE" else 1, op.path, op.method)


def test_every_operation_answers_as_documented(live: tuple[Runtime, str]) -> None:
    rt, token = live
    url = base_url(rt)
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    ops = sorted((r.ok() for r in schema.get_all_operations()), key=_order)
    assert len(ops) >= 40, [f"{o.method} {o.path}" for o in ops]
    deadline = time.monotonic() + BUDGET_S
    tested: list[str] = []
    for op in ops:
        if (op.method.upper(), op.path) in SKIP:
            continue
        if time.monotonic() > deadline:
            break
        _run(op, url, {"Authorization": f"Bearer {token}"} if op.path.startswith("/v1/me")
             else {"X-API-Key": ADMIN_KEY}, deadline)
        tested.append(f"{op.method.upper()} {op.path}")
    # The budget must cover the whole document, or the run proves less than it says.
    assert len(tested) == len(ops) - len(SKIP), f"only {len(tested)} of {len(ops)} operations ran"


def _run(op: Any, url: str, auth: dict[str, str], deadline: float) -> None:
    """EXAMPLES generated cases of one operation, each sent and checked."""

    @given(case=op.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        if time.monotonic() > deadline:
            return
        case.call_and_validate(base_url=url, headers=auth, checks=CHECKS, timeout=10)

    run()
