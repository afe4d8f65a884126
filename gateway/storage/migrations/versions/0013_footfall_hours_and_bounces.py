"""Anonymous footfall per local hour (footfall_hours), and anonymous bounces per zone and for the store
(footfall_counts.anonymous_bounces of footfall_counts.anonymous_ended): the hourly chart counts everyone,
and bounce comes per zone

Rows older than the columns get 0 of both: nobody judged their visits, so the bounce rates leave them out
(rather than count them as visits that did not bounce). A downgrade drops the new table and columns; the
daily counts stay as they were.

Revision ID: 0013
Revises: 0012
"""
import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

DEFAULT = "store-001"


def upgrade() -> None:
    with op.batch_alter_table("footfall_counts") as batch:
        batch.add_column(sa.Column("anonymous_ended", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("anonymous_bounces", sa.Integer(), server_default="0", nullable=False))
    op.create_table(
        "footfall_hours",
        sa.Column("store_id", sa.String(length=64), server_default=DEFAULT, nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("hour", sa.Integer(), nullable=False),
        sa.Column("zone", sa.String(length=64), nullable=False),
        sa.Column("anonymous_visits", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("store_id", "day", "hour", "zone"),
    )


def downgrade() -> None:
    op.drop_table("footfall_hours")
    with op.batch_alter_table("footfall_counts") as batch:
        batch.drop_column("anonymous_bounces")
        batch.drop_column("anonymous_ended")
