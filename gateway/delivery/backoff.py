"""The one backoff: the outbox's retries, a webhook's attempts within one delivery, telemetry held by a
database outage."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Exponential backoff with jitter: how long to wait before attempt ``n + 1`` after ``n`` failures.

    The delay doubles from ``base_s`` up to ``max_s``; ``jitter`` (0..1) takes a random share off
    it so that a channel coming back is not hit by every retry at once. ``rng`` is injectable so
    tests know the exact schedule.
    """

    def __init__(self, base_s: float = 2.0, max_s: float = 600.0, factor: float = 2.0, jitter: float = 0.5,
                 max_attempts: int = 8, rng: Callable[[], float] = random.random) -> None:
        if base_s <= 0 or max_s < base_s or factor < 1 or not 0 <= jitter <= 1 or max_attempts < 1:
            raise ValueError("backoff needs 0 < base_s <= max_s, factor >= 1, 0 <= jitter <= 1, max_attempts >= 1")
        self.base_s, self.max_s, self.factor, self.jitter = base_s, max_s, factor, jitter
        self.max_attempts = max_attempts
        self.rng = rng

    def delay(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts (1 for the first failure)."""
        try:
            full = min(self.max_s, self.base_s * self.factor ** max(0, attempts - 1))
        except OverflowError:  # past about 1,000 doublings (a caller that retries for ever, the BLE scanner)
            full = self.max_s
        return full * (1.0 - self.jitter * self.rng())
