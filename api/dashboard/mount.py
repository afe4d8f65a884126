"""The dashboard's pages on the app: the core pages (routes.py) and the pages built on their helpers
(devices.py, figures.py), which import routes.py, so that routes.py imports none of them back."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response

from api.dashboard import Dashboard
from api.dashboard.devices import router as devices_router
from api.dashboard.figures import router as figures_router
from api.dashboard.routes import SignInFirst, _login_page, router


def install(app: FastAPI, dashboard: Dashboard) -> None:
    app.state.dashboard = dashboard

    async def sign_in_first(request: Request, exc: Exception) -> Response:
        return _login_page(request)

    app.add_exception_handler(SignInFirst, sign_in_first)
    for pages in (router, devices_router, figures_router):
        app.include_router(pages)
