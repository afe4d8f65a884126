"""Logging set up from ``[logging]``: text for a terminal, or one JSON object per line for a shipper.

Either way secrets never reach a log line: the configured keys and secrets are masked wherever
they appear, and so is anything shaped like a credential (a bearer token, ``access_token=`` in a
URL, an ``X-API-Key`` value), because a stray f-string in any module must not leak one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Iterable
from typing import IO, Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from gateway.app.config import ConfigError, LoggingSettings, Settings

MASK = "***"
FORMATS = ("text", "json")
NOISY = ("amqtt", "transitions", "uvicorn.error", "httpx", "alembic")

# Credential shapes, whatever the source: header values, query parameters, key=value pairs.
_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"(?i)((?:access_token|token|api_key|apikey|secret|password|admin_key)[\"']?\s*[=:]\s*[\"']?)"
               r"[^\s&\"',;]{4,}"),
    re.compile(r"(?i)(x-api-key[\"']?\s*[=:]\s*[\"']?)[^\s&\"',;]{4,}"),
)
# The standard LogRecord attributes: anything else a caller passes in ``extra=`` goes into the JSON.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def secrets_of(settings: Settings) -> list[str]:
    """Every configured secret value (a short one is not masked: it would blank ordinary words): the keys,
    the database URL's password, and a VAPID key given as PEM text (each line of its body)."""
    values = [settings.api.admin_key, settings.api.token_secret, settings.mqtt.password, settings.webhook.secret]
    with contextlib.suppress(ArgumentError):  # not a URL: the database never opens, no password to mask
        values.append(make_url(settings.database.url).password or "")
    vapid = settings.webpush.vapid_private_key
    if "-----BEGIN" in vapid:
        values += [line.strip() for line in vapid.splitlines() if line.strip() and "-----" not in line]
    return [v for v in values if v and len(v) >= 6]


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, MASK)
        for pattern in _PATTERNS:
            text = pattern.sub(lambda m: m.group(1) + MASK, text)
        return text


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"}`` plus ``exc`` and any ``extra=`` fields, on one line."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": self.redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[key] = self.redact(value) if isinstance(value, str) else value
        if record.exc_info:
            doc["exc"] = self.redact(self.formatException(record.exc_info))
        return json.dumps(doc, default=str, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


def formatter(settings: LoggingSettings, secrets: Iterable[str] = ()) -> logging.Formatter:
    if settings.format not in FORMATS:
        raise ConfigError(f"logging.format: expected one of {', '.join(FORMATS)}, got {settings.format!r}")
    redact = Redactor(secrets)
    return JsonFormatter(redact) if settings.format == "json" else TextFormatter(redact)


def setup_logging(settings: LoggingSettings, secrets: Iterable[str] = (), *, verbose: bool = False,
                  stream: IO[str] | None = None) -> logging.Handler:
    """Replace the root logger's handlers with one of ours; returns it (tests read what it wrote)."""
    level = logging.DEBUG if verbose else logging.getLevelName(settings.level.upper())
    if not isinstance(level, int):
        raise ConfigError(f"logging.level: unknown level {settings.level!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(settings, secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler
