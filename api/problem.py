"""RFC 9457 problem details: the shape of every error the API sends, from a route or from middleware."""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse

PROBLEM = "application/problem+json"


def problem(status: int, detail: str, headers: dict[str, str] | None = None, **extra: object) -> JSONResponse:
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)
