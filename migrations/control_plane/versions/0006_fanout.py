"""Fan-out: replay, bulk actions, alerts; a leaner loop; shard routing (control plane).

Revision ID: 0006
Revises: 0005
"""
from runops_revisions import steps

revision = "0006"
down_revision = "0005"
upgrade, downgrade = steps("r0006_fanout", "CONTROL_PLANE")
