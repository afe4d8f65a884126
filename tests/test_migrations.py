"""The Alembic migrations produce exactly the schema the models describe, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from gateway.storage.db import Database
from gateway.storage.models import Base


def test_migrations_match_the_models(db_url):
    db = Database(db_url)
    try:
        db.upgrade()
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        # SQLite cannot tell some index/constraint spellings apart; a missing table or column it does see.
        significant = [d for d in diff if d[0] in ("add_table", "remove_table", "add_column", "remove_column")]
        assert significant == [], significant
    finally:
        db.dispose()


def test_one_head_or_a_merge_per_branch():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from gateway.storage.db import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    heads = ScriptDirectory.from_config(cfg).get_heads()
    assert len(heads) == 1, f"merge the migration branches: heads {heads}"


def _downgrade(db: Database, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    from gateway.storage.db import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def test_0013_adds_hourly_footfall_and_bounces_and_keeps_the_daily_counts_both_ways(db_url):
    from sqlalchemy import inspect, text

    from gateway.storage.db import upgrade

    db = Database(db_url)
    daily = "SELECT store_id, day, zone, anonymous_visits, anonymous_dwell_s FROM footfall_counts ORDER BY zone"
    try:
        upgrade(db.engine, revision="0012")
        with db.engine.begin() as conn:
            conn.execute(text("INSERT INTO footfall_counts (store_id, day, zone, anonymous_visits, anonymous_dwell_s) "
                              "VALUES ('north', '2026-06-01', '', 4, 0), ('north', '2026-06-01', 'shoes', 3, 90.5)"))
            before = [tuple(r) for r in conn.execute(text(daily))]
        db.upgrade()
        with db.engine.begin() as conn:
            assert [tuple(r) for r in conn.execute(text(daily))] == before
            # Not judged before the upgrade: none ended and none bounced, so bounce rates leave them out.
            assert [tuple(r) for r in conn.execute(text(
                "SELECT anonymous_ended, anonymous_bounces FROM footfall_counts"))] == [(0, 0), (0, 0)]
            conn.execute(text("INSERT INTO footfall_hours (day, hour, zone, anonymous_visits) "
                              "VALUES ('2026-06-01', 14, '', 2)"))
            assert conn.execute(text("SELECT store_id, hour, anonymous_visits FROM footfall_hours")).one() == (
                "store-001", 14, 2)
        _downgrade(db, "0012")
        with db.engine.connect() as conn:
            assert [tuple(r) for r in conn.execute(text(daily))] == before
        schema = inspect(db.engine)
        assert "footfall_hours" not in schema.get_table_names()
        assert "anonymous_bounces" not in {c["name"] for c in schema.get_columns("footfall_counts")}
        db.upgrade()  # and up again, over the downgraded tables
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM footfall_hours")).scalar() == 0
            assert [tuple(r) for r in conn.execute(text(daily))] == before
    finally:
        db.dispose()
