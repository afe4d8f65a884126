"""The gateway's shared test fixtures (conftest.py imports them): a database, a service, a runtime.

- ``clock``: a VirtualClock at the test module's ``T0`` (``DEFAULT_T0`` in a module without one), so
  each file keeps its own times.
- ``db``: a migrated SQLite database in ``tmp_path``; a copy of one migrated once per worker, so a
  test does not pay for the migrations. A module whose tests must run on both engines overrides it
  with ``any_db``: ``@pytest.fixture`` ``def db(any_db): return any_db``.
- ``any_db``: migrated, once on SQLite and once on a fresh PostgreSQL database (``db_url``).
- ``service``: a GatewayService on ``db`` at ``clock``, as the API and the CLI use it.
- ``runtime_factory``: ``await runtime_factory(settings, **runtime_kwargs)`` starts a Runtime (on
  ``clock`` unless given one, no decision log, ticks left to the test, the API on loopback only); every
  one is stopped at teardown, or earlier with ``await runtime_factory.stop(rt)`` (a restart).
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.app.config import Settings
from gateway.app.runtime import Runtime
from gateway.clock import Clock, VirtualClock
from gateway.profiles.identity import IdentityIndex
from gateway.profiles.service import GatewayService
from gateway.security.tokens import TokenSigner
from gateway.storage.db import Database

DEFAULT_T0 = 1_780_300_800.0  # 2026-06-01 08:00 UTC
SERVICE_SECRET = b"shared-fixture-token-secret-0123"


@pytest.fixture
def clock(request: pytest.FixtureRequest) -> VirtualClock:
    return VirtualClock(float(getattr(request.module, "T0", DEFAULT_T0)))


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty SQLite database migrated once (Database.upgrade); ``db`` hands out copies."""
    path = tmp_path_factory.mktemp("migrated") / "template.db"
    template = Database(f"sqlite:///{path}")
    template.upgrade()
    template.dispose()  # the last connection to close checkpoints the WAL into the file
    return path


def migrated_copy(template: Path, path: Path) -> Database:
    """A database at ``path``, a copy of the migrated ``template`` (for a fixture of a wider scope)."""
    shutil.copyfile(template, path)
    return Database(f"sqlite:///{path}")


@pytest.fixture
def db(tmp_path: Path, migrated_sqlite: Path) -> Iterator[Database]:
    database = migrated_copy(migrated_sqlite, tmp_path / "gw.db")
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def any_db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.upgrade()
    try:
        yield database
    finally:
        database.dispose()


def make_service(db: Database, clock: Clock, identities: IdentityIndex | None = None,
                 **options: Any) -> GatewayService:
    """The plain service of the fixture on another database or clock; ``options`` go to its constructor."""
    return GatewayService(db, identities or IdentityIndex(), clock, TokenSigner(SERVICE_SECRET), **options)


@pytest.fixture
def service(db: Database, clock: VirtualClock) -> GatewayService:
    return make_service(db, clock)


def runtime_settings(tmp_path: Path) -> Settings:
    """What every test's runtime has of its own: a data dir and SQLite file in ``tmp_path``, a free port on
    loopback for its API, no MQTT; the test sets the rest."""
    from tests.conftest import free_port  # conftest imports this module: its names exist by the time of a call

    s = Settings()
    s.data_dir = str(tmp_path)
    s.database.url = f"sqlite:///{tmp_path / 'gw.db'}"
    s.api.host, s.api.port = "127.0.0.1", free_port()
    s.mqtt.enabled = False
    return s


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RuntimeFactory:
    """Starts runtimes for one test and stops every one it started."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.started: list[Runtime] = []

    async def __call__(self, settings: Settings, **kwargs: Any) -> Runtime:
        if kwargs.get("serve_api", True) and not _loopback(settings.api.host):
            raise ValueError(f"a test's API listens on loopback only, not {settings.api.host!r}")
        kwargs.setdefault("clock", self.clock)
        kwargs.setdefault("on_outcome", None)
        kwargs.setdefault("tick_s", 3600)
        rt = Runtime(settings, **kwargs)
        self.started.append(rt)  # stopped at teardown even if its start fails half-way
        await rt.start()
        return rt

    async def stop(self, rt: Runtime) -> None:
        self.started.remove(rt)
        await rt.stop()

    async def stop_all(self) -> None:
        while self.started:
            await self.stop(self.started[-1])


@pytest.fixture
async def runtime_factory(clock: VirtualClock) -> AsyncIterator[RuntimeFactory]:
    factory = RuntimeFactory(clock)
    try:
        yield factory
    finally:
        await factory.stop_all()

#: gateway.toml with two receivers 10 m apart, "left" at a and "right" at b (3 m bands): the presence
#: tests' smallest floor (replay, calibration).
TWO_RECEIVERS = """
[[receivers]]
id = "a"
measured_power = -59
zones = [{ name = "left", max_m = 3.0 }]

[[receivers]]
id = "b"
measured_power = -59
zones = [{ name = "right", max_m = 3.0 }]
"""


def self_signed_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it, made with `cryptography`: the
    paths of the CA, the certificate and its key (for a Mosquitto TLS listener on loopback)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test ca")).issuer_name(name("test ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    for p in paths:
        p.chmod(0o644)
    return paths
