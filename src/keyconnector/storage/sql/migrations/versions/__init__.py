"""Alembic revisions, oldest first. Every revision must leave upstream's tables usable by upstream."""
