"""telemetry storage: readings, per-minute/per-hour rollups, device events, dead letters, registry columns

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("device_profile", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("store_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("firmware", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("online", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("status_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("quarantined", sa.Boolean(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("registered_at", sa.Float(), nullable=True))
    op.create_table(
        "readings",
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("key", sa.String(length=40), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("profile_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["profile_id"], ["profiles.id"], ondelete="CASCADE"),
        sa.UniqueConstraint("device_id", "key", name="uq_readings_device_key"),
    )
    op.create_index("ix_readings_device_ts", "readings", ["device_id", "ts"])
    op.create_index("ix_readings_ts", "readings", ["ts"])
    op.create_index("ix_readings_profile_id", "readings", ["profile_id"])
    op.create_table(
        "reading_rollups",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("period", sa.Integer(), nullable=False),
        sa.Column("start", sa.Float(), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("sum", sa.Float(), nullable=False),
        sa.Column("min", sa.Float(), nullable=False),
        sa.Column("max", sa.Float(), nullable=False),
        sa.Column("last", sa.Float(), nullable=False),
        sa.Column("last_ts", sa.Float(), nullable=False),
        sa.Column("profile_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["profile_id"], ["profiles.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("device_id", "period", "start", "metric"),
    )
    op.create_index("ix_reading_rollups_profile_id", "reading_rollups", ["profile_id"])
    op.create_table(
        "device_events",
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=True),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("profile_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["profile_id"], ["profiles.id"], ondelete="CASCADE"),
        sa.UniqueConstraint("device_id", "ts", "type", name="uq_device_events_device_ts_type"),
    )
    op.create_index("ix_device_events_device_id", "device_events", ["device_id"])
    op.create_index("ix_device_events_profile_id", "device_events", ["profile_id"])
    op.create_table(
        "dead_letters",
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("topic", sa.String(length=512), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=True),
        sa.Column("reason", sa.String(length=48), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        sa.Column("profile_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["profile_id"], ["profiles.id"], ondelete="CASCADE"),
    )
    op.create_index("ix_dead_letters_received_at", "dead_letters", ["received_at"])
    op.create_index("ix_dead_letters_device_id", "dead_letters", ["device_id"])
    op.create_index("ix_dead_letters_profile_id", "dead_letters", ["profile_id"])


def downgrade() -> None:
    op.drop_table("dead_letters")
    op.drop_table("device_events")
    op.drop_table("reading_rollups")
    op.drop_table("readings")
    with op.batch_alter_table("devices") as batch:
        for column in ("registered_at", "quarantined", "status_at", "online", "firmware", "store_id",
                       "device_profile"):
            batch.drop_column(column)
