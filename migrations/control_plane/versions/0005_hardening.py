"""Hardening: roles, structure, dequeue slots, notifications (control plane).

Revision ID: 0005
Revises: 0004
"""
from runops_revisions import steps

revision = "0005"
down_revision = "0004"
upgrade, downgrade = steps("r0005_hardening", "CONTROL_PLANE")
