"""Recording sightings as trace files (the format of gateway/presence/traces.py), one file per hour.

What a recording may hold is what presence data may: an identity the gateway does not know (not
enrolled, or a passer-by) is written only as a hash salted per file, so rows of one file still say
"the same tag" while no file can be joined with another or with an address or raw id. Files older
than the store's presence retention are deleted by ``purge``.

Erasure: an enrolled key is written as is (a calibration walk's labels name it), so erasing its
profile rewrites the files: ``scrub`` turns each of that key's rows into an anonymous alias, as if the
tag had never been enrolled (the current file: its own salt, so later rows match; a closed file: a salt
drawn for the rewrite and dropped). The rows stay, so a replay still counts the footfall.
"""

from __future__ import annotations

import calendar
import csv
import hashlib
import operator
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from beacons.types import Sighting
from gateway.presence.traces import TRACE_COLUMNS, TRACE_OPTIONAL

HOUR_S = 3600.0
PREFIX = "trace-"
SUFFIX = ".csv"
ANON = "anon-"  # the key of an unknown identity in a recording: ANON + 16 hex digits
KEY_COLUMN = 2  # time,receiver,beacon,...
PENDING = ".scrub-pending"  # app keys of erasures whose rewrite is under way; a start after a crash redoes it
HEADER = ",".join((*TRACE_COLUMNS, TRACE_OPTIONAL)) + "\n"
_QUOTED = frozenset(',"\r\n')
_TIME = operator.itemgetter(3)  # Sighting.time


def csv_field(text: str) -> str:
    """``text`` as one CSV field, quoted only if it must be (as the csv module's minimal quoting does)."""
    return '"' + text.replace('"', '""') + '"' if _QUOTED.intersection(text) else text


class RecordError(ValueError):
    """The recording directory cannot be used (not creatable, not writable): says which and why."""


def salted(key: str, salt: bytes) -> str:
    """The anonymous alias of ``key`` under one file's salt."""
    return ANON + hashlib.blake2b(key.encode(), key=salt, digest_size=8).hexdigest()


def scrub_file(path: Path, gone: Callable[[str], bool], alias: Callable[[str], str]) -> int:
    """Rewrite ``path`` with ``alias(key)`` for every row whose key is ``gone``; the rows changed.

    Written to a hidden temporary file beside it and renamed over it, so a crash leaves either the old
    file or the new one. Rows it cannot read as CSV are copied unchanged; a file with nothing to change
    is left untouched. A file deleted meanwhile (purged) is skipped.
    """
    tmp = path.with_name(f".{path.name}.scrub")
    changed = 0
    try:
        with open(path, newline="", encoding="utf-8") as src, open(tmp, "w", newline="", encoding="utf-8") as dst:
            out = csv.writer(dst, lineterminator="\n")
            for n, row in enumerate(csv.reader(src)):
                if n and len(row) > KEY_COLUMN and not row[KEY_COLUMN].startswith(ANON) and gone(row[KEY_COLUMN]):
                    row[KEY_COLUMN] = alias(row[KEY_COLUMN])
                    changed += 1
                out.writerow(row)
    except FileNotFoundError:
        tmp.unlink(missing_ok=True)
        return 0
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if changed:
        os.replace(tmp, path)
    else:
        tmp.unlink()
    return changed


def _fresh_alias() -> Callable[[str], str]:
    """Aliases under a salt drawn now and never kept: for rewriting a file whose own salt is gone."""
    salt = os.urandom(16)
    return lambda key: salted(key, salt)


def hour_name(t: float) -> str:
    """The file of the UTC hour holding unix time ``t``: trace-YYYYMMDDTHH.csv (sorts by time)."""
    return PREFIX + time.strftime("%Y%m%dT%H", time.gmtime(t)) + SUFFIX


class TraceRecorder:
    """Appends sightings to the current hour's trace file; ``known(key)`` says which keys are kept as is.

    Writes are buffered: ``write`` formats a drain into one string for the file's buffer, ``flush`` (the
    runtime's tick, and ``close``) hands it to the OS. What each key is written as is kept for the hour
    (``known`` is asked once per key and file; ``scrub_current`` forgets the clear ones after an erasure).
    One thread writes (the pipeline's worker); ``scrub_closed`` may run on another.
    """

    def __init__(self, directory: str | Path, known: Callable[[str], bool]) -> None:
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.dir, prefix=".probe-"):
                pass  # created and deleted: the directory takes new files
        except OSError as exc:
            raise RecordError(f"cannot record into {self.dir}: {exc.strerror or exc}") from None
        for tmp in self.dir.glob(f".{PREFIX}*{SUFFIX}.scrub"):  # a rewrite a crash cut short: the file is intact
            tmp.unlink(missing_ok=True)
        self._scrubbing, self._scrub_failed = 0, False
        self._pending = threading.Lock()
        self._known = known
        self._hour = -1
        self._end = float("-inf")  # when the open file's hour ends
        self._file: IO[str] | None = None
        self._salt = b""
        self._alias: dict[str, str] = {}  # key -> the field written for it in this file
        self._receivers: dict[str, str] = {}  # receiver id -> its CSV field
        self._files = threading.Lock()  # a file is either rewritten or purged, never both at once

    @property
    def current(self) -> Path | None:
        """The file being written, if one is open."""
        return self.dir / hour_name(self._hour * HOUR_S) if self._file is not None else None

    def _open(self, hour: int, salt: bytes | None = None) -> IO[str]:
        self.close()
        path = self.dir / hour_name(hour * HOUR_S)
        fresh = not path.exists() or path.stat().st_size == 0
        f = self._file = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - held open for the hour
        if salt is None:  # a new salt per file, also when a restart appends to this hour's file
            self._salt, self._alias = os.urandom(16), {}
        self._hour, self._end = hour, (hour + 1) * HOUR_S
        if fresh:
            f.write(HEADER)
        return f

    def _field(self, key: str) -> str:
        field = self._alias[key] = csv_field(key) if self._known(key) else salted(key, self._salt)
        return field

    def _receiver(self, receiver: str) -> str:
        field = self._receivers[receiver] = csv_field(receiver)
        return field

    def write(self, sightings: Iterable[Sighting]) -> None:
        """Sightings stamped in unix time; each lands in the file of its own hour (a late sighting of the
        hour before stays in the current file). One string per drain and file."""
        batch = sightings if isinstance(sightings, list) else list(sightings)
        if not batch:
            return
        f = self._file
        if f is not None and max(map(_TIME, batch)) < self._end:  # the usual drain: all in the open file
            f.write(self._lines(batch))
            return
        start = 0
        for n, s in enumerate(batch):  # the drain crosses an hour (or nothing is open yet)
            if f is None or s.time >= self._end:
                if n > start and f is not None:
                    f.write(self._lines(batch[start:n]))
                f, start = self._open(int(s.time // HOUR_S)), n
        assert f is not None
        f.write(self._lines(batch[start:]))

    def _lines(self, batch: list[Sighting]) -> str:
        alias, receivers, field, receiver_field = self._alias.get, self._receivers.get, self._field, self._receiver
        return "".join([f"{float(t)!r},{receivers(r) or receiver_field(r)},{alias(k) or field(k)},{rssi},"
                        f"{'' if tx is None else tx}\n" for k, r, rssi, t, tx in batch])

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._hour, self._end = -1, float("-inf")

    def scrub_current(self, gone: Callable[[str], bool]) -> int:
        """Erasure in the file being written (on the writing thread): ``gone`` keys become this file's
        own alias, so the rows written from now on match them. The rows changed."""
        path = self.current
        if path is None:
            return 0
        hour = self._hour
        self.close()
        with self._files:
            changed = scrub_file(path, gone, lambda key: salted(key, self._salt))
        self._open(hour, salt=self._salt)
        self._alias = {k: v for k, v in self._alias.items() if v.startswith(ANON)}  # known ones asked again
        return changed

    def closed_files(self) -> list[Path]:
        """Every trace file but the one being written (read on the writing thread, for ``scrub_closed``)."""
        current = self.current
        return [p for p in sorted(self.dir.glob(f"{PREFIX}*{SUFFIX}")) if p != current]

    def scrub_closed(self, files: Iterable[Path], gone: Callable[[str], bool]) -> int:
        """Erasure in files no longer written (any thread): each rewritten with a salt of its own. The rows
        changed."""
        changed = 0
        for path in files:
            with self._files:
                changed += scrub_file(path, gone, _fresh_alias())
        return changed

    def begin_scrub(self, keys: Iterable[str]) -> None:
        """An erasure's rewrite starts: ``keys`` (its app keys) are noted in the directory until every rewrite
        under way has ended, so a start after a crash can redo it (``pending_scrub``)."""
        with self._pending:
            self._scrubbing += 1
            with open(self.dir / PENDING, "a", encoding="utf-8") as f:
                f.write("".join(k + "\n" for k in keys))
                f.flush()
                os.fsync(f.fileno())

    def end_scrub(self, ok: bool = True) -> None:
        """A rewrite ended; the note goes once all have, and none failed (a failed one is redone at start)."""
        with self._pending:
            self._scrubbing -= 1
            self._scrub_failed = self._scrub_failed or not ok
            if self._scrubbing <= 0 and not self._scrub_failed:
                (self.dir / PENDING).unlink(missing_ok=True)

    def pending_scrub(self) -> set[str] | None:
        """The app keys of erasures whose rewrite a crash (or a failure) left unfinished; None: nothing to redo."""
        try:
            text = (self.dir / PENDING).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return {line for line in text.splitlines() if line}

    def scrub(self, gone: Callable[[str], bool]) -> int:
        """Every file, on the writing thread: ``scrub_current`` and ``scrub_closed``."""
        closed = self.closed_files()
        return self.scrub_current(gone) + self.scrub_closed(closed, gone)

    def purge(self, now: float, retention_days: float) -> list[Path]:
        """Delete the files whose hour ended more than ``retention_days`` before ``now`` (0: keep all)."""
        if retention_days <= 0:
            return []
        cutoff = now - retention_days * 86400.0
        current = self.current
        gone = []
        for path in sorted(self.dir.glob(f"{PREFIX}*{SUFFIX}")):
            try:
                start = calendar.timegm(time.strptime(path.name[len(PREFIX):-len(SUFFIX)], "%Y%m%dT%H"))
            except ValueError:
                continue  # not one of ours
            if start + HOUR_S <= cutoff and path != current:
                with self._files:
                    path.unlink(missing_ok=True)
                gone.append(path)
        return gone
