"""Our key ring table, for data-key rotation and key-pair rotation.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import inspect

from keyconnector.storage.sql.schema import KEY_RING, key_ring

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    bind = op.get_bind()
    if KEY_RING not in inspect(bind).get_table_names():
        key_ring.create(bind)


def downgrade() -> None:
    raise NotImplementedError("keyconnector never downgrades")
