"""MQTT topic layout for devices and gateways.

One layout, built and parsed only here, so a change of convention touches one module::

    {prefix}/{store_id}/devices/{device_id}/{kind}      kind: telemetry | status | events | commands
    {prefix}/{store_id}/gateways/{client_id}/status     the gateway's own online/offline flag

The prefix may have several levels ("acme/stores"); ids are single levels.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple, cast, get_args

DEFAULT_PREFIX = "stores"

# The columns a topic's ids are stored in (gateway/storage/models.py: devices.store_id, devices.id).
MAX_STORE_ID = 64
MAX_DEVICE_ID = 128

# C0 and C1 controls (NUL among them) and lone surrogates: PostgreSQL refuses NUL in text, UTF-8 cannot
# encode a surrogate, and neither belongs in a name anyone reads in a log or a chart.
_NOT_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

Kind = Literal["telemetry", "status", "events", "commands"]
KINDS: frozenset[str] = frozenset(get_args(Kind))


class TopicParts(NamedTuple):
    """What a device topic names. A NamedTuple: built once per message on the hot path."""

    store_id: str
    device_id: str
    kind: Kind


def is_text(value: str, limit: int) -> bool:
    """1 to ``limit`` characters, none a control character or a lone surrogate: a name every text
    column takes as it is (VARCHAR(n) counts characters)."""
    if not 0 < len(value) <= limit:
        return False
    if value.isascii():  # the usual case: printable ASCII is exactly "no control character"
        return value.isprintable()
    return _NOT_TEXT.search(value) is None


def escape_text(value: str, limit: int | None = None) -> str:
    """``value`` with control characters and lone surrogates written as escapes (``\\x00``, ``\\ud800``),
    cut to ``limit`` characters: anything, made fit for a text column and a log line."""
    if _NOT_TEXT.search(value) is not None:
        value = _NOT_TEXT.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), value)
    return value if limit is None else value[:limit]


def ids_problem(parts: TopicParts) -> tuple[str, str] | None:
    """Which id of a parsed topic cannot be stored, and why; None when both can.

    ``parse_topic`` checks the shape only: an id that is too long or not text is the message's fault, so
    the parsers dead-letter it with its own reason instead of letting it fail the batch's commit."""
    if not is_text(parts.store_id, MAX_STORE_ID):
        return "store_id", _describe(parts.store_id, MAX_STORE_ID)
    if not is_text(parts.device_id, MAX_DEVICE_ID):
        return "device_id", _describe(parts.device_id, MAX_DEVICE_ID)
    return None


def _describe(value: str, limit: int) -> str:
    if len(value) > limit:
        return f"{len(value)} characters, over the {limit} allowed (starts {value[:40]!r})"
    return f"{value[:40]!r} holds a control character or a lone surrogate"


def _check_level(value: str, what: str) -> str:
    """Refuse ids that would change the topic's shape (empty, a separator or a wildcard)."""
    if not value or "/" in value or "+" in value or "#" in value or "\x00" in value:
        raise ValueError(f"{what} {value!r} is not a valid single MQTT topic level")
    return value


def _check_prefix(prefix: str) -> str:
    if not prefix or prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"topic prefix {prefix!r} must be non-empty without leading/trailing '/'")
    for level in prefix.split("/"):
        _check_level(level, "topic prefix level")
    return prefix


def device_filter(kind: Kind, prefix: str = DEFAULT_PREFIX, store_id: str = "+") -> str:
    """Subscription filter for one kind of device message, in all stores by default."""
    if kind not in KINDS:
        raise ValueError(f"unknown device topic kind {kind!r}")
    if store_id != "+":
        _check_level(store_id, "store id")
    return f"{_check_prefix(prefix)}/{store_id}/devices/+/{kind}"


def telemetry_filter(prefix: str = DEFAULT_PREFIX, store_id: str = "+") -> str:
    """The filter the intake subscribes to: ``stores/+/devices/+/telemetry``."""
    return device_filter("telemetry", prefix, store_id)


def device_topic(store_id: str, device_id: str, kind: Kind, prefix: str = DEFAULT_PREFIX) -> str:
    """The concrete topic a device publishes (or is sent) one kind of message on."""
    if kind not in KINDS:
        raise ValueError(f"unknown device topic kind {kind!r}")
    return (
        f"{_check_prefix(prefix)}/{_check_level(store_id, 'store id')}"
        f"/devices/{_check_level(device_id, 'device id')}/{kind}"
    )


def telemetry_topic(store_id: str, device_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Where a device publishes its readings (simulators and tests use this)."""
    return device_topic(store_id, device_id, "telemetry", prefix)


def command_topic(store_id: str, device_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Where the gateway sends a command to one device."""
    return device_topic(store_id, device_id, "commands", prefix)


def gateway_status_topic(store_id: str, client_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The gateway's retained "online"/"offline" flag (also its last will)."""
    return (
        f"{_check_prefix(prefix)}/{_check_level(store_id, 'store id')}"
        f"/gateways/{_check_level(client_id, 'client id')}/status"
    )


def parse_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> TopicParts | None:
    """Split a device topic into its parts, or None if it is not one of ours.

    None rather than an exception: a stray topic is ordinary input, counted by the caller.
    """
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    levels = topic[len(head) :].split("/")
    if len(levels) != 4:
        return None
    store_id, section, device_id, kind = levels
    if section != "devices" or not store_id or not device_id or kind not in KINDS:
        return None
    return TopicParts(store_id, device_id, cast(Kind, kind))  # kind checked just above
