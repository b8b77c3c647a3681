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

Before anything is created, a database holding tables none of which is Key Connector's (upstream's
``UserKeys``, ``ApplicationDatas``, ``__EFMigrationsHistory``, or our ``keyconnector_...``) is refused
unless ``database.createSchema`` says to: it is almost always a connection string that points at
another application's database, which must not be adopted as an empty one.

The PostgreSQL, MySQL and SQL Server locks are written against their documentation but are exercised
only once those backends land; SQLite's is covered by tests with concurrent processes.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import URL, Connection, Engine, create_engine, event
from sqlalchemy.pool import NullPool

from keyconnector.errors import ConfigurationError, StorageError, setting_name

VERSION_TABLE = "keyconnector_schema_version"
MIGRATIONS_DIRECTORY = Path(__file__).resolve().parent / "migrations"

LOCK_NAME = "keyconnector-schema-migration"
"""The name of the migration lock on databases whose locks are named (MySQL, SQL Server)."""
LOCK_TIMEOUT_SECONDS = 60

UPSTREAM_TABLES = frozenset({"UserKeys", "ApplicationDatas", "__EFMigrationsHistory"})
OUR_TABLE_PREFIX = "keyconnector_"
FOREIGN_TABLES_SHOWN = 5
"""How many of a foreign database's tables a refusal names (the rest are counted)."""


def foreign_tables(tables: Collection[str]) -> list[str]:
    """The tables of a database that holds nothing of Key Connector's (ours or upstream's), sorted;
    empty when the database is empty or holds any of ours or upstream's."""
    if any(name in UPSTREAM_TABLES or name.lower().startswith(OUR_TABLE_PREFIX) for name in tables):
        return []
    return sorted(tables)


def refuse_foreign_database(tables: Collection[str], *, create_schema: bool, setting: str) -> list[str]:
    """Refuse (``ConfigurationError`` naming ``setting``, ``database.createSchema``) a database whose
    tables are all someone else's, unless ``create_schema``; returns those tables (empty when none)."""
    foreign = foreign_tables(tables)
    if foreign and not create_schema:
        shown = ", ".join(foreign[:FOREIGN_TABLES_SHOWN])
        if len(foreign) > FOREIGN_TABLES_SHOWN:
            shown += f" and {len(foreign) - FOREIGN_TABLES_SHOWN} more"
        raise ConfigurationError(
            setting,
            f"the database holds {len(foreign)} table(s), none of them Key Connector's (upstream's UserKeys "
            f"and ApplicationDatas, or keyconnector_...): {shown}. It looks like another application's "
            "database: check the connection string; to create Key Connector's schema beside these tables, "
            f"set {setting_name(setting)}=true (or run `keyconnector serve --create-schema`)",
        )
    return foreign


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


def upgrade(engine: Engine, *, create_schema: bool = False, setting: str = "database.createSchema") -> None:
    """Bring the database to the newest revision, creating or adopting upstream's schema on the way.

    A database of someone else's tables only is refused first, unless ``create_schema`` (see
    :func:`refuse_foreign_database`; ``setting`` is the path of ``createSchema`` to name).

    Database errors propagate as SQLAlchemy exceptions: each backend knows best how its driver reports
    "unreachable" versus "misconfigured" and turns them into UnavailableError or ConfigurationError.
    """
    from sqlalchemy import inspect

    from keyconnector.storage.registry import schema_for

    with (
        engine.connect() as connection,
        connection.begin(),
        schema_for(connection.dialect.name).migration_lock(connection),
    ):
        refuse_foreign_database(
            inspect(connection).get_table_names(), create_schema=create_schema, setting=setting
        )
        try:
            command.upgrade(alembic_config(connection), "head")
        except CommandError as exc:
            # Typically "Can't locate revision": a newer keyconnector migrated this database.
            raise StorageError(
                f"the database schema is at a revision this keyconnector does not know ({exc}); "
                "it was migrated by a newer keyconnector: upgrade this one"
            ) from None


def describe_schema(
    connection: Connection, *, create_schema: bool = False, setting: str = "database.createSchema"
) -> tuple[str, bool]:
    """One line on the state of a database, and whether it holds the schema; reads only.

    Raises StorageError when the database cannot be used as it is (half of upstream's schema, wrong
    columns, or a revision newer than this keyconnector knows), and ``serve``'s ConfigurationError
    for a foreign database unless ``create_schema`` (see :func:`upgrade`).
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
        foreign = refuse_foreign_database(tables, create_schema=create_schema, setting=setting)
        if foreign:
            shown = ", ".join(foreign[:FOREIGN_TABLES_SHOWN])
            return (
                f"{len(foreign)} table(s) of another application ({shown}); "
                f"`serve` would create upstream's schema beside them ({setting_name(setting)})",
                False,
            )
        return "empty; `serve` would create upstream's schema", False
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
