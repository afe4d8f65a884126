"""The words of the health answers (/health, /health/ready, /health/live and the probes behind them),
defined once for the core that produces them and the API that documents them. A leaf: imports nothing."""

from __future__ import annotations

from enum import StrEnum


class Health(StrEnum):
    """/health as a whole."""

    OK = "ok"
    DEGRADED = "degraded"


class Readiness(StrEnum):
    """/health/ready: whether the gateway should get traffic."""

    READY = "ready"
    NOT_READY = "not_ready"


class Liveness(StrEnum):
    """/health/live: the process answers (there is no other answer)."""

    ALIVE = "alive"


class DbState(StrEnum):
    """The database's component of a health answer: can a write start now?"""

    OK = "ok"
    LOCKED = "locked"  # another writer holds it past the probe's short wait
    FULL = "full"  # the data directory has no room
    DOWN = "down"  # no connection
    FAILING = "failing"  # it answers a probe, yet writes fail (e.g. PostgreSQL's disk is full)
    TIMEOUT = "timeout"  # the probe did not answer in time
    UNKNOWN = "unknown"  # nothing said


class SchemaState(StrEnum):
    """The migrations' component of /health/ready."""

    CURRENT = "current"  # at every migration head this version ships
    BEHIND = "behind"  # an upgrade is due: traffic waits for it
    UNKNOWN = "unknown"  # could not be read
