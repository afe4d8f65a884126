"""Real database faults for tests: a SQLite file locked by another process, a PostgreSQL database that
refuses connections (its open ones cut)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import make_url


@contextlib.contextmanager
def sqlite_locked(path: Path) -> Iterator[None]:
    """Another process holds the database's write lock until the block ends."""
    code = ("import sqlite3, sys\n"
            f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "sys.stdin.readline()\n"
            "c.execute('ROLLBACK')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield
    finally:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write("\n")
            proc.stdin.flush()
        proc.wait(10)


def pg_admin(url: str, statement: str) -> None:
    import psycopg

    u = make_url(url)
    with psycopg.connect(host=u.host, port=u.port, user=u.username, password=u.password, dbname="postgres",
                         autocommit=True, connect_timeout=5) as conn:
        conn.execute(statement)


@contextlib.contextmanager
def postgresql_refusing(url: str) -> Iterator[None]:
    """The database takes no new connection, and the gateway's open ones are cut."""
    name = make_url(url).database
    pg_admin(url, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    try:
        pg_admin(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")
        yield
    finally:
        pg_admin(url, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
