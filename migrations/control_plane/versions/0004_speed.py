"""Speed: trigger and batch paths rebuilt, one idempotency engine (control plane).

Revision ID: 0004
Revises: 0003
"""
import runops_revisions
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    runops_revisions.upgrade(op, "r0004_speed", "CONTROL_PLANE")


def downgrade() -> None:
    runops_revisions.downgrade(op, "r0004_speed", "CONTROL_PLANE")
