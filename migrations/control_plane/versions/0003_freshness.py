"""The mirror freshness bound: heartbeats, RO009 on a stale mirror, the pull standing in for replication; issue 10: the run-status vocabulary once, a CHECK on runs.status, one idempotency engine (control plane).

Revision ID: 0003
Revises: 0002
"""
from alembic import op
from runops_revisions import r0003_freshness

revision = "0003"
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    r0003_freshness.upgrade(op, "CONTROL_PLANE")


def downgrade() -> None:
    r0003_freshness.downgrade(op)
