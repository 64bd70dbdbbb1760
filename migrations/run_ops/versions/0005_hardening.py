"""Hardening: roles, structure, dequeue slots, notifications (run-ops store).

Revision ID: 0005
Revises: 0004
"""
from runops_revisions import steps

revision = "0005"
down_revision = "0004"
upgrade, downgrade = steps("r0005_hardening", "RUN_OPS")
