"""`gateway db backup` / `db restore`: a backup taken while rows are being committed restores to a sound
database holding every row committed before it began; bad files, newer schemas and a database still in
use are refused with nothing changed; an older schema is brought current."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from gateway.clock import VirtualClock
from gateway.profiles.service import NewProfile
from gateway.storage.backup import BackupError, backup, restore
from gateway.storage.db import Database, shipped_heads, upgrade
from tests.fixtures import make_service

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_780_300_800.0
WAIT_S = 30.0  # bound on every wait for the writer thread
HEAD = ",".join(sorted(shipped_heads()))  # this version's schema


class Writer(threading.Thread):
    """Enrols profiles one transaction at a time through the real service until stopped; ``committed``
    holds the ids whose commit has returned."""

    def __init__(self, db: Database) -> None:
        super().__init__(daemon=True)
        self.service = make_service(db, VirtualClock(T0))
        self.committed: list[int] = []
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        i = 0
        try:
            while not self.stop.is_set():
                pid = self.service.create_profile(NewProfile(external_id=f"w{i}", name=f"writer {i}",
                                                             attributes={"pad": "x" * 200}))["id"]
                i += 1
                with self.cond:
                    self.committed.append(int(pid))
                    self.cond.notify_all()
        except BaseException as exc:  # reported by wait_for / the test
            self.error = exc
            with self.cond:
                self.cond.notify_all()

    def wait_for(self, n: int) -> list[int]:
        """Block until at least n rows are committed; the ids committed so far."""
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.committed) >= n or self.error is not None, WAIT_S), \
                f"the writer committed only {len(self.committed)} rows"
            assert self.error is None, self.error
            return list(self.committed)


@pytest.fixture
def restore_url(db_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """An empty target on the same engine as db_url: a new SQLite path, or a new PostgreSQL database."""
    if db_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path}/restored/gw.db"
        return
    from tests.conftest import fresh_pg_database

    with fresh_pg_database(request.getfixturevalue("pg_url"), "gw_restore") as url:
        yield url


def profile_ids(url: str) -> set[int]:
    db = Database(url)
    try:
        with db.engine.connect() as conn:
            return {int(r[0]) for r in conn.execute(text("SELECT id FROM profiles"))}
    finally:
        db.dispose()


def integrity(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("PRAGMA integrity_check")]


def test_a_backup_during_traffic_restores_every_row_committed_before_it_began(
        db_url: str, restore_url: str, tmp_path: Path) -> None:
    db = Database(db_url)
    db.upgrade()
    writer = Writer(db)
    writer.start()
    during: list[int] = []
    try:
        before = writer.wait_for(40)  # committed before the backup began: every one must come back

        def step(remaining: int, total: int) -> None:
            if not during:  # the backup is under way: more rows are committed before it may go on
                during.extend(writer.wait_for(len(before) + 10))

        summary = backup(db_url, tmp_path / "gw.backup", progress=step, pages=4)
    finally:
        writer.stop.set()
        writer.join(WAIT_S)
        db.dispose()
    assert writer.error is None, writer.error
    assert len(during) >= len(before) + 10  # rows were committed while the backup ran
    assert summary.revision == HEAD
    assert len(before) <= summary.tables["profiles"] <= len(writer.committed)
    assert not (tmp_path / "gw.backup.tmp").exists()

    restored = restore(restore_url, tmp_path / "gw.backup")
    if restore_url.startswith("sqlite"):
        assert integrity(Path(make_url(restore_url).database or "")) == ["ok"]
    ids = profile_ids(restore_url)
    assert set(before) <= ids
    assert len(ids) == summary.tables["profiles"] == restored.tables["profiles"]  # one snapshot, counted as dumped
    assert ids <= set(writer.committed)
    target = Database(restore_url)
    try:
        assert target.schema_state() == "current"  # the gateway starts on it as it is
    finally:
        target.dispose()


def enrolled(url: str, n: int, prefix: str = "p") -> None:
    db = Database(url)
    db.upgrade()
    service = make_service(db, VirtualClock(T0))
    for i in range(n):
        service.create_profile(NewProfile(external_id=f"{prefix}{i}", name=f"{prefix}{i}"))
    db.dispose()


@pytest.mark.parametrize("content", [b"not a database at all\n" * 100, None, b""])
def test_a_missing_corrupt_or_truncated_backup_is_refused_and_changes_nothing(tmp_path: Path,
                                                                               content: bytes | None) -> None:
    url = f"sqlite:///{tmp_path}/gw.db"
    enrolled(url, 3)
    good = tmp_path / "good.backup"
    backup(url, good)
    bad = tmp_path / "bad.backup"
    if content is None:  # a copy cut in half, as a full disk or an interrupted copy leaves it
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif content:
        bad.write_bytes(content)
    before = (tmp_path / "gw.db").read_bytes()
    with pytest.raises(BackupError, match="nothing was changed"):
        restore(url, bad if content != b"" else tmp_path / "missing.backup")
    assert (tmp_path / "gw.db").read_bytes() == before
    assert profile_ids(url) == {1, 2, 3}
    assert sorted(p.name for p in tmp_path.iterdir() if "restore" in p.name) == []


def test_a_backup_from_a_newer_schema_is_refused_and_changes_nothing(db_url: str, restore_url: str,
                                                                      tmp_path: Path) -> None:
    newer = Database(db_url)
    newer.upgrade()
    with newer.engine.begin() as conn:  # as a later version leaves it
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    newer.dispose()
    backup(db_url, tmp_path / "newer.backup")
    enrolled(restore_url, 2)  # the database a restore would replace
    with pytest.raises(BackupError, match=rf"revision 0099, newer than this version knows \(latest {HEAD}\)"):
        restore(restore_url, tmp_path / "newer.backup")
    assert profile_ids(restore_url) == {1, 2}
    target = Database(restore_url)
    try:
        assert target.schema_state() == "current"
    finally:
        target.dispose()


def test_a_backup_from_an_older_schema_is_restored_then_upgraded(db_url: str, restore_url: str,
                                                                  tmp_path: Path) -> None:
    old = Database(db_url)
    upgrade(old.engine, "0011")  # an older version's database, before stores had ids
    with old.engine.begin() as conn:
        conn.execute(text("INSERT INTO footfall_counts (day, zone, anonymous_visits, anonymous_dwell_s) "
                          "VALUES ('2026-06-01', 'shoes', 7, 420.0)"))
    old.dispose()
    backup(db_url, tmp_path / "old.backup")
    summary = restore(restore_url, tmp_path / "old.backup", store_id="store-042")
    assert (summary.upgraded_from, summary.revision) == ("0011", HEAD)
    if restore_url.startswith("sqlite"):
        assert integrity(Path(make_url(restore_url).database or "")) == ["ok"]
    db = Database(restore_url)
    try:
        assert db.schema_state() == "current"
        with db.engine.connect() as conn:
            rows = conn.execute(text("SELECT store_id, zone, anonymous_visits FROM footfall_counts")).all()
        assert [tuple(r) for r in rows] == [("store-042", "shoes", 7)]
    finally:
        db.dispose()


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.app.cli", "db", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_the_commands_back_up_a_database_in_use_and_restore_only_once_it_is_closed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/gw.db"
    enrolled(url, 5)
    live = Database(url)  # this process holds it open, as a running gateway does
    with live.session() as s:
        s.execute(text("SELECT 1 FROM profiles")).all()
    r = gateway("backup", str(tmp_path / "b.backup"), "--url", url)
    assert r.returncode == 0, r.stderr
    assert f"schema {HEAD}" in r.stdout
    assert [line.split() for line in r.stdout.splitlines() if line.split()[0] == "profiles"] == [["profiles", "5"]]

    enrolled(url, 2, prefix="late")  # committed after the backup: the restore takes them away
    refused = gateway("restore", str(tmp_path / "b.backup"), "--url", url)
    assert refused.returncode == 2
    assert "open in another process" in refused.stderr and "stop the gateway first" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert len(profile_ids(url)) == 7 and not (tmp_path / "gw.db.before-restore").exists()

    live.dispose()  # the gateway stopped
    done = gateway("restore", str(tmp_path / "b.backup"), "--url", url)
    assert done.returncode == 0, done.stderr
    assert profile_ids(url) == {1, 2, 3, 4, 5}
    assert profile_ids(f"sqlite:///{tmp_path}/gw.db.before-restore") == {1, 2, 3, 4, 5, 6, 7}  # kept, whole
    assert integrity(tmp_path / "gw.db") == ["ok"]


def test_a_postgresql_password_never_shows_in_an_error(tmp_path: Path) -> None:
    with pytest.raises(BackupError) as err:
        backup("postgresql+psycopg://shop:pg-s3cret-pw@127.0.0.1:1/gw?connect_timeout=1", tmp_path / "b.dump")
    assert "pg-s3cret-pw" not in str(err.value) and "127.0.0.1:1/gw" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_the_heads_read_from_the_migration_files_are_alembics() -> None:
    """Starts and readiness compare the database with these without importing Alembic; a restore too."""
    from gateway.storage.backup import known_revisions
    from gateway.storage.db import shipped_heads

    assert shipped_heads() == frozenset(known_revisions()[1])


async def test_the_command_backs_up_a_live_gateway_while_customers_are_enrolled(tmp_path: Path) -> None:
    """Across processes, as in a shop: the gateway keeps committing over its API while `gateway db backup`
    copies its SQLite file; the restored copy holds every profile whose 201 came before the command began."""
    import asyncio

    import httpx

    from tests.live_gateway import ADMIN_KEY, base_url, live_settings, running

    settings = live_settings(tmp_path / "live")
    settings.api.admin_rate_limit_per_s = 0  # as fast as the gateway commits
    committed: list[int] = []
    stop, enough = asyncio.Event(), asyncio.Event()
    async with running(settings) as rt, httpx.AsyncClient(base_url=base_url(rt), timeout=30,
                                                          headers={"X-API-Key": ADMIN_KEY}) as c:
        async def enrol() -> None:
            i = 0
            try:
                while not stop.is_set():
                    r = await c.post("/v1/profiles", json={"external_id": f"c{i}", "consents": {"offers": True}})
                    assert r.status_code == 201, r.text
                    committed.append(r.json()["id"])
                    i += 1
                    if i >= 20:
                        enough.set()
            finally:
                enough.set()

        writer = asyncio.create_task(enrol())
        await asyncio.wait_for(enough.wait(), 60)
        assert not writer.done(), writer.exception()
        before = list(committed)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.app.cli", "db", "backup", str(tmp_path / "live.backup"), "--url",
            settings.database.url, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        stop.set()
        await writer
    assert proc.returncode == 0, err.decode()
    restored_url = f"sqlite:///{tmp_path}/restored.db"
    restore(restored_url, tmp_path / "live.backup")
    assert integrity(tmp_path / "restored.db") == ["ok"]
    ids = profile_ids(restored_url)
    assert set(before) <= ids <= set(committed)
    assert f"profiles {len(ids)}" in " ".join(out.decode().split())  # the rows it printed are the file's
