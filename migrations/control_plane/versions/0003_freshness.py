"""The mirror freshness bound: heartbeats, RO009 on a stale mirror, the pull standing in for replication; the run-status vocabulary once, a CHECK on runs.status, one idempotency engine (control plane).

Revision ID: 0003
Revises: 0002
"""
import runops_revisions
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    runops_revisions.upgrade(op, "r0003_freshness", "CONTROL_PLANE")


def downgrade() -> None:
    runops_revisions.downgrade(op, "r0003_freshness", "CONTROL_PLANE")
