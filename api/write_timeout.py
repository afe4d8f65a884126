"""A write timeout for every HTTP response and WebSocket: a client that stops reading is cut off.

uvicorn has none. Once the transport's buffer is past its high-water mark, its ``send`` waits for the
peer to read (``flow.drain()`` for HTTP, ``writable.wait()`` for WebSockets) with no deadline, so a phone
that went into a tunnel with the live stream open kept its connection, several MB in the kernel's
buffers and its stream task until it read again, if ever; the hub had already dropped it for falling
behind, so ``gateway_stream_clients`` no longer counted it.

Here the server's own ``send`` is wrapped: one that cannot finish within ``timeout_s`` aborts the
connection. ``transport.abort()``, not ``close()``: asyncio's close waits for the buffer to drain, which
is exactly what does not happen; abort drops the buffer and resets the connection at once. uvicorn's
``connection_lost`` then tells the app (``http.disconnect``; a WebSocket send or receive raises), so the
stream's ``finally`` unsubscribes it from the hub. The transport is the one uvicorn's ``send`` is bound to
(its HTTP request cycle and its WebSocket protocols both keep it as ``transport``), which is why this
layer must sit outside every middleware that wraps ``send`` in a closure: ``install`` puts it around the
whole middleware stack. Under a server whose ``send`` holds no transport (a test client), a stalled send
raises OSError instead, which ends the app's stream the same way.

Bytes can also be left in the buffer after the app has returned (a WebSocket close frame, the end of a
stream whose token expired); uvicorn then calls ``close()``, which waits for a reader that may never
come, so the transport is watched and aborted if its buffer does not shrink for ``timeout_s``.

The alternative, ``TCP_USER_TIMEOUT`` on the listening socket, is Linux-only, lives in the runtime's
server setup rather than the app, and leaves the stream task waiting until the kernel gives up.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("api")


class _Transport(Protocol):
    def abort(self) -> None: ...

    def get_write_buffer_size(self) -> int: ...


def transport_of(send: Send) -> _Transport | None:
    """The asyncio transport behind the server's ``send``, if the server keeps it where uvicorn does."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if callable(getattr(transport, "abort", None)) and callable(getattr(transport, "get_write_buffer_size", None)):
        return transport
    return None


class WriteTimeout:
    """Pure ASGI; outermost, so it receives the server's ``send`` unwrapped."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.timeout_s <= 0:
            await self.app(scope, receive, send)
            return
        transport = transport_of(send)
        timeout_s = self.timeout_s

        async def timed_send(message: Message) -> None:
            try:
                async with asyncio.timeout(timeout_s):
                    await send(message)
            except TimeoutError:
                log.warning("a client read nothing for %.0f s: its connection is closed (%s %s)", timeout_s,
                            scope.get("method", "WebSocket"), scope.get("path", ""))
                if transport is None:
                    raise OSError(f"the client read nothing for {timeout_s:.0f} s") from None
                transport.abort()  # connection_lost follows: the app sees the disconnect

        try:
            await self.app(scope, receive, timed_send)
        finally:
            if transport is not None:
                _watch_drain(asyncio.get_running_loop(), transport, timeout_s, None)


def _watch_drain(loop: asyncio.AbstractEventLoop, transport: _Transport, timeout_s: float,
                 last: int | None) -> None:
    """Abort ``transport`` once its write buffer has not shrunk for ``timeout_s``; stop when it is empty."""
    try:
        size = transport.get_write_buffer_size()
    except Exception:  # closed under us: nothing left to watch
        return
    if size == 0:
        return
    if last is not None and size >= last:
        log.warning("a client read nothing for %.0f s after its answer: its connection is closed", timeout_s)
        transport.abort()
        return
    loop.call_later(timeout_s, _watch_drain, loop, transport, timeout_s, size)


def install(app: FastAPI, timeout_s: float) -> None:
    """Wrap the app's whole middleware stack (built on the first request) in the write timeout."""
    build = app.build_middleware_stack

    def build_with_timeout() -> Any:
        return WriteTimeout(build(), timeout_s)

    app.build_middleware_stack = build_with_timeout  # type: ignore[method-assign]
