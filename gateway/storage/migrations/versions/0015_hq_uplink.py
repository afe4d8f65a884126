"""Store and head office: the store's uplink marks and open rows (what was published upward and
acknowledged), and head office's ledger of applied events (each event once, by its id).

Revision ID: 0015
Revises: 0014
"""
import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hq_uplink_marks",
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("last_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("kind"),
    )
    op.create_table(
        "hq_uplink_open",
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("row_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "row_id"),
    )
    op.create_table(
        "hq_events",
        sa.Column("event_id", sa.String(length=300), nullable=False),
        sa.Column("store_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("row_id", sa.Integer(), nullable=True),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_index("ix_hq_events_store_id", "hq_events", ["store_id"])


def downgrade() -> None:
    op.drop_index("ix_hq_events_store_id", table_name="hq_events")
    op.drop_table("hq_events")
    op.drop_table("hq_uplink_open")
    op.drop_table("hq_uplink_marks")
