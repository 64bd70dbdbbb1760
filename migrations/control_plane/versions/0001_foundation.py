"""Foundation: tenants, split settings, the run graph and its functions (control plane).

Revision ID: 0001
Revises:
"""
from runops_revisions import steps

revision = "0001"
down_revision = None
upgrade, downgrade = steps("r0001_foundation", "CONTROL_PLANE")
