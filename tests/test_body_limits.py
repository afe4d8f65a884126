"""Request bodies are bounded and a credential comes before a body: on a real uvicorn server (the Runtime's).

Requests are written on a raw loopback socket where the test must control what is sent: a body that
never ends, a Content-Length that is never honoured, a chunked upload with no length at all. Each
answer has to come while the rest of the body is still owed, which today's code never gives (it waits
for the whole body, then parses it on the event loop, then looks at the credential).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from api.deps import ADMIN_KEY_REQUIRED
from gateway.app.config import ConfigError, load_settings
from gateway.app.runtime import Runtime
from gateway.storage.models import CatalogItem, Profile
from tests.live_gateway import ADMIN_KEY, base_url, enrol, live_settings, running

MiB = 1 << 20
ANSWER_WITHIN_S = 10.0  # a bound on a wait for an answer that must come, never a figure asserted


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class Raw:
    """One HTTP/1.1 request written by hand on a loopback socket, its answer read back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, rt: Runtime, method: str, path: str, headers: dict[str, str]) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", rt.settings.api.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(head.encode())
        await writer.drain()
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> tuple[int, dict[str, str], Any]:
        """(status, headers, JSON body) of the response; fails if none comes within the bound."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), ANSWER_WITHIN_S)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines if ":" in ln)}
        body = await asyncio.wait_for(self.reader.readexactly(int(headers["content-length"])), ANSWER_WITHIN_S)
        return int(status_line.split()[1]), headers, json.loads(body)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):  # the server may have dropped the connection it refused
            await self.writer.wait_closed()


def profiles(rt: Runtime) -> int:
    with rt.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(Profile)) or 0)


def assert_problem(status: int, headers: dict[str, str], body: Any, expected: int, words: str) -> None:
    assert status == expected, body
    assert headers["content-type"].startswith("application/problem+json")
    assert body["status"] == expected and words in body["detail"], body


async def test_an_anonymous_chunked_upload_is_refused_before_its_body_while_the_loop_answers(tmp_path: Path) -> None:
    async with running(live_settings(tmp_path)) as rt, httpx.AsyncClient(base_url=base_url(rt), timeout=10) as c:
        before = profiles(rt)
        upload = await Raw.open(rt, "POST", "/v1/profiles", {"Transfer-Encoding": "chunked"})
        await upload.send(chunk(b'{"attributes": {"blob": "' + b"x" * 65536))  # ...and the rest never comes
        live = await c.get("/health/live")  # the loop is free while the upload hangs there
        assert (live.status_code, live.json()) == (200, {"status": "alive"})
        assert_problem(*await upload.answer(), 401, ADMIN_KEY_REQUIRED)
        await upload.close()
        assert profiles(rt) == before


async def test_a_declared_length_over_the_limit_is_refused_at_once_with_or_without_a_key(tmp_path: Path) -> None:
    async with running(live_settings(tmp_path)) as rt:
        before = profiles(rt)
        for headers in ({}, {"X-API-Key": ADMIN_KEY}):  # 155 MB announced, none of it sent
            upload = await Raw.open(rt, "POST", "/v1/profiles", {"Content-Length": str(155_000_000), **headers})
            assert_problem(*await upload.answer(), 413, f"{MiB} bytes at most")
            await upload.close()
        assert profiles(rt) == before


async def test_a_chunked_upload_with_a_key_is_cut_at_the_limit(tmp_path: Path) -> None:
    async with running(live_settings(tmp_path)) as rt:
        before = profiles(rt)
        upload = await Raw.open(rt, "POST", "/v1/profiles", {"Transfer-Encoding": "chunked", "X-API-Key": ADMIN_KEY})
        body = b'{"attributes": {"blob": "' + b"x" * (MiB - 25)  # the limit exactly, then one byte more
        for start in range(0, len(body), 65536):
            await upload.send(chunk(body[start:start + 65536]))
        await upload.send(chunk(b"x"))
        assert_problem(*await upload.answer(), 413, f"{MiB} bytes at most")
        await upload.close()
        assert profiles(rt) == before


async def test_a_bad_credential_is_refused_before_its_body_as_the_route_would_refuse_it(tmp_path: Path) -> None:
    async with running(live_settings(tmp_path)) as rt, httpx.AsyncClient(base_url=base_url(rt), timeout=10) as c:
        _, token = enrol(rt, "alice", 7)
        cases = [("/v1/profiles", {"X-API-Key": "gk_nosuchkey_0123456789abcdef"}, 401),
                 ("/v1/profiles", {"Authorization": f"Bearer {token}"}, 403),  # an app token on an admin route
                 ("/v1/me/sightings", {"Authorization": "Bearer v1.forged.token"}, 401),
                 ("/v1/me/sightings", {"X-API-Key": ADMIN_KEY}, 401)]  # a key is no customer token
        for path, headers, status in cases:
            same_without_body = await c.post(path, headers=headers)  # what the route's own check says
            assert same_without_body.status_code == status
            upload = await Raw.open(rt, "POST", path, {"Transfer-Encoding": "chunked", **headers})
            await upload.send(chunk(b'[{"beacon": "' + b"x" * 65536))
            assert_problem(*await upload.answer(), status, same_without_body.json()["detail"])
            await upload.close()


async def test_under_the_limit_is_accepted_and_the_catalogue_import_may_send_more(tmp_path: Path) -> None:
    async with running(live_settings(tmp_path)) as rt, httpx.AsyncClient(base_url=base_url(rt), timeout=30) as c:
        key = {"X-API-Key": ADMIN_KEY}
        fits = await c.post("/v1/profiles", headers=key, json={"attributes": {"note": "x" * (MiB - 100)}})
        assert fits.status_code == 201, fits.text
        items = [{"sku": f"SKU-{i:06d}", "name": f"Product {i} " + "x" * 180, "zone": "shoes"} for i in range(10_000)]
        payload = json.dumps(items).encode()
        assert 2 * MiB < len(payload) < rt.settings.api.catalogue_max_body_bytes
        r = await c.put("/v1/catalogue", headers={**key, "Content-Type": "application/json"}, content=payload)
        assert (r.status_code, r.json()) == (200, {"upserted": 10_000})
        with rt.db.session() as s:
            assert s.scalar(select(func.count()).select_from(CatalogItem)) == 10_000


async def test_the_limit_is_a_setting_and_public_routes_keep_their_answers(tmp_path: Path) -> None:
    settings = live_settings(tmp_path)
    settings.api.max_body_bytes = 4096
    async with running(settings) as rt, httpx.AsyncClient(base_url=base_url(rt), timeout=10) as c:
        key = {"X-API-Key": ADMIN_KEY}
        assert (await c.post("/v1/profiles", headers=key, json={"name": "x" * 100})).status_code == 201
        upload = await Raw.open(rt, "POST", "/v1/profiles", {"Content-Length": "4097", **key})
        assert_problem(*await upload.answer(), 413, "4096 bytes at most")
        await upload.close()
        # No credential is asked of public routes, body or not; an unknown path is still a 404.
        assert (await c.request("GET", "/health/live", content=b"{}")).status_code == 200
        assert (await c.request("GET", "/metrics", content=b"{}")).status_code == 200
        assert (await c.post("/v1/no-such-route", content=b"{}")).status_code == 404


def test_the_limits_are_read_from_the_api_section(tmp_path: Path) -> None:
    toml = tmp_path / "gateway.toml"
    toml.write_text("[api]\nmax_body_bytes = 65536\ncatalogue_max_body_bytes = 1048576\n")
    api = load_settings(toml, environ={}).api
    assert (api.max_body_bytes, api.catalogue_max_body_bytes) == (65536, MiB)
    toml.write_text("[api]\nmax_body_bytes = 0\n")
    with pytest.raises(ConfigError, match=r"api\.max_body_bytes"):
        load_settings(toml, environ={})
