"""store_id on visits, zone_stays, notifications, decisions and footfall_counts: stores sharing one database
keep their figures apart

Rows older than the column get the store id the upgrade is told (``gateway.storage.db.upgrade(store_id=...)``:
the runtime and the CLI pass ``[store] id``), else ``store-001``, the setting's default. The column's server
default is ``store-001`` too, for rows written by code that does not say (tests, old tools).

Revision ID: 0012
Revises: 0011
"""
import sqlalchemy as sa
from alembic import context, op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

DEFAULT = "store-001"
TABLES = {"visits": "started_at", "zone_stays": "entered_at", "notifications": "created_at", "decisions": "at"}
_INDEX = {"visits": "ix_visits_store_started", "zone_stays": "ix_zone_stays_store_entered",
          "notifications": "ix_notifications_store_created", "decisions": "ix_decisions_store_at"}


def _store_id() -> str:
    told = context.config.attributes.get("store_id")
    return str(told) if told else DEFAULT


def upgrade() -> None:
    store = _store_id()
    for table, time_column in TABLES.items():
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("store_id", sa.String(length=64), server_default=DEFAULT, nullable=False))
        if store != DEFAULT:
            op.execute(sa.text(f"UPDATE {table} SET store_id = :store").bindparams(store=store))
        op.create_index(_INDEX[table], table, ["store_id", time_column])
    # The key gains the store: the table is small (a row per day and zone), so it is rebuilt with its rows.
    conn = op.get_bind()
    rows = [dict(r._mapping) for r in conn.execute(sa.text(
        "SELECT day, zone, anonymous_visits, anonymous_dwell_s FROM footfall_counts"))]
    op.drop_table("footfall_counts")
    counts = op.create_table(
        "footfall_counts",
        sa.Column("store_id", sa.String(length=64), server_default=DEFAULT, nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("zone", sa.String(length=64), nullable=False),
        sa.Column("anonymous_visits", sa.Integer(), nullable=False),
        sa.Column("anonymous_dwell_s", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("store_id", "day", "zone"),
    )
    if rows:
        op.bulk_insert(counts, [{**r, "store_id": store} for r in rows])


def downgrade() -> None:
    conn = op.get_bind()
    rows = [dict(r._mapping) for r in conn.execute(sa.text(
        "SELECT day, zone, SUM(anonymous_visits) AS anonymous_visits, SUM(anonymous_dwell_s) AS anonymous_dwell_s "
        "FROM footfall_counts GROUP BY day, zone"))]
    op.drop_table("footfall_counts")
    counts = op.create_table(
        "footfall_counts",
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("zone", sa.String(length=64), nullable=False),
        sa.Column("anonymous_visits", sa.Integer(), nullable=False),
        sa.Column("anonymous_dwell_s", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("day", "zone"),
    )
    if rows:
        op.bulk_insert(counts, rows)
    for table in TABLES:
        op.drop_index(_INDEX[table], table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("store_id")
