"""Our audit table, ``keyconnector_audit`` (see keyconnector.audit).

Created on every SQL database whether or not ``audit.database`` is on, so that turning the setting
on later needs no migration step.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import inspect

from keyconnector.storage.sql.schema import AUDIT, audit

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    bind = op.get_bind()
    if AUDIT not in inspect(bind).get_table_names():
        audit.create(bind)


def downgrade() -> None:
    raise NotImplementedError("keyconnector never downgrades")
