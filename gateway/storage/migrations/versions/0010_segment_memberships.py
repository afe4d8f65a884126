"""segment_memberships: which live segments a profile is in, so joining one is an event

Revision ID: 0010
Revises: 0009
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "segment_memberships",
        sa.Column("profile_id", sa.Integer(), sa.ForeignKey("profiles.id", ondelete="CASCADE"), nullable=False),
        sa.Column("segment_id", sa.String(length=64), nullable=False),
        sa.Column("entered_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("profile_id", "segment_id"),
    )


def downgrade() -> None:
    op.drop_table("segment_memberships")
