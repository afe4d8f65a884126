"""Trace and labels files: the CSV that `gateway replay` reads and a recording writes.

A **trace** is one sighting per row, ``time,receiver,beacon,rssi[,tx_power]`` with a header: time in
seconds (any origin), a receiver id of the config's ``[[receivers]]``, the beacon key (as
``gateway decode`` names it, or any opaque identity), RSSI in integer dBm, and optionally the
beacon's tx power at 1 m. **Labels** say where each beacon really was: ``beacon,start,end,zone``
(an empty zone: in no zone).

Files are read as a stream (a shop day is millions of rows); a bad row is skipped, counted and
kept with its line number for the report (the first ``KEEP_ERRORS`` of them), never raised. Only a
wrong header, which makes every row meaningless, raises ``TraceError``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from beacons.types import Sighting

TRACE_COLUMNS = ("time", "receiver", "beacon", "rssi")
TRACE_OPTIONAL = "tx_power"
LABEL_COLUMNS = ("beacon", "start", "end", "zone")
RSSI_MIN, RSSI_MAX = -127, 20  # what BLE controllers report; 127 ("unavailable") is not a reading
KEEP_ERRORS = 20  # bad rows kept with their reason; the rest are only counted


class TraceError(ValueError):
    """The file cannot be read at all (a wrong header): says which file and line."""


@dataclass
class RowErrors:
    """Bad rows of one file: how many, and the first few with their line numbers."""

    source: str
    count: int = 0
    first: list[tuple[int, str]] = field(default_factory=list)

    def add(self, line: int, reason: str) -> None:
        self.count += 1
        if len(self.first) < KEEP_ERRORS:
            self.first.append((line, reason))

    def report(self) -> str:
        """One line per kept error, and how many more were skipped, for stderr."""
        lines = [f"{self.source} line {n}: {reason}" for n, reason in self.first]
        if self.count > len(self.first):
            lines.append(f"{self.source}: {self.count - len(self.first)} more bad rows")
        return "\n".join(lines)


class Label(NamedTuple):
    beacon: str
    start: float
    end: float
    zone: str | None


def _finite(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} {text!r} is not finite")
    return value


def _dbm(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not an integer dBm") from None
    if not RSSI_MIN <= value <= RSSI_MAX:
        raise ValueError(f"{name} {value} is outside [{RSSI_MIN}, {RSSI_MAX}] dBm")
    return value


def _numbered(rows: Any, errors: RowErrors) -> Iterator[tuple[int, list[str]]]:
    """Rows with the line each ends on; a row the csv module cannot split (a NUL, a runaway quote) is a bad row."""
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            errors.add(rows.line_num, f"unreadable CSV: {exc}")
            continue
        yield rows.line_num, row


def _first(rows: Any, source: str) -> list[str] | None:
    try:
        return next(rows, None)
    except csv.Error as exc:
        raise TraceError(f"{source} line 1: unreadable CSV: {exc}") from None


def _header(row: list[str] | None, expected: tuple[str, ...], optional: tuple[str, ...], source: str) -> int:
    """The number of columns the header declares; a wrong header is a TraceError at line 1."""
    got = tuple(c.strip().lower() for c in row or [])
    for extra in range(len(optional), -1, -1):
        if got == expected + optional[:extra]:
            return len(got)
    want = ",".join(expected) + "".join(f"[,{c}]" for c in optional)
    raise TraceError(f"{source} line 1: expected the header {want}, got {','.join(got) or 'nothing'}")


class TraceReader:
    """Sightings from a trace file, one at a time; ``errors`` fills as it goes.

    ``receivers``, when given, are the configured ids: a row naming another receiver is a bad row
    (the tracker would drop it silently).
    """

    def __init__(self, stream: Iterable[str], source: str = "trace", receivers: Iterable[str] | None = None) -> None:
        self._rows = csv.reader(stream)
        self.source = source
        self.errors = RowErrors(source)
        self.rows = 0  # good rows read so far
        self._receivers = frozenset(receivers) if receivers is not None else None
        self._width = _header(_first(self._rows, source), TRACE_COLUMNS, (TRACE_OPTIONAL,), source)

    def __iter__(self) -> Iterator[Sighting]:
        width, known, errors = self._width, self._receivers, self.errors
        for line, row in _numbered(self._rows, errors):
            if not row:
                continue
            if len(row) != width and not (width == 5 and len(row) == 4):
                errors.add(line, f"expected {width} columns, got {len(row)}")
                continue
            try:
                s = self._sighting(row)
            except ValueError as exc:
                errors.add(line, str(exc))
                continue
            if known is not None and s.receiver not in known:
                errors.add(line, f"receiver {s.receiver!r} is not in the config's [[receivers]]")
                continue
            self.rows += 1
            yield s

    @staticmethod
    def _sighting(row: list[str]) -> Sighting:
        receiver, beacon = row[1].strip(), row[2].strip()
        if not receiver or not beacon:
            raise ValueError("receiver and beacon must not be empty")
        tx = row[4].strip() if len(row) == 5 else ""
        return Sighting(beacon, receiver, _dbm(row[3].strip(), "rssi"), _finite(row[0], "time"),
                        _dbm(tx, "tx_power") if tx else None)


def open_trace(path: str | Path, receivers: Iterable[str] | None = None) -> tuple[IO[str], TraceReader]:
    """The open file (close it when done) and its reader; a missing file raises OSError."""
    f = open(path, newline="", encoding="utf-8")  # noqa: SIM115 - the caller streams it, then closes it
    try:
        return f, TraceReader(f, str(path), receivers)
    except BaseException:
        f.close()
        raise


def read_labels(stream: Iterable[str], source: str = "labels") -> tuple[list[Label], RowErrors]:
    """All labels (they are small), sorted by beacon and start; overlapping labels of one beacon are bad rows."""
    rows = csv.reader(stream)
    _header(_first(rows, source), LABEL_COLUMNS, (), source)
    errors = RowErrors(source)
    out: list[tuple[int, Label]] = []
    for line, row in _numbered(rows, errors):
        if not row:
            continue
        if len(row) != 4:
            errors.add(line, f"expected 4 columns, got {len(row)}")
            continue
        try:
            beacon = row[0].strip()
            if not beacon:
                raise ValueError("beacon must not be empty")
            start, end = _finite(row[1], "start"), _finite(row[2], "end")
            if not end > start:
                raise ValueError(f"end {end:g} is not after start {start:g}")
        except ValueError as exc:
            errors.add(line, str(exc))
            continue
        out.append((line, Label(beacon, start, end, row[3].strip() or None)))
    out.sort(key=lambda x: (x[1].beacon, x[1].start))
    kept: list[Label] = []
    for line, label in out:
        if kept and kept[-1].beacon == label.beacon and label.start < kept[-1].end:
            errors.add(line, f"overlaps the label of {label.beacon!r} ending at {kept[-1].end:g}")
            continue
        kept.append(label)
    return kept, errors


class TraceWriter:
    """Writes sightings as trace rows (the header first, unless appending); times keep full precision."""

    def __init__(self, stream: IO[str], tx_power: bool = False, header: bool = True) -> None:
        self._w = csv.writer(stream, lineterminator="\n")
        self._tx = tx_power
        if header:
            self._w.writerow(TRACE_COLUMNS + ((TRACE_OPTIONAL,) if tx_power else ()))

    def write(self, s: Sighting) -> None:
        row: list[object] = [repr(float(s.time)), s.receiver, s.key, s.rssi]
        if self._tx:
            row.append("" if s.tx_power is None else s.tx_power)
        self._w.writerow(row)

    def write_many(self, sightings: Iterable[Sighting]) -> None:
        for s in sightings:
            self.write(s)


def write_labels(stream: IO[str], labels: Iterable[Label]) -> None:
    w = csv.writer(stream, lineterminator="\n")
    w.writerow(LABEL_COLUMNS)
    for lb in labels:
        w.writerow([lb.beacon, repr(float(lb.start)), repr(float(lb.end)), lb.zone or ""])
