"""Two gateways for one store on one PostgreSQL: active/standby under the store's lease.

Two real processes (tests/pair_gateway.py, which takes the lease as ``gateway run`` does): the first
leads, the second waits as standby. An acking SSE client (the app) follows whichever one serves.
kill -9 of the leader mid-stream: the standby takes the lease, recovers what was committed and not
dispatched, and the client that resumes there with Last-Event-ID ends with every committed
notification processed once, none received twice, all acked. kill -9 of the standby changes nothing
for the client. "Exactly once" is what tests/test_crash_recovery.py defines; receipts are counted raw.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from gateway.storage.lease import Lease
from tests.conftest import _pg_connect, free_port, fresh_pg_database
from tests.sse import SseReader
from tests.test_crash_recovery import KILL_AFTER, TAGS, AckingClient, Gateway

ROOT = Path(__file__).resolve().parents[1]


class PairGateway(Gateway):
    """One of the pair: tests/pair_gateway.py on the shared database, its own port and data dir."""

    def __init__(self, url: str, port: int, data_dir: Path) -> None:
        import queue

        data_dir.mkdir(parents=True, exist_ok=True)
        self.errors = data_dir / f"gateway-{len(list(data_dir.glob('gateway-*.err')))}.err"
        self._stderr = self.errors.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.pair_gateway", "--db-url", url, "--port", str(port),
             "--data-dir", str(data_dir), "--beacons", str(TAGS)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.port = port
        self.lines = queue.Queue()
        self.seen = []
        self._expected = 0
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()


@pytest.fixture
def store_db(pg_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database that both gateways share."""
    with fresh_pg_database(pg_url, "gw_pair") as url:
        yield url


def committed(url: str, profile_id: int) -> dict[int, str]:
    with _pg_connect(url, autocommit=True) as conn:
        return dict(conn.execute("SELECT id, status FROM notifications WHERE profile_id = %s", (profile_id,)))


async def test_kill_9_of_the_leader_mid_stream_the_standby_takes_over_nothing_lost_nothing_twice(
        store_db: str, tmp_path: Path) -> None:
    leader = PairGateway(store_db, free_port(), tmp_path / "a")
    standby: PairGateway | None = None
    readers: list[SseReader] = []
    try:
        await leader.expect("LEADER")
        _, pid_s, token = await leader.expect("READY")
        pid = int(pid_s)
        standby = PairGateway(store_db, free_port(), tmp_path / "b")
        await standby.expect("STANDBY")
        async with httpx.AsyncClient(timeout=5) as http:
            http.base_url = f"http://127.0.0.1:{leader.port}"
            app = AckingClient(http, token)
            reader = await SseReader(http, f"/v1/me/stream?access_token={token}").start()
            readers.append(reader)
            assert reader.status == 200
            acking = asyncio.create_task(app.consume(reader, lambda: False))  # until the stream ends
            assert await reader.wait(lambda r: len(r.events) >= KILL_AFTER, timeout=30)
            leader.kill9()  # mid-run: notifications are being committed and streamed
            assert not leader.said("DONE"), "the leader finished before the kill: nothing was in flight"
            at_kill = committed(store_db, pid)
            await acking
            assert 0 < len(at_kill) < TAGS
            assert not standby.said("READY"), "the standby ran before the leader died"

            await standby.expect("LEADER")  # the lease was freed with the killed process's session
            await standby.expect("READY")
            http.base_url = f"http://127.0.0.1:{standby.port}"  # the app fails over to the other address
            new = standby

            def caught_up() -> bool:
                return new.said("DONE") and set(committed(store_db, pid)) <= app.processed

            readers.append(await app.resume(token, caught_up))
    finally:
        for r in readers:
            await r.close()
        leader.kill9()
        if standby is not None:
            standby.kill9()

    final = committed(store_db, pid)
    assert len(final) >= len(at_kill) + TAGS  # the new leader walked every tag in again
    app.check_exactly_once(final)


async def test_kill_9_of_the_standby_mid_stream_changes_nothing_for_the_client(
        store_db: str, tmp_path: Path) -> None:
    leader = PairGateway(store_db, free_port(), tmp_path / "a")
    standby: PairGateway | None = None
    third: PairGateway | None = None
    readers: list[SseReader] = []
    try:
        await leader.expect("LEADER")
        _, pid_s, token = await leader.expect("READY")
        pid = int(pid_s)
        standby = PairGateway(store_db, free_port(), tmp_path / "b")
        await standby.expect("STANDBY")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{leader.port}", timeout=5) as http:
            app = AckingClient(http, token)
            reader = await SseReader(http, f"/v1/me/stream?access_token={token}").start()
            readers.append(reader)
            done = False

            def caught_up() -> bool:
                return done or (leader.said("DONE") and set(committed(store_db, pid)) <= app.processed)

            acking = asyncio.create_task(app.consume(reader, caught_up))
            assert await reader.wait(lambda r: len(r.events) >= KILL_AFTER, timeout=30)
            standby.kill9()
            await acking
            done = True
            for nid in sorted(app.unacked):
                await app.ack(nid)
        third = PairGateway(store_db, free_port(), tmp_path / "c")
        await third.expect("STANDBY")  # the leader still holds the lease: a new standby waits
    finally:
        for r in readers:
            await r.close()
        for g in (leader, standby, third):
            if g is not None:
                g.kill9()
    final = committed(store_db, pid)
    assert len(final) == TAGS
    app.check_exactly_once(final)


def test_the_lease_is_one_holders_and_free_when_its_session_dies(store_db: str) -> None:
    first, second = Lease(store_db, "store-1"), Lease(store_db, "store-1")
    other_store = Lease(store_db, "store-2")
    try:
        assert first.try_acquire() and not second.try_acquire()
        assert other_store.try_acquire()  # stores sharing one database do not wait for each other
        assert first._conn is not None
        holder = first._conn.execute(text("SELECT pg_backend_pid()")).scalar()
        with _pg_connect(store_db, autocommit=True) as conn:  # the holder's session ends, as under kill -9
            conn.execute("SELECT pg_terminate_backend(%s)", (holder,))
        assert not first.still_held()  # the holder notices and must stop
        assert second.try_acquire()
    finally:
        for lease in (first, second, other_store):
            lease.release()


def test_on_sqlite_the_lease_is_a_lock_beside_the_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/gw.db"
    first, second = Lease(url, "store-1"), Lease(url, "store-1")
    try:
        assert first.try_acquire() and not second.try_acquire()
        first.release()  # a clean stop hands over at once
        assert second.try_acquire() and second.still_held()
    finally:
        first.release()
        second.release()


class GatewayRun(Gateway):
    """``gateway run --config F --no-ble``, the command a shop's service runs; stdout read by a thread."""

    def __init__(self, config: Path, data_dir: Path) -> None:
        import queue

        self.errors = data_dir / "run.err"
        self._stderr = self.errors.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.app.cli", "run", "--config", str(config),
                                      "--no-ble"], cwd=ROOT, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.lines = queue.Queue()
        self.seen = []
        self._expected = 0
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()


def run_config(tmp_path: Path, url: str, name: str, port: int) -> Path:
    data = tmp_path / name
    data.mkdir()
    cfg = data / "gw.toml"
    cfg.write_text(f'data_dir = "{data}"\n[database]\nurl = "{url}"\n[api]\nport = {port}\n'
                   'admin_key = "pair-admin-key-0123456789"\n[mqtt]\nenabled = false\n'
                   f'[campaigns]\ndir = "{ROOT / "examples/campaigns"}"\n')
    return cfg


async def test_two_gateway_runs_one_waits_as_standby_and_serves_once_the_leader_is_killed(
        store_db: str, tmp_path: Path) -> None:
    ports = free_port(), free_port()
    first = GatewayRun(run_config(tmp_path, store_db, "a", ports[0]), tmp_path / "a")
    second: GatewayRun | None = None
    try:
        await first.expect("gateway running")
        second = GatewayRun(run_config(tmp_path, store_db, "b", ports[1]), tmp_path / "b")
        await second.expect("gateway standby")
        async with httpx.AsyncClient(timeout=5) as http:
            assert (await http.get(f"http://127.0.0.1:{ports[0]}/health/ready")).status_code == 200
            with pytest.raises(httpx.ConnectError):  # the standby runs nothing, not even its API
                await http.get(f"http://127.0.0.1:{ports[1]}/health/ready")
            first.kill9()
            await second.expect("gateway running")  # the lease went with the killed process's session
            assert (await http.get(f"http://127.0.0.1:{ports[1]}/health/ready")).status_code == 200
    finally:
        first.kill9()
        if second is not None:
            second.kill9()
