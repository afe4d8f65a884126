"""Operations: liveness and readiness probes, JSON logs without secrets, presence now, and 500s as problem+json."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import httpx
import pytest
from alembic import command
from alembic.config import Config
from fastapi.testclient import TestClient

from api.app import PROBLEM, create_app
from api.deps import ApiContext
from gateway.app.config import ConfigError, LoggingSettings, load_settings
from gateway.app.logs import MASK, secrets_of, setup_logging
from gateway.app.metrics import readiness
from gateway.delivery.hub import StreamHub
from gateway.storage.db import MIGRATIONS, Database
from tests.live_gateway import ADMIN_KEY, T0, base_url, enrol, live_settings, running, walk_in


async def test_live_and_ready_then_not_ready_when_the_schema_is_behind(tmp_path: Path) -> None:
    async with running(live_settings(tmp_path)) as rt, httpx.AsyncClient(base_url=base_url(rt), timeout=10) as c:
        live, ready = await c.get("/health/live"), await c.get("/health/ready")
        assert (live.status_code, live.json()) == (200, {"status": "alive"})
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "components": {"db": "ok", "migrations": "current"}}
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with rt.db.engine.begin() as conn:  # as if an older version's database: one migration behind
            cfg.attributes["connection"] = conn
            command.stamp(cfg, "0008")
        behind = await c.get("/health/ready")
        assert behind.status_code == 503
        assert behind.json()["components"]["migrations"] == "behind"
        assert (await c.get("/health/live")).status_code == 200  # alive all along: not a reason to restart
        assert (await c.get("/health")).status_code == 200


def test_ready_is_503_when_the_database_is_unreachable() -> None:
    db = Database("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1")
    app = create_app(ApiContext(service=None, hub=StreamHub(), admin_key="k", health=dict,  # type: ignore[arg-type]
                                ready=lambda: readiness(db)))
    r = TestClient(app).get("/health/ready")
    assert r.status_code == 503
    assert r.json() == {"status": "not_ready", "components": {"db": "down", "migrations": "unknown"}}


def test_json_logs_are_one_object_per_line_and_never_carry_a_secret(tmp_path: Path) -> None:
    conf = tmp_path / "gw.toml"
    conf.write_text('[logging]\nformat = "json"\nlevel = "DEBUG"\n[api]\nadmin_key = "admin-key-s3cr3t-value"\n'
                    '[webhook]\nsecret = "whsec-very-secret"\n')
    settings = load_settings(conf, environ={})
    stream = io.StringIO()
    handler = setup_logging(settings.logging, secrets_of(settings), stream=stream)
    try:
        log = logging.getLogger("gateway.test")
        log.info("calling with key %s", settings.api.admin_key)
        log.warning("GET /v1/me/stream?access_token=v1.eyJwIjo3fQ.c2lnbmF0dXJl&after=3 from 127.0.0.1")
        log.debug("headers: Authorization: Bearer v1.abcdefgh.ijklmnop, X-API-Key: gk_abc_defghijk",
                  extra={"profile_id": 7})
        try:
            raise RuntimeError(f"webhook secret {settings.webhook.secret} rejected")
        except RuntimeError:
            log.exception("delivery failed")
    finally:
        logging.getLogger().removeHandler(handler)
    text = stream.getvalue()
    lines = text.strip().split("\n")
    assert len(lines) == 4
    docs = [json.loads(line) for line in lines]
    assert [d["level"] for d in docs] == ["INFO", "WARNING", "DEBUG", "ERROR"]
    assert all(d["logger"] == "gateway.test" and d["time"].startswith("20") for d in docs)
    assert docs[0]["message"] == f"calling with key {MASK}"
    assert docs[1]["message"].endswith(f"access_token={MASK}&after=3 from 127.0.0.1")
    assert docs[2]["profile_id"] == 7
    assert "RuntimeError" in docs[3]["exc"]
    for secret in ("admin-key-s3cr3t-value", "whsec-very-secret", "eyJwIjo3fQ", "abcdefgh.ijklmnop", "defghijk"):
        assert secret not in text


def test_text_logs_mask_too_and_a_bad_format_is_named() -> None:
    stream = io.StringIO()
    handler = setup_logging(LoggingSettings(format="text"), ["topsecret-123"], stream=stream)
    try:
        logging.getLogger("gateway.t").info("key=topsecret-123")
    finally:
        logging.getLogger().removeHandler(handler)
    assert "topsecret" not in stream.getvalue() and MASK in stream.getvalue()
    with pytest.raises(ConfigError, match=r"logging\.format"):
        setup_logging(LoggingSettings(format="xml"))


async def test_presence_shows_enrolled_by_profile_and_counts_the_anonymous(tmp_path: Path) -> None:
    async with running(live_settings(tmp_path)) as rt, httpx.AsyncClient(base_url=base_url(rt), timeout=10) as c:
        pid, _ = enrol(rt, "alice", 1)
        rt.inject([*walk_in(1, T0), *walk_in(900, T0, address="06:AA:BB:CC:DD:EE")])  # 1:900 is nobody's
        await rt.flush()
        r = await c.get("/v1/presence", headers={"X-API-Key": ADMIN_KEY})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["zones"] == [{"zone": "shop", "profiles": [pid], "enrolled": 1, "anonymous": 1, "total": 2}]
        assert (body["enrolled"], body["anonymous"]) == (1, 1)
        assert "06:AA:BB:CC:DD:EE" not in r.text and "900" not in r.text  # the unknown one is only counted
        assert (await c.get("/v1/presence")).status_code == 401


async def test_the_audits_500s_are_now_4xx_and_a_real_500_is_problem_json(tmp_path: Path) -> None:
    big = 2 ** 70
    async with running(live_settings(tmp_path)) as rt, httpx.AsyncClient(base_url=base_url(rt), timeout=10) as c:
        _, token = enrol(rt, "alice", 1)
        admin = {"X-API-Key": ADMIN_KEY}
        calls = [c.get(f"/v1/profiles/{big}/decisions", headers=admin), c.get(f"/v1/profiles/{big}/export",
                 headers=admin), c.delete(f"/v1/profiles/{big}", headers=admin),
                 c.post(f"/v1/me/notifications/{big}/interactions", json={"kind": "opened"},
                        headers={"Authorization": f"Bearer {token}"}),
                 c.get(f"/v1/notifications/{big}", headers=admin),
                 c.get("/v1/figures", params={"from": "9999-12-31"}, headers=admin)]
        for call in calls:
            r = await call
            assert r.status_code in (404, 422), (r.request.url, r.text)
            assert r.headers["content-type"] == PROBLEM
        rt.service.list_campaigns = lambda: 1 / 0  # type: ignore[method-assign]  # a bug behind a route
        r = await c.get("/v1/campaigns", headers=admin)
        assert r.status_code == 500
        assert r.headers["content-type"] == PROBLEM
        assert r.json()["status"] == 500 and "ZeroDivision" not in r.text  # the details go to the log only


def test_the_database_password_and_a_pem_vapid_key_are_masked_too(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    conf = tmp_path / "gw.toml"
    conf.write_text('[database]\nurl = "postgresql+psycopg://shop:pg-pass-w0rd@db.local/gw"\n'
                    f'[webpush]\nvapid_private_key = """{pem}"""\n')
    settings = load_settings(conf, environ={})
    stream = io.StringIO()
    handler = setup_logging(settings.logging, secrets_of(settings), stream=stream)
    try:
        logging.getLogger("gateway.test").warning("connect failed: %s; key %s", settings.database.url, pem)
    finally:
        logging.getLogger().removeHandler(handler)
    text = stream.getvalue()
    body = [line for line in pem.splitlines() if "-----" not in line]
    assert "pg-pass-w0rd" not in text and not any(line in text for line in body)
    assert "shop:" in text and MASK in text  # the rest of the line is still there to read


def test_a_vapid_key_pasted_without_its_pem_lines_is_not_echoed_in_the_error(tmp_path: Path) -> None:
    from gateway.delivery.webpush import WebPushSettings, load_vapid

    body = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgkeyMaterialThatMustNotLeak"
    with pytest.raises(FileNotFoundError) as err:
        load_vapid(WebPushSettings(vapid_private_key=body), tmp_path)
    assert body not in str(err.value) and "not shown" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"keys/vapid\.pem"):  # a path is named, to be fixed
        load_vapid(WebPushSettings(vapid_private_key="keys/vapid.pem"), tmp_path)
