"""Engine creation, schema upgrades and the database's health. SQLite gets WAL and foreign keys;
PostgreSQL is used as is.

A database error is either *transient* (locked, disk full, unreachable, the server restarting: the
same write succeeds later, so nothing may be acknowledged or dead-lettered for it) or a fault of the
data. :func:`is_transient` tells them apart; :class:`Outage` turns a run of transient errors into one
log line and answers readiness while it lasts.
"""

from __future__ import annotations

import ast
import functools
import logging
import math
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import CursorResult, Engine, create_engine, event, exc, inspect, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger("gateway.storage")
BUSY_TIMEOUT_MS = 5000
PROBE_TIMEOUT_MS = 500  # the readiness probe's own wait for a write lock
MIN_FREE_BYTES = 16 * 1024 * 1024  # below this the data dir counts as full: SQLite fails mid-transaction
PG_CONNECT_TIMEOUT_S = 5


def is_transient(error: BaseException) -> bool:
    """True for errors of the database's state, not of the data: the same statement may pass later.

    SQLite says "database is locked" or "database or disk is full" as OperationalError; PostgreSQL's
    connection failures, shutdowns, disk full and serialization conflicts are OperationalError too
    (psycopg maps SQLSTATE classes 08, 53, 57 and 40 there). Integrity and data errors are not transient.
    """
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated:
            return True
        error = error.orig if error.orig is not None else error
    if isinstance(error, exc.OperationalError | exc.DisconnectionError | exc.TimeoutError | exc.InterfaceError):
        return True
    if isinstance(error, sqlite3.OperationalError):
        text = str(error).lower()
        return "locked" in text or "full" in text or "busy" in text or "disk i/o" in text or "unable to open" in text
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)


def describe(error: BaseException) -> str:
    """One line for the log: the driver's message without SQLAlchemy's statement and parameters."""
    orig = getattr(error, "orig", None) or error
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    return f"{type(orig).__name__}: {text}"[:300]


class Outage:
    """One log line per database outage, however many requests and batches fail during it.

    ``failed`` is called with every transient error, ``succeeded`` whenever the database answered a
    write or a probe. While an outage lasts, readiness says so and the API answers 503.
    """

    def __init__(self, name: str = "database") -> None:
        self.name = name
        self.since: float | None = None
        self.last = 0.0  # monotonic time of the latest transient error
        self.reason = ""
        self.refused = 0
        self.outages = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.since is not None

    def failed(self, error: BaseException) -> None:
        reason = describe(error)
        with self._lock:
            self.refused += 1
            self.last = time.monotonic()
            if self.since is not None:
                self.reason = reason
                return
            self.since = time.monotonic()
            self.reason = reason
            self.outages += 1
        log.warning("%s unavailable (%s): inputs are held and the API answers 503 until it is back",
                    self.name, reason)

    def recent(self, within_s: float = 10.0) -> bool:
        """An outage whose latest failure is this fresh: readiness trusts it over a probe that passed (a
        PostgreSQL disk full still answers SELECT 1)."""
        return self.since is not None and time.monotonic() - self.last < within_s

    def succeeded(self) -> None:
        if self.since is None:
            return
        with self._lock:
            since, self.since = self.since, None
            refused, self.refused = self.refused, 0
        if since is not None:
            log.warning("%s available again after %.1f s (%d failed operation(s) held or refused meanwhile)",
                        self.name, time.monotonic() - since, refused)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")  # durable across app crashes in WAL; fsync at checkpoint
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    cur.close()


def make_engine(url: str, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> Engine:
    """``busy_timeout_ms``: how long a SQLite write waits for another writer's lock before it fails
    (transiently: the work is held and retried, see is_transient)."""
    if url.startswith("sqlite"):
        db_path = url.split("///", 1)[-1]
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", functools.partial(_sqlite_pragmas, busy_timeout_ms=busy_timeout_ms))
        return engine
    connect_args = {"connect_timeout": PG_CONNECT_TIMEOUT_S} if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


@functools.cache
def shipped_heads() -> frozenset[str]:
    """The migration heads this version ships, read from the migration files' ``revision`` and
    ``down_revision`` lines: a start on a current schema then never imports Alembic (9 MB, 0.2 s)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                if node.targets[0].id == "revision":
                    revisions.add(str(ast.literal_eval(node.value)))
                elif node.targets[0].id == "down_revision":
                    down = ast.literal_eval(node.value)
                    parents.update([down] if isinstance(down, str) else down or ())
    return frozenset(revisions - parents)


def applied_revisions(conn: Any) -> set[str]:
    """The revisions recorded in the database (empty before the first migration)."""
    if not inspect(conn).has_table("alembic_version"):
        return set()
    return {str(r[0]) for r in conn.exec_driver_sql("SELECT version_num FROM alembic_version")}


def upgrade(engine: Engine, revision: str = "heads", store_id: str | None = None) -> None:
    """Apply Alembic migrations; run at every start so a new version migrates itself. ``store_id``: the
    gateway's store, which rows older than the store columns are given (migration 0012)."""
    if revision == "heads":
        with engine.connect() as conn:
            current = applied_revisions(conn) == shipped_heads()
        if current:
            return
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        cfg.attributes["store_id"] = store_id
        command.upgrade(cfg, revision)


class Database:
    """An engine and its session factory."""

    def __init__(self, url: str, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.url = url
        self.busy_timeout_ms = busy_timeout_ms
        self.engine = make_engine(url, busy_timeout_ms)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.outage = Outage()

    def upgrade(self, store_id: str | None = None) -> None:
        upgrade(self.engine, store_id=store_id)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits on success, rolls back on error."""
        with self.sessions() as s, s.begin():
            yield s

    def schema_state(self) -> str:
        """``current`` when the database is at every migration head this version ships, else ``behind``
        (or ``unknown`` when it cannot be read): readiness, so traffic waits for an upgrade."""
        try:
            with self.engine.connect() as conn:
                applied = applied_revisions(conn)
        except Exception:
            return "unknown"
        return "current" if applied == shipped_heads() else "behind"

    def probe(self) -> str:
        """Can a write start now? ``ok``, ``locked`` (another writer holds it past the probe's short wait),
        ``full`` (the data dir has no room) or ``down`` (no connection). Writes nothing."""
        if self.engine.dialect.name == "sqlite":
            path = self.url.split("///", 1)[-1]
            if path and path != ":memory:":
                try:
                    room = shutil.disk_usage(Path(path).parent)
                except OSError:
                    return "down"
                if room.free < min(MIN_FREE_BYTES, room.total // 20):
                    return "full"
        try:
            with self.engine.connect() as conn:
                if conn.dialect.name == "sqlite":
                    raw = conn.connection.dbapi_connection
                    assert raw is not None
                    raw.execute(f"PRAGMA busy_timeout={min(PROBE_TIMEOUT_MS, self.busy_timeout_ms)}")
                    try:
                        raw.execute("BEGIN IMMEDIATE")  # waits for, or fails on, another writer's lock
                        raw.execute("ROLLBACK")
                    finally:
                        raw.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
                else:
                    conn.exec_driver_sql(f"SET LOCAL statement_timeout = {PROBE_TIMEOUT_MS * 4}")
                    conn.exec_driver_sql("SELECT 1")
                    conn.rollback()
        except Exception as error:
            text = str(error).lower()
            if "locked" in text or "busy" in text:
                return "locked"
            if "full" in text or "no space" in text:
                return "full"
            return "down"
        return "ok"

    def dispose(self) -> None:
        self.engine.dispose()


def upsert_insert(on: Session | str, table: Any) -> Any:
    """An INSERT that can take ON CONFLICT, for the session's (or the named) dialect: SQLite and PostgreSQL
    spell the clause alike in SQLAlchemy, but each has its own insert construct."""
    name = on if isinstance(on, str) else on.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"storage supports SQLite and PostgreSQL, not {name}")


def shift_stamps(session: Session, column: Any, after: float, upto: float, by: float, *where: Any) -> int:
    """Move ``column`` by ``by`` on the rows (of ``where``) stamped in (``after``, ``upto``]: what a wall-clock
    step leaves stamped on the clock as it was. Returns how many rows moved."""
    moved = [*where, column <= upto]
    if after > -math.inf:
        moved.append(column > after)
    result = session.execute(update(column.class_).where(*moved).values({column.key: column + by})
                             .execution_options(synchronize_session=False))
    return result.rowcount if isinstance(result, CursorResult) else 0
