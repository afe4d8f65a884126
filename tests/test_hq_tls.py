"""Head office's connections over TLS, as the store's intake makes them: the store's uplink and head
office's consumer take [mqtt]'s tls, ca_file and tls_verify through the one helper the intake uses
(``devices.mqtt.secure_client``). On a real Mosquitto TLS listener on loopback with a throwaway CA: an
event the uplink publishes over TLS reaches head office's database over TLS; a consumer whose CA did not
sign the broker's certificate never connects (nothing subscribed, nothing received), and connects once
told not to verify (``tls_verify = false``), so the refusal is the verification."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from devices.mqtt import MqttSettings
from gateway.clock import VirtualClock
from gateway.hq.consumer import HqConsumer
from gateway.hq.uplink import Uplink, UplinkThread
from gateway.profiles.service import NewProfile
from gateway.storage.db import Database
from gateway.storage.models import Decision
from tests.conftest import MosquittoServer, _mosquitto_binary
from tests.fixtures import make_service, self_signed_ca
from tests.test_hq_bridge import (
    hq_db,  # noqa: F401  # the fixture: a fresh PostgreSQL for head office
    wait_until,
)

T0 = 1_780_300_800.0  # 2026-06-01 08:00 UTC
PREFIX = "stores"


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[MosquittoServer, Path, Path]]:
    """A Mosquitto whose only listener is TLS (loopback), the CA that signed it, and a CA that did not."""
    ca, cert, key = self_signed_ca(tmp_path)
    (tmp_path / "other").mkdir()
    other_ca, _, _ = self_signed_ca(tmp_path / "other")
    server = MosquittoServer(binary=_mosquitto_binary(), workdir=tmp_path,
                             extra=f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\nuser root")
    server.start()
    try:
        yield server, ca, other_ca
    finally:
        server.stop()


def test_the_uplink_and_head_office_connect_over_tls_and_refuse_an_unverified_broker(
        tls_broker: tuple[MosquittoServer, Path, Path], db: Database, hq_db: Database) -> None:  # noqa: F811
    broker, ca, other_ca = tls_broker
    impostor = HqConsumer(hq_db, broker.host, broker.port, PREFIX, f"hq-bad-{secrets.token_hex(3)}",
                          broker=MqttSettings(tls=True, ca_file=str(other_ca)))
    impostor.start()
    try:
        # The certificate does not verify against this CA: no session, so nothing could ever be received.
        assert not impostor.subscribed.wait(2)
    finally:
        impostor.stop()
    lax = HqConsumer(hq_db, broker.host, broker.port, PREFIX, f"hq-lax-{secrets.token_hex(3)}",
                     broker=MqttSettings(tls=True, ca_file=str(other_ca), ca_cert_reqs=False))
    lax.start()
    try:  # tls_verify = false (a lab broker): the same CA connects, so the refusal above was the verification
        assert lax.subscribed.wait(10)
    finally:
        lax.stop()

    hq = HqConsumer(hq_db, broker.host, broker.port, PREFIX, f"hq-tls-{secrets.token_hex(3)}",
                    broker=MqttSettings(tls=True, ca_file=str(ca)))
    hq.start()
    link = UplinkThread(lambda publish: Uplink(db, "s1", PREFIX, publish, now=lambda: T0 + 60),
                        broker.host, broker.port, f"uplink-s1-{secrets.token_hex(3)}",
                        broker=MqttSettings(tls=True, ca_file=str(ca)))
    try:
        assert hq.subscribed.wait(10), "head office did not subscribe over TLS"
        link.connect()
        assert link.wait_connected(10), "the uplink did not connect over TLS"
        pid = int(make_service(db, VirtualClock(T0)).create_profile(NewProfile(external_id="ann"))["id"])
        with db.session() as s:
            s.add(Decision(at=T0, profile_id=pid, campaign_id="hello", event_kind="enter", event_key="stay:a:1",
                           fired=False, reason="cooldown", detail=None, variant=None, store_id="s1"))
        link.uplink.run_once()
        assert wait_until(lambda: hq.stats.applied >= 1), hq.stats
        with hq_db.session() as s:
            assert s.scalars(select(Decision.campaign_id).where(Decision.store_id == "s1")).all() == ["hello"]
            assert s.scalar(select(func.count()).select_from(Decision)) == 1
    finally:
        link.stop()
        hq.stop()
