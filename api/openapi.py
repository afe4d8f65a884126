"""The OpenAPI document as the API really behaves: every error is RFC 9457 problem+json.

FastAPI documents its validation errors as ``HTTPValidationError`` in ``application/json``; this
gateway answers 422 with ``application/problem+json`` (see api/app.py), so the document is
rewritten to say so, and the refusals every route can give (401/403 for a protected route, 404 for
a route that names a resource, 409 for one that changes state, 400 for one that takes a body, which
may not be JSON at all, 500) are documented with the same schema. Schemathesis checks responses
against this document, so it must not promise less.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.schemas import NO_NUL, STORED_VALUE, Problem, ValidationProblem

PROBLEM = "application/problem+json"
PUBLIC = ("/health", "/metrics")
_REF = "#/components/schemas/"
_DESCRIPTIONS = {
    "400": "Bad request: a body that is not JSON at all (not UTF-8, a syntax error), or a malformed header "
           "(problem+json)",
    "401": "No credential, or an unknown, expired or revoked one (problem+json)",
    "403": "A valid credential that may not call this (problem+json)",
    "404": "No such resource, or not yours (problem+json)",
    "409": "Conflicts with the current state (problem+json)",
    "422": "The request is malformed or its values are not acceptable (problem+json)",
    "429": "Rate limit exceeded; see Retry-After (problem+json)",
    "500": "An unexpected error; nothing was changed that was not committed (problem+json)",
}


def _problem(code: str, schema: str = "Problem") -> dict[str, Any]:
    return {"description": _DESCRIPTIONS[code], "content": {PROBLEM: {"schema": {"$ref": _REF + schema}}}}


def _is_public(path: str) -> bool:
    return path.startswith(PUBLIC)


def example_for(schema: dict[str, Any], schemas: dict[str, Any], depth: int = 0) -> Any:
    """An example value for ``schema``: the schema's own (or its component's) example when it has one,
    else one built from its properties, so every body in the document shows a concrete shape."""
    if depth > 8:
        return None
    ref = schema.get("$ref")
    if ref:
        return example_for(schemas.get(ref.rsplit("/", 1)[-1], {}), schemas, depth + 1)
    if schema.get("examples"):
        return schema["examples"][0]
    if "example" in schema:
        return schema["example"]
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = [o for o in schema.get(key, ()) if o.get("type") != "null"]
        if options:
            return example_for(options[0], schemas, depth + 1)
    kind = schema.get("type")
    if kind == "array":
        item = example_for(schema.get("items", {}), schemas, depth + 1)
        return [] if item is None else [item]
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {k: example_for(v, schemas, depth + 1) for k, v in props.items()}
    if kind == "integer":
        return max(1, int(schema.get("minimum", 1)))
    if kind == "number":
        return float(schema.get("minimum", 1.0))
    if kind == "boolean":
        return True
    if kind == "string":
        length = int(schema.get("minLength", 1))
        return "example"[:max(length, 7)] if length <= 7 else "x" * length
    return None


def _with_example(media: dict[str, Any], schemas: dict[str, Any]) -> None:
    if "example" in media or "examples" in media or "schema" not in media:
        return
    own = media["schema"]
    target = schemas.get(own.get("$ref", "").rsplit("/", 1)[-1], own) if "$ref" in own else own
    if "examples" in target or "example" in target:
        return  # the schema shows its own
    media["example"] = example_for(own, schemas)


def _restore_examples(schemas: dict[str, Any]) -> None:
    """FastAPI drops ``None`` from schema examples (exclude_none), which breaks an example whose nullable
    field is required; the models' own examples are put back as written."""
    import api.schemas as models

    for name, schema in schemas.items():
        model = getattr(models, name, None)
        extra = getattr(model, "model_config", {}).get("json_schema_extra") if model is not None else None
        if isinstance(extra, dict) and extra.get("examples"):
            schema["examples"] = extra["examples"]


def stored_value_schema() -> dict[str, Any]:
    """Any JSON value with no NUL in a string or a key, at any depth: what a stored document holds."""
    ref = {"$ref": _REF + STORED_VALUE}
    return {"description": "Any JSON value; no string or key in it contains NUL (U+0000)", "anyOf": [
        {"type": "string", "pattern": NO_NUL}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
        {"type": "array", "items": ref},
        {"type": "object", "propertyNames": {"pattern": NO_NUL}, "additionalProperties": ref}]}


def rewrite(doc: dict[str, Any]) -> dict[str, Any]:
    """Errors as problem+json on every operation; FastAPI's own validation schemas removed."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    _restore_examples(schemas)
    schemas[STORED_VALUE] = stored_value_schema()
    for model in (Problem, ValidationProblem):
        schemas[model.__name__] = model.model_json_schema(ref_template=_REF + "{model}")
        for name, sub in schemas[model.__name__].pop("$defs", {}).items():
            schemas.setdefault(name, sub)
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            responses: dict[str, Any] = op["responses"]
            has_input = bool(op.get("parameters")) or "requestBody" in op
            if has_input or "422" in responses:
                responses["422"] = _problem("422", "ValidationProblem")
            codes = ["500"]
            if not _is_public(path):
                codes += ["401", "403", "429"]
            if "{" in path or method in ("post", "put", "delete", "patch"):
                codes.append("404")
            if method in ("post", "put", "delete", "patch"):
                codes.append("409")
            if path.startswith("/v1/me/stream") or "requestBody" in op:  # Last-Event-ID; a body that is not JSON
                codes.append("400")
            for code in codes:
                current = responses.get(code)
                if current is None or "content" not in current or "application/json" in current.get("content", {}):
                    desc = (current or {}).get("description")
                    responses[code] = _problem(code)
                    if desc and desc not in ("Validation Error", "Successful Response"):
                        responses[code]["description"] = desc
    for ops in doc.get("paths", {}).values():  # every JSON body shows an example
        for op in ops.values():
            if not isinstance(op, dict):
                continue
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None:
                _with_example(body, schemas)
            for code, response in op.get("responses", {}).items():
                media = response.get("content", {}).get("application/json")
                if code.startswith("2") and media is not None:
                    _with_example(media, schemas)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return doc


def install(app: FastAPI) -> None:
    """Replace ``app.openapi`` with a cached, rewritten document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                              tags=app.openapi_tags, servers=app.servers)
            app.openapi_schema = rewrite(doc)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
