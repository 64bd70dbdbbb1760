"""Across the seam: the idempotency claim ledger, merged listing and retention (run-ops store).

Revision ID: 0002
Revises: 0001
"""
from alembic import op
from runops_revisions import r0002_seam

revision = "0002"
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    r0002_seam.upgrade(op, "RUN_OPS")


def downgrade() -> None:
    r0002_seam.downgrade(op)
