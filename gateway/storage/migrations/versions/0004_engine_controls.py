"""engine controls and figures: scheduled sends, expiry, experiment arms, loyalty points, redemption
codes, zone stays and anonymous footfall counts

Revision ID: 0004
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("notifications") as batch:
        batch.add_column(sa.Column("deliver_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("expires_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("variant", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("redemption_code", sa.String(length=32), nullable=True))
        batch.create_index("ix_notifications_deliver_at", ["deliver_at"])
        batch.create_unique_constraint("uq_notifications_redemption_code", ["redemption_code"])
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("variant", sa.String(length=64), nullable=True))
    with op.batch_alter_table("profiles") as batch:
        batch.add_column(sa.Column("points", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "zone_stays",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("profile_id", sa.Integer(), nullable=False),
        sa.Column("visit_id", sa.Integer(), nullable=True),
        sa.Column("zone", sa.String(length=64), nullable=False),
        sa.Column("entered_at", sa.Float(), nullable=False),
        sa.Column("exited_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["profile_id"], ["profiles.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["visit_id"], ["visits.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_zone_stays_profile_id", "zone_stays", ["profile_id"])
    op.create_index("ix_zone_stays_visit_id", "zone_stays", ["visit_id"])
    op.create_index("ix_zone_stays_zone_entered", "zone_stays", ["zone", "entered_at"])
    with op.batch_alter_table("carts") as batch:
        batch.add_column(sa.Column("abandoned_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("checked_out_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("purchase_handled_at", sa.Float(), nullable=True))
    op.create_table(
        "campaigns",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "footfall_counts",
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("zone", sa.String(length=64), nullable=False),
        sa.Column("anonymous_visits", sa.Integer(), nullable=False),
        sa.Column("anonymous_dwell_s", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("day", "zone"),
    )


def downgrade() -> None:
    op.drop_table("footfall_counts")
    op.drop_table("campaigns")
    with op.batch_alter_table("carts") as batch:
        batch.drop_column("purchase_handled_at")
        batch.drop_column("checked_out_at")
        batch.drop_column("abandoned_at")
    op.drop_table("zone_stays")
    with op.batch_alter_table("profiles") as batch:
        batch.drop_column("points")
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("variant")
    with op.batch_alter_table("notifications") as batch:
        batch.drop_constraint("uq_notifications_redemption_code", type_="unique")
        batch.drop_index("ix_notifications_deliver_at")
        batch.drop_column("redemption_code")
        batch.drop_column("variant")
        batch.drop_column("expires_at")
        batch.drop_column("deliver_at")
