"""The mirror freshness bound: heartbeats, RO009 on a stale mirror, the pull standing in for replication; the run-status vocabulary once, a CHECK on runs.status, one idempotency engine (run-ops store).

Revision ID: 0003
Revises: 0002
"""
from runops_revisions import steps

revision = "0003"
down_revision = "0002"
upgrade, downgrade = steps("r0003_freshness", "RUN_OPS")
