"""Log-distance path loss with log-normal shadowing and random loss.

The model is the gateway's own (``gateway.presence.model``, which the tracker inverts), so
simulated RSSI is realistic enough to exercise smoothing and zone bands, yet cheap enough for
hundreds of thousands of adverts. Randomness comes from a private seeded generator: same seed,
same noise.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import NamedTuple

from gateway.presence.model import rssi_at
from simulators.scenario import Radio, Receiver

#: Below this the simulated receiver does not hear the advert at all.
SENSITIVITY_DBM = -100
#: Closer than this the log model explodes; real antennas saturate anyway.
MIN_DISTANCE_M = 0.1


def expected_rssi(distance_m: float, measured_power: float, n: float) -> float:
    """Mean RSSI at ``distance_m`` for a beacon whose RSSI at 1 m is ``measured_power``: the model, with the
    distance held at ``MIN_DISTANCE_M`` or more."""
    return rssi_at(max(distance_m, MIN_DISTANCE_M), measured_power, n)


class Link(NamedTuple):
    """A receiver with its offset folded into its power at 1 m, for the per-advert hot loop."""

    receiver: str
    x: float
    y: float
    at_1m: float  # measured_power + rssi_offset
    exponent: float  # path_loss_exponent

    @classmethod
    def of(cls, rx: Receiver) -> Link:
        return cls(rx.id, rx.position[0], rx.position[1], rx.measured_power + rx.rssi_offset, rx.path_loss_exponent)


class RadioModel:
    """Turns a tag-to-receiver distance into an RSSI reading, or None when not heard."""

    __slots__ = ("_gauss", "_random", "loss", "shadowing_sigma_db")

    def __init__(self, seed: int | str, shadowing_sigma_db: float = 3.0, loss: float = 0.0) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        rng = random.Random(seed)
        self.shadowing_sigma_db = float(shadowing_sigma_db)
        self.loss = float(loss)
        self._random = rng.random
        self._gauss = rng.gauss

    @classmethod
    def for_radio(cls, radio: Radio, seed: int | str) -> RadioModel:
        return cls(seed, radio.shadowing_sigma_db, radio.loss)

    def rssi(self, distance_m: float, receiver: Receiver) -> int | None:
        """One reading: path loss + receiver offset + N(0, sigma); None if lost or too weak."""
        if self.loss and self._random() < self.loss:
            return None
        value = expected_rssi(distance_m, receiver.measured_power, receiver.path_loss_exponent) + receiver.rssi_offset
        if self.shadowing_sigma_db:
            value += self._gauss(0.0, self.shadowing_sigma_db)
        out = round(value)
        return None if out < SENSITIVITY_DBM else out

    def hear(self, x: float, y: float, links: Sequence[Link]) -> list[tuple[str, int]]:
        """One advert sent from (x, y): (receiver id, rssi) for each receiver that hears it.

        Same model and the same draws, in the same order, as calling :meth:`rssi` per
        receiver; folded into one loop because the store simulator calls it per advert.
        """
        loss, sigma, rand, gauss = self.loss, self.shadowing_sigma_db, self._random, self._gauss
        model, hypot = rssi_at, math.hypot
        out: list[tuple[str, int]] = []
        for rx_id, rx_x, rx_y, at_1m, exponent in links:
            if loss and rand() < loss:
                continue
            d = hypot(x - rx_x, y - rx_y)
            value = model(d if d > MIN_DISTANCE_M else MIN_DISTANCE_M, at_1m, exponent)
            if sigma:
                value += gauss(0.0, sigma)
            level = round(value)
            if level >= SENSITIVITY_DBM:
                out.append((rx_id, level))
        return out
