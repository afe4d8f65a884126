"""Recording sightings as trace files (the format of gateway/presence/traces.py), one file per hour.

What a recording may hold is what presence data may: an identity the gateway does not know (not
enrolled, or a passer-by) is written only as a hash salted per file, so rows of one file still say
"the same tag" while no file can be joined with another or with an address or raw id. Files older
than the store's presence retention are deleted by ``purge``.
"""

from __future__ import annotations

import calendar
import hashlib
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from beacons.types import Sighting
from gateway.presence.traces import TraceWriter

HOUR_S = 3600.0
PREFIX = "trace-"
SUFFIX = ".csv"
ANON = "anon-"  # the key of an unknown identity in a recording: ANON + 16 hex digits


def hour_name(t: float) -> str:
    """The file of the UTC hour holding unix time ``t``: trace-YYYYMMDDTHH.csv (sorts by time)."""
    return PREFIX + time.strftime("%Y%m%dT%H", time.gmtime(t)) + SUFFIX


class TraceRecorder:
    """Appends sightings to the current hour's trace file; ``known(key)`` says which keys are kept as is."""

    def __init__(self, directory: str | Path, known: Callable[[str], bool]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._known = known
        self._hour = -1
        self._file: IO[str] | None = None
        self._writer: TraceWriter | None = None
        self._salt = b""
        self._alias: dict[str, str] = {}

    def _open(self, hour: int) -> TraceWriter:
        self.close()
        path = self.dir / hour_name(hour * HOUR_S)
        fresh = not path.exists() or path.stat().st_size == 0
        self._file = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - held open for the hour
        # A new salt per file, also when a restart appends to this hour's file: no alias survives a restart.
        self._salt, self._alias, self._hour = os.urandom(16), {}, hour
        self._writer = TraceWriter(self._file, tx_power=True, header=fresh)
        return self._writer

    def _key(self, key: str) -> str:
        alias = self._alias.get(key)
        if alias is None:
            alias = key if self._known(key) else ANON + hashlib.blake2b(
                key.encode(), key=self._salt, digest_size=8).hexdigest()
            self._alias[key] = alias
        return alias

    def write(self, sightings: Iterable[Sighting]) -> None:
        """Sightings stamped in unix time; each lands in the file of its own hour."""
        for s in sightings:
            hour = int(s.time // HOUR_S)
            w = self._writer
            if w is None or hour > self._hour:  # a late sighting of the hour before stays in this file
                w = self._open(hour)
            w.write(s._replace(key=self._key(s.key)))
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._writer = None
        self._hour = -1

    def purge(self, now: float, retention_days: float) -> list[Path]:
        """Delete the files whose hour ended more than ``retention_days`` before ``now`` (0: keep all)."""
        if retention_days <= 0:
            return []
        cutoff = now - retention_days * 86400.0
        current = hour_name(self._hour * HOUR_S) if self._file is not None else None
        gone = []
        for path in sorted(self.dir.glob(f"{PREFIX}*{SUFFIX}")):
            try:
                start = calendar.timegm(time.strptime(path.name[len(PREFIX):-len(SUFFIX)], "%Y%m%dT%H"))
            except ValueError:
                continue  # not one of ours
            if start + HOUR_S <= cutoff and path.name != current:
                path.unlink()
                gone.append(path)
        return gone
