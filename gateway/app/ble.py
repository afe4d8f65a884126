"""The BLE scanner's wiring that `gateway run` and `gateway demo` share: its restart delays."""

from __future__ import annotations

from gateway.delivery.backoff import Backoff


def ble_retry() -> Backoff:
    """The delays of an adapter's failed restarts: 1 s doubling to 60 s, each up to 20 % shorter (jitter keeps
    gateways that lost their radios together from retrying in step; downward keeps the cap a cap)."""
    return Backoff(base_s=1.0, max_s=60.0, factor=2.0, jitter=0.2)
