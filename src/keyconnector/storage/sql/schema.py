"""Upstream's relational schema, described once for every SQL dialect.

An operator must be able to point keyconnector at the database the .NET service created, and to go
back to the .NET service later. So the tables are not "ours": they are exactly what upstream's first
Entity Framework migration makes on each database (docs/compatibility.md section 3.3), down to the column
types, the primary-key constraint names and the ``__EFMigrationsHistory`` row that stops Entity Framework from
trying to create the tables a second time. One ``MetaData`` serves SQLite, PostgreSQL, MySQL/MariaDB and
SQL Server; per-dialect types pick what Entity Framework's provider for that database would have used.

On SQLite the DDL is written out by :func:`sqlite_create_table_sql` rather than by SQLAlchemy: SQLite
keeps the ``CREATE TABLE`` text verbatim in ``sqlite_master``, and upstream's reads
``"Id" INTEGER NOT NULL CONSTRAINT "PK_ApplicationDatas" PRIMARY KEY AUTOINCREMENT`` (an inline, named,
``AUTOINCREMENT`` key), which SQLAlchemy's SQLite compiler cannot express.

The value conversions upstream's SQLite provider applies (GUIDs as upper-case text, times as
``yyyy-MM-dd HH:mm:ss.FFFFFFF``) live here too, because the SQLite hot path, which does not go through
SQLAlchemy, must write byte-for-byte the same text as the column types below.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Identity,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    inspect,
)
from sqlalchemy.dialects import mssql, mysql, postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.schema import CreateTable
from sqlalchemy.types import TypeDecorator, TypeEngine

from keyconnector.errors import StorageError

PRODUCT_VERSION = "5.0.9"
"""Entity Framework Core version upstream recorded in ``__EFMigrationsHistory.ProductVersion``."""

APPLICATION_DATAS = "ApplicationDatas"
USER_KEYS = "UserKeys"
MIGRATIONS_HISTORY = "__EFMigrationsHistory"

_MYSQL = ("mysql", "mariadb")


def _is_mysql(dialect: Dialect) -> bool:
    return dialect.name in _MYSQL


# --------------------------------------------------------------------------------------------------
# Value conversions of upstream's SQLite provider

_SQLITE_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:Z|[+-]00:?00)?",
    re.ASCII,
)


def sqlite_guid(user_id: UUID) -> str:
    """A GUID as upstream's SQLite provider stores it: upper-case text with dashes.

    Comparison on the ``Id`` text is binary, so a lower-case key would simply never match a row upstream
    wrote: the case is part of the key, not cosmetics.
    """
    return str(user_id).upper()


def naive_utc(value: datetime) -> datetime:
    """The naive UTC form every column holds. An aware value is converted instead of trusted blindly."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def format_sqlite_time(value: datetime) -> str:
    """``yyyy-MM-dd HH:mm:ss.FFFFFFF``: trailing zeros of the fraction dropped, no dot when it is zero.

    The exact text matters beyond looks: values in this shape sort as text in time order, which the
    ``LastAccessDate`` update relies on to never move the time backwards.
    """
    value = naive_utc(value)
    text = (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d} "
        f"{value.hour:02d}:{value.minute:02d}:{value.second:02d}"
    )
    if value.microsecond:
        text += "." + f"{value.microsecond:06d}".rstrip("0")
    return text


def parse_sqlite_time(text: str) -> datetime:
    """Read upstream's time text (7 fractional digits, of which Python keeps 6, truncating).

    Tolerates a ``T`` separator and a UTC suffix, which a hand-edited or tool-imported row may carry.
    """
    match = _SQLITE_TIME.fullmatch(text.strip())
    if match is None:
        raise ValueError("not a time in the form yyyy-MM-dd HH:mm:ss.FFFFFFF")
    year, month, day, hour, minute, second, fraction = match.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micro)


# --------------------------------------------------------------------------------------------------
# Column types


class Guid(TypeDecorator[UUID]):
    """A user GUID: ``TEXT`` (upper-case) on SQLite, ``uuid`` on PostgreSQL, ``char(36)`` with an ASCII
    collation (lower-case text) on MySQL/MariaDB, ``uniqueidentifier`` on SQL Server."""

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.UUID(as_uuid=True))
        if _is_mysql(dialect):
            return dialect.type_descriptor(mysql.CHAR(36, collation="ascii_general_ci"))
        if dialect.name == "mssql":
            return dialect.type_descriptor(mssql.UNIQUEIDENTIFIER(as_uuid=True))
        return dialect.type_descriptor(Text())

    def process_bind_param(self, value: UUID | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name in ("postgresql", "mssql"):
            return value
        if _is_mysql(dialect):
            return str(value)
        return sqlite_guid(value)

    def process_result_value(self, value: Any | None, dialect: Dialect) -> UUID | None:
        if value is None or isinstance(value, UUID):
            return value
        return UUID(str(value))


class UtcDateTime(TypeDecorator[datetime]):
    """A naive UTC time: upstream's text on SQLite, ``timestamp without time zone`` on PostgreSQL,
    ``datetime(6)`` on MySQL/MariaDB, ``datetime2`` on SQL Server."""

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.TIMESTAMP(timezone=False))
        if _is_mysql(dialect):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        if dialect.name == "mssql":
            return dialect.type_descriptor(mssql.DATETIME2())  # type: ignore[no-untyped-call]
        return dialect.type_descriptor(Text())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return format_sqlite_time(value)
        return naive_utc(value)

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, datetime):
            return naive_utc(value)
        return parse_sqlite_time(str(value))


def _long_text() -> TypeEngine[str]:
    """``TEXT``; ``longtext`` in utf8mb4 on MySQL; ``nvarchar(max)`` on SQL Server."""
    return (
        Text()
        .with_variant(mysql.LONGTEXT(charset="utf8mb4"), *_MYSQL)
        .with_variant(mssql.NVARCHAR(), "mssql")
    )


def _history_string(length: int) -> TypeEngine[str]:
    """Entity Framework's history columns: ``TEXT`` on SQLite (its SQLite provider drops lengths),
    ``varchar(n)``/``character varying(n)`` elsewhere, ``nvarchar(n)`` on SQL Server."""
    return (
        String(length)
        .with_variant(Text(), "sqlite")
        .with_variant(mysql.VARCHAR(length, charset="utf8mb4"), *_MYSQL)
        .with_variant(mssql.NVARCHAR(length), "mssql")
    )


metadata = MetaData()

application_datas = Table(
    APPLICATION_DATAS,
    metadata,
    Column("Id", Integer, Identity(), nullable=False),
    Column("SymmetricKey", _long_text(), nullable=True),
    PrimaryKeyConstraint("Id", name="PK_ApplicationDatas"),
    mysql_charset="utf8mb4",
)

user_keys = Table(
    USER_KEYS,
    metadata,
    Column("Id", Guid(), nullable=False),
    Column("Key", _long_text(), nullable=True),
    Column("CreationDate", UtcDateTime(), nullable=False),
    Column("RevisionDate", UtcDateTime(), nullable=True),
    Column("LastAccessDate", UtcDateTime(), nullable=True),
    PrimaryKeyConstraint("Id", name="PK_UserKeys"),
    mysql_charset="utf8mb4",
)

migrations_history = Table(
    MIGRATIONS_HISTORY,
    metadata,
    Column("MigrationId", _history_string(150), nullable=False),
    Column("ProductVersion", _history_string(32), nullable=False),
    PrimaryKeyConstraint("MigrationId", name="PK___EFMigrationsHistory"),
    mysql_charset="utf8mb4",
)

UPSTREAM_TABLES: tuple[Table, ...] = (application_datas, user_keys)


def history_row(dialect_name: str, product_version: str = PRODUCT_VERSION) -> dict[str, str]:
    """The ``__EFMigrationsHistory`` row upstream's first migration leaves on this kind of database.

    Upstream generated one migration per database, so the id of "the same" migration differs: each
    backend's :class:`~keyconnector.storage.registry.Schema` carries its own."""
    from keyconnector.storage.registry import schema_for

    try:
        migration_id = schema_for(dialect_name).upstream_migration_id
    except StorageError:
        raise ValueError(f"upstream has no migration for the '{dialect_name}' dialect") from None
    return {"MigrationId": migration_id, "ProductVersion": product_version}


def sqlite_create_table_sql(table: Table) -> str:
    """``CREATE TABLE`` in the exact shape Entity Framework's SQLite provider writes it."""
    dialect = sqlite.dialect()
    primary_key = table.primary_key
    lines = []
    for column in table.columns:
        type_sql = column.type.compile(dialect=dialect)
        line = f'    "{column.name}" {type_sql} {"NULL" if column.nullable else "NOT NULL"}'
        if len(primary_key.columns) == 1 and column.primary_key:
            line = f'    "{column.name}" {type_sql} NOT NULL CONSTRAINT "{primary_key.name}" PRIMARY KEY'
            if column.identity is not None:
                line += " AUTOINCREMENT"
        lines.append(line)
    return f'CREATE TABLE "{table.name}" (\n' + ",\n".join(lines) + "\n)"


def _create_table(connection: Connection, table: Table) -> None:
    from keyconnector.storage.registry import schema_for

    create = schema_for(connection.dialect.name).create_table
    if create is not None:
        create(connection, table)
    else:
        connection.execute(CreateTable(table))


def create_upstream_schema(connection: Connection) -> str:
    """Make the database look as if upstream's first migration had run; return what was done.

    - No upstream table: create all three and the history row, as upstream would on first start.
    - Both data tables present (an upstream database): create nothing and keep the data. Only a missing
      ``__EFMigrationsHistory`` is added, because without its row upstream would try to create the
      tables again if the operator ever went back to it.
    - Anything in between is a damaged or foreign database: refuse rather than guess.
    """
    existing = set(inspect(connection).get_table_names())
    present = [table.name for table in UPSTREAM_TABLES if table.name in existing]
    if not present:
        for table in (*UPSTREAM_TABLES, migrations_history):
            if table.name not in existing:
                _create_table(connection, table)
        if MIGRATIONS_HISTORY in existing:
            return "created the upstream tables next to an existing migration history"
        connection.execute(migrations_history.insert().values(**history_row(connection.dialect.name)))
        return "created upstream's schema"
    if len(present) != len(UPSTREAM_TABLES):
        missing = [table.name for table in UPSTREAM_TABLES if table.name not in existing]
        raise StorageError(
            f"the database has table {', '.join(present)} but not {', '.join(missing)}: it is neither empty "
            "nor a Key Connector database; refusing to change it"
        )
    check_upstream_columns(connection)
    if MIGRATIONS_HISTORY not in existing:
        _create_table(connection, migrations_history)
        connection.execute(migrations_history.insert().values(**history_row(connection.dialect.name)))
        return "adopted an existing Key Connector database (added its missing migration history)"
    return "adopted an existing Key Connector database"


def check_upstream_columns(connection: Connection) -> None:
    """Refuse a database whose upstream tables lack a column the service reads or writes."""
    inspector = inspect(connection)
    for table in UPSTREAM_TABLES:
        found = {column["name"].lower() for column in inspector.get_columns(table.name)}
        missing = [column.name for column in table.columns if column.name.lower() not in found]
        if missing:
            raise StorageError(
                f"table {table.name} has no column {', '.join(missing)}: it was not created by Key Connector"
            )


# --------------------------------------------------------------------------------------------------
# Our own tables (upstream never reads them; dropping them takes nothing from upstream)

KEY_RING = "keyconnector_key_ring"

key_ring = Table(
    KEY_RING,
    MetaData(),
    Column("id", Integer, nullable=False, autoincrement=False),
    Column("revision", Integer, nullable=False),
    Column(
        "document",
        Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb").with_variant(mssql.NVARCHAR(), "mssql"),
        nullable=False,
    ),
    PrimaryKeyConstraint("id", name="PK_keyconnector_key_ring"),
)
"""One row (``id = 1``): the data-key versions and their wraps, as a JSON document (see
``keyconnector.core.keyring``). A document rather than columns so that adding a field later needs no
migration on five databases; ``revision`` makes every change a compare-and-swap."""

AUDIT = "keyconnector_audit"

audit = Table(
    AUDIT,
    MetaData(),
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("chain", String(100), nullable=False),
    Column("seq", BigInteger(), nullable=False),
    Column("time", String(32), nullable=False),
    Column("user_id", String(36), nullable=True),
    Column("outcome", String(32), nullable=False),
    Column("status", Integer, nullable=False),
    Column(
        "entry",
        Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb").with_variant(mssql.NVARCHAR(), "mssql"),
        nullable=False,
    ),
    Column("hash", String(64), nullable=False),
)
"""The audit trail (see ``keyconnector.audit``): append-only, one row per entry in insertion order
(``id``). ``entry`` is the hash-chained JSON exactly as sealed; the other columns repeat some of its
fields for queries, and ``keyconnector audit verify --database`` checks that they still agree."""
