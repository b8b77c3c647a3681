"""Schema migrations for every SQL backend: Alembic, run from code, under a database-wide lock.

Several worker processes (or several containers) start at once against one database, and each runs
the migrations before serving. Without a lock two of them could both find an empty database and both
create the tables, and one would fail half-way. So the whole upgrade, Alembic's read of its version
table included, runs inside one transaction that first takes an exclusive lock the database itself
enforces:

- SQLite: the transaction is opened with ``BEGIN EXCLUSIVE`` (see :func:`sqlite_migration_engine`);
- PostgreSQL: ``pg_advisory_xact_lock``, released with the transaction;
- MySQL/MariaDB: ``GET_LOCK``, released explicitly (DDL commits implicitly there, so a transaction
  cannot be the lock);
- SQL Server: ``sp_getapplock`` owned by the transaction.

Each lock is written in its backend module, as the ``migration_lock`` of the backend's
:class:`~keyconnector.storage.registry.Schema`; this runner asks the entry for the dialect at hand.

The second process waits on that lock, then finds the version table at head and does nothing.
Waiting for a database that is down is the caller's job: this module raises and never sleeps.

Our version table is ``keyconnector_schema_version``, not Alembic's default, so that nobody mistakes
it for upstream's (upstream ignores tables it does not know).

The PostgreSQL, MySQL and SQL Server locks are written against their documentation but are exercised
only once those backends land; SQLite's is covered by tests with concurrent processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import URL, Connection, Engine, create_engine, event
from sqlalchemy.pool import NullPool

from keyconnector.errors import StorageError

VERSION_TABLE = "keyconnector_schema_version"
MIGRATIONS_DIRECTORY = Path(__file__).resolve().parent / "migrations"

LOCK_NAME = "keyconnector-schema-migration"
"""The name of the migration lock on databases whose locks are named (MySQL, SQL Server)."""
LOCK_TIMEOUT_SECONDS = 60


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration pointing at our migrations package; no ``alembic.ini`` involved."""
    config = Config()
    # Config options go through configparser interpolation: a literal % must be doubled.
    config.set_main_option("script_location", str(MIGRATIONS_DIRECTORY).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    """The newest revision this version of keyconnector knows."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(connection: Connection) -> str | None:
    """The revision recorded in the database, or None before keyconnector has touched it."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def sqlite_migration_engine(path: str, busy_timeout_seconds: float) -> Engine:
    """An engine whose transactions start with ``BEGIN EXCLUSIVE``: that is the migration lock.

    Python's sqlite3 module would otherwise issue a deferred ``BEGIN`` of its own, and only before DML,
    so DDL would run outside any transaction. SQLAlchemy's documented recipe hands transaction control
    back: the driver is put in autocommit mode and the ``begin`` event emits the ``BEGIN`` we want.
    """
    engine = create_engine(
        URL.create("sqlite+pysqlite", database=path),
        poolclass=NullPool,
        connect_args={"timeout": busy_timeout_seconds},
    )

    @event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_exclusive(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN EXCLUSIVE")

    return engine


def upgrade(engine: Engine) -> None:
    """Bring the database to the newest revision, creating or adopting upstream's schema on the way.

    Database errors propagate as SQLAlchemy exceptions: each backend knows best how its driver reports
    "unreachable" versus "misconfigured" and turns them into UnavailableError or ConfigurationError.
    """
    from keyconnector.storage.registry import schema_for

    with (
        engine.connect() as connection,
        connection.begin(),
        schema_for(connection.dialect.name).migration_lock(connection),
    ):
        try:
            command.upgrade(alembic_config(connection), "head")
        except CommandError as exc:
            # Typically "Can't locate revision": a newer keyconnector migrated this database.
            raise StorageError(
                f"the database schema is at a revision this keyconnector does not know ({exc}); "
                "it was migrated by a newer keyconnector: upgrade this one"
            ) from None


def describe_schema(connection: Connection) -> tuple[str, bool]:
    """One line on the state of a database, and whether it holds the schema; reads only.

    Raises StorageError when the database cannot be used as it is (half of upstream's schema, wrong
    columns, or a revision newer than this keyconnector knows).
    """
    from sqlalchemy import func, inspect, select

    from keyconnector.storage.sql.schema import (
        APPLICATION_DATAS,
        MIGRATIONS_HISTORY,
        USER_KEYS,
        check_upstream_columns,
        user_keys,
    )

    tables = set(inspect(connection).get_table_names())
    present = {APPLICATION_DATAS, USER_KEYS} & tables
    if not present:
        return "empty; `serve` creates upstream's schema", False
    if len(present) == 1:
        raise StorageError(
            f"only {present.pop()} exists of upstream's two tables: the database is half-created; "
            "restore it or point the setting at the right database"
        )
    check_upstream_columns(connection)
    parts = []
    if MIGRATIONS_HISTORY in tables:
        from keyconnector.storage.sql.schema import migrations_history

        ids = connection.execute(select(migrations_history.c.MigrationId)).scalars().all()
        parts.append("upstream schema (" + (", ".join(ids) or "no history row") + ")")
    else:
        parts.append("upstream tables without a migration history")
    ours = current_revision(connection) if VERSION_TABLE in tables else None
    head = head_revision()
    if ours is None:
        parts.append("not yet adopted by keyconnector; `serve` adopts it in place")
    elif ours != head and ours not in _known_revisions():
        raise StorageError(
            f"the schema is at revision {ours}, which this keyconnector does not know: upgrade it"
        )
    else:
        parts.append(
            f"keyconnector revision {ours}" + ("" if ours == head else f" (`serve` upgrades it to {head})")
        )
    count = connection.execute(select(func.count()).select_from(user_keys)).scalar_one()
    parts.append(f"{count} user keys")
    return "; ".join(parts), True


def _known_revisions() -> set[str]:
    return {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
