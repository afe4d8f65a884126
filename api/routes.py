"""The app's HTTP routes as one table (included routers too, in the router's order), built once all
routers are in: the 405's Allow, the literal-over-template rule and the credential-before-body check
all read it."""

from __future__ import annotations

from dataclasses import dataclass
from re import Pattern
from typing import Any

from fastapi import FastAPI
from fastapi.routing import iter_route_contexts


@dataclass(frozen=True)
class Route:
    regex: Pattern[str]
    literal: str | None  # the path, when it has no parameters
    methods: frozenset[str]
    route: Any  # the APIRoute (its dependant says whom it is for)


def http_routes(app: FastAPI) -> list[Route]:
    """Every HTTP route (WebSocket routes left out: they authenticate on the socket), cached on the app."""
    table: list[Route] | None = getattr(app.state, "http_routes", None)
    if table is None:
        table = []
        for route in iter_route_contexts(app.routes):
            regex, methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
            if regex is None or not methods:
                continue
            fmt = str(getattr(route, "path_format", "") or "")
            table.append(Route(regex, fmt if "{" not in fmt else None, frozenset(methods), route))
        app.state.http_routes = table
    return table
