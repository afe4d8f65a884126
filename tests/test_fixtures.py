"""The shared fixtures keep their promises: a migrated private database, the module's time, loopback only."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gateway.profiles.service import GatewayService, NewProfile
from gateway.storage.db import Database
from tests.fixtures import RuntimeFactory
from tests.live_gateway import live_settings

T0 = 1_767_261_600.0


def test_db_is_migrated_and_empty_and_service_runs_at_the_modules_time(db: Database,
                                                                          service: GatewayService) -> None:
    assert db.schema_state() == "current"
    assert service.db is db
    created = service.create_profile(NewProfile(external_id="ann"))
    assert created["id"] == 1 and created["created_at"] == T0


def test_each_test_gets_its_own_database_file(db: Database, tmp_path: Path) -> None:
    assert db.url == f"sqlite:///{tmp_path / 'gw.db'}"


async def test_a_runtime_serves_on_loopback_only(runtime_factory: RuntimeFactory, tmp_path: Path) -> None:
    settings = live_settings(tmp_path)
    settings.api.host = "0.0.0.0"
    with pytest.raises(ValueError, match="loopback"):
        await runtime_factory(settings)


async def test_a_runtime_stopped_early_closes_its_port(runtime_factory: RuntimeFactory, tmp_path: Path) -> None:
    settings = live_settings(tmp_path)
    rt = await runtime_factory(settings)
    assert rt.clock.now() == T0
    socket.create_connection(("127.0.0.1", settings.api.port), timeout=2).close()
    await runtime_factory.stop(rt)
    assert runtime_factory.started == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", settings.api.port), timeout=2).close()
