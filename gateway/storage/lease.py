"""One active gateway per store: a lease held in the database, so a second gateway waits as standby.

Two gateways for one store hear the same adverts and the same MQTT; if both ran the pipeline each
would decide, and a customer would get the offer twice. So only the lease holder runs anything
(presence, engine, outbox dispatch, API); the other waits and takes over once the lease is free.

On PostgreSQL the lease is a session advisory lock (``pg_try_advisory_lock``) keyed by the store id,
held on a connection of its own: when the holder dies (kill -9, power loss) its socket closes, the
server ends the session and the lock is free at once; there is no expiry to wait out and no clock to
trust. On SQLite, which only processes on one host can share, it is an ``flock`` on a file beside the
database, which the kernel drops with the process. The holder checks its connection every
``check_s``; if the connection is lost, so may be the lock, and the holder must stop (:meth:`watch`
returns) before the standby can have started.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.pool import NullPool

log = logging.getLogger("gateway.storage.lease")


def lease_key(store_id: str) -> int:
    """A signed 64-bit advisory-lock key for a store: stable across processes and versions."""
    digest = hashlib.sha256(f"gateway-store-lease:{store_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Lease:
    """The store's lease: :meth:`acquire` waits for it, :meth:`watch` returns if it is lost."""

    def __init__(self, url: str, store_id: str, *, poll_s: float = 1.0, check_s: float = 1.0) -> None:
        self.url = url
        self.store_id = store_id
        self.poll_s = poll_s
        self.check_s = check_s
        self.key = lease_key(store_id)
        self.held = False
        self._conn: Connection | None = None
        self._file: IO[bytes] | None = None
        u = make_url(url)
        self.kind = "postgresql" if u.get_backend_name() == "postgresql" else "sqlite"
        self._path: Path | None = None
        if self.kind == "sqlite" and u.database and u.database != ":memory:":
            self._path = Path(f"{u.database}.lease")

    # ------------------------------------------------------------ one try (off the event loop)

    def try_acquire(self) -> bool:
        """One attempt; True when this process holds the lease now."""
        if self.held:
            return True
        if self.kind == "postgresql":
            self.held = self._try_pg()
        elif self._path is None:  # an in-memory database: no other process can share it
            self.held = True
        else:
            self.held = self._try_file(self._path)
        return self.held

    def _try_pg(self) -> bool:
        if self._conn is None:
            # Keepalives: a holder behind a dead network is noticed by the server within seconds.
            engine = create_engine(self.url, poolclass=NullPool, isolation_level="AUTOCOMMIT",
                                   connect_args={"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 5,
                                                 "keepalives_interval": 2, "keepalives_count": 3,
                                                 "application_name": f"gateway lease {self.store_id}"[:63]})
            self._conn = engine.connect()
        got = bool(self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar())
        return got

    def _try_file(self, path: Path) -> bool:
        if self._file is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("ab")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._file.truncate(0)
        self._file.write(f"{os.getpid()}\n".encode())
        self._file.flush()
        return True

    def still_held(self) -> bool:
        """Whether the lease is certainly still ours: on PostgreSQL, its connection still answers."""
        if not self.held:
            return False
        if self.kind != "postgresql" or self._conn is None:
            return True
        try:
            self._conn.execute(text("SELECT 1")).scalar()
        except Exception as exc:  # the session, and with it the lock, may be gone
            log.error("the lease of store %s was lost with its database connection: %s", self.store_id,
                      type(exc).__name__)
            self.held = False
        return self.held

    def release(self) -> None:
        """Give the lease up (a clean stop): the standby takes over at its next poll."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                if self.held:
                    self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        self.held = False

    # ------------------------------------------------------------ async: waiting and watching

    async def acquire(self, stop: asyncio.Event | None = None,
                      on_standby: Callable[[], None] | None = None) -> bool:
        """Wait until the lease is ours (True) or ``stop`` is set (False); ``on_standby`` is called once
        if it has to wait. A database that does not answer is waited for too: the standby must outlive
        the holder's outage."""
        waiting_said = False
        while stop is None or not stop.is_set():
            try:
                if await asyncio.to_thread(self.try_acquire):
                    return True
            except Exception as exc:  # unreachable database: try again, quietly after the first line
                self._drop_connection()
                log.warning("lease of store %s: database unreachable (%s); waiting", self.store_id,
                            type(exc).__name__)
            if not waiting_said:
                log.info("store %s: another gateway holds the lease; waiting as standby", self.store_id)
                waiting_said = True
                if on_standby is not None:
                    on_standby()
            await _wait(stop, self.poll_s)
        return False

    async def watch(self) -> None:
        """Return as soon as the lease may be lost (the holder must then stop deciding)."""
        while await asyncio.to_thread(self.still_held):
            await asyncio.sleep(self.check_s)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


async def _wait(stop: asyncio.Event | None, seconds: float) -> None:
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)

