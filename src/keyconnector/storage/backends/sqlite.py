"""SQLite backend: upstream's database file, shared by several worker processes.

Why it looks the way it does (docs/performance.md sections 1 and 4):

- ``get_key`` runs one ``SELECT`` with the standard ``sqlite3`` module straight on the event loop. In
  WAL mode a reader never waits for a writer, so the call costs microseconds; handing it to a thread
  would cost ten times more than the query, and aiosqlite or SQLAlchemy's async layer far more.
- Writes may wait for another process's write lock, so they never run on the loop: one dedicated
  thread per repository owns a second connection and runs every write as a short
  ``BEGIN IMMEDIATE`` transaction. Taking the write lock up front is what makes read-then-write
  sequences atomic across processes, and avoids the "database is locked" failure a deferred
  transaction hits when it tries to upgrade its read lock while another process writes.
- Values are stored exactly as upstream's Entity Framework provider writes them (upper-case GUID text,
  ``yyyy-MM-dd HH:mm:ss.FFFFFFF`` times), so the file stays usable by upstream.

The connection string is the operator's existing ADO.NET one (``Data Source=/etc/bitwarden/kc.db``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import quote
from uuid import UUID

from keyconnector.errors import ConfigurationError, StorageError, UnavailableError, setting_name
from keyconnector.runtime.settings import DatabaseSettings
from keyconnector.runtime.trust import Trust
from keyconnector.storage.base import DatabaseState, RecordUpdate, StoredKeyRing, UserKeyRecord
from keyconnector.storage.connstr import parse_connection_string, resolve
from keyconnector.storage.registry import Backend, Schema
from keyconnector.storage.sql.schema import format_sqlite_time, parse_sqlite_time, sqlite_guid

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine, Table

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_SECONDS = 30.0
"""How long a write waits for another process's lock; upstream's driver default ("Default Timeout")."""

READ_TIMEOUT_SECONDS = 1.0
"""A WAL reader only waits in rare moments (recovery after a crash, a journal-mode change). It waits on
the event loop, so briefly; past that the request gets a 503 rather than stalling every other one."""

_SYNONYMS = {
    "Data Source": "data source",
    "DataSource": "data source",
    "Filename": "data source",
    "Mode": "mode",
    "Default Timeout": "timeout",
    "DefaultTimeout": "timeout",
    "Command Timeout": "timeout",
    "CommandTimeout": "timeout",
}
# Accepted and dropped: pooling and cache sharing are driver internals, the schema has no foreign keys
# or triggers, and "Version=3" is left over from System.Data.SQLite-era strings.
_IGNORED = (
    "Cache",
    "Pooling",
    "Foreign Keys",
    "ForeignKeys",
    "Recursive Triggers",
    "RecursiveTriggers",
    "Version",
)
_UNSUPPORTED = {
    "Password": (
        "means an SQLCipher-encrypted database, which keyconnector does not support. Export it to a plain "
        "SQLite file (sqlcipher's sqlcipher_export) and remove Password from the connection string; the "
        "user keys inside are encrypted by the data key either way"
    ),
}

_SELECT_KEY = 'SELECT "Key" FROM "UserKeys" WHERE "Id" = ?'
_SELECT_DATA_KEY = 'SELECT "Id", "SymmetricKey" FROM "ApplicationDatas" ORDER BY "Id" LIMIT 1'
_INSERT_OR_FILL = (
    'INSERT INTO "UserKeys" ("Id", "Key", "CreationDate", "RevisionDate", "LastAccessDate") '
    "VALUES (?1, ?2, ?3, NULL, NULL) "
    'ON CONFLICT ("Id") DO UPDATE SET "Key" = excluded."Key", "CreationDate" = excluded."CreationDate", '
    '"RevisionDate" = NULL WHERE "UserKeys"."Key" IS NULL'
)
_RECORD_ACCESS = (
    'UPDATE "UserKeys" SET "LastAccessDate" = ?1 '
    'WHERE "Id" = ?2 AND ("LastAccessDate" IS NULL OR "LastAccessDate" < ?1)'
)
_UPSERT = (
    'INSERT INTO "UserKeys" ("Id", "Key", "CreationDate", "RevisionDate", "LastAccessDate") '
    "VALUES (?, ?, ?, ?, ?) "
    'ON CONFLICT ("Id") DO UPDATE SET "Key" = excluded."Key", "CreationDate" = excluded."CreationDate", '
    '"RevisionDate" = excluded."RevisionDate", "LastAccessDate" = excluded."LastAccessDate"'
)
# Comparison of TEXT is binary in SQLite: a key differing only in case never matches. A row already
# holding the new value counts as changed, as on the server backends (there: a retried batch).
_REPLACE_IF = 'UPDATE "UserKeys" SET "Key" = ?1 WHERE "Id" = ?2 AND ("Key" = ?3 OR "Key" = ?1)'
_SELECT_RING = "SELECT revision, document FROM keyconnector_key_ring WHERE id = 1"
_INSERT_RING = (
    "INSERT INTO keyconnector_key_ring (id, revision, document) VALUES (1, 1, ?) ON CONFLICT (id) DO NOTHING"
)
_UPDATE_RING = (
    "UPDATE keyconnector_key_ring SET document = ?, revision = revision + 1 WHERE id = 1 AND revision = ?"
)
_SELECT_BATCH = (
    'SELECT "Id", "Key", "CreationDate", "RevisionDate", "LastAccessDate" FROM "UserKeys" '
    'WHERE "Id" > ? ORDER BY "Id" LIMIT ?'
)


@dataclass(frozen=True, slots=True)
class SqliteTarget:
    """What the connection string asks for, validated."""

    path: str
    timeout: float
    setting: str


def parse_target(settings: DatabaseSettings, prefix: str) -> SqliteTarget:
    """Read ``sqliteConnectionString`` and check that the database's directory exists."""
    setting = f"{prefix}.sqliteConnectionString"
    raw = settings.sqlite_connection_string
    text = raw.get_secret_value().strip() if raw is not None else ""
    if not text:
        raise ConfigurationError(
            setting, "is not set; for example: Data Source=/etc/bitwarden/keyconnector.db"
        )
    values = resolve(
        parse_connection_string(text, setting),
        setting,
        synonyms=_SYNONYMS,
        ignored=_IGNORED,
        unsupported=_UNSUPPORTED,
    )
    source = values.get("data source", "").strip()
    if not source:
        raise ConfigurationError(
            setting, "has no Data Source: name the database file, e.g. Data Source=/etc/bitwarden/kc.db"
        )
    if source == ":memory:" or source.lower().startswith("file:"):
        raise ConfigurationError(
            setting, "Data Source must be a plain file path: every worker process has to open the same file"
        )
    mode = values.get("mode", "ReadWriteCreate").strip().lower()
    if mode not in ("readwritecreate", "readwrite"):
        raise ConfigurationError(
            setting, "Mode must be ReadWriteCreate or ReadWrite: keyconnector writes to the database"
        )
    timeout = DEFAULT_TIMEOUT_SECONDS
    if "timeout" in values:
        try:
            timeout = float(int(values["timeout"]))
        except ValueError:
            raise ConfigurationError(setting, "Default Timeout must be a whole number of seconds") from None
        if timeout <= 0:
            timeout = DEFAULT_TIMEOUT_SECONDS
    path = os.path.abspath(os.path.expanduser(source))
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise ConfigurationError(
            setting, f"the directory {directory} of the database file does not exist; create it first"
        )
    if os.path.isdir(path):
        raise ConfigurationError(setting, f"Data Source {path} is a directory, not a database file")
    if mode == "readwrite" and not os.path.exists(path):
        raise ConfigurationError(setting, f"{path} does not exist and Mode=ReadWrite forbids creating it")
    return SqliteTarget(path=path, timeout=timeout, setting=setting)


def _translate(exc: BaseException, target: SqliteTarget, action: str) -> Exception:
    """Turn a driver error into the operator-facing kind: misconfigured, unavailable or damaged."""
    message = str(exc)
    lowered = message.lower()
    if "locked" in lowered or "busy" in lowered:
        return UnavailableError(
            "database", f"{target.path} stayed locked by another process while {action}: {message}"
        )
    if "unable to open" in lowered or "readonly" in lowered or "read-only" in lowered:
        return ConfigurationError(
            target.setting,
            f"cannot write {target.path} (or its -wal/-shm files beside it) while {action}: {message}; "
            "check that the file and its directory are writable by this user",
        )
    if "not a database" in lowered or "malformed" in lowered or "encrypted" in lowered:
        return StorageError(f"{target.path} is not a usable SQLite database ({message}) while {action}")
    if "no such table" in lowered or "no such column" in lowered:
        return StorageError(
            f"{target.path} lacks upstream's schema ({message}) while {action}: run the migrations first"
        )
    if isinstance(exc, sqlite3.OperationalError):
        return UnavailableError("database", f"{target.path} while {action}: {message}")
    return StorageError(f"{target.path} while {action}: {message}")


def _create_private(path: str) -> None:
    """Create the database file with mode 0600 if it does not exist yet.

    SQLite creates a missing file with 0644 less the umask: readable by every local account from
    the first write, user keys included (encrypted, but a copy is an offline attack and a writable
    one lets records be swapped). SQLite gives the ``-wal`` and ``-shm`` files the mode of the
    database file, so creating it first, empty and private, covers all three whatever the umask. An
    existing file keeps its mode: the start-up permission warning speaks about it instead.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError:
        return  # a missing folder or no right to write: SQLite's own error names it better, next
    os.close(fd)


def _set_wal(target: SqliteTarget) -> None:
    """Switch the file to WAL (a persistent property of the file) before any worker reads it.

    Done outside the migration transaction because SQLite refuses to change the journal mode inside one.
    This is also where a new database file is born: see :func:`_create_private`.
    """
    _create_private(target.path)
    connection = sqlite3.connect(target.path, timeout=target.timeout, isolation_level=None)
    try:
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]
    finally:
        connection.close()
    if str(mode).lower() != "wal":
        log.warning(
            "%s could not be switched to WAL mode (it is in %s mode): readers may wait for writers; "
            "is it on a network file system?",
            target.path,
            mode,
        )


def migrate(settings: DatabaseSettings, prefix: str, trust: Trust | None = None) -> None:
    """Create upstream's schema in a new file, or adopt an upstream file in place.

    Safe when several processes run it at once on the same (even empty) file: see
    :mod:`keyconnector.storage.sql.migrate`.
    """
    # Imported here: worker processes only open the database, and need neither Alembic nor SQLAlchemy.
    from sqlalchemy.exc import DBAPIError

    from keyconnector.storage.sql.migrate import sqlite_migration_engine, upgrade

    target = parse_target(settings, prefix)
    if not os.path.exists(target.path):
        log.warning(
            "%s does not exist: creating a new, empty database there (%s). If this deployment already "
            "has data, stop now: the setting points at the wrong file",
            target.path,
            setting_name(target.setting),
        )
    try:
        _set_wal(target)
        engine = sqlite_migration_engine(target.path, target.timeout)
        try:
            upgrade(engine, create_schema=settings.create_schema, setting=f"{prefix}.createSchema")
        finally:
            engine.dispose()
    except DBAPIError as exc:
        raise _translate(exc.orig if exc.orig is not None else exc, target, "migrating the schema") from None
    except sqlite3.Error as exc:
        raise _translate(exc, target, "migrating the schema") from None


def inspect(settings: DatabaseSettings, prefix: str, trust: Trust | None = None) -> DatabaseState:
    """What ``keyconnector check`` reports; opens the file read-only and never creates it."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.pool import NullPool

    from keyconnector.storage.sql.migrate import describe_schema

    target = parse_target(settings, prefix)
    if not os.path.exists(target.path):
        return DatabaseState(
            f"sqlite {target.path}: no database yet; `serve` would create a new, empty database there", False
        )
    engine = create_engine(
        "sqlite+pysqlite:///file:" + quote(target.path) + "?mode=ro&uri=true", poolclass=NullPool
    )
    try:
        with engine.connect() as connection:
            description, has_schema = describe_schema(
                connection, create_schema=settings.create_schema, setting=f"{prefix}.createSchema"
            )
            return DatabaseState(f"sqlite {target.path}: {description}", has_schema)
    except DBAPIError as exc:
        raise _translate(exc.orig if exc.orig is not None else exc, target, "inspecting the schema") from None
    finally:
        engine.dispose()


def _connect(target: SqliteTarget, timeout: float, *, read_only: bool) -> sqlite3.Connection:
    # mode=rw: never create a file here; a missing file means migrations did not run (or the file was
    # removed), which must not silently become a new empty database.
    uri = "file:" + quote(target.path) + "?mode=rw"
    connection = sqlite3.connect(
        uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False
    )
    try:
        connection.execute("PRAGMA synchronous=NORMAL")
        if read_only:
            connection.execute("PRAGMA query_only=ON")
    except BaseException:
        connection.close()
        raise
    return connection


def _open_reader(target: SqliteTarget) -> tuple[sqlite3.Connection, tuple[int, int]]:
    """The event loop's read connection, and the identity of the file it opened (see ``ping``)."""
    if not os.path.exists(target.path):
        raise StorageError(f"{target.path} does not exist: run the migrations first")
    reader = _connect(target, READ_TIMEOUT_SECONDS, read_only=True)
    stat = os.stat(target.path)
    return reader, (stat.st_dev, stat.st_ino)


class SqliteRepository:
    """The :class:`~keyconnector.storage.base.Repository` over one SQLite file."""

    def __init__(self, target: SqliteTarget) -> None:
        self._target = target
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keyconnector-sqlite")
        self._identity: tuple[int, int] = (0, 0)

    @property
    def description(self) -> str:
        return f"sqlite {self._target.path}"

    # -- life cycle ---------------------------------------------------------------------------------

    async def _open(self) -> None:
        target = self._target
        try:
            self._reader, self._identity = _open_reader(target)
            # Fail at start-up, not on the first request, if the tables are not upstream's.
            self._reader.execute(
                'SELECT "Id", "Key", "CreationDate", "RevisionDate", "LastAccessDate" FROM "UserKeys" LIMIT 0'
            ).fetchall()
            self._reader.execute('SELECT "Id", "SymmetricKey" FROM "ApplicationDatas" LIMIT 0').fetchall()
            self._writer = await asyncio.get_running_loop().run_in_executor(
                self._executor, functools.partial(_connect, target, target.timeout, read_only=False)
            )
        except sqlite3.Error as exc:
            await self.aclose()
            raise _translate(exc, target, "opening the database") from None
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        writer, self._writer = self._writer, None
        if writer is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, writer.close)
        self._executor.shutdown(wait=False)

    # -- plumbing ------------------------------------------------------------------------------------

    def _read_connection(self) -> sqlite3.Connection:
        if self._reader is None:
            raise StorageError(f"the repository for {self._target.path} is closed")
        return self._reader

    def _transaction(self, work: Callable[[sqlite3.Connection], T], action: str) -> T:
        """Run ``work`` in one ``BEGIN IMMEDIATE`` transaction; called only on the writer thread."""
        connection = self._writer
        if connection is None:
            raise StorageError(f"the repository for {self._target.path} is closed")
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                result = work(connection)
                connection.execute("COMMIT")
            finally:
                # COMMIT itself can fail (a full disk, a lock in rollback-journal mode): never leave
                # a transaction open on the shared writer connection.
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise _translate(exc, self._target, action) from None
        return result

    async def _write(self, work: Callable[[sqlite3.Connection], T], action: str) -> T:
        if self._writer is None:
            raise StorageError(f"the repository for {self._target.path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._transaction, work, action)

    # -- the request path ------------------------------------------------------------------------------

    async def get_key(self, user_id: UUID) -> str | None:
        try:
            # fetchall, not fetchone: stepping to the end resets the statement at once, so this
            # connection never holds a read snapshot open (which would stop WAL checkpoints).
            rows = self._read_connection().execute(_SELECT_KEY, (sqlite_guid(user_id),)).fetchall()
        except sqlite3.Error as exc:
            raise _translate(exc, self._target, "reading a user key") from None
        if not rows:
            return None
        key: str | None = rows[0][0]
        return key

    # -- writes --------------------------------------------------------------------------------------

    async def create_key(self, user_id: UUID, record: str, now: datetime) -> bool:
        params = (sqlite_guid(user_id), record, format_sqlite_time(now))

        def work(connection: sqlite3.Connection) -> bool:
            # One statement: insert, or fill a row whose Key is NULL; a row with a key is left alone
            # and the statement then changes nothing.
            return connection.execute(_INSERT_OR_FILL, params).rowcount == 1

        return await self._write(work, "creating a user key")

    async def put_key(self, user_id: UUID, record: str, now: datetime) -> bool:
        guid = sqlite_guid(user_id)
        stamp = format_sqlite_time(now)

        def work(connection: sqlite3.Connection) -> bool:
            rows = connection.execute(_SELECT_KEY, (guid,)).fetchall()
            if not rows:
                connection.execute(
                    'INSERT INTO "UserKeys" ("Id", "Key", "CreationDate", "RevisionDate", "LastAccessDate") '
                    "VALUES (?, ?, ?, NULL, NULL)",
                    (guid, record, stamp),
                )
                return True
            if rows[0][0] is None:
                # A row without a key is no key: this is the user's first key, as for create_key.
                connection.execute(
                    'UPDATE "UserKeys" SET "Key" = ?, "CreationDate" = ?, "RevisionDate" = NULL '
                    'WHERE "Id" = ?',
                    (record, stamp, guid),
                )
                return True
            connection.execute(
                'UPDATE "UserKeys" SET "Key" = ?, "RevisionDate" = ? WHERE "Id" = ?', (record, stamp, guid)
            )
            return False

        return await self._write(work, "storing a user key")

    async def record_access(self, accesses: Mapping[UUID, datetime]) -> None:
        if not accesses:
            return
        # The guard in _RECORD_ACCESS keeps a late batch from another worker from moving a user's
        # access time backwards; upstream's time text sorts in time order, so comparing text is exact.
        params = [(format_sqlite_time(when), sqlite_guid(user)) for user, when in accesses.items()]

        def work(connection: sqlite3.Connection) -> None:
            connection.executemany(_RECORD_ACCESS, params)

        await self._write(work, "recording access times")

    async def get_wrapped_data_key(self) -> str | None:
        try:
            rows = self._read_connection().execute(_SELECT_DATA_KEY).fetchall()
        except sqlite3.Error as exc:
            raise _translate(exc, self._target, "reading the data key") from None
        if not rows:
            return None
        wrapped: str | None = rows[0][1]
        return wrapped

    async def set_wrapped_data_key(self, wrapped: str) -> None:
        def work(connection: sqlite3.Connection) -> None:
            rows = connection.execute(_SELECT_DATA_KEY).fetchall()
            if rows:
                connection.execute(
                    'UPDATE "ApplicationDatas" SET "SymmetricKey" = ? WHERE "Id" = ?', (wrapped, rows[0][0])
                )
            else:
                connection.execute('INSERT INTO "ApplicationDatas" ("SymmetricKey") VALUES (?)', (wrapped,))

        await self._write(work, "replacing the data key")

    async def store_wrapped_data_key(self, wrapped: str) -> str:
        def work(connection: sqlite3.Connection) -> str:
            # The write lock is held from BEGIN IMMEDIATE, so no other process can slip a different key
            # in between this read and the write below: the first one stored wins, everywhere.
            rows = connection.execute(_SELECT_DATA_KEY).fetchall()
            if rows and rows[0][1] is not None:
                stored: str = rows[0][1]
                return stored
            if rows:
                connection.execute(
                    'UPDATE "ApplicationDatas" SET "SymmetricKey" = ? WHERE "Id" = ?', (wrapped, rows[0][0])
                )
            else:
                connection.execute('INSERT INTO "ApplicationDatas" ("SymmetricKey") VALUES (?)', (wrapped,))
            return wrapped

        return await self._write(work, "storing the data key")

    # -- operations: transfer, rotation, backup -------------------------------------------------------

    async def count_records(self) -> int:
        def work(connection: sqlite3.Connection) -> int:
            count: int = connection.execute('SELECT COUNT(*) FROM "UserKeys"').fetchone()[0]
            return count

        # On the writer thread, outside a transaction: counting a large table must not stall the loop.
        return await self._on_writer(work, "counting user keys")

    async def upsert_records(self, records: Sequence[UserKeyRecord]) -> None:
        if not records:
            return
        # In key order (stable, so the last of a user's rows still wins): the B-tree is then filled
        # page by page instead of at random places, about a fifth faster for new rows.
        params = sorted(
            (
                (
                    sqlite_guid(record.user_id),
                    record.key,
                    format_sqlite_time(record.creation_date),
                    _time_text(record.revision_date),
                    _time_text(record.last_access_date),
                )
                for record in records
            ),
            key=lambda row: row[0],
        )

        def work(connection: sqlite3.Connection) -> None:
            connection.executemany(_UPSERT, params)

        await self._write(work, "copying user keys")

    async def replace_records(self, updates: Sequence[RecordUpdate]) -> int:
        if not updates:
            return 0
        params = [(update.new, sqlite_guid(update.user_id), update.expected) for update in updates]

        def work(connection: sqlite3.Connection) -> int:
            # executemany sums the rows each statement changed.
            return connection.executemany(_REPLACE_IF, params).rowcount

        return await self._write(work, "re-encrypting user keys")

    async def get_key_ring(self) -> StoredKeyRing | None:
        try:
            rows = self._read_connection().execute(_SELECT_RING).fetchall()
        except sqlite3.Error as exc:
            if "no such table" in str(exc):
                return None  # an upstream database keyconnector never migrated: it never rotated either
            raise _translate(exc, self._target, "reading the key ring") from None
        if not rows:
            return None
        return StoredKeyRing(revision=int(rows[0][0]), document=str(rows[0][1]))

    async def put_key_ring(self, document: str, expected_revision: int) -> bool:
        def work(connection: sqlite3.Connection) -> bool:
            # BEGIN IMMEDIATE holds the write lock, and the statement itself compares: one of several
            # processes with the same expected revision changes the row, the others change nothing.
            if expected_revision == 0:
                return connection.execute(_INSERT_RING, (document,)).rowcount == 1
            return connection.execute(_UPDATE_RING, (document, expected_revision)).rowcount == 1

        return await self._write(work, "storing the key ring")

    # -- bulk and health -----------------------------------------------------------------------------

    def _read_batch(self, after: str, size: int) -> list[tuple[str, str | None, str, str | None, str | None]]:
        connection = self._writer
        if connection is None:
            raise StorageError(f"the repository for {self._target.path} is closed")
        try:
            rows: list[tuple[str, str | None, str, str | None, str | None]] = connection.execute(
                _SELECT_BATCH, (after, size)
            ).fetchall()
        except sqlite3.Error as exc:
            raise _translate(exc, self._target, "listing user keys") from None
        return rows

    async def _on_writer(self, work: Callable[[sqlite3.Connection], T], action: str) -> T:
        """A read on the writer thread, without a transaction (no write lock taken)."""

        def run() -> T:
            connection = self._writer
            if connection is None:
                raise StorageError(f"the repository for {self._target.path} is closed")
            try:
                return work(connection)
            except sqlite3.Error as exc:
                raise _translate(exc, self._target, action) from None

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def iter_records(self, batch_size: int = 1000) -> AsyncIterator[list[UserKeyRecord]]:
        """Keyset pagination on the primary key: each batch is one short query (no snapshot is held
        between batches, so writers are never blocked), and rows written meanwhile are not skipped
        twice or repeated. Runs on the writer thread: a large batch would stall the event loop."""
        if self._writer is None:
            raise StorageError(f"the repository for {self._target.path} is closed")
        loop = asyncio.get_running_loop()
        after = ""
        while True:
            rows = await loop.run_in_executor(self._executor, self._read_batch, after, batch_size)
            if not rows:
                return
            yield [self._record(row) for row in rows]
            if len(rows) < batch_size:
                return
            after = rows[-1][0]

    def _record(self, row: tuple[str, str | None, str, str | None, str | None]) -> UserKeyRecord:
        guid, key, created, revised, accessed = row
        try:
            return UserKeyRecord(
                user_id=UUID(guid),
                key=key,
                creation_date=parse_sqlite_time(created),
                revision_date=parse_sqlite_time(revised) if revised is not None else None,
                last_access_date=parse_sqlite_time(accessed) if accessed is not None else None,
            )
        except (TypeError, ValueError) as exc:
            raise StorageError(
                f"{self._target.path}: the UserKeys row '{guid}' is malformed ({exc})"
            ) from None

    async def ping(self) -> None:
        path = self._target.path
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise UnavailableError("database", f"{path} cannot be read: {exc.strerror}") from None
        if (stat.st_dev, stat.st_ino) != self._identity:
            # Our connections still point at the old file: writes would go somewhere nobody reads.
            raise UnavailableError(
                "database", f"{path} was replaced or removed after start-up; restart keyconnector"
            )
        try:
            # Touches the file itself (schema page and lock), unlike a bare SELECT 1.
            self._read_connection().execute('SELECT 1 FROM "UserKeys" LIMIT 1').fetchall()
        except sqlite3.Error as exc:
            raise _translate(exc, self._target, "checking the database") from None


def _time_text(value: datetime | None) -> str | None:
    return None if value is None else format_sqlite_time(value)


async def open(settings: DatabaseSettings, prefix: str, trust: Trust | None = None) -> SqliteRepository:
    """Open the repository; :func:`migrate` must have run (the file must exist with upstream's tables)."""
    repository = SqliteRepository(parse_target(settings, prefix))
    await repository._open()
    return repository


@contextlib.contextmanager
def _migration_lock(connection: Connection) -> Iterator[None]:
    # BEGIN EXCLUSIVE already holds it: see keyconnector.storage.sql.migrate.sqlite_migration_engine.
    yield


def _create_table(connection: Connection, table: Table) -> None:
    """Upstream's ``CREATE TABLE`` text, which SQLite keeps verbatim (see ``sqlite_create_table_sql``)."""
    from keyconnector.storage.sql.schema import sqlite_create_table_sql

    connection.exec_driver_sql(sqlite_create_table_sql(table))


def _sync_engine(settings: DatabaseSettings, prefix: str) -> Engine:
    from sqlalchemy import URL, create_engine
    from sqlalchemy.pool import NullPool

    target = parse_target(settings, prefix)
    return create_engine(
        URL.create("sqlite+pysqlite", database=target.path),
        poolclass=NullPool,
        connect_args={"timeout": target.timeout},
    )


def _secret_files(settings: DatabaseSettings, prefix: str) -> list[tuple[str, str]]:
    if settings.sqlite_connection_string is None:
        return []
    return [(f"{prefix}.sqliteConnectionString", parse_target(settings, prefix).path)]


BACKEND = Backend(
    name="sqlite",
    migrate=migrate,
    open=open,
    inspect=inspect,
    sync_engine=_sync_engine,
    secret_files=_secret_files,
    schema=Schema(
        sqlalchemy_dialects=("sqlite",),
        upstream_migration_id="20210820155938_InitialCreate",
        transactional_ddl=True,
        migration_lock=_migration_lock,
        create_table=_create_table,
    ),
)

__all__ = ["BACKEND", "SqliteRepository", "SqliteTarget", "migrate", "open", "parse_target"]
