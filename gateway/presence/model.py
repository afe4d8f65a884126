"""The log-distance path-loss model: the one the tracker inverts and the simulators' radio runs forward.

RSSI(d) = P1m - 10 n log10(d), with P1m the RSSI at 1 m (measured power) and n the path-loss exponent
(2 in free space, 2-4 indoors). Pure functions over floats, so ``simulators/`` may share them.
"""

from __future__ import annotations

import math


def rssi_at(distance: float, measured_power: float, exponent: float) -> float:
    """The RSSI expected at ``distance`` metres (> 0)."""
    return measured_power - 10.0 * exponent * math.log10(distance)


def distance_m(rssi: float, measured_power: float, exponent: float) -> float:
    """The model inverted: the distance at which ``rssi`` is expected, d = 10 ^ ((P1m - RSSI) / (10 n))."""
    return float(10.0 ** ((measured_power - rssi) / (10.0 * exponent)))
