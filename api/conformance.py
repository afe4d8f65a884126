"""The HTTP details where FastAPI and Starlette say less than the OpenAPI document promises.

- A 405 names every method of the path in ``Allow``: FastAPI registers one route per method and
  Starlette's router answers from the first route whose path matches, so it would list only that
  route's method.
- A literal path comes before a templated one, as OpenAPI matches them: ``/v1/campaigns/validate``
  is not the campaign named "validate", so GET on it is a 405 (Allow: POST), not a lookup of that
  campaign by ``/v1/campaigns/{campaign_id}``.
- A body that cannot be parsed (not JSON, not UTF-8) is a 400, not a 422: nothing in it could be
  checked against the schema.
- A scalar query parameter given more than once is a 422 naming it: FastAPI would quietly take the
  last value, so ``?limit=1&limit=500`` would mean whatever the client did not intend.

The gateway is never mounted under a ``root_path``, so a request's ``path`` is its route path.
"""

from __future__ import annotations

import types
import typing
from collections import Counter
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.dependencies.utils import get_flat_params
from fastapi.exceptions import RequestValidationError
from fastapi.params import Query
from fastapi.routing import APIRoute
from starlette.requests import HTTPConnection

from api.routes import http_routes

METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods ``path`` supports, in a stable order: those of its literal routes if it has any,
    else those of every templated route that matches it."""
    matching = [r for r in http_routes(app) if r.regex.match(path)]
    literal = [r for r in matching if r.literal == path]
    methods = set().union(*(r.methods for r in (literal or matching)))
    return sorted(methods, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))


def allow_headers(conn: HTTPConnection, headers: dict[str, str] | None) -> dict[str, str]:
    """The 405's headers with ``Allow`` computed from all the app's routes (RFC 9110 section 15.5.6)."""
    methods = allowed_methods(conn.app, conn.scope["path"])
    out = {k: v for k, v in (headers or {}).items() if k.lower() != "allow"}
    if methods:
        out["Allow"] = ", ".join(methods)
    return out


def unparsable_body(exc: RequestValidationError) -> str | None:
    """The 400's detail when FastAPI could not decode the JSON body at all; None for a real 422."""
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            loc = error.get("loc", ())
            where = f" at position {loc[1]}" if len(loc) > 1 else ""
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            return f"the body is not valid JSON: {reason}{where}"
    return None


def _is_sequence(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _is_sequence(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_is_sequence(arg) for arg in typing.get_args(annotation))
    return origin in (list, set, frozenset, tuple)


def scalar_query_names(route: APIRoute) -> frozenset[str]:
    """The query parameters the route (and its dependencies) declares as one value each; kept on the route."""
    names: frozenset[str] | None = getattr(route, "_scalar_query_names", None)
    if names is None:
        names = frozenset(f.alias for f in get_flat_params(route.dependant)
                          if isinstance(f.field_info, Query) and not _is_sequence(f.field_info.annotation))
        route._scalar_query_names = names  # type: ignore[attr-defined]
    return names


def conform(conn: HTTPConnection) -> None:
    """A dependency of every route, run before the route's own (auth included)."""
    route = conn.scope.get("route")
    if conn.scope["type"] != "http" or not isinstance(route, APIRoute):
        return
    path = conn.scope["path"]
    if "{" in route.path_format and any(r.literal == path for r in http_routes(conn.app)):
        raise HTTPException(405)  # a literal path's own methods only; http_error adds Allow
    declared = scalar_query_names(route)
    counts = Counter(k for k, _ in conn.query_params.multi_items() if k in declared)
    errors = [{"type": "repeated_parameter", "loc": ("query", name), "input": conn.query_params.getlist(name),
               "msg": f"given {n} times; this parameter takes one value"}
              for name, n in counts.items() if n > 1]
    if errors:
        raise RequestValidationError(errors)


def install(app: FastAPI) -> None:
    """Call before the routers are included: the app's dependencies are copied into each route then."""
    app.router.dependencies.append(Depends(conform))
