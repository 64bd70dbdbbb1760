"""Across the seam: the idempotency claim ledger, merged listing and retention (run-ops store).

Revision ID: 0002
Revises: 0001
"""
from runops_revisions import steps

revision = "0002"
down_revision = "0001"
upgrade, downgrade = steps("r0002_seam", "RUN_OPS")
