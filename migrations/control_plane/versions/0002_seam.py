"""Across the seam: the idempotency claim ledger, merged listing and retention (control plane).

Revision ID: 0002
Revises: 0001
"""
import runops_revisions
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    runops_revisions.upgrade(op, "r0002_seam", "CONTROL_PLANE")


def downgrade() -> None:
    runops_revisions.downgrade(op, "r0002_seam", "CONTROL_PLANE")
