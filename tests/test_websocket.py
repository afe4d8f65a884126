"""The WebSocket stream on a real uvicorn server, with a real WebSocket client (websockets) over TCP.

Same promises as the SSE stream: unacked notifications after the client's last id are replayed,
then new ones arrive live, ids only go up; plus acks over the socket, and 4401 for a bad token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import select
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from api.app import create_app
from api.deps import ApiContext
from gateway.delivery.hub import StreamHub
from gateway.delivery.outbox import Dispatcher
from gateway.profiles.service import GatewayService, NewProfile
from gateway.storage.db import Database
from gateway.storage.models import Interaction, Notification
from tests.conftest import free_port

T0 = 1_767_261_600.0
HEARTBEAT_S = 0.2


@dataclass
class Server:
    db: Database
    service: GatewayService
    dispatcher: Dispatcher
    port: int
    alice: int
    bob: int
    alice_token: str
    bob_token: str
    hub: StreamHub

    def url(self, query: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}/v1/me/ws{query}"

    def add(self, profile_id: int, key: str, status: str = "pending") -> int:
        with self.db.session() as s:
            n = Notification(profile_id=profile_id, campaign_id="c", purpose="offers", dedup_key=key,
                             title=f"title {key}", body="b", data={}, created_at=T0, status=status)
            s.add(n)
            s.flush()
            return n.id

    def status(self, nid: int) -> str:
        with self.db.session() as s:
            n = s.get(Notification, nid)
            assert n is not None
            return n.status


@pytest.fixture
async def server(service: GatewayService) -> AsyncIterator[Server]:
    db = service.db
    hub = StreamHub(queue_size=4)  # small, so the slow-client test can overflow it
    app = create_app(ApiContext(service=service, hub=hub, admin_key="admin-key-0123456789",
                                health=lambda: {"status": "ok"}, heartbeat_s=HEARTBEAT_S))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(uv.serve())
    for _ in range(500):  # bounded: the port is bound within milliseconds
        if uv.started or task.done():
            break
        await asyncio.sleep(0.01)
    assert uv.started, "uvicorn did not start"
    alice = service.create_profile(NewProfile(external_id="alice"))["id"]
    bob = service.create_profile(NewProfile(external_id="bob"))["id"]
    try:
        yield Server(db, service, Dispatcher(db, [hub]), port, alice, bob, service.issue_token(alice)[0],
                     service.issue_token(bob)[0], hub)
    finally:
        uv.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)


async def _next(ws: ClientConnection, kind: str = "notification") -> dict[str, Any]:
    """The next message of a kind (heartbeats are skipped unless asked for); bounded."""
    async with asyncio.timeout(5):
        while True:
            msg = json.loads(await ws.recv())
            if msg["type"] == kind:
                return msg
            assert msg["type"] == "ping", msg


async def _close_code(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(5):
            while True:
                await ws.recv()
    return closed.value.rcvd.code if closed.value.rcvd else None


async def test_replay_after_the_last_id_then_live_with_acks_over_the_socket(server: Server) -> None:
    a1, a2, a3 = (server.add(server.alice, k) for k in ("a1", "a2", "a3"))
    b1 = server.add(server.bob, "b1")
    held = server.add(server.alice, "held", status="scheduled")  # quiet hours: released later, older id
    server.service.ack(server.alice, a1)  # acked: never replayed

    async with connect(server.url(f"?access_token={server.alice_token}&after=0")) as ws:
        assert [(await _next(ws))["id"] for _ in range(2)] == [a2, a3]

        live = server.add(server.alice, "a4")
        await server.dispatcher.dispatch([live, b1], T0)
        got = await _next(ws)
        assert got["id"] == live and got["notification"]["title"] == "title a4"
        with server.db.session() as s:
            s.get(Notification, held).status = "pending"  # type: ignore[union-attr]
        await server.dispatcher.dispatch([held, a3], T0)  # a3 was replayed already: not sent again
        assert (await _next(ws))["id"] == held

        await ws.send(json.dumps({"ack": a2}))
        assert await _next(ws, "acked") == {"type": "acked", "id": a2, "status": "acked"}
        assert server.status(a2) == "acked"
        await ws.send(json.dumps({"ack": b1}))  # Bob's: not hers to ack
        refused = await _next(ws, "error")
        assert refused["ack"] == b1 and "not found" in refused["detail"]
        await ws.send("not json")
        assert "JSON" in (await _next(ws, "error"))["detail"]
        await ws.send(json.dumps({"type": "ping"}))
        assert await _next(ws, "pong") == {"type": "pong"}
        assert await _next(ws, "ping") == {"type": "ping"}  # the idle socket's heartbeat

    assert server.status(b1) == "pending"
    with server.db.session() as s:
        assert list(s.scalars(select(Interaction.notification_id).order_by(Interaction.id))) == [a1, a2]

    # Reconnecting after the last id seen: only what is still unacked and newer.
    async with connect(server.url(f"?access_token={server.alice_token}&after={held}")) as ws:
        assert (await _next(ws))["id"] == live
    # The same ack over HTTP and over the socket: one state.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
        pending = await http.get("/v1/me/notifications", headers={"Authorization": f"Bearer {server.alice_token}"})
    assert [n["id"] for n in pending.json()] == [a3, held, live]


async def test_the_token_may_come_in_the_first_message(server: Server) -> None:
    a1 = server.add(server.alice, "a1")
    a2 = server.add(server.alice, "a2")
    async with connect(server.url()) as ws:
        await ws.send(json.dumps({"token": server.alice_token, "after": a1}))
        assert (await _next(ws))["id"] == a2


@pytest.mark.parametrize("how", ["bad query token", "bad first message", "not json", "no token"])
async def test_a_bad_or_missing_token_closes_with_4401_and_reveals_nothing(server: Server, how: str) -> None:
    server.add(server.alice, "a1")
    query = "?access_token=forged.token" if how == "bad query token" else ""
    async with connect(server.url(query)) as ws:
        if how == "bad first message":
            await ws.send(json.dumps({"token": server.alice_token[:-4] + "AAAA"}))
        elif how == "not json":
            await ws.send("hello")
        elif how == "no token":
            await ws.send(json.dumps({"after": 0}))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(5):
                msg = await ws.recv()
                pytest.fail(f"got a message without a valid token: {msg!r}")
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


async def test_a_client_that_falls_behind_is_closed_with_1013_and_resumes_from_its_last_id(server: Server) -> None:
    ids = [server.add(server.alice, f"a{i}") for i in range(8)]
    async with connect(server.url(f"?access_token={server.alice_token}&after={ids[-1]}")) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert await _next(ws, "pong") == {"type": "pong"}  # subscribed and idle
        for nid in ids:  # a burst faster than this socket is drained: its queue (4) overflows
            server.hub.publish(server.alice, {"id": nid + 100, "title": "burst"})
        assert await _close_code(ws) == 1013
    assert server.hub.dropped_clients == 1 and server.hub.listeners(server.alice) == 0
    async with connect(server.url(f"?access_token={server.alice_token}&after={ids[3]}")) as ws:
        assert [(await _next(ws))["id"] for _ in range(4)] == ids[4:]  # nothing is lost: the outbox replays
