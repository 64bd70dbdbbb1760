"""Foundation: tenants, split settings, the run graph and its functions (run-ops store).

Revision ID: 0001
Revises:
"""
from alembic import op
from runops_revisions import r0001_foundation

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    r0001_foundation.upgrade(op, "RUN_OPS")


def downgrade() -> None:
    r0001_foundation.downgrade(op)
