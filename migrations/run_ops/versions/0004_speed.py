"""Speed: trigger and batch paths rebuilt, one idempotency engine (run-ops store).

Revision ID: 0004
Revises: 0003
"""
from runops_revisions import steps

revision = "0004"
down_revision = "0003"
upgrade, downgrade = steps("r0004_speed", "RUN_OPS")
