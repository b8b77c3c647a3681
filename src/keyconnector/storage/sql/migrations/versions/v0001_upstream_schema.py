"""Upstream's schema: create it on an empty database, adopt it on an existing one.

Revision ID: 0001
Revises:
Create Date: 2026-01-01
"""

from __future__ import annotations

import logging

from alembic import op

from keyconnector.storage.sql.schema import create_upstream_schema

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

log = logging.getLogger("keyconnector.storage.migrate")


def upgrade() -> None:
    outcome = create_upstream_schema(op.get_bind())
    log.info("schema revision 0001: %s", outcome)


def downgrade() -> None:
    # Dropping the tables would drop every user's key; going back to upstream needs no downgrade
    # because these tables are upstream's own.
    raise NotImplementedError("keyconnector never downgrades: upstream's data stays where it is")
