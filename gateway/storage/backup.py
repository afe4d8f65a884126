"""Backups and restores of the gateway's database, safe to take while the gateway runs.

SQLite: the online backup API copies pages from a connection that holds one read transaction for the
whole copy, so in WAL mode the gateway keeps writing and the copy is the database as it was when the
backup began (other writers do not restart it). PostgreSQL: ``pg_dump --format=custom`` on a snapshot
exported by a REPEATABLE READ transaction, so the row counts printed are those of the dump.

Every step writes beside the target and renames at the end: a backup is ``FILE.tmp`` until it passed
its check, a restore builds the new database beside the old one and keeps the old one as
``.before-restore``. A bad or missing file, or a backup from a newer schema than this version knows,
is refused before anything changes. Passwords go to the PostgreSQL tools in ``PGPASSWORD``, never on
a command line or in a message.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url

from gateway.storage.db import BUSY_TIMEOUT_MS, MIGRATIONS, Database

BACKUP_PAGES = 256  # pages per step: the source's lock is taken and released between steps
Progress = Callable[[int, int], None]
"""Called after each step with (pages remaining, pages in all); PostgreSQL calls it once, snapshot taken."""


class BackupError(Exception):
    """A backup or restore that could not be done; the message says why and that nothing was changed."""


@dataclass(frozen=True)
class Summary:
    """What a backup holds, or what a restore left: rows per table and the schema revision."""

    path: str
    size_bytes: int
    revision: str
    tables: dict[str, int] = field(default_factory=dict)
    upgraded_from: str | None = None  # a restore of an older schema, brought to this version's

    def lines(self) -> list[str]:
        width = max((len(t) for t in self.tables), default=0)
        return [f"  {name:<{width}}  {n:>10,}" for name, n in sorted(self.tables.items())]


def known_revisions() -> tuple[set[str], set[str]]:
    """(every migration revision this version ships, the heads among them)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(MIGRATIONS))
    return {r.revision for r in script.walk_revisions()}, set(script.get_heads())


def check_revision(revisions: set[str], source: str) -> bool:
    """True when a backup at ``revisions`` is behind this version (a restore then upgrades it); raises
    when it is from a newer version or not a gateway database at all."""
    if not revisions:
        raise BackupError(f"{source}: not a gateway database (no schema revision in it); nothing was changed")
    known, heads = known_revisions()
    unknown = revisions - known
    if unknown:
        raise BackupError(
            f"{source}: the backup is at schema revision {','.join(sorted(unknown))}, newer than this version "
            f"knows (latest {','.join(sorted(heads))}): restore it with the version that made it or a later "
            "one; nothing was changed")
    return revisions != heads


def backup(url: str, dest: str | Path, progress: Progress | None = None, pages: int = BACKUP_PAGES) -> Summary:
    """Back the database at ``url`` up to ``dest`` while it may be in use; the checked copy's summary."""
    u = make_url(url)
    target = Path(dest)
    if target.is_dir():
        raise BackupError(f"{target} is a directory: give the backup file's name")
    if not target.parent.is_dir():
        raise BackupError(f"{target.parent}: no such directory")
    if u.get_backend_name() == "sqlite":
        return _sqlite_backup(_sqlite_path(u), target, progress, pages)
    if u.get_backend_name() == "postgresql":
        return _pg_backup(u, target, progress)
    raise BackupError(f"backups of {u.get_backend_name()} databases are not supported (SQLite, PostgreSQL)")


def restore(url: str, src: str | Path, store_id: str | None = None) -> Summary:
    """Replace the database at ``url`` with the backup ``src`` (the gateway stopped); an older schema is
    upgraded to this version's (``store_id`` as at start). Nothing changes unless every check passed."""
    u = make_url(url)
    source = Path(src)
    if not source.is_file():
        raise BackupError(f"{source}: no such file; nothing was changed")
    if u.get_backend_name() == "sqlite":
        return _sqlite_restore(_sqlite_path(u), source, store_id)
    if u.get_backend_name() == "postgresql":
        return _pg_restore(u, source, store_id)
    raise BackupError(f"restores to {u.get_backend_name()} databases are not supported (SQLite, PostgreSQL)")


# -- SQLite ---------------------------------------------------------------------------------------


def _sqlite_path(u: URL) -> Path:
    if not u.database or u.database == ":memory:":
        raise BackupError("an in-memory SQLite database has nothing to back up or restore")
    return Path(u.database)


def _counts(conn: Any, tables: list[str]) -> dict[str, int]:
    def quoted(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    return {t: int(conn.execute(f"SELECT count(*) FROM {quoted(t)}").fetchone()[0]) for t in tables}


def _sqlite_summary(conn: sqlite3.Connection, path: Path) -> Summary:
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    return Summary(str(path), path.stat().st_size, ",".join(sorted(_sqlite_revisions(conn))), _counts(conn, tables))


def _sqlite_revisions(conn: sqlite3.Connection) -> set[str]:
    try:
        return {r[0] for r in conn.execute("SELECT version_num FROM alembic_version")}
    except sqlite3.OperationalError:  # no such table: not a gateway database
        return set()


def _integrity(conn: sqlite3.Connection, path: Path, what: str) -> None:
    rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
    if rows != ["ok"]:
        raise BackupError(f"{path}: {what} failed its integrity check ({'; '.join(rows[:3])}); nothing was changed")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_pages(src: sqlite3.Connection, path: Path, progress: Progress | None, pages: int) -> sqlite3.Connection:
    """``src`` copied into a new file at ``path`` (a rollback-journal database, one self-contained file)."""
    try:
        path.unlink(missing_ok=True)
        dst = sqlite3.connect(path, isolation_level=None)
        dst.execute("PRAGMA user_version").fetchone()  # opens the file: a directory we cannot write fails here
    except (OSError, sqlite3.Error) as exc:
        raise BackupError(f"{path}: cannot be written ({exc}); nothing was changed") from exc
    try:
        step = None if progress is None else (lambda _status, remaining, total: progress(remaining, total))
        # sleep only applies when a step finds the source busy; with the read transaction held it never is
        src.backup(dst, pages=pages, progress=step, sleep=0)
        dst.execute("PRAGMA journal_mode=DELETE")
    except BaseException:
        dst.close()
        path.unlink(missing_ok=True)
        raise
    return dst


def _sqlite_backup(path: Path, target: Path, progress: Progress | None, pages: int) -> Summary:
    if not path.is_file():
        raise BackupError(f"no database at {path}")
    tmp = target.with_name(target.name + ".tmp")
    try:
        with closing(sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)) as src:
            src.execute("BEGIN")
            src.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the snapshot starts here
            with closing(_copy_pages(src, tmp, progress, pages)) as dst:
                src.execute("ROLLBACK")
                _integrity(dst, tmp, "the backup")
                summary = _sqlite_summary(dst, tmp)
        if not summary.revision:
            raise BackupError(f"{path}: not a gateway database (no schema revision in it)")
        _fsync(tmp)
        os.replace(tmp, target)
    except sqlite3.DatabaseError as exc:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"{path}: {exc}; no backup was written") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Summary(str(target), target.stat().st_size, summary.revision, summary.tables)


def _read_only(path: Path) -> str:
    return path.resolve().as_uri() + "?mode=ro"


def _refuse_if_open(path: Path) -> None:
    """Refuse when another process has the database open: leaving WAL mode needs it to be the only
    connection, and doing so also folds the WAL into the file that is kept as ``.before-restore``."""
    if not path.exists():
        return
    try:
        with closing(sqlite3.connect(path, timeout=0, isolation_level=None)) as conn:
            mode = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc) and "busy" not in str(exc):
            return  # unreadable (the reason to restore, often): it is set aside as it is
        mode = "wal"
    except sqlite3.DatabaseError:
        return
    if str(mode).lower() == "wal":
        raise BackupError(f"{path} is open in another process (a running gateway?): stop the gateway first, "
                          "then restore; nothing was changed")


def _sqlite_restore(path: Path, source: Path, store_id: str | None) -> Summary:
    try:
        with closing(sqlite3.connect(_read_only(source), uri=True)) as src:
            _integrity(src, source, "the backup")
            revisions = _sqlite_revisions(src)
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{source}: not a SQLite backup ({exc}); nothing was changed") from exc
    behind = check_revision(revisions, str(source))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # a new box restored before its first start
    except OSError as exc:
        raise BackupError(f"{path.parent}: cannot be created ({exc.strerror}); nothing was changed") from exc
    _refuse_if_open(path)
    tmp = path.with_name(path.name + ".restore-tmp")
    try:
        with closing(sqlite3.connect(_read_only(source), uri=True)) as src:
            _copy_pages(src, tmp, None, -1).close()
        if behind:
            db = Database(f"sqlite:///{tmp}")
            try:
                db.upgrade(store_id)
            finally:
                db.dispose()
        with closing(sqlite3.connect(tmp, isolation_level=None)) as conn:
            conn.execute("PRAGMA journal_mode=DELETE")
            _integrity(conn, tmp, "the restored database")
            summary = _sqlite_summary(conn, tmp)
        _fsync(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    kept = path.with_name(path.name + ".before-restore")
    for suffix in ("", "-wal", "-shm"):  # a stale WAL must never be applied to the restored file
        old = Path(f"{path}{suffix}")
        if old.exists():
            os.replace(old, f"{kept}{suffix}")
    os.replace(tmp, path)
    return Summary(str(path), path.stat().st_size, summary.revision, summary.tables,
                   upgraded_from=",".join(sorted(revisions)) if behind else None)


# -- PostgreSQL -----------------------------------------------------------------------------------


def _pg_env(u: URL) -> dict[str, str]:
    """libpq's environment for ``u``: the password goes here, so no process listing or log shows it."""
    env = dict(os.environ)
    for key, value in (("PGHOST", u.host), ("PGPORT", u.port), ("PGUSER", u.username),
                       ("PGPASSWORD", u.password), ("PGDATABASE", u.database)):
        if value is not None:
            env[key] = str(value)
    for option, key in (("sslmode", "PGSSLMODE"), ("connect_timeout", "PGCONNECT_TIMEOUT")):
        given = u.query.get(option)
        if isinstance(given, str):
            env[key] = given
    return env


def _pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} was not found on PATH: install the PostgreSQL client (apt-get install "
                          "postgresql-client) of the server's major version or newer")
    return found


def _run(argv: list[str], u: URL, what: str, after: str = "") -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, env=_pg_env(u), capture_output=True, text=True, check=False)
    if r.returncode != 0:
        detail = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[0]
        if u.password:
            detail = detail.replace(u.password, "***")
        raise BackupError(f"{what}: {detail}{after}")
    return r


def _shown(u: URL) -> str:
    return u.render_as_string(hide_password=True).split("@")[-1]


@contextmanager
def _pg_connection(u: URL) -> Iterator[Any]:
    db = Database(u.render_as_string(hide_password=False))
    try:
        with db.engine.connect() as conn:
            yield conn
    except BackupError:
        raise
    except Exception as exc:
        from gateway.storage.db import describe

        raise BackupError(f"database {_shown(u)}: {describe(exc)}; nothing was changed") from exc
    finally:
        db.dispose()


def _pg_tables(conn: Any) -> list[str]:
    return [r[0] for r in conn.execute(text(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename"))]


def _pg_counts(conn: Any) -> tuple[str, dict[str, int]]:
    tables = _pg_tables(conn)
    counts = {t: int(conn.execute(text(f'SELECT count(*) FROM "{t}"')).scalar_one()) for t in tables}
    revision = ""
    if "alembic_version" in tables:
        revision = ",".join(sorted(conn.execute(text("SELECT version_num FROM alembic_version")).scalars()))
    return revision, counts


def _pg_backup(u: URL, target: Path, progress: Progress | None) -> Summary:
    pg_dump = _pg_tool("pg_dump")
    tmp = target.with_name(target.name + ".tmp")
    try:
        with _pg_connection(u) as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                snapshot = conn.execute(text("SELECT pg_export_snapshot()")).scalar_one()
                revision, counts = _pg_counts(conn)  # the snapshot's rows: those of the dump
                if not revision:
                    raise BackupError(f"database {_shown(u)}: not a gateway database (no schema revision in it)")
                if progress is not None:
                    progress(0, 1)
                _run([pg_dump, "--format=custom", "--no-password", f"--snapshot={snapshot}", f"--file={tmp}"],
                     u, f"pg_dump of {_shown(u)}")
        _run([_pg_tool("pg_restore"), "--list", str(tmp)], u, f"{tmp}: the dump does not read back")
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Summary(str(target), target.stat().st_size, revision, counts)


_COPY = re.compile(r"^COPY (?:\S+\.)?alembic_version \(version_num\) FROM stdin;$")


def _archive_revisions(source: Path, u: URL) -> set[str]:
    """The alembic_version rows inside a pg_dump archive, read without restoring anything."""
    pg_restore = _pg_tool("pg_restore")
    unchanged = "; nothing was changed"
    _run([pg_restore, "--list", str(source)], u, f"{source}: not a pg_dump custom-format archive", unchanged)
    out = _run([pg_restore, "--data-only", "--table=alembic_version", "--file=-", str(source)], u,
               f"{source}: its schema revision cannot be read", unchanged).stdout.splitlines()
    revisions: set[str] = set()
    for i, line in enumerate(out):
        if _COPY.match(line):
            for row in out[i + 1:]:
                if row == "\\.":
                    break
                revisions.add(row.strip())
    return revisions


def _pg_restore(u: URL, source: Path, store_id: str | None) -> Summary:
    revisions = _archive_revisions(source, u)
    behind = check_revision(revisions, str(source))
    with _pg_connection(u) as conn:
        others = conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")).scalar_one()
    if others:
        raise BackupError(f"database {_shown(u)} has {others} other connection(s) (a running gateway?): stop the "
                          "gateway first, then restore; nothing was changed")
    assert u.database is not None
    # one transaction: a failure half-way leaves the database as it was
    _run([_pg_tool("pg_restore"), "--clean", "--if-exists", "--no-owner", "--no-privileges", "--single-transaction",
          "--exit-on-error", "--no-password", f"--dbname={u.database}", str(source)], u,
         f"pg_restore into {_shown(u)}", "; rolled back, nothing was changed")
    url = u.render_as_string(hide_password=False)
    if behind:
        db = Database(url)
        try:
            db.upgrade(store_id)
        finally:
            db.dispose()
    with _pg_connection(u) as conn:
        revision, counts = _pg_counts(conn)
    return Summary(_shown(u), source.stat().st_size, revision, counts,
                   upgraded_from=",".join(sorted(revisions)) if behind else None)
