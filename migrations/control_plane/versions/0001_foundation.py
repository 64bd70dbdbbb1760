"""Foundation: tenants, split settings, the run graph and its functions (control plane).

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
    r0001_foundation.upgrade(op, "CONTROL_PLANE")


def downgrade() -> None:
    r0001_foundation.downgrade(op)
