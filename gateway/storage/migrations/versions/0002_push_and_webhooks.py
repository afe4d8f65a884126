"""web push subscriptions and webhook endpoint state

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('push_subscriptions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('profile_id', sa.Integer(), nullable=False),
    sa.Column('endpoint', sa.String(length=1024), nullable=False),
    sa.Column('p256dh', sa.String(length=128), nullable=False),
    sa.Column('auth', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('last_success_at', sa.Float(), nullable=True),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['profile_id'], ['profiles.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('endpoint')
    )
    op.create_index('ix_push_subscriptions_profile_id', 'push_subscriptions', ['profile_id'], unique=False)
    op.create_table('webhook_endpoints',
    sa.Column('url', sa.String(length=1024), nullable=False),
    sa.Column('consecutive_gone', sa.Integer(), nullable=False),
    sa.Column('disabled_at', sa.Float(), nullable=True),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('last_attempt_at', sa.Float(), nullable=True),
    sa.Column('last_success_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('url')
    )


def downgrade() -> None:
    op.drop_table('webhook_endpoints')
    op.drop_index('ix_push_subscriptions_profile_id', table_name='push_subscriptions')
    op.drop_table('push_subscriptions')
