"""Rotating identities (Eddystone-EID keys, IRKs, the app's rotating iBeacon secrets), one row each, the key
encrypted at rest; a profile's rows go with it (ON DELETE CASCADE). A downgrade drops the table, and with it
every rotating enrolment.

Revision ID: 0014
Revises: 0013
"""
import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rotating_identities",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("profile_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("rotation_exponent", sa.Integer(), nullable=True),
        sa.Column("period_s", sa.Integer(), nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["profile_id"], ["profiles.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("fingerprint"),
    )
    op.create_index("ix_rotating_identities_profile_id", "rotating_identities", ["profile_id"])


def downgrade() -> None:
    op.drop_index("ix_rotating_identities_profile_id", table_name="rotating_identities")
    op.drop_table("rotating_identities")
