"""Speed: trigger and batch paths rebuilt, one idempotency engine (control plane).

Revision ID: 0004
Revises: 0003
"""
from alembic import op
from runops_revisions import r0004_speed

revision = "0004"
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    r0004_speed.upgrade(op, "CONTROL_PLANE")


def downgrade() -> None:
    r0004_speed.downgrade(op)
