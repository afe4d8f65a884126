"""The SSE stream on a real uvicorn server with real clients over TCP: heartbeats keep an idle stream
alive, and a client that never reads is cut off while the others keep receiving everything."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from api.app import create_app
from api.deps import ApiContext
from gateway.delivery.hub import StreamHub
from gateway.delivery.outbox import Dispatcher
from gateway.profiles.service import GatewayService, NewProfile
from gateway.storage.db import Database
from gateway.storage.models import Notification
from tests.conftest import free_port
from tests.sse import SseReader

T0 = 1_767_261_600.0
HEARTBEAT_S = 0.1


@dataclass
class Server:
    db: Database
    service: GatewayService
    hub: StreamHub
    dispatcher: Dispatcher
    port: int
    tokens: dict[str, str]
    ids: dict[str, int]

    def url(self, who: str) -> str:
        return f"http://127.0.0.1:{self.port}/v1/me/stream?access_token={self.tokens[who]}"

    def add(self, who: str, key: str) -> int:
        with self.db.session() as s:
            n = Notification(profile_id=self.ids[who], campaign_id="c", purpose="offers", dedup_key=key,
                             title=f"title {key}", body="b", data={}, created_at=T0, status="pending")
            s.add(n)
            s.flush()
            return n.id


async def serve(service: GatewayService, heartbeat_s: float, queue_size: int = 256) -> AsyncIterator[Server]:
    db = service.db
    hub = StreamHub(queue_size=queue_size)
    app = create_app(ApiContext(service=service, hub=hub, admin_key="admin-key-0123456789",
                                health=lambda: {"status": "ok"}, heartbeat_s=heartbeat_s))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                       timeout_graceful_shutdown=2))
    task = asyncio.create_task(uv.serve())
    for _ in range(500):  # bounded: the port is bound within milliseconds
        if uv.started or task.done():
            break
        await asyncio.sleep(0.01)
    assert uv.started, "uvicorn did not start"
    ids = {who: service.create_profile(NewProfile(external_id=who))["id"] for who in ("alice", "bob", "slow")}
    tokens = {who: service.issue_token(pid)[0] for who, pid in ids.items()}
    try:
        yield Server(db, service, hub, Dispatcher(db, [hub]), port, tokens, ids)
    finally:
        uv.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)


@pytest.fixture
async def quick_heartbeats(service: GatewayService) -> AsyncIterator[Server]:
    async for s in serve(service, HEARTBEAT_S):
        yield s


@pytest.fixture
async def small_queues(service: GatewayService) -> AsyncIterator[Server]:
    async for s in serve(service, 30.0, queue_size=4):
        yield s


async def raw_stream(port: int, url: str, rcvbuf: int | None = None) -> tuple[asyncio.StreamReader,
                                                                                  asyncio.StreamWriter]:
    sock = socket.socket()
    if rcvbuf is not None:  # a phone on a dead network: tiny window, never read
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    path = url.split(str(port), 1)[1]
    # HTTP/1.0: the body is the bare event stream (no chunk framing between the lines).
    writer.write(f"GET {path} HTTP/1.0\r\nHost: test\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def test_an_idle_stream_gets_heartbeat_comments_then_live_events(quick_heartbeats: Server) -> None:
    server = quick_heartbeats
    reader, writer = await raw_stream(server.port, server.url("alice"))
    try:
        async with asyncio.timeout(10):
            assert b" 200 " in await reader.readline()
            lines: list[bytes] = []
            while lines.count(b": heartbeat") < 3:  # nothing to send: the stream still speaks at its interval
                lines.append((await reader.readline()).strip())
            assert b": stream for profile %d" % server.ids["alice"] in lines
            assert not any(line.startswith(b"data:") for line in lines)  # heartbeats are comments, not events
            nid = server.add("alice", "a1")
            await server.dispatcher.dispatch([nid], T0)
            while not (line := (await reader.readline()).strip()).startswith(b"id:"):
                assert line in (b"", b": heartbeat"), line
            assert line == b"id: %d" % nid  # the heartbeat never took the event's place
    finally:
        writer.close()


async def test_a_client_that_never_reads_is_cut_off_and_the_others_keep_receiving(small_queues: Server) -> None:
    server = small_queues
    async with httpx.AsyncClient() as http:
        alice = await SseReader(http, server.url("alice")).start()
        bob = await SseReader(http, server.url("bob")).start()
        assert await alice.wait(lambda r: server.hub.listeners(server.ids["alice"]) == 1)
        _, slow_writer = await raw_stream(server.port, server.url("slow"), rcvbuf=4096)
        try:
            for _ in range(500):  # bounded: wait until the slow stream is subscribed
                if server.hub.listeners(server.ids["slow"]):
                    break
                await asyncio.sleep(0.01)
            assert server.hub.listeners(server.ids["slow"]) == 1
            big = "x" * 32_768  # large frames fill the socket buffers of a client that never reads
            sent = 0
            for i in range(1, 1001):  # bounded: the kernel buffers hold a few MB at most
                for who in ("slow", "alice", "bob"):
                    server.hub.publish(server.ids[who], {"id": i, "campaign": "c", "title": f"n{i}", "body": big,
                                                         "data": {}, "created_at": T0, "status": "pending"})
                sent = i
                # Each round waits for the readers: the slow one never reads, so its frames pile up.
                assert await alice.wait(lambda r, n=i: len(r.events) >= n)
                assert await bob.wait(lambda r, n=i: len(r.events) >= n)
                if not server.hub.listeners(server.ids["slow"]):
                    break
            assert server.hub.listeners(server.ids["slow"]) == 0, "the slow client was never cut off"
            assert server.hub.dropped_clients == 1
            # After the cut-off the others keep receiving, in order, every one of them (a burst within their
            # queues of 4; a bigger one would cut them off too, and they would resume by Last-Event-ID).
            for i in range(sent + 1, sent + 4):
                for who in ("slow", "alice", "bob"):
                    server.hub.publish(server.ids[who], {"id": i, "campaign": "c", "title": f"n{i}", "body": "b",
                                                         "data": {}, "created_at": T0, "status": "pending"})
            total = sent + 3
            assert await alice.wait(lambda r: len(r.events) >= total)
            assert await bob.wait(lambda r: len(r.events) >= total)
            assert server.hub.dropped_clients == 1  # only the one that never read
            assert [int(e.id or 0) for e in alice.events] == list(range(1, total + 1))
            assert [int(e.id or 0) for e in bob.events] == list(range(1, total + 1))
            assert server.hub.listeners(server.ids["alice"]) == 1 and server.hub.listeners(server.ids["bob"]) == 1
        finally:
            slow_writer.close()
            await alice.close()
            await bob.close()
