"""Foundation: tenants, split settings, the run graph and its functions (run-ops store).

Revision ID: 0001
Revises:
"""
import runops_revisions
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    runops_revisions.upgrade(op, "r0001_foundation", "RUN_OPS")


def downgrade() -> None:
    runops_revisions.downgrade(op, "r0001_foundation", "RUN_OPS")
