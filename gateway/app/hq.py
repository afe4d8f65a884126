"""`gateway hq --config F`: head office. Subscribes to every store's upward events on the central broker
([mqtt]: host, port, topic_prefix; [hq] client_id: its persistent session) and writes them, each once, into
head office's database ([database] url: PostgreSQL), then serves the API ([api]) on that database: the
figures across stores (``GET /v1/figures``: every store by default, ``store=a`` or ``store=a,b``).

Head office's API reads what the stores sent; it runs no pipeline, no engine and no delivery (docs/scale-out.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import signal
import sys
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("gateway.hq")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`hq` on the `gateway` command."""
    p = sub.add_parser("hq", help="head office: every store's events from the central broker into one database, "
                                  "and the API with the figures across stores (docs/scale-out.md)")
    p.add_argument("--config", default=None, help="gateway.toml ([database] head office's, [mqtt] the central "
                                                  "broker, [api], [hq])")
    p.add_argument("--no-api", action="store_true", help="consume only, serve no API")
    p.set_defaults(func=cmd_hq)


def cmd_hq(args: argparse.Namespace) -> int:
    from gateway.app.config import ConfigError, load_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"gateway hq: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(settings, api=not args.no_api))
    except KeyboardInterrupt:
        return 0


async def serve(settings: Any, *, api: bool = True) -> int:
    """Consume until SIGINT / SIGTERM; the API on [api] host and port meanwhile."""
    from devices.mqtt import settings_from_config
    from gateway.hq.consumer import HqConsumer
    from gateway.storage.db import Database

    db = Database(settings.database.url)
    await asyncio.to_thread(db.upgrade, settings.store.id)
    m = settings.mqtt
    consumer = HqConsumer(db, m.host, m.port, m.topic_prefix, settings.hq.client_id,
                          broker=settings_from_config(m, settings.store.id))  # credentials, TLS
    consumer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if not await asyncio.to_thread(consumer.subscribed.wait, 30.0):  # the API only once the session is there
        log.warning("hq: not subscribed to the central broker yet (%s:%s); serving meanwhile", m.host, m.port)
    server = _api(settings, db) if api else None
    task = asyncio.create_task(server.serve()) if server is not None else None
    print(f"gateway hq: consuming {m.topic_prefix}/+/hq/v1/# from {m.host}:{m.port}"
          + (f"; API on http://{settings.api.host}:{settings.api.port}" if server is not None else ""), flush=True)
    await stop.wait()
    if server is not None and task is not None:
        server.should_exit = True
        await task
    await asyncio.to_thread(consumer.stop)
    db.dispose()
    return 0


def _api(settings: Any, db: Any) -> Any:
    """The gateway's FastAPI app over head office's database: a service with no store of its own, so the
    figures count every store unless ``store=`` names some."""
    import uvicorn

    from api.app import create_app
    from api.deps import ApiContext
    from gateway.app.runtime import token_secret
    from gateway.clock import SystemClock
    from gateway.delivery.hub import StreamHub
    from gateway.profiles.identity import IdentityIndex
    from gateway.profiles.service import GatewayService, ServiceOptions
    from gateway.security.auth import AuthPolicy
    from gateway.security.tokens import TokenSigner

    service = GatewayService(db, IdentityIndex(), SystemClock(), TokenSigner(token_secret(settings)),
                             ServiceOptions(timezone=settings.store.timezone, store_id=None,
                                            conversion_window_s=settings.interactions.conversion_window_s,
                                            bounce_s=settings.figures.bounce_s))
    admin_key = settings.api.admin_key or secrets.token_urlsafe(24)
    app = create_app(ApiContext(service=service, hub=StreamHub(), admin_key=admin_key,
                                health=lambda: {"status": "ok", "role": "hq"},
                                auth_policy=AuthPolicy.from_settings(settings.api)))
    config = uvicorn.Config(app, host=settings.api.host, port=settings.api.port, log_level="warning",
                            lifespan="off", log_config=None)
    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # the command owns the signals
            yield

    return Server(config)
