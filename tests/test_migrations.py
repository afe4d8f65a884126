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
