"""The back-end registry: one typed :class:`Backend` entry per database, found by ``database.provider``.

Each backend module (``storage/backends/<name>.py``) exposes one ``BACKEND``. Everything that differs
by database and is needed outside that module (how to migrate, open and inspect it, its connection
string, a synchronous engine for the audit table, the files holding its secrets, the Alembic runner's
lock and the DDL quirks of upstream's schema) is a field of that entry, so nothing outside the backend
modules branches on a database name: it asks the entry. This is Vault's factory map, typed.

The registry holds module paths, not modules: a backend module is imported on first use, so a
deployment on SQLite never imports the PostgreSQL code, and the drivers themselves are imported only
when a connection is made (a missing one raises ``MissingDependencyError`` naming the extra to
install, see :mod:`keyconnector._optional`).

The protocols and record types the backends implement live in :mod:`keyconnector.storage.base`,
which imports nothing of keyconnector but ``errors``: the core reaches the storage through it alone.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keyconnector.errors import ConfigurationError, StorageError, did_you_mean
from keyconnector.storage.base import DatabaseState, Repository

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine, Table

    from keyconnector.runtime.settings import DatabaseSettings
    from keyconnector.runtime.trust import Trust
    from keyconnector.storage.sql.common import ServerTarget

BACKENDS: dict[str, str] = {
    "sqlite": "keyconnector.storage.backends.sqlite",
    "json": "keyconnector.storage.backends.jsonfile",
    "postgresql": "keyconnector.storage.backends.postgresql",
    "mysql": "keyconnector.storage.backends.mysql",
    "sqlserver": "keyconnector.storage.backends.sqlserver",
}
"""``database.provider`` -> the module whose ``BACKEND`` implements it (imported on first use)."""

REMOVED: dict[str, str] = {
    "mongo": (
        "MongoDB support was removed from Key Connector upstream and is not offered here. To leave it: "
        "mongodump upstream's database, set database__provider to the new database (sqlite, postgresql, "
        "mysql or sqlserver), then run `keyconnector transfer --from-mongo-dump <dump folder>` "
        "(docs/takeover.md, 'Leaving MongoDB')"
    ),
}


@dataclass(frozen=True, slots=True)
class Schema:
    """How upstream's schema is made on one SQL database, for the Alembic runner and revision 0001.

    Upstream generated one Entity Framework migration per database, so the history row differs; some
    databases cannot roll DDL back; and SQLite's ``CREATE TABLE`` text is kept verbatim by the
    database, so it is written by hand to match upstream's byte for byte.
    """

    sqlalchemy_dialects: tuple[str, ...]
    """The names SQLAlchemy gives this database's dialect (``connection.dialect.name``)."""
    upstream_migration_id: str
    """``MigrationId`` of upstream's first migration on this database (its ``__EFMigrationsHistory`` row)."""
    transactional_ddl: bool
    """DDL can be rolled back, so Alembic runs inside the caller's transaction (the migration lock)."""
    migration_lock: Callable[[Connection], AbstractContextManager[None]]
    """Hold the database-wide migration lock inside the caller's open transaction (see ``sql.migrate``)."""
    create_table: Callable[[Connection, Table], None] | None = None
    """Write ``CREATE TABLE`` for one of upstream's tables, when SQLAlchemy's DDL would not match."""


@dataclass(frozen=True, slots=True)
class Backend:
    """What one database offers the rest of keyconnector.

    ``prefix`` (every callable's second argument) is the settings path errors name: ``database`` or
    ``transferTo.database``. ``trust`` is the deployment's trust store for TLS to a database server
    (:mod:`keyconnector.runtime.trust`); file backends ignore it.
    """

    name: str
    """``database.provider``."""
    migrate: Callable[[DatabaseSettings, str, Trust | None], None]
    """Bring the schema up to date, synchronously, once per start-up and before any worker serves. It
    creates a new database the way upstream would (migration history row included) and uses an existing
    upstream one in place. Safe when two processes run it at once on the same empty database."""
    open: Callable[[DatabaseSettings, str, Trust | None], Awaitable[Repository]]
    """The repository a process serves or operates from."""
    inspect: Callable[[DatabaseSettings, str, Trust | None], DatabaseState]
    """Describe the database read-only (``keyconnector check``): never creates a file or a table."""
    parse_target: Callable[[DatabaseSettings, str, Trust | None], ServerTarget] | None = None
    """A server database's parsed connection string (no driver, no connection); None for a file."""
    sync_engine: Callable[[DatabaseSettings, str], Engine] | None = None
    """A synchronous SQLAlchemy engine on this database (the audit table); None when it is not SQL."""
    secret_files: Callable[[DatabaseSettings, str], list[tuple[str, str]]] | None = None
    """(setting path, file path) of the files that hold the data itself, for the permission check."""
    schema: Schema | None = None
    """How upstream's schema is made here; None when there is no SQL schema."""


def backend(settings: DatabaseSettings, prefix: str = "database") -> Backend:
    """The entry implementing ``database.provider``, or a ConfigurationError naming the setting."""
    provider = settings.provider
    if provider in REMOVED:
        raise ConfigurationError(f"{prefix}.provider", REMOVED[provider])
    if provider not in BACKENDS:
        raise ConfigurationError(
            f"{prefix}.provider",
            f"unknown database provider '{provider}'; choose one of: {', '.join(sorted(BACKENDS))}"
            f"{did_you_mean(provider, BACKENDS)}",
        )
    return _load(provider)


@functools.cache
def _load(provider: str) -> Backend:
    entry: Backend = importlib.import_module(BACKENDS[provider]).BACKEND
    return entry


def schema_for(dialect_name: str) -> Schema:
    """The schema quirks of the database SQLAlchemy calls ``dialect_name`` (inside a migration, the
    connection is all there is)."""
    for provider in BACKENDS:
        schema = _load(provider).schema
        if schema is not None and dialect_name in schema.sqlalchemy_dialects:
            return schema
    raise StorageError(f"keyconnector has no schema for the '{dialect_name}' dialect")


def inspect(
    settings: DatabaseSettings, prefix: str = "database", *, trust: Trust | None = None
) -> DatabaseState:
    """Describe the database read-only (``keyconnector check``): never creates a file or a table.

    ``trust`` (here and below) is the deployment's :class:`~keyconnector.runtime.trust.Trust`: a database
    section does not carry ``caCertificatesDirectory``, so whoever holds the whole settings passes
    it in; None means the default folder's (tools and tests without settings)."""
    return backend(settings, prefix).inspect(settings, prefix, trust)


def migrate(settings: DatabaseSettings, prefix: str = "database", *, trust: Trust | None = None) -> None:
    backend(settings, prefix).migrate(settings, prefix, trust)


async def open_repository(
    settings: DatabaseSettings, prefix: str = "database", *, trust: Trust | None = None
) -> Repository:
    return await backend(settings, prefix).open(settings, prefix, trust)


def server_target(
    settings: DatabaseSettings, prefix: str = "database", *, trust: Trust | None = None
) -> ServerTarget | None:
    """The parsed connection string of a server database, or None for a file (SQLite, JSON).

    Parsing needs no driver and no connection, so ``check`` and ``serve`` can judge the transport
    (:func:`~keyconnector.storage.sql.common.transport_warning`) before anything is contacted. A
    connection string that does not parse raises the same ``ConfigurationError`` the backend would.
    """
    if settings.provider not in BACKENDS:
        return None  # an unknown or removed provider is reported by whatever opens the database
    parse = backend(settings, prefix).parse_target
    return None if parse is None else parse(settings, prefix, trust)


def warn_insecure_transport(
    settings: DatabaseSettings, prefix: str = "database", *, trust: Trust | None = None
) -> str | None:
    """Log, once, the warning for a server database a network attacker could stand in for (see
    :func:`~keyconnector.storage.sql.common.transport_warning`); returns it, or None when the
    database is a file, on this machine or reached over verified TLS."""
    target = server_target(settings, prefix, trust=trust)
    if target is None:
        return None
    from keyconnector.storage.sql.common import log_transport_warning

    return log_transport_warning(target)
