"""kill -9 of the gateway while it commits and streams notifications, then a restart on the same
database and port: an acking SSE client that resumes with Last-Event-ID gets every committed
notification exactly once.

"Exactly once" here means what the app can observe and rely on:

- the set of notification ids the client processed equals the set of notifications committed
  in the database at the end (nothing committed is lost, nothing uncommitted is invented);
- no id reaches the client twice, across both connections: the client resumes with
  Last-Event-ID = the last id it received, the server replays only unacked ones after it, and
  ids are monotonic. (An app must still dedup by id, as this client does: a notification
  received but not yet acked at the crash is unacked in the database; with a Last-Event-ID
  older than it, it would legitimately be sent again. The test counts raw receipts, so such a
  re-send would show here.)
- every notification ends acked in the database: acks that died with the server are re-sent.

The gateway runs as a subprocess (tests/crash_gateway.py): Runtime, real uvicorn on a free port,
SQLite in tmp, tags walked into the shop at the scanner boundary. Bounded in time throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

import httpx

from tests.conftest import free_port
from tests.sse import SseReader

ROOT = Path(__file__).resolve().parents[1]
TAGS = 30  # one notification per tag per run
KILL_AFTER = 6  # notifications the client has processed when the gateway is killed


class Gateway:
    """One gateway process; its stdout lines are read by a thread into a queue."""

    def __init__(self, db: Path, port: int, data_dir: Path) -> None:
        self.errors = data_dir / f"gateway-{len(list(data_dir.glob('gateway-*.err')))}.err"
        self._stderr = self.errors.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.crash_gateway", "--db", str(db), "--port", str(port),
             "--data-dir", str(data_dir), "--beacons", str(TAGS)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._expected = 0  # seen[:_expected] were looked at by ``expect``
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, out: IO[str]) -> None:
        for line in out:
            self.lines.put(line.strip())

    async def expect(self, word: str, timeout: float = 30.0) -> list[str]:
        """The first line starting with ``word`` (bounded wait), split in words."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._expected < len(self.seen):  # lines ``said`` read meanwhile count too
            line = self.seen[self._expected]
            self._expected += 1
            if line.startswith(word):
                return line.split()
        while loop.time() < deadline:
            if self.proc.poll() is not None and self.lines.empty():
                break
            try:
                line = await asyncio.to_thread(self.lines.get, True, 0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            self._expected = len(self.seen)
            if line.startswith(word):
                return line.split()
        raise AssertionError(f"gateway did not print {word} (exit {self.proc.poll()}, saw {self.seen}); "
                             f"stderr: {self.errors.read_text()[-2000:]}")

    def said(self, word: str) -> bool:
        while not self.lines.empty():
            self.seen.append(self.lines.get_nowait())
        return any(line.startswith(word) for line in self.seen)

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._stderr.close()


class AckingClient:
    """The app: processes each notification once (dedup by id), acks it, re-sends failed acks."""

    def __init__(self, http: httpx.AsyncClient, token: str) -> None:
        self.http = http
        self.auth = {"Authorization": f"Bearer {token}"}
        self.receipts: list[int] = []  # every event received, duplicates included
        self.processed: set[int] = set()
        self.unacked: set[int] = set()
        self._handled: dict[int, int] = {}  # per reader: how many of its events were handled

    async def ack(self, nid: int) -> None:
        try:
            r = await self.http.post(f"/v1/me/notifications/{nid}/ack", headers=self.auth)
            if r.status_code == 200:
                self.unacked.discard(nid)
        except httpx.HTTPError:
            pass  # the server died under us: ack again after the reconnect

    async def consume(self, reader: SseReader, done: object, timeout: float = 40.0) -> None:
        """Handle events as they come until ``done()`` or the stream ends (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        handled = self._handled.get(id(reader), 0)
        while loop.time() < deadline:
            seen = handled
            await reader.wait(lambda r, seen=seen: len(r.events) > seen or done(), timeout=0.5)  # type: ignore[operator]
            while handled < len(reader.events):  # events keep arriving while we ack
                ev = reader.events[handled]
                handled = self._handled[id(reader)] = handled + 1
                nid = int(ev.id or 0)
                self.receipts.append(nid)
                if nid not in self.processed:
                    self.processed.add(nid)
                    self.unacked.add(nid)
                    await self.ack(nid)
            if done() or (reader._task is not None and reader._task.done()):  # type: ignore[operator]
                return
        raise AssertionError(f"client timed out with {len(self.processed)} processed")

    async def resume(self, token: str, caught_up: Callable[[], bool]) -> SseReader:
        """After a failover: re-send the acks that died, resume the stream from the last id received, handle
        events until ``caught_up()``, ack what is left. The caller closes the reader it returns."""
        for nid in sorted(self.unacked):
            await self.ack(nid)
        resumed = await SseReader(self.http, f"/v1/me/stream?access_token={token}",
                                  {"Last-Event-ID": str(max(self.receipts))}).start()
        assert resumed.status == 200
        try:
            await self.consume(resumed, caught_up)
            for nid in sorted(self.unacked):
                await self.ack(nid)
        except BaseException:
            await resumed.close()
            raise
        return resumed

    def check_exactly_once(self, final: dict[int, str]) -> None:
        """Every notification committed at the end processed, none received twice, all acked."""
        assert self.processed == set(final), (sorted(set(final) - self.processed),
                                              sorted(self.processed - set(final)))
        duplicates = sorted(n for n in self.processed if self.receipts.count(n) > 1)
        assert duplicates == [], f"delivered twice: {duplicates}"
        assert self.unacked == set() and set(final.values()) == {"acked"}


def committed(db: Path, profile_id: int) -> dict[int, str]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        return dict(conn.execute("SELECT id, status FROM notifications WHERE profile_id = ?", (profile_id,)))


async def test_kill_9_during_dispatch_then_restart_loses_nothing_and_sends_nothing_twice(tmp_path: Path) -> None:
    db, port = tmp_path / "gw.db", free_port()
    first = Gateway(db, port, tmp_path)
    second: Gateway | None = None
    readers: list[SseReader] = []
    try:
        _, pid_s, token = await first.expect("READY")
        pid = int(pid_s)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            app = AckingClient(http, token)
            reader = await SseReader(http, f"/v1/me/stream?access_token={token}").start()
            readers.append(reader)
            assert reader.status == 200
            acking = asyncio.create_task(app.consume(reader, lambda: False))  # until the stream ends
            assert await reader.wait(lambda r: len(r.events) >= KILL_AFTER, timeout=30)
            first.kill9()  # mid-run: tags are still walking in, notifications being committed and streamed
            assert not first.said("DONE"), "the gateway finished before the kill: nothing was in flight"
            at_kill = committed(db, pid)
            await acking  # whatever was on the wire is handled; acks that hit the dead server are kept
            assert 0 < len(at_kill) < TAGS

            second = Gateway(db, port, tmp_path)  # same database, same port
            await second.expect("READY")

            def caught_up() -> bool:
                return second is not None and second.said("DONE") and set(committed(db, pid)) <= app.processed

            readers.append(await app.resume(token, caught_up))
    finally:
        for r in readers:
            await r.close()
        first.kill9()
        if second is not None:
            second.kill9()

    final = committed(db, pid)
    assert len(final) >= len(at_kill) + TAGS  # the second run walked every tag in again
    app.check_exactly_once(final)
