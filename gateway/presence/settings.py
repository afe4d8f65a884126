"""What presence is configured with: the receivers, their zone bands, the tracker's parameters
(``[[receivers]]`` and ``[presence]`` of gateway.toml; docs/presence.md has the benchmark behind each).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.errors import ConfigError


@dataclass
class ZoneBand:
    name: str
    max_m: float

    def __post_init__(self) -> None:
        if not isinstance(self.max_m, int | float) or not self.max_m > 0:
            raise ConfigError(f"receivers.zones: zone {self.name!r} max_m must be positive, got {self.max_m!r}")


@dataclass
class ReceiverSettings:
    id: str
    zones: list[ZoneBand] = field(default_factory=list)
    measured_power: int | None = None  # RSSI at 1 m; None: use the beacon's advertised tx power
    path_loss_exponent: float = 2.0
    position: list[float] | None = None  # [x, y] metres on the floor plan ([[zones]] polygons); optional

    def __post_init__(self) -> None:
        if not isinstance(self.path_loss_exponent, int | float) or not self.path_loss_exponent > 0:
            raise ConfigError(f"receivers: {self.id!r} path_loss_exponent must be positive, "
                              f"got {self.path_loss_exponent!r}")
        if self.measured_power is not None and not -127 < self.measured_power < 0:
            raise ConfigError(f"receivers: {self.id!r} measured_power must be in (-127, 0) dBm, "
                              f"got {self.measured_power!r}")
        if self.position is not None and (len(self.position) != 2 or not all(
                isinstance(v, int | float) and v == v and abs(v) != float("inf") for v in self.position)):
            raise ConfigError(f"receivers: {self.id!r} position must be [x, y] in metres, got {self.position!r}")


@dataclass
class FloorZone:
    """A zone on the floor plan (``[[zones]]``): its polygon, and the zones one can walk to from it that
    the polygons do not show as touching (a door, an aisle). Which zones adjoin is the tracker's
    transition prior: nobody jumps from the entrance to the checkout."""

    name: str
    polygon: list[list[float]] = field(default_factory=list)  # [[x, y], ...] metres, at least 3 corners
    adjacent: list[str] = field(default_factory=list)


@dataclass
class PresenceSettings:
    exit_after_s: float = 10.0  # silence before an identity has left (CLBeacon semantics)
    dwell_every_s: float = 15.0  # a dwell event every N s inside a zone
    smoothing: float = 0.3  # rssi_filter "ema": weight a sample gets after 1 s without one (time-aware)
    visit_end_after_s: float = 300.0  # silence after which the visit (not just the zone) ends
    rssi_filter: str = "kalman"  # per identity-receiver RSSI filter: "kalman" (time-aware) or "ema"
    rssi_noise_db: float = 5.0  # Kalman: RSSI noise of one advert (shadowing sigma)
    rssi_drift_db_s: float = 1.5  # Kalman: how fast the true RSSI may drift (dB per sqrt(s))
    enter_hold_s: float = 0.0  # a zone's posterior must stay above its threshold this long before it is entered
    # Zones: the HMM forward filter per identity (gateway/presence/tracker.py, docs/presence.md)
    shadowing_db: float = 4.0  # slow shadowing sigma: the RSSI noise that the filter cannot average away
    fade_time_s: float = 3.0  # a receiver gives one independent look per this long while the RSSI stands still
    fade_db: float = 5.0  # ... and one more per this many dB its filtered RSSI moves (walking decorrelates fades)
    outside_factor: float = 3.0  # "outside" a receiver's bands reaches this x its widest band
    zone_stay_s: float = 60.0  # prior: mean time in a zone before leaving it
    transit_s: float = 5.0  # prior: mean time outside every zone before reaching one
    direct_share: float = 0.2  # prior: share of zone stays that end straight in another zone
    enter_posterior: float = 0.6  # from no zone: enter a zone once its posterior reaches this
    switch_posterior: float = 0.995  # from a zone: move once its own posterior falls to 1 - this
    # from a zone to no zone (an exit on evidence, not on silence): its own posterior must fall to 1 - this;
    # 0: as switch_posterior. Exits can ask for more evidence than moves (a calibration may choose it).
    exit_posterior: float = 0.0
    calibration: str = ""  # a file from `gateway calibrate` (learned receivers and zone signatures); empty: none
    record_dir: str = ""  # write every sighting to hourly trace files here (`gateway replay`); empty: off

    def __post_init__(self) -> None:
        if self.rssi_filter not in ("kalman", "ema"):
            raise ConfigError(f"presence.rssi_filter: expected kalman or ema, got {self.rssi_filter!r}")
        for name in ("exit_after_s", "dwell_every_s", "visit_end_after_s", "rssi_noise_db"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"presence.{name}: must be positive, got {getattr(self, name)!r}")
        for name in ("shadowing_db", "fade_time_s", "fade_db", "zone_stay_s", "transit_s", "outside_factor"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"presence.{name}: must be positive, got {getattr(self, name)!r}")
        for name in ("direct_share", "enter_posterior", "switch_posterior", "exit_posterior"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"presence.{name}: must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("rssi_drift_db_s", "enter_hold_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"presence.{name}: must not be negative, got {getattr(self, name)!r}")
        if not 0 < self.smoothing <= 1:
            raise ConfigError(f"presence.smoothing: must be in (0, 1], got {self.smoothing!r}")
        if self.visit_end_after_s < self.exit_after_s:
            raise ConfigError("presence.visit_end_after_s: must not be shorter than exit_after_s")
