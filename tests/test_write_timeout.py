"""A stream client that stops reading is disconnected after ``[api] stream_write_timeout_s``.

A live Runtime (real uvicorn on loopback) and a raw socket with a small receive buffer that opens the
SSE stream, or the WebSocket, with a valid app token and then never reads. Enough notifications are
published to fill the kernel's buffers both sides and the transport's, so the server's send blocks.
Fewer than the hub's queue holds: the hub never drops the client for falling behind, so only the
write timeout can end it. The test polls (bounded) until the hub has no listener, the
``gateway_stream_clients`` gauge says 0 and the socket, read at last, ends in EOF or a reset.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from pathlib import Path

import pytest

from tests.live_gateway import T0, enrol, live_settings, running

WRITE_TIMEOUT_S = 0.5
BODY = "x" * 65_536  # per notification; the stream frames it as one SSE event or one WebSocket message


def _buffers_bytes() -> int:
    """What can sit unread on the connection: the server's send buffer at its largest (autotuned up to
    tcp_wmem's maximum), the client's fixed 4 KiB receive buffer (doubled by the kernel) and the
    transport's 64 KiB high-water mark, with room to spare."""
    try:
        send_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        send_max = 4 << 20
    return send_max + (1 << 20)


async def _open(port: int, request: bytes) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a phone on a dead network: tiny window
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, request)
    return sock


def _request(kind: str, token: str) -> bytes:
    if kind == "sse":
        return (f"GET /v1/me/stream?access_token={token} HTTP/1.1\r\nHost: test\r\n"
                "Accept: text/event-stream\r\n\r\n").encode()
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /v1/me/ws?access_token={token} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


async def _poll(predicate: object, timeout_s: float) -> bool:
    """Wait (bounded) for the server's side of real I/O; True once ``predicate()`` holds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _read_to_the_end(sock: socket.socket, limit: int) -> tuple[int, str]:
    """Read what the kernel kept until the connection ends: (bytes read, "eof" or "reset")."""
    loop = asyncio.get_running_loop()
    read = 0
    async with asyncio.timeout(30):
        while read <= limit:
            try:
                chunk = await loop.sock_recv(sock, 1 << 20)
            except ConnectionResetError:
                return read, "reset"
            if not chunk:
                return read, "eof"
            read += len(chunk)
    return read, "open"


def _gauge(text: str) -> float:
    line = next(ln for ln in text.splitlines() if ln.startswith("gateway_stream_clients "))
    return float(line.split()[1])


@pytest.mark.parametrize("kind", ["sse", "ws"])
async def test_a_client_that_stops_reading_is_disconnected_and_no_longer_counted(tmp_path: Path, kind: str) -> None:
    settings = live_settings(tmp_path)
    settings.api.stream_write_timeout_s = WRITE_TIMEOUT_S
    async with running(settings) as rt:
        pid, token = enrol(rt, "alice", 1)
        sock = await _open(settings.api.port, _request(kind, token))
        try:
            assert await _poll(lambda: rt.hub.listeners(pid) == 1, 10), "the stream never opened"
            assert _gauge(await rt.metrics_text()) == 1
            count = min(rt.hub.queue_size - 16, _buffers_bytes() // len(BODY) + 16)
            assert count * len(BODY) > _buffers_bytes(), "the hub's queue cannot hold enough to fill the buffers"
            for i in range(1, count + 1):
                rt.hub.publish(pid, {"id": i, "campaign": "c", "purpose": "offers", "title": f"n{i}",
                                     "body": BODY, "data": {}, "created_at": T0, "status": "pending"})
            assert await _poll(lambda: rt.hub.listeners(pid) == 0, 30), "the stuck client is still subscribed"
            assert rt.hub.dropped_clients == 0  # it was the write timeout, not the hub's queue, that ended it
            assert rt.hub.open_streams() == 0
            assert _gauge(await rt.metrics_text()) == 0
            read, end = await _read_to_the_end(sock, count * len(BODY))
            assert end in ("eof", "reset"), f"the connection is still open after {read} bytes"
            assert read < count * len(BODY)  # it was cut off, not served to the end
        finally:
            sock.close()


async def test_a_client_that_reads_keeps_its_stream(tmp_path: Path) -> None:
    """The timeout is on a stalled write, not on the stream's age: a client that reads through the same
    small window gets every notification, and its stream stays open."""
    settings = live_settings(tmp_path)
    settings.api.stream_write_timeout_s = 5.0  # never waited for: generous, so a busy machine cannot trip it
    async with running(settings) as rt:
        pid, token = enrol(rt, "bob", 2)
        sock = await _open(settings.api.port, _request("sse", token))
        loop = asyncio.get_running_loop()
        try:
            assert await _poll(lambda: rt.hub.listeners(pid) == 1, 10)
            count = 64  # 4 MiB through a 4 KiB window
            for i in range(1, count + 1):
                rt.hub.publish(pid, {"id": i, "campaign": "c", "purpose": "offers", "title": f"n{i}",
                                     "body": BODY, "data": {}, "created_at": T0, "status": "pending"})
            mark, events, tail = b"event: notification", 0, b""
            async with asyncio.timeout(30):
                while events < count:
                    chunk = await loop.sock_recv(sock, 1 << 20)
                    assert chunk, "the server closed a stream whose client was reading"
                    data = tail + chunk
                    events += data.count(mark)
                    tail = data[-(len(mark) - 1):]
            assert rt.hub.listeners(pid) == 1 and rt.hub.dropped_clients == 0
        finally:
            sock.close()
