"""SQL Server backend: upstream's tables through pymssql, on a pool of threads.

Why it looks the way it does:

- The driver is pymssql: maintained, and its wheels bundle FreeTDS and OpenSSL, so ``pip install``
  is all an operator needs (no ODBC driver manager, no Microsoft ODBC driver). SQLAlchemy supports it
  (``mssql+pymssql``) for migrations and ``inspect``. It is a blocking driver, so the repository runs
  each operation on a thread of its own pool, one connection per thread at most: the ~100 us of a
  thread hop is paid on this backend only (docs/performance.md section 1).
- Writes are single statements, atomic on their own, as on MySQL: "create unless a key exists" is an
  ``INSERT`` that succeeds or hits the primary key, then an ``UPDATE ... WHERE Key IS NULL``. The data
  key is one T-SQL batch that takes an application lock (``sp_getapplock``) owned by its transaction.
  The bulk operations run a batch as one explicit transaction of ``MERGE`` / ``UPDATE ... FROM
  (VALUES ...)`` statements of 400 rows each.
- pymssql substitutes parameters on the client; GUIDs go in as ``uniqueidentifier`` text and times as
  full-precision ``datetime2`` literals (``use_datetime2``), so nothing is rounded to milliseconds.

TLS: ``Encrypt`` maps onto FreeTDS's encryption levels. Certificate checking (``Encrypt=True`` without
``TrustServerCertificate=True``, or ``Encrypt=Strict``) needs a CA file in FreeTDS's configuration: we
write one (system store, certifi and ``/etc/bitwarden/ca-certificates``) and point ``FREETDSCONF`` at it.

Tested without a server (connection strings, DDL, statements compiled for the dialect) and, when
``KC_TEST_SQLSERVER`` names one, against a live server; see the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from keyconnector._optional import require
from keyconnector.errors import ConfigurationError, StorageError, UnavailableError
from keyconnector.runtime.settings import DatabaseSettings
from keyconnector.runtime.trust import Trust
from keyconnector.storage.base import RecordUpdate, StoredKeyRing, UserKeyRecord
from keyconnector.storage.registry import Backend, Schema
from keyconnector.storage.sql import shared
from keyconnector.storage.sql.common import (
    PING_TIMEOUT_SECONDS,
    ConnectionStringSpec,
    Failure,
    ServerSchema,
    ServerTarget,
    load_target,
    log_pool,
    parse_bool,
    translate,
    with_retries,
)
from keyconnector.storage.sql.schema import naive_utc
from keyconnector.storage.sql.shared import Plan, drive_sync

if TYPE_CHECKING:
    from sqlalchemy import Connection

log = logging.getLogger(__name__)

T = TypeVar("T")

DATA_KEY_LOCK = "keyconnector-data-key"
DATA_KEY_LOCK_MILLISECONDS = 30_000

# Microsoft.Data.SqlClient's Encrypt values (and libpq's words, for URLs).
_SSL_MODES = {
    "false": "prefer",
    "no": "prefer",
    "optional": "prefer",
    "true": "verify-full",
    "yes": "verify-full",
    "mandatory": "verify-full",
    "strict": "verify-full",
    "disable": "disable",
    "prefer": "prefer",
    "require": "require",
    "verify-ca": "verify-ca",
    "verify-full": "verify-full",
}


def split_server(value: str, setting: str) -> list[tuple[str, int | None]]:
    """SqlClient's ``Server`` value: ``tcp:host,port``, ``host,port``, ``host\\instance``, ``(local)``."""
    text = value.strip()
    lowered = text.lower()
    if lowered.startswith(("np:", "lpc:", "admin:")) or lowered.startswith("(localdb)"):
        raise ConfigurationError(
            setting,
            "names a named-pipe, shared-memory, admin or LocalDB server; keyconnector connects over TCP: "
            "write Server=tcp:host,1433",
        )
    if lowered.startswith("tcp:"):
        text = text[4:].strip()
    port: int | None = None
    if "," in text:
        text, port_text = (part.strip() for part in text.rsplit(",", 1))
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigurationError(setting, "the port after ',' in Server must be a number") from None
        if not 0 < port < 65536:
            raise ConfigurationError(setting, "the port after ',' in Server must be between 1 and 65535")
    if text in (".", "(local)", "(LOCAL)"):
        text = "localhost"
    if not text:
        raise ConfigurationError(setting, "names no server host")
    return [(text, port)]


SPEC = ConnectionStringSpec(
    provider="sqlserver",
    setting_name="sqlServerConnectionString",
    example="Server=tcp:db,1433;Database=keyconnector;User Id=keyconnector;Password=...;Encrypt=True",
    default_port=1433,
    synonyms={
        "Server": "host",
        "Data Source": "host",
        "Address": "host",
        "Addr": "host",
        "Network Address": "host",
        "Host": "host",
        "Port": "port",
        "Database": "database",
        "Initial Catalog": "database",
        "User Id": "user",
        "UserId": "user",
        "Uid": "user",
        "User": "user",
        "Username": "user",
        "Password": "password",
        "Pwd": "password",
        "Encrypt": "ssl mode",
        "Trust Server Certificate": "trust server certificate",
        "TrustServerCertificate": "trust server certificate",
        "Connect Timeout": "connect timeout",
        "Connection Timeout": "connect timeout",
        "Timeout": "connect timeout",
        "Command Timeout": "command timeout",
        "CommandTimeout": "command timeout",
        "Min Pool Size": "min pool size",
        "MinPoolSize": "min pool size",
        "Max Pool Size": "max pool size",
        "MaxPoolSize": "max pool size",
        "Application Name": "application name",
        "App": "application name",
        "Integrated Security": "integrated security",
        "Trusted_Connection": "integrated security",
    },
    ignored=(
        "Pooling",
        "MultipleActiveResultSets",
        "Multiple Active Result Sets",
        "MARS",
        "Persist Security Info",
        "PersistSecurityInfo",
        "Workstation ID",
        "WSID",
        "Connect Retry Count",
        "ConnectRetryCount",
        "Connect Retry Interval",
        "ConnectRetryInterval",
        "Load Balance Timeout",
        "Connection Lifetime",
        "MultiSubnetFailover",
        "Multi Subnet Failover",
        "Packet Size",
        "Enlist",
        "Transaction Binding",
        "Current Language",
        "Language",
        "Pool Blocking Period",
        "PoolBlockingPeriod",
        "TransparentNetworkIPResolution",
        "Transparent Network IP Resolution",
        "Application Intent",
        "ApplicationIntent",
        "Type System Version",
        "Replication",
        "Host Name In Certificate",
        "HostNameInCertificate",
        "Server Certificate",
        "IP Address Preference",
    ),
    unsupported={
        "Authentication": (
            "(Azure AD / Entra ID login) is not supported by keyconnector's SQL Server driver; "
            "use a SQL login (User Id and Password)"
        ),
        "AttachDBFilename": "is not supported; attach the database to the server and name it in Database",
        "Initial File Name": "is not supported; attach the database to the server and name it in Database",
        "User Instance": "is not supported; connect to a regular SQL Server instance",
        "Failover Partner": "(database mirroring) is not supported; use an availability group listener",
        "Column Encryption Setting": "(Always Encrypted) is not supported; the user keys are encrypted already",  # noqa: E501
        "Context Connection": "is not supported",
    },
    url_schemes=("mssql", "mssql+pymssql", "sqlserver"),
    url_query={
        "encrypt": "ssl mode",
        "trustservercertificate": "trust server certificate",
        "connect_timeout": "connect timeout",
        "login_timeout": "connect timeout",
        "timeout": "command timeout",
        "command_timeout": "command timeout",
        "appname": "application name",
        "application_name": "application name",
    },
    ssl_modes=_SSL_MODES,
    default_ssl_mode="verify-full",  # SqlClient 4+ encrypts and checks the certificate by default
    default_connect_timeout=15.0,
    default_command_timeout=30.0,
    default_idle_lifetime=300.0,
    verified_tls=("Encrypt=True;TrustServerCertificate=False", "encrypt=true&trustservercertificate=false"),
    verified_tls_refuses_trust=True,
    split_host=split_server,
)

_SELECT_KEY = "SELECT [Key] FROM [UserKeys] WHERE [Id] = CAST(%s AS uniqueidentifier)"
_INSERT = (
    "INSERT INTO [UserKeys] ([Id], [Key], [CreationDate], [RevisionDate], [LastAccessDate]) "
    "VALUES (CAST(%s AS uniqueidentifier), %s, CAST(%s AS datetime2), NULL, NULL)"
)
_FILL = (
    "UPDATE [UserKeys] SET [Key] = %s, [CreationDate] = CAST(%s AS datetime2), [RevisionDate] = NULL "
    "WHERE [Id] = CAST(%s AS uniqueidentifier) AND [Key] IS NULL"
)
_REPLACE = (
    "UPDATE [UserKeys] SET [Key] = %s, [RevisionDate] = CAST(%s AS datetime2) "
    "WHERE [Id] = CAST(%s AS uniqueidentifier) AND [Key] IS NOT NULL"
)
_TAKE_DATA_KEY_LOCK = (
    "SET NOCOUNT ON; SET XACT_ABORT ON; "  # noqa: S608 - constants only
    "BEGIN TRANSACTION; "
    "DECLARE @lock int, @id int, @key nvarchar(max); "
    "EXEC @lock = sp_getapplock @Resource = N'" + DATA_KEY_LOCK + "', @LockMode = 'Exclusive', "
    "@LockOwner = 'Transaction', @LockTimeout = " + str(DATA_KEY_LOCK_MILLISECONDS) + "; "
    "IF @lock < 0 THROW 50001, 'the data key lock was held by another process for too long', 1; "
    "SELECT TOP 1 @id = [Id], @key = [SymmetricKey] FROM [ApplicationDatas] ORDER BY [Id]; "
)
"""The start of both data-key batches: one transaction owning the application lock. SET options of an
ad hoc batch outlive it on the pooled connection, so each batch ends with ``SET NOCOUNT OFF``: the
row counts other statements rely on (``cursor.rowcount``) must come back afterwards."""
_STORE_DATA_KEY = (
    _TAKE_DATA_KEY_LOCK  # noqa: S608
    + "IF @key IS NULL BEGIN "
    "IF @id IS NULL INSERT INTO [ApplicationDatas] ([SymmetricKey]) VALUES (%s); "
    "ELSE UPDATE [ApplicationDatas] SET [SymmetricKey] = %s WHERE [Id] = @id; "
    "SET @key = %s; END; "
    "COMMIT; SET NOCOUNT OFF; "
    "SELECT @key"
)
_SET_DATA_KEY = (
    _TAKE_DATA_KEY_LOCK  # noqa: S608
    + "IF @id IS NULL INSERT INTO [ApplicationDatas] ([SymmetricKey]) VALUES (%s); "
    "ELSE UPDATE [ApplicationDatas] SET [SymmetricKey] = %s WHERE [Id] = @id; "
    "COMMIT; SET NOCOUNT OFF;"
)
_SELECT_DATA_KEY = "SELECT TOP 1 [Id], [SymmetricKey] FROM [ApplicationDatas] ORDER BY [Id]"
_COLUMNS = "[Id], [Key], [CreationDate], [RevisionDate], [LastAccessDate]"
_FIRST_BATCH = f"SELECT TOP (%s) {_COLUMNS} FROM [UserKeys] ORDER BY [Id]"  # noqa: S608
_NEXT_BATCH = (
    f"SELECT TOP (%s) {_COLUMNS} FROM [UserKeys] WHERE [Id] > CAST(%s AS uniqueidentifier) ORDER BY [Id]"  # noqa: S608
)
_CHECK_SCHEMA = (
    f"SELECT TOP 0 {_COLUMNS} FROM [UserKeys]",  # noqa: S608
    "SELECT TOP 0 [Id], [SymmetricKey] FROM [ApplicationDatas]",
)
ACCESS_CHUNK = 500  # 1,000 parameters per statement, under SQL Server's 2,100
OPERATION_CHUNK = 400  # rows per MERGE/UPDATE of upsert_records and replace_records (2,000 parameters)

_BEGIN = "SET XACT_ABORT ON; SET NOCOUNT OFF; BEGIN TRANSACTION"
_COMMIT = "COMMIT"
_SELECT_RING = "SELECT [revision], [document] FROM [keyconnector_key_ring] WHERE [id] = 1"
_INSERT_RING = "INSERT INTO [keyconnector_key_ring] ([id], [revision], [document]) VALUES (1, 1, %s)"
_UPDATE_RING = (
    "UPDATE [keyconnector_key_ring] SET [document] = %s, [revision] = [revision] + 1 "
    "WHERE [id] = 1 AND [revision] = %s"
)
_BINARY = "COLLATE Latin1_General_BIN2"
"""Keys are compared byte for byte: the database's default collation usually ignores case."""


def upsert_statement(count: int) -> str:
    """One ``MERGE`` inserting or wholly replacing ``count`` rows (id, key and the three dates).

    ``HOLDLOCK`` makes the existence check and the insert one atomic step, so two concurrent MERGEs of
    one new user cannot both insert it.
    """
    rows = ", ".join(
        [
            "(CAST(%s AS uniqueidentifier), %s, CAST(%s AS datetime2), CAST(%s AS datetime2), "
            "CAST(%s AS datetime2))"
        ]
        * count
    )
    return (
        "MERGE [UserKeys] WITH (HOLDLOCK) AS u "  # noqa: S608
        f"USING (VALUES {rows}) AS v([Id], [Key], [CreationDate], [RevisionDate], [LastAccessDate]) "
        "ON u.[Id] = v.[Id] "
        "WHEN MATCHED THEN UPDATE SET u.[Key] = v.[Key], u.[CreationDate] = v.[CreationDate], "
        "u.[RevisionDate] = v.[RevisionDate], u.[LastAccessDate] = v.[LastAccessDate] "
        "WHEN NOT MATCHED THEN INSERT ([Id], [Key], [CreationDate], [RevisionDate], [LastAccessDate]) "
        "VALUES (v.[Id], v.[Key], v.[CreationDate], v.[RevisionDate], v.[LastAccessDate]);"
    )


def replace_statement(count: int) -> str:
    """One ``UPDATE`` of ``count`` (id, expected, new) triples: the key changes only where the row still
    holds ``expected``, or already holds ``new`` (a retried batch whose earlier try committed)."""
    rows = ", ".join(["(CAST(%s AS uniqueidentifier), %s, %s)"] * count)
    return (
        "UPDATE u SET u.[Key] = v.new FROM [UserKeys] AS u "  # noqa: S608
        f"JOIN (VALUES {rows}) AS v(id, expected, new) ON u.[Id] = v.id "
        f"WHERE u.[Key] {_BINARY} = v.expected {_BINARY} OR u.[Key] {_BINARY} = v.new {_BINARY}"
    )


def record_access_statement(count: int) -> str:
    """One ``UPDATE`` for ``count`` (id, time) pairs, joined through a ``VALUES`` table."""
    rows = ", ".join(["(CAST(%s AS uniqueidentifier), CAST(%s AS datetime2))"] * count)
    return (
        "UPDATE u SET u.[LastAccessDate] = v.t FROM [UserKeys] AS u "  # noqa: S608
        f"JOIN (VALUES {rows}) AS v(id, t) ON u.[Id] = v.id "
        "WHERE u.[LastAccessDate] IS NULL OR u.[LastAccessDate] < v.t"
    )


# Error numbers: SQL Server's own, and DB-Library's (2xxxx) for the client side.
_TRANSIENT = {
    64, 233, 1204, 1205, 1222, 3960, 10053, 10054, 10060, 10928, 10929, 40143, 40197, 40501, 40613,
    49918, 49919, 49920, 20003, 20004, 20006, 20009, 20017, 20047, 20056,
}  # fmt: skip
_CONFIGURATION = {18456, 18452, 4060, 229, 262, 916}
_DUPLICATE_KEY = {2627, 2601}
_NUMBER = re.compile(r"(?:message|error|Msg) (\d{3,5})", re.IGNORECASE)


def parse_target(settings: DatabaseSettings, prefix: str, trust: Trust | None = None) -> ServerTarget:
    raw = settings.sqlserver_connection_string
    target = load_target(
        raw.get_secret_value() if raw is not None else None,
        f"{prefix}.{SPEC.setting_name}",
        SPEC,
        settings.pool_size,
        trust,
    )
    integrated = target.extra.get("integrated security", "").strip().lower()
    if integrated and (integrated == "sspi" or parse_bool(integrated, target.setting, "Integrated Security")):
        raise ConfigurationError(
            target.setting,
            "uses Integrated Security (Windows/Kerberos login), which keyconnector does not support; "
            "use a SQL login (User Id and Password)",
        )
    if not target.user:
        raise ConfigurationError(target.setting, "names no login (User Id); SQL logins are required")
    return target


def error_numbers(exc: BaseException) -> set[int]:
    """Every error number pymssql put into an exception (it nests them, and repeats them in text)."""
    found: set[int] = set()

    def walk(value: Any) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk(item)
        elif isinstance(value, (bytes, str)):
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            found.update(int(number) for number in _NUMBER.findall(text))

    walk(getattr(exc, "args", ()))
    number = getattr(exc, "number", None)
    if isinstance(number, int):
        found.add(number)
    return found


def classify(exc: BaseException) -> Failure | None:
    """What a pymssql error means: retry, give up for now, or fix the settings."""
    if isinstance(exc, TimeoutError):
        return Failure.UNAVAILABLE
    if isinstance(exc, (OSError, ConnectionError, EOFError)):
        return Failure.TRANSIENT
    if not type(exc).__module__.startswith(("pymssql", "_mssql")):
        return None
    numbers = error_numbers(exc)
    if numbers & _CONFIGURATION:
        return Failure.CONFIGURATION
    if numbers & _TRANSIENT:
        return Failure.TRANSIENT
    text = str(exc).lower()
    if "connection" in text and ("failed" in text or "closed" in text or "dead" in text):
        return Failure.TRANSIENT
    if type(exc).__name__ in ("OperationalError", "InterfaceError"):
        return Failure.TRANSIENT
    return Failure.FATAL


_INVALID_OBJECT_NAME = 208


def is_duplicate_key(exc: BaseException) -> bool:
    return bool(error_numbers(exc) & _DUPLICATE_KEY)


DIALECT = shared.Dialect(
    guid=str,
    select_key=_SELECT_KEY,
    writes=shared.InsertThenFill(insert=_INSERT, fill=_FILL, replace=_REPLACE),
    select_ring=_SELECT_RING,
    insert_ring=_INSERT_RING,
    update_ring=_UPDATE_RING,
    first_page=lambda size: (_FIRST_BATCH, (size,)),
    next_page=lambda after, size: (_NEXT_BATCH, (size, after)),
    page_key=lambda row: str(row[0]),
    is_duplicate=is_duplicate_key,
    is_missing_table=lambda exc: _INVALID_OBJECT_NAME in error_numbers(exc),
)
"""SQL Server's statements for :mod:`..sql.shared`: autocommit, one atomic statement at a time, as on
MySQL; GUIDs and times cast explicitly, because pymssql substitutes parameters on the client."""


def _step(cursor: Any, step: shared.Step) -> Any:
    """One statement of a shared operation on a pymssql cursor."""
    if step.parameters:
        cursor.execute(step.sql, step.parameters)
    else:
        cursor.execute(step.sql)
    if isinstance(step, shared.Execute):
        return cursor.rowcount
    if isinstance(step, shared.FetchOne):
        return cursor.fetchone()
    return list(cursor.fetchall())


# -- TLS through FreeTDS ---------------------------------------------------------------------------------------  # noqa: E501


def encryption_level(target: ServerTarget) -> str:
    """FreeTDS's encryption level for the SSL mode."""
    return {"disable": "off", "allow": "request", "prefer": "request"}.get(target.ssl_mode, "require")


_freetds_conf: tuple[str, bool, str] | None = None
"""(CA file, host name checked, configuration file) last written: FREETDSCONF is process-wide."""


def _configure_certificate_checks(target: ServerTarget) -> None:
    """Make FreeTDS check the server certificate (it only does when its configuration names a CA file).

    The CA file is ``target.trust``'s bundle, the same trust every other outgoing connection has;
    the file is rewritten only when that trust (or the host-name check) changes."""
    global _freetds_conf
    if target.ssl_mode not in ("verify-ca", "verify-full"):
        return
    ca_file = target.trust.bundle_file()
    check_hostname = target.ssl_mode == "verify-full"
    if _freetds_conf is not None and _freetds_conf[:2] == (ca_file, check_hostname):
        return
    handle, name = tempfile.mkstemp(prefix="keyconnector-freetds-", suffix=".conf")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write("[global]\n")
        out.write(f"\tca file = {ca_file}\n")
        out.write(f"\tcheck certificate hostname = {'yes' if check_hostname else 'no'}\n")
    os.environ["FREETDSCONF"] = name
    _freetds_conf = (ca_file, check_hostname, name)


def connect_arguments(target: ServerTarget) -> dict[str, Any]:
    """pymssql's ``connect`` arguments for ``target`` (also SQLAlchemy's ``connect_args``)."""
    host, port = target.hosts[0]
    named_instance = "\\" in host
    arguments: dict[str, Any] = {
        "server": host,
        "user": target.user,
        "password": target.password or "",
        "database": target.database,
        "login_timeout": max(1, int(target.connect_timeout)),
        "timeout": max(1, int(target.command_timeout)),
        "appname": target.application_name,
        "encryption": encryption_level(target),
        "use_datetime2": True,
        "charset": "UTF-8",
    }
    if not named_instance:
        arguments["port"] = str(port)
    return arguments


# -- migrations (pymssql, through SQLAlchemy) ---------------------------------------------------------------


def migration_engine(target: ServerTarget) -> Any:
    require("pymssql", extra="sqlserver", setting=target.setting, provider="sqlserver")
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    _configure_certificate_checks(target)
    arguments = connect_arguments(target)
    arguments.pop("use_datetime2")  # SQLAlchemy binds its own types
    return create_engine("mssql+pymssql://", connect_args=arguments, poolclass=NullPool)


@contextlib.contextmanager
def migration_lock(connection: Connection) -> Iterator[None]:
    """An application lock owned by the migration's transaction: released with it."""
    from sqlalchemy import text

    from keyconnector.storage.sql.migrate import LOCK_NAME, LOCK_TIMEOUT_SECONDS

    status = connection.execute(
        text(
            "DECLARE @result int; "
            "EXEC @result = sp_getapplock @Resource = :name, @LockMode = 'Exclusive', "
            "@LockOwner = 'Transaction', @LockTimeout = :timeout; "
            "SELECT @result"
        ),
        {"name": LOCK_NAME, "timeout": LOCK_TIMEOUT_SECONDS * 1000},
    ).scalar()
    if status is None or int(status) < 0:
        raise UnavailableError(
            "database", f"another process held the schema migration lock for over {LOCK_TIMEOUT_SECONDS}s"
        )
    yield


SCHEMA = ServerSchema(parse_target, migration_engine, classify)
migrate = SCHEMA.migrate
inspect = SCHEMA.inspect


# -- the repository ------------------------------------------------------------------------------------------


class _Connections:
    """Idle pymssql connections, shared by the threads of the repository's executor.

    At most one connection per thread is ever in use, so the pool never exceeds the thread count.
    A connection that failed is closed, never put back.
    """

    def __init__(self, arguments: dict[str, Any]) -> None:
        self._arguments = arguments
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._pymssql = require(
            "pymssql", extra="sqlserver", setting="database.sqlServerConnectionString", provider="sqlserver"
        )

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        try:
            connection = self._idle.get_nowait()
        except queue.Empty:
            connection = self._pymssql.connect(autocommit=True, **self._arguments)
        try:
            yield connection
        except BaseException:
            with contextlib.suppress(Exception):
                connection.close()
            raise
        self._idle.put(connection)

    def clear(self) -> None:
        while True:
            try:
                connection = self._idle.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(Exception):
                connection.close()


class SqlServerRepository:
    """The :class:`~keyconnector.storage.base.Repository` over pymssql on a thread pool."""

    def __init__(self, target: ServerTarget, connections: _Connections) -> None:
        self._target = target
        self._connections = connections
        self._executor = ThreadPoolExecutor(
            max_workers=target.max_pool_size, thread_name_prefix="keyconnector-sqlserver"
        )

    @property
    def description(self) -> str:
        return self._target.description

    def _call(self, work: Callable[[Any], T]) -> T:
        with self._connections.connection() as connection:
            return work(connection)

    async def _run(self, action: str, work: Callable[[Any, int], T]) -> T:
        loop = asyncio.get_running_loop()

        async def attempt(number: int) -> T:
            return await loop.run_in_executor(self._executor, self._call, lambda c: work(c, number))

        return await with_retries(
            attempt, classify, self._target, action, on_transient=lambda _exc: self._connections.clear()
        )

    async def get_key(self, user_id: UUID) -> str | None:
        guid = str(user_id)

        def work(connection: Any, _number: int) -> str | None:
            cursor = connection.cursor()
            cursor.execute(_SELECT_KEY, (guid,))
            row = cursor.fetchone()
            return None if row is None else row[0]

        return await self._run("reading a user key", work)

    async def _perform(self, action: str, plan: Callable[[int], Plan[T]]) -> T:
        """Run a shared operation (:mod:`..sql.shared`) on one connection of the thread pool."""

        def work(connection: Any, number: int) -> T:
            cursor = connection.cursor()
            return drive_sync(plan(number), lambda step: _step(cursor, step))

        return await self._run(action, work)

    async def create_key(self, user_id: UUID, record: str, now: datetime) -> bool:
        return await self._perform(
            "creating a user key", lambda number: shared.create_key(DIALECT, user_id, record, now, number > 1)
        )

    async def put_key(self, user_id: UUID, record: str, now: datetime) -> bool:
        return await self._perform(
            "storing a user key", lambda _n: shared.put_key(DIALECT, user_id, record, now, self.description)
        )

    async def record_access(self, accesses: Mapping[UUID, datetime]) -> None:
        if not accesses:
            return
        items = sorted((str(user), naive_utc(when)) for user, when in accesses.items())
        for start in range(0, len(items), ACCESS_CHUNK):
            chunk = items[start : start + ACCESS_CHUNK]
            statement = record_access_statement(len(chunk))
            parameters = tuple(value for pair in chunk for value in pair)

            def work(
                connection: Any, _number: int, statement: str = statement, parameters: Any = parameters
            ) -> None:
                connection.cursor().execute(statement, parameters)

            await self._run("recording access times", work)

    async def get_wrapped_data_key(self) -> str | None:
        def work(connection: Any, _number: int) -> str | None:
            cursor = connection.cursor()
            cursor.execute(_SELECT_DATA_KEY)
            row = cursor.fetchone()
            return None if row is None else row[1]

        return await self._run("reading the data key", work)

    async def store_wrapped_data_key(self, wrapped: str) -> str:
        def work(connection: Any, _number: int) -> str:
            cursor = connection.cursor()
            cursor.execute(_STORE_DATA_KEY, (wrapped, wrapped, wrapped))
            row = cursor.fetchone()
            if row is None or row[0] is None:
                raise StorageError(f"{self.description}: storing the data key returned nothing")
            stored: str = row[0]
            return stored

        return await self._run("storing the data key", work)

    async def set_wrapped_data_key(self, wrapped: str) -> None:
        def work(connection: Any, _number: int) -> None:
            connection.cursor().execute(_SET_DATA_KEY, (wrapped, wrapped))

        await self._run("replacing the data key", work)

    # -- operations: transfer, rotation, backup -------------------------------------------------------------

    async def count_records(self) -> int:
        def work(connection: Any, _number: int) -> int:
            cursor = connection.cursor()
            cursor.execute("SELECT COUNT_BIG(*) FROM [UserKeys]")
            return int(cursor.fetchone()[0])

        return await self._run("counting user keys", work)

    @staticmethod
    def _in_transaction(connection: Any, statements: list[tuple[str, tuple[Any, ...]]]) -> int:
        """Run the statements in one transaction; the sum of their row counts.

        On any failure the connection is closed (see ``_Connections``) and the server rolls back.
        """
        cursor = connection.cursor()
        cursor.execute(_BEGIN)
        changed = 0
        for statement, parameters in statements:
            cursor.execute(statement, parameters)
            changed += max(cursor.rowcount, 0)
        cursor.execute(_COMMIT)
        return changed

    async def upsert_records(self, records: Sequence[UserKeyRecord]) -> None:
        if not records:
            return
        # One row per user (MERGE refuses to touch a row twice), in id order against deadlocks.
        unique = sorted({record.user_id: record for record in records}.values(), key=lambda r: r.user_id)
        statements = []
        for start in range(0, len(unique), OPERATION_CHUNK):
            chunk = unique[start : start + OPERATION_CHUNK]
            parameters = tuple(
                value
                for record in chunk
                for value in (
                    str(record.user_id),
                    record.key,
                    naive_utc(record.creation_date),
                    _time(record.revision_date),
                    _time(record.last_access_date),
                )
            )
            statements.append((upsert_statement(len(chunk)), parameters))
        await self._run("copying user keys", lambda c, _n: self._in_transaction(c, statements))

    async def replace_records(self, updates: Sequence[RecordUpdate]) -> int:
        if not updates:
            return 0
        ordered = sorted(updates, key=lambda update: update.user_id)
        statements = []
        for start in range(0, len(ordered), OPERATION_CHUNK):
            chunk = ordered[start : start + OPERATION_CHUNK]
            parameters = tuple(
                value for update in chunk for value in (str(update.user_id), update.expected, update.new)
            )
            statements.append((replace_statement(len(chunk)), parameters))
        return await self._run("re-encrypting user keys", lambda c, _n: self._in_transaction(c, statements))

    async def get_key_ring(self) -> StoredKeyRing | None:
        return await self._perform("reading the key ring", lambda _n: shared.get_key_ring(DIALECT))

    async def put_key_ring(self, document: str, expected_revision: int) -> bool:
        return await self._perform(
            "storing the key ring",
            lambda number: shared.put_key_ring(DIALECT, document, expected_revision, number > 1),
        )

    def iter_records(self, batch_size: int = 1000) -> AsyncIterator[list[UserKeyRecord]]:
        """Keyset pagination on the primary key (in SQL Server's own uniqueidentifier order)."""

        def read_page(after: Any) -> Awaitable[list[Any]]:
            return self._perform("listing user keys", lambda _n: shared.page(DIALECT, after, batch_size))

        return shared.iter_records(
            DIALECT,
            read_page,
            batch_size,
            lambda row: UserKeyRecord(
                UUID(str(row[0])), row[1], naive_utc(row[2]), _time(row[3]), _time(row[4])
            ),
        )

    async def ping(self) -> None:
        loop = asyncio.get_running_loop()

        def probe(connection: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("SELECT 1")
            cursor.fetchall()

        try:
            async with asyncio.timeout(PING_TIMEOUT_SECONDS):
                await loop.run_in_executor(self._executor, self._call, probe)
        except Exception as exc:
            failure = classify(exc)
            if failure is None:
                raise
            if failure is Failure.TRANSIENT:
                self._connections.clear()
                failure = Failure.UNAVAILABLE
            raise translate(exc, failure, self._target, "checking the database") from None

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._connections.clear)
        self._executor.shutdown(wait=False)


def _time(value: datetime | None) -> datetime | None:
    return None if value is None else naive_utc(value)


def _record(row: Any) -> UserKeyRecord:
    return UserKeyRecord(UUID(str(row[0])), row[1], naive_utc(row[2]), _time(row[3]), _time(row[4]))


async def open(settings: DatabaseSettings, prefix: str, trust: Trust | None = None) -> SqlServerRepository:
    """Make the pool and check upstream's tables are there (a server that is down does not stop the
    worker from starting: requests answer 503 until it is back)."""
    target = parse_target(settings, prefix, trust)
    log_pool(target, settings.pool_size)
    _configure_certificate_checks(target)
    repository = SqlServerRepository(target, _Connections(connect_arguments(target)))

    def check(connection: Any, _number: int) -> None:
        cursor = connection.cursor()
        for statement in _CHECK_SCHEMA:
            cursor.execute(statement)
            cursor.fetchall()

    try:
        await repository._run("checking upstream's tables", check)
    except UnavailableError as exc:
        log.warning("%s is not reachable yet; requests answer 503 until it is: %s", target.description, exc)
    except BaseException:
        await repository.aclose()
        raise
    return repository


def _sync_engine(settings: DatabaseSettings, prefix: str) -> Any:
    return migration_engine(parse_target(settings, prefix))


BACKEND = Backend(
    name="sqlserver",
    migrate=migrate,
    open=open,
    inspect=inspect,
    parse_target=parse_target,
    sync_engine=_sync_engine,
    schema=Schema(
        sqlalchemy_dialects=("mssql",),
        upstream_migration_id="20210820154908_InitialCreate",
        transactional_ddl=True,
        migration_lock=migration_lock,
    ),
)

__all__ = [
    "BACKEND",
    "SqlServerRepository",
    "classify",
    "connect_arguments",
    "inspect",
    "migrate",
    "open",
    "parse_target",
    "record_access_statement",
    "replace_statement",
    "split_server",
    "upsert_statement",
]
