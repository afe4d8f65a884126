"""Injectable time, so a simulation can run a store day in seconds and tests never sleep."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (UTC)."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        """Seconds that really passed (never stepped): set against ``now`` it shows a wall clock step."""
        return time.monotonic()


class VirtualClock:
    """A clock that only moves when told to."""

    def __init__(self, start: float = 1_767_261_600.0) -> None:  # 2026-01-01 10:00 UTC
        self._now = float(start)
        self._stepped = 0.0

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        """Time that really passed: the virtual time itself, less any ``step`` of a SteppingClock."""
        return self._now - self._stepped

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a virtual clock does not run backwards")
        self._now += seconds
        return self._now

    def set(self, t: float) -> None:
        if t < self._now:
            raise ValueError("a virtual clock does not run backwards")
        self._now = float(t)


class SteppingClock(VirtualClock):
    """A virtual clock whose wall time can also be stepped, back or forward, as NTP steps a Pi's clock
    that booted without one. ``advance`` is time really passing; ``step`` only moves the reading."""

    def step(self, seconds: float) -> float:
        self._now += seconds
        self._stepped += seconds
        return self._now
