"""Alembic environment of keyconnector's own schema changes (run from code, no alembic.ini).

See :mod:`keyconnector.storage.sql.migrate` for how it is driven.
"""
