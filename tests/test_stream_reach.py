"""A customer's reach ends when their right to it ends: erasure, revocation, logout and expiry.

A token is checked when a stream opens; these tests check that a stream already open ends too, and
that an erased customer's token never reaches a profile created later under the same id (a token
older than its profile is refused). Real uvicorn, real SSE and WebSocket clients.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.clock import VirtualClock
from gateway.profiles.service import GatewayService, NewProfile
from gateway.security.tokens import TokenError
from gateway.storage.models import Profile
from tests.sse import SseReader
from tests.test_sse import T0, Server, serve

ADMIN = {"X-API-Key": "admin-key-0123456789"}  # the key tests.test_sse.serve configures


@pytest.fixture
async def server(service: GatewayService) -> AsyncIterator[Server]:
    async for s in serve(service, heartbeat_s=0.1):
        yield s


def stream_url(server: Server, token: str) -> str:
    return f"http://127.0.0.1:{server.port}/v1/me/stream?access_token={token}"


async def ended(reader: SseReader) -> bool:
    """Whether the server ended the stream (bounded wait; the reader task finishes at end of body)."""
    task = reader._task
    assert task is not None
    await reader.wait(lambda r: task.done(), timeout=10)
    return task.done()


def test_an_erased_customers_token_never_reaches_the_next_customer_enrolled(service: GatewayService,
                                                                            clock: VirtualClock) -> None:
    svc = service
    ann = svc.create_profile(NewProfile(external_id="ann"))["id"]
    token, _ = svc.issue_token(ann)
    svc.erase_profile(ann)
    with pytest.raises(TokenError):
        svc.verify_token(token)
    clock.set(T0 + 60)
    # Profile ids are never given twice (tests/test_profile_ids.py), but a restored backup or a row
    # written by hand can still put a new customer under the erased id: the token must not follow.
    with svc.db.session() as s:
        s.add(Profile(id=ann, external_id="bea", attributes={}, created_at=clock.now()))
    with pytest.raises(TokenError, match="no longer exists"):
        svc.verify_token(token)
    assert svc.verify_token(svc.issue_token(ann)[0]).profile_id == ann  # hers works


async def test_erasure_ends_the_open_stream_and_the_old_token_never_reads_the_newcomers(server: Server) -> None:
    newest = server.service.create_profile(NewProfile(external_id="dora"))["id"]  # the highest id
    old_token = server.service.issue_token(newest)[0]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as http:
        dora = await SseReader(http, stream_url(server, old_token)).start()
        assert dora.status == 200
        r = await http.delete(f"/v1/profiles/{newest}", headers=ADMIN)
        assert r.status_code == 204
        assert await ended(dora), "the erased customer's stream stayed open"
        assert server.hub.listeners(newest) == 0

        server.service.clock.set(T0 + 60)  # type: ignore[attr-defined]
        r = await http.post("/v1/profiles", headers=ADMIN, json={"external_id": "eve"})
        assert r.json()["id"] != newest  # the erased id stays retired
        again = await SseReader(http, stream_url(server, old_token)).start()
        assert again.status == 401  # Dora's old phone cannot open Eve's stream
        assert (await http.get("/v1/me/notifications", params={"access_token": old_token})).status_code == 401
        await again.close()
        await dora.close()


async def test_revoking_a_customers_tokens_ends_their_streams_and_logout_ends_only_its_own(server: Server) -> None:
    alice = server.ids["alice"]
    phone, tablet = server.tokens["alice"], server.service.issue_token(alice)[0]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as http:
        on_phone = await SseReader(http, stream_url(server, phone)).start()
        on_tablet = await SseReader(http, stream_url(server, tablet)).start()
        assert await on_phone.wait(lambda r: server.hub.listeners(alice) == 2)

        r = await http.delete("/v1/me/token", headers={"Authorization": f"Bearer {phone}"})
        assert r.status_code == 204
        assert await ended(on_phone), "the logged-out token's stream stayed open"
        assert not on_tablet._task.done()  # type: ignore[union-attr]  # the other device keeps its stream
        nid = server.add("alice", "after-logout")
        await server.dispatcher.dispatch([nid], T0)
        assert await on_tablet.wait(lambda r: [int(e.id or 0) for e in r.events] == [nid])
        assert on_phone.events == []

        r = await http.delete(f"/v1/profiles/{alice}/tokens", headers=ADMIN)
        assert r.status_code == 204
        assert await ended(on_tablet), "a revoked token's stream stayed open"
        assert server.hub.listeners(alice) == 0
        await on_phone.close()
        await on_tablet.close()


async def test_a_stream_ends_when_its_token_expires(server: Server) -> None:
    bob = server.ids["bob"]
    async with httpx.AsyncClient(timeout=10) as http:
        reader = await SseReader(http, server.url("bob")).start()
        assert reader.status == 200
        assert await reader.wait(lambda r: r.comments >= 2)  # heartbeats: open and idle
        server.service.clock.set(T0 + server.service.token_ttl_s + 1)  # type: ignore[attr-defined]
        assert await ended(reader), "the stream outlived its token"
        assert server.hub.listeners(bob) == 0
        await reader.close()


async def test_erasure_closes_the_websocket_and_its_reconnect_is_refused(server: Server) -> None:
    bob = server.ids["bob"]
    url = f"ws://127.0.0.1:{server.port}/v1/me/ws?access_token={server.tokens['bob']}"
    async with connect(url) as ws:
        for _ in range(500):  # bounded: wait until the socket is subscribed
            if server.hub.listeners(bob):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.01)
        assert server.hub.listeners(bob) == 1
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as http:
            assert (await http.delete(f"/v1/profiles/{bob}", headers=ADMIN)).status_code == 204
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(1000):  # bounded: pings until the close frame
                await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
    async with connect(url) as ws:
        with pytest.raises(ConnectionClosed) as refused:
            await asyncio.wait_for(ws.recv(), 10)
        assert refused.value.rcvd is not None and refused.value.rcvd.code == 4401
