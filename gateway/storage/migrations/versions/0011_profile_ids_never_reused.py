"""id_high_water: profile ids are never given twice on SQLite (an erased customer's id stays retired)

Revision ID: 0011
Revises: 0010
"""
import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "id_high_water",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.execute("INSERT INTO id_high_water (name, value) SELECT 'profiles', COALESCE(MAX(id), 0) FROM profiles")


def downgrade() -> None:
    op.drop_table("id_high_water")
