"""Shared test infrastructure: a private Mosquitto per session and databases per test; the gateway's
fixtures (database, service, runtime) are tests/fixtures.py's.

Everything real that a test talks to is started here, on a free port, and torn down here: the
suite never touches the machine's own broker on 1883. Waits are for processes to become ready
and are always bounded.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
import pytest

from tests.fixtures import any_db, clock, db, migrated_sqlite, runtime_factory, service

__all__ = ["any_db", "clock", "db", "migrated_sqlite", "runtime_factory", "service"]  # the gateway's fixtures

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MOSQUITTO_FALLBACK = "/usr/sbin/mosquitto"  # Debian installs it outside a normal user's PATH
READY_TIMEOUT = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = READY_TIMEOUT, proc: Any = None) -> bool:
    """Poll until host:port accepts TCP (True), the process dies or the time is up (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def _mosquitto_binary() -> str:
    found = shutil.which("mosquitto")
    if found is None and os.access(MOSQUITTO_FALLBACK, os.X_OK):
        found = MOSQUITTO_FALLBACK
    if found is None:
        pytest.fail(
            "mosquitto is needed for the tests and was not found on PATH or at /usr/sbin/mosquitto: "
            "sudo apt-get install mosquitto",
            pytrace=False,
        )
    return found


@dataclass
class MosquittoServer:
    """A Mosquitto process of our own. ``restart()`` keeps the port, as a real broker restart would."""

    binary: str
    workdir: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None
    extra: str = ""
    """More mosquitto.conf lines; a later line overrides an earlier one (``persistence true``...)."""

    @property
    def config_file(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_file(self) -> Path:
        return self.workdir / "mosquitto.log"

    def start(self) -> None:
        self.config_file.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_queued_messages 100000\n"
            "log_dest stderr\n"
            f"{self.extra}\n"
        )
        # Logging to an inherited fd: mosquitto may drop root to its own user and could not open a file.
        self._log = self.log_file.open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        if not wait_for_port(self.host, self.port, READY_TIMEOUT, self.proc):
            self.stop()
            pytest.fail(
                f"mosquitto did not accept connections on {self.host}:{self.port} within {READY_TIMEOUT} s; "
                f"its log:\n{self.log_file.read_text(errors='replace')[-2000:]}",
                pytrace=False,
            )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoServer]:
    """A Mosquitto broker for the whole session, on a free port of 127.0.0.1."""
    server = MosquittoServer(binary=_mosquitto_binary(), workdir=tmp_path_factory.mktemp("mosquitto"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- MQTT test clients -----------------------------------------------------------------------


class PahoTestClient:
    """A plain paho client for tests: publishes, and records what it receives.

    Its waits block the calling thread, bounded by a timeout; from a coroutine whose event loop
    runs the broker (amqtt), call them through ``asyncio.to_thread``.
    """

    def __init__(self, host: str, port: int, protocol: str = "5", client_id: str | None = None) -> None:
        version = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{secrets.token_hex(4)}",
            protocol=version,
        )
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._subacks: set[int] = set()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            self._connected.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._cond:
            self._subacks.add(mid)
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait_connected(self, timeout: float = 5.0) -> bool:
        return self._connected.wait(timeout)

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> None:
        """Subscribe and wait for the SUBACK, so nothing published afterwards is missed."""
        assert self.wait_connected(timeout), "test client did not connect"
        _, mid = self.client.subscribe(topic, qos)
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._subacks, timeout), f"no SUBACK for {topic}"

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def publish_wait(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        self.publish(topic, payload, qos, retain).wait_for_publish(5.0)

    def wait_for(self, predicate: Callable[[list[mqtt.MQTTMessage]], bool], timeout: float = 5.0) -> bool:
        """Wait until predicate(messages so far) holds; False when the time is up."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mqtt_client() -> Iterator[Callable[..., PahoTestClient]]:
    """Factory for PahoTestClient(host, port, protocol="5"); every client is closed at teardown."""
    made: list[PahoTestClient] = []

    def make(host: str, port: int, protocol: str = "5", client_id: str | None = None) -> PahoTestClient:
        client = PahoTestClient(host, port, protocol, client_id)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


# -- databases --------------------------------------------------------------------------------


def _pg_connect(url: str, dbname: str | None = None, autocommit: bool = False) -> Any:
    """A psycopg connection for a SQLAlchemy-style URL, failing fast (2 s) if nothing answers."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return psycopg.connect(
        host=u.host or "127.0.0.1",
        port=u.port or 5432,
        user=u.username,
        password=u.password,
        dbname=dbname or u.database,
        connect_timeout=2,
        autocommit=autocommit,
    )


@pytest.fixture(scope="session")
def pg_url() -> str:
    """URL of a reachable PostgreSQL: $GATEWAY_TEST_POSTGRES_URL, else the local default.

    Skipped when none answers, except in CI, where a missing database is a broken setup.
    """
    from sqlalchemy.engine import make_url

    url = os.environ.get("GATEWAY_TEST_POSTGRES_URL") or DEFAULT_PG_URL
    try:
        _pg_connect(url).close()
    except Exception as exc:
        shown = make_url(url).render_as_string(hide_password=True)
        message = f"PostgreSQL not reachable at {shown}: {exc}".strip()
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set: the PostgreSQL tests must run)", pytrace=False)
        pytest.skip(f"{message}; set GATEWAY_TEST_POSTGRES_URL to run them")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database per test, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/gw.db"
        return

    with fresh_pg_database(request.getfixturevalue("pg_url"), "gw_test") as url:
        yield url


@contextlib.contextmanager
def fresh_pg_database(base: str, prefix: str) -> Iterator[str]:
    """A new, empty PostgreSQL database on ``base``'s server, its URL yielded, dropped afterwards (forced:
    a killed process's sessions may linger)."""
    from psycopg import sql
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{secrets.token_hex(6)}"
    with _pg_connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with _pg_connect(base, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
