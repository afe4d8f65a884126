"""Shared by the delivery benchmarks: a live gateway (Runtime, uvicorn on loopback, SQLite) and a
light SSE client for another process (raw asyncio sockets, HTTP/1.0 so the stream is not chunked).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# The gateway is imported inside the server-side functions: the client processes (spawned) stay light.


UUID = "f7826da6-4fa2-4e98-8024-bc5b71e0893e"
CAMPAIGN = """\
id: bench-enter
name: Welcome on entering the shop
purpose: offers
trigger: {type: enter, zone: shop}
action: {title: "Welcome {profile.name}", body: "Show this at the till for a coffee."}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def bench_settings(tmp: Path, port: int) -> Settings:
    from gateway.app.config import Settings
    from gateway.presence.settings import ReceiverSettings, ZoneBand

    camp = tmp / "campaigns"
    camp.mkdir(parents=True, exist_ok=True)
    (camp / "enter.yaml").write_text(CAMPAIGN)
    s = Settings()
    s.data_dir = str(tmp)
    s.database.url = f"sqlite:///{tmp / 'bench.db'}"
    s.api.port = port
    s.api.admin_key = "bench-admin-key-0123456789"
    s.api.heartbeat_s = 30.0
    s.campaigns.dir = str(camp)
    s.presence.enter_hold_s = 0.0
    s.engine.caps = []
    s.receivers = [ReceiverSettings(id="rx", zones=[ZoneBand("shop", 50.0)], measured_power=-59)]
    return s


def beacon_key(minor: int, major: int = 1) -> str:
    return f"ibeacon:{UUID}:{major}:{minor}"


def enrol_many(db: Any, n: int, now: float, beacons: bool = True) -> list[int]:
    """n profiles with the offers consent (and beacon ``1:i`` each), in one transaction."""
    from sqlalchemy import insert

    from gateway.storage.models import Consent, Identifier, Profile

    with db.session() as s:
        first = (s.execute(insert(Profile).returning(Profile.id), [
            {"external_id": f"bench-{i}", "name": f"P{i}", "attributes": {}, "created_at": now}
            for i in range(n)]).scalars().all())
        ids = list(first)
        s.execute(insert(Consent), [{"profile_id": pid, "purpose": "offers", "granted": True, "updated_at": now,
                                     "source": "bench"} for pid in ids])
        if beacons:
            s.execute(insert(Identifier), [{"profile_id": pid, "kind": "beacon", "value": beacon_key(i),
                                            "created_at": now} for i, pid in enumerate(ids)])
    return ids


# ------------------------------------------------------------------ the client side (another process)


class Stream:
    """One SSE connection over a raw socket; ``events`` collects (receipt time, parsed data)."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.ready = asyncio.Event()
        self.failed: str | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()

    async def run(self, expected: int) -> None:
        """Read until ``expected`` notifications arrived; the socket stays open (``close()`` it) so a
        client hanging up does not add work to the server while others are still being served."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
        except OSError as exc:
            self.failed = str(exc)
            self.ready.set()
            return
        self.writer = writer
        writer.write(f"GET /v1/me/stream?access_token={self.token} HTTP/1.0\r\nHost: bench\r\n"
                     "Accept: text/event-stream\r\n\r\n".encode())
        try:
            status = await reader.readline()
            if b" 200 " not in status:
                self.failed = status.decode(errors="replace").strip()
                return
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            while True:
                line = await reader.readline()
                if not line:
                    return
                if line.startswith(b": stream"):
                    self.ready.set()
                elif line.startswith(b"data:"):
                    self.events.append((time.time(), json.loads(line[5:])))
                    if len(self.events) >= expected:
                        return
        except OSError as exc:
            self.failed = str(exc)
        finally:
            self.ready.set()


async def open_streams(port: int, tokens: Iterable[str], expected: int = 1,
                       connect_concurrency: int = 100) -> tuple[list[Stream], list[asyncio.Task[None]]]:
    """Connect every stream (at most ``connect_concurrency`` handshakes at once) and wait until each is live."""
    streams = [Stream(port, t) for t in tokens]
    tasks: list[asyncio.Task[None]] = []
    for i in range(0, len(streams), connect_concurrency):
        batch = streams[i:i + connect_concurrency]
        tasks += [asyncio.create_task(s.run(expected)) for s in batch]
        await asyncio.gather(*(s.ready.wait() for s in batch))
    return streams, tasks
