"""Alembic's entry point, executed by :func:`keyconnector.storage.sql.migrate.upgrade`.

The caller hands in a connection that already holds the database-wide migration lock inside an open
transaction; running on that very connection (rather than opening one here) is what makes the lock
cover Alembic's own reads of the version table.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from keyconnector.storage.registry import schema_for
from keyconnector.storage.sql.migrate import VERSION_TABLE
from keyconnector.storage.sql.schema import metadata

if context.is_offline_mode():
    raise RuntimeError("keyconnector migrations run against a live database only (no --sql mode)")

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run keyconnector migrations through keyconnector.storage.sql.migrate.upgrade")

context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    # Where DDL can be rolled back, Alembic must not commit on its own: the caller's transaction is the
    # lock that keeps a second process from migrating at the same time.
    transactional_ddl=schema_for(connection.dialect.name).transactional_ddl,
)
with context.begin_transaction():
    context.run_migrations()
