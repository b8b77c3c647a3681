"""MySQL and MariaDB backend: upstream's tables through an asyncmy pool.

Why it looks the way it does:

- The request path is asyncmy with its statement cache on, so each query is a server-side prepared
  statement, prepared once per connection: ``get_key`` is one round trip. SQLAlchemy serves migrations
  and ``inspect`` only, synchronously, over PyMySQL.
- Connections run in autocommit mode and every write is one statement that is atomic by itself, so
  concurrent writers need no transactions and no locks, and never hold InnoDB gap locks that could
  deadlock them. "Create unless a key exists" is an ``INSERT`` that either succeeds or hits the primary
  key, then an ``UPDATE ... WHERE Key IS NULL`` that fills a key-less row: exactly one of several
  concurrent creators sees its statement take effect. Row counts are "rows matched" (the FOUND_ROWS
  client flag), so a retried write that already took effect still reads as success.
- The data key is created under a named server lock (``GET_LOCK``), released with the connection if
  the process dies.
- The bulk operations (``upsert_records``, ``replace_records``) are the exception to "one statement":
  a batch is one explicit transaction, sent with ``executemany`` (one bulk round trip on MariaDB), in
  id order so that two batches never deadlock each other. A failure closes the connection, and the
  server rolls the whole batch back.
- GUIDs are written lower-case into ``char(36)`` with upstream's ``ascii_general_ci`` collation (case
  does not matter when reading), times into ``datetime(6)``.

The connection string is the operator's MySqlConnector one (``Server=db;Port=3306;Database=kc;Uid=kc;
Pwd=...``) or a ``mysql://`` / ``mariadb://`` URL. Several servers (``Server=db1,db2``, or
``db1:3306,db2:3307`` in the URL) are a primary and its replicas: everything goes to the one that is
writable, found again after a failover (:class:`WritableServer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from keyconnector._optional import require
from keyconnector.errors import ConfigurationError, StorageError, UnavailableError, setting_name
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
    client_ssl_context,
    load_target,
    log_pool,
    translate,
    with_retries,
)
from keyconnector.storage.sql.hosts import HostOrder
from keyconnector.storage.sql.schema import naive_utc
from keyconnector.storage.sql.shared import Plan, drive

if TYPE_CHECKING:
    from sqlalchemy import Connection

log = logging.getLogger(__name__)

T = TypeVar("T")

DATA_KEY_LOCK = "keyconnector-data-key"
DATA_KEY_LOCK_SECONDS = 30
FOUND_ROWS = 2  # CLIENT_FOUND_ROWS: UPDATE reports rows matched, not rows changed
STATEMENT_CACHE = 16

_SSL_MODES = {
    "none": "disable",
    "disabled": "disable",
    "disable": "disable",
    "preferred": "prefer",
    "prefer": "prefer",
    "required": "require",
    "require": "require",
    "verifyca": "verify-ca",
    "verify-ca": "verify-ca",
    "verify_ca": "verify-ca",
    "verifyfull": "verify-full",
    "verify-full": "verify-full",
    "verify_identity": "verify-full",
}

SPEC = ConnectionStringSpec(
    provider="mysql",
    setting_name="mySqlConnectionString",
    example="Server=db;Port=3306;Database=keyconnector;Uid=keyconnector;Pwd=...",
    default_port=3306,
    synonyms={
        "Server": "host",
        "Host": "host",
        "Data Source": "host",
        "DataSource": "host",
        "Address": "host",
        "Addr": "host",
        "Network Address": "host",
        "Port": "port",
        "Database": "database",
        "Initial Catalog": "database",
        "User Id": "user",
        "UserID": "user",
        "Username": "user",
        "User Name": "user",
        "Uid": "user",
        "User": "user",
        "Password": "password",
        "Pwd": "password",
        "SSL Mode": "ssl mode",
        "SslMode": "ssl mode",
        "Ssl-Mode": "ssl mode",
        "SSL CA": "ssl root cert",
        "SslCa": "ssl root cert",
        "Ssl-Ca": "ssl root cert",
        "CA Certificate File": "ssl root cert",
        "CACertificateFile": "ssl root cert",
        "SSL Cert": "ssl cert",
        "SslCert": "ssl cert",
        "Ssl-Cert": "ssl cert",
        "SSL Key": "ssl key",
        "SslKey": "ssl key",
        "Ssl-Key": "ssl key",
        "Connect Timeout": "connect timeout",
        "Connection Timeout": "connect timeout",
        "ConnectionTimeout": "connect timeout",
        "ConnectTimeout": "connect timeout",
        "Default Command Timeout": "command timeout",
        "DefaultCommandTimeout": "command timeout",
        "Command Timeout": "command timeout",
        "CommandTimeout": "command timeout",
        "Minimum Pool Size": "min pool size",
        "MinimumPoolSize": "min pool size",
        "Min Pool Size": "min pool size",
        "MinPoolSize": "min pool size",
        "Maximum Pool Size": "max pool size",
        "MaximumPoolSize": "max pool size",
        "Max Pool Size": "max pool size",
        "MaxPoolSize": "max pool size",
        "Connection Idle Timeout": "idle lifetime",
        "ConnectionIdleTimeout": "idle lifetime",
        "Application Name": "application name",
        "ApplicationName": "application name",
        "GUID Format": "guid format",
        "GuidFormat": "guid format",
        "Old Guids": "old guids",
        "OldGuids": "old guids",
        "Load Balance": "load balance",
        "LoadBalance": "load balance",
    },
    ignored=(
        "Pooling",
        "Connection Reset",
        "ConnectionReset",
        "Connection Lifetime",
        "ConnectionLifetime",
        "Allow User Variables",
        "AllowUserVariables",
        "Allow Public Key Retrieval",
        "AllowPublicKeyRetrieval",
        "Character Set",
        "CharSet",
        "Convert Zero Datetime",
        "ConvertZeroDateTime",
        "Allow Zero Datetime",
        "AllowZeroDateTime",
        "Treat Tiny As Boolean",
        "TreatTinyAsBoolean",
        "Persist Security Info",
        "PersistSecurityInfo",
        "Keepalive",
        "Keep Alive",
        "Use Compression",
        "UseCompression",
        "Compress",
        "Use Affected Rows",
        "UseAffectedRows",
        "Ignore Command Transaction",
        "IgnoreCommandTransaction",
        "Interactive Session",
        "Interactive",
        "No Backslash Escapes",
        "NoBackslashEscapes",
        "Cancellation Timeout",
        "CancellationTimeout",
        "Auto Enlist",
        "AutoEnlist",
        "DNS Check Interval",
        "DnsCheckInterval",
        "Server Redirection Mode",
        "ServerRedirectionMode",
        "TLS Version",
        "TlsVersion",
        "Tls Cipher Suites",
        "TlsCipherSuites",
        "Server RSA Public Key File",
        "ServerRSAPublicKeyFile",
        "Defer Connection Reset",
        "DeferConnectionReset",
        "Connection Idle Ping Time",
    ),
    unsupported={
        "Protocol": "is not supported: keyconnector connects over TCP; remove it",
        "Connection Protocol": "is not supported: keyconnector connects over TCP; remove it",
        "Pipe": "is not supported: keyconnector connects over TCP; remove it",
        "Pipe Name": "is not supported: keyconnector connects over TCP; remove it",
        "Certificate File": "(a PKCS#12 client certificate) is not supported; give PEM files in SslCert and SslKey",  # noqa: E501
        "CertificateFile": "(a PKCS#12 client certificate) is not supported; give PEM files in SslCert and SslKey",  # noqa: E501
        "Certificate Password": "is not supported; give an unencrypted PEM key in SslKey",
        "CertificatePassword": "is not supported; give an unencrypted PEM key in SslKey",
    },
    url_schemes=("mysql", "mariadb", "mysql+pymysql", "mysql+asyncmy", "mysql+aiomysql", "mariadb+pymysql"),
    url_query={
        "ssl_mode": "ssl mode",
        "sslmode": "ssl mode",
        "ssl_ca": "ssl root cert",
        "ssl_cert": "ssl cert",
        "ssl_key": "ssl key",
        "connect_timeout": "connect timeout",
        "command_timeout": "command timeout",
        "charset": "character set",
        "load_balance": "load balance",
    },
    ssl_modes=_SSL_MODES,
    default_ssl_mode="prefer",
    default_connect_timeout=15.0,
    default_command_timeout=30.0,
    default_idle_lifetime=180.0,
    verified_tls=("SslMode=VerifyFull", "ssl_mode=VERIFY_IDENTITY"),
)

_LOAD_BALANCE = {
    "failover": "failover",
    "inorder": "failover",
    "roundrobin": "failover",
    "leastconnections": "failover",
    "fewestconnections": "failover",
    "random": "random",
}
"""MySqlConnector's ``Load Balance`` values (and their older names), as keyconnector reads them.

keyconnector sends all of a process's connections to one writable server at a time (see
:class:`WritableServer`), so the value only says in which order the servers are tried when one must be
found: ``FailOver`` (``InOrder``) in the listed order, ``Random`` shuffled. ``RoundRobin`` (upstream's
default) and ``LeastConnections`` would spread connections over several writable servers (a Galera
cluster), where the data key's ``GET_LOCK`` would be held on one node only: they are read as
``FailOver``."""

_SELECT_WRITABLE = "SELECT @@global.read_only, @@global.innodb_read_only"
SEARCH_PAUSE_SECONDS = 0.2
"""After a search that found no writable server (a promotion not done yet), wait this long before the
next one may start: failing requests then cost one probe per server five times a second at most."""

_SELECT_KEY = "SELECT `Key` FROM `UserKeys` WHERE `Id` = %s"
_INSERT = (
    "INSERT INTO `UserKeys` (`Id`, `Key`, `CreationDate`, `RevisionDate`, `LastAccessDate`) "
    "VALUES (%s, %s, %s, NULL, NULL)"
)
_FILL = (
    "UPDATE `UserKeys` SET `Key` = %s, `CreationDate` = %s, `RevisionDate` = NULL "
    "WHERE `Id` = %s AND `Key` IS NULL"
)
_REPLACE = "UPDATE `UserKeys` SET `Key` = %s, `RevisionDate` = %s WHERE `Id` = %s AND `Key` IS NOT NULL"
_SELECT_DATA_KEY = "SELECT `Id`, `SymmetricKey` FROM `ApplicationDatas` ORDER BY `Id` LIMIT 1"
# executemany turns these into one COM_STMT_BULK_EXECUTE round trip on MariaDB, and into multi-row
# statements (the INSERT) on MySQL. VALUES() rather than MySQL 8's row alias: MariaDB knows only VALUES().
_UPSERT = (
    "INSERT INTO `UserKeys` (`Id`, `Key`, `CreationDate`, `RevisionDate`, `LastAccessDate`) "
    "VALUES (%s, %s, %s, %s, %s) "
    "ON DUPLICATE KEY UPDATE `Key` = VALUES(`Key`), `CreationDate` = VALUES(`CreationDate`), "
    "`RevisionDate` = VALUES(`RevisionDate`), `LastAccessDate` = VALUES(`LastAccessDate`)"
)
# The column's collation ignores case: compare bytes, or a key differing only in case would match. A row
# already holding the new value counts (rows matched, FOUND_ROWS): a retried batch's earlier try committed.
_REPLACE_IF = (
    "UPDATE `UserKeys` SET `Key` = %s WHERE `Id` = %s "
    "AND (CAST(`Key` AS BINARY) = CAST(%s AS BINARY) OR CAST(`Key` AS BINARY) = CAST(%s AS BINARY))"
)
_SELECT_RING = "SELECT `revision`, `document` FROM `keyconnector_key_ring` WHERE `id` = 1"
_INSERT_RING = "INSERT INTO `keyconnector_key_ring` (`id`, `revision`, `document`) VALUES (1, 1, %s)"
_UPDATE_RING = (
    "UPDATE `keyconnector_key_ring` SET `document` = %s, `revision` = `revision` + 1 "
    "WHERE `id` = 1 AND `revision` = %s"
)
_COLUMNS = "`Id`, `Key`, `CreationDate`, `RevisionDate`, `LastAccessDate`"
_FIRST_BATCH = f"SELECT {_COLUMNS} FROM `UserKeys` ORDER BY `Id` LIMIT %s"  # noqa: S608
_NEXT_BATCH = f"SELECT {_COLUMNS} FROM `UserKeys` WHERE `Id` > %s ORDER BY `Id` LIMIT %s"  # noqa: S608
_CHECK_SCHEMA = (
    f"SELECT {_COLUMNS} FROM `UserKeys` LIMIT 0",  # noqa: S608
    "SELECT `Id`, `SymmetricKey` FROM `ApplicationDatas` LIMIT 0",
)
ACCESS_CHUNK = 500

# Server error numbers (MySQL and MariaDB agree on these) and client ones (2xxx).
_TRANSIENT = {
    1040,  # too many connections
    1053,  # server shutdown in progress
    1205,  # lock wait timeout
    1213,  # deadlock
    1290,  # --read-only (a failover in progress)
    1792,  # read-only transaction
    1927,  # connection killed
    2002,  # cannot connect (socket)
    2003,  # cannot connect (TCP)
    2006,  # server has gone away
    2013,  # lost connection during query
    2055,  # lost connection
    4031,  # disconnected by the server (idle timeout)
}
_SERVER_BUSY = {1040, 1205, 1213}
"""Transient errors that a working, writable server answers: they never start a search for another."""
_CONFIGURATION = {1044, 1045, 1049, 1142, 1227, 1251, 2026, 2059, 2061}  # 2026: TLS required, not offered
_DUPLICATE_KEY = 1062
_TLS_NOT_OFFERED = 2026


def parse_target(settings: DatabaseSettings, prefix: str, trust: Trust | None = None) -> ServerTarget:
    raw = settings.mysql_connection_string
    target = load_target(
        raw.get_secret_value() if raw is not None else None,
        f"{prefix}.{SPEC.setting_name}",
        SPEC,
        settings.pool_size,
        trust,
    )
    balance = target.extra.get("load balance")
    if balance is not None and _balance_word(balance) not in _LOAD_BALANCE:
        raise ConfigurationError(
            target.setting,
            "Load Balance must be one of: FailOver, InOrder, Random, RoundRobin, LeastConnections "
            "(load_balance in the URL form)",
        )
    guid_format = target.extra.get("guid format", "").strip().lower()
    if guid_format not in ("", "default", "char36"):
        raise ConfigurationError(
            target.setting,
            "GuidFormat must be Char36 (or Default): upstream stores user ids as char(36) text",
        )
    if target.extra.get("old guids", "").strip().lower() in ("true", "yes", "1"):
        raise ConfigurationError(
            target.setting, "OldGuids=true (binary GUIDs) is not upstream's format; remove it"
        )
    return target


def _balance_word(value: str) -> str:
    return "".join(char for char in value.lower() if char.isalnum())


def load_balance(target: ServerTarget) -> str:
    """``failover`` (the listed order) or ``random``: how servers are tried, see :data:`_LOAD_BALANCE`."""
    balance = target.extra.get("load balance")
    return _LOAD_BALANCE[_balance_word(balance)] if balance else "failover"


_NO_SUCH_TABLE = 1146

DIALECT = shared.Dialect(
    guid=lambda user_id: _guid(user_id),
    select_key=_SELECT_KEY,
    writes=shared.InsertThenFill(insert=_INSERT, fill=_FILL, replace=_REPLACE),
    select_ring=_SELECT_RING,
    insert_ring=_INSERT_RING,
    update_ring=_UPDATE_RING,
    first_page=lambda size: (_FIRST_BATCH, (size,)),
    next_page=lambda after, size: (_NEXT_BATCH, (after, size)),
    page_key=lambda row: row[0],
    is_duplicate=lambda exc: _error_number(exc) == _DUPLICATE_KEY,
    is_missing_table=lambda exc: _error_number(exc) == _NO_SUCH_TABLE,
)
"""MySQL's statements for :mod:`..sql.shared`: autocommit, one atomic statement at a time, row counts
as rows matched (FOUND_ROWS), so a retried write that already took effect still reads as success."""


def _error_number(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], int):
        return args[0]
    return None


def classify(exc: BaseException) -> Failure | None:
    """What a driver error (asyncmy or PyMySQL) means: retry, give up for now, or fix the settings."""
    if isinstance(exc, TimeoutError):
        return Failure.UNAVAILABLE
    if isinstance(exc, (OSError, ConnectionError, EOFError, asyncio.IncompleteReadError)):
        return Failure.TRANSIENT
    module = type(exc).__module__
    if not (module.startswith("asyncmy") or module.startswith("pymysql")):
        return None
    number = _error_number(exc)
    if number in _TRANSIENT:
        return Failure.TRANSIENT
    if number in _CONFIGURATION:
        return Failure.CONFIGURATION
    name = type(exc).__name__
    if name == "InterfaceError" or (name == "OperationalError" and (number is None or number < 1000)):
        # "Already closed", a broken pipe, a half-read packet: the connection is gone.
        return Failure.TRANSIENT
    return Failure.FATAL


def _ssl_argument(target: ServerTarget) -> Any:
    try:
        return client_ssl_context(target)
    except (OSError, ValueError) as exc:
        raise translate(exc, Failure.CONFIGURATION, target, "loading TLS certificates") from None


# -- migrations (PyMySQL, through SQLAlchemy) --------------------------------------------------------------


def _pymysql_arguments(target: ServerTarget) -> dict[str, Any]:
    """PyMySQL's connection arguments for the writable server, TLS decided (see :func:`_offers_tls`).

    With several servers, each is asked in turn (the order ``Load Balance`` says) whether it is
    writable: migrations write, and a replica's ``read_only`` does not stop a user that has ``SUPER``
    or ``READ ONLY ADMIN``. When none is (a failover in progress), the first one's arguments: the
    migration then fails as the database being unavailable, and is tried again."""
    if len(target.hosts) == 1:
        return _pymysql_arguments_for(target, target.hosts[0])
    hosts = HostOrder(target.hosts, shuffle=load_balance(target) == "random").order()
    for host in hosts:
        arguments = _pymysql_arguments_for(target, host)
        if _writable_now(arguments):
            return arguments
    log.warning("%s: no server is writable right now (a failover in progress?)", target.description)
    return _pymysql_arguments_for(target, hosts[0])


def _writable_now(arguments: dict[str, Any]) -> bool:
    """Whether the server ``arguments`` name answers and is neither ``read_only`` nor ``innodb_read_only``."""
    import pymysql

    try:
        connection = pymysql.connect(**arguments)
    except (pymysql.err.MySQLError, OSError):
        return False
    try:
        with connection.cursor() as cursor:
            cursor.execute(_SELECT_WRITABLE)
            row = cursor.fetchone()
    except (pymysql.err.MySQLError, OSError):
        return False
    finally:
        with contextlib.suppress(Exception):
            connection.close()
    return row is not None and not any(row)


def _pymysql_arguments_for(target: ServerTarget, host: tuple[str, int]) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "host": host[0],
        "port": host[1],
        "database": target.database,
        "user": target.user or "",
        "password": target.password or "",
        "charset": "utf8mb4",
        "connect_timeout": max(2, int(target.connect_timeout)),
        "read_timeout": max(30, int(target.command_timeout)),
        "write_timeout": max(30, int(target.command_timeout)),
    }
    ssl_context = _ssl_argument(target)
    if ssl_context is not None:
        arguments["ssl"] = ssl_context
        if target.ssl_mode == "prefer" and not _offers_tls(arguments, target.setting):
            del arguments["ssl"]
    return arguments


def _offers_tls(arguments: dict[str, Any], setting: str) -> bool:
    """For SslMode=Preferred: does the server take TLS?

    Given a TLS context, PyMySQL demands TLS and asyncmy starts it blindly; without one, neither tries.
    So "preferred" is a probe with PyMySQL (which reads the server's capabilities and says "not
    offered" precisely), then the answer. When the probe cannot tell (the server is down), the answer
    is "no TLS", which is what "preferred" promises at worst: a worker that guessed TLS against a
    server without it would fail every connection once the server is back. Use SslMode=Required to
    insist on TLS.
    """
    require("pymysql", extra="mysql", setting="database.mySqlConnectionString", provider="mysql")
    import pymysql

    try:
        pymysql.connect(**arguments).close()
    except pymysql.err.MySQLError as exc:
        number = _error_number(exc)
        if number != _TLS_NOT_OFFERED and number not in _CONFIGURATION:
            log.warning(
                "could not tell whether the MySQL server offers TLS (it is not reachable): this connection "
                "attempt goes without TLS, as SslMode=Preferred allows; to insist on TLS, put "
                "SslMode=Required in %s",
                setting_name(setting),
            )
        return False
    except OSError:
        return False
    return True


def migration_engine(target: ServerTarget) -> Any:
    require("pymysql", extra="mysql", setting=target.setting, provider="mysql")
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    return create_engine("mysql+pymysql://", connect_args=_pymysql_arguments(target), poolclass=NullPool)


@contextlib.contextmanager
def migration_lock(connection: Connection) -> Iterator[None]:
    """A named server lock, released explicitly: DDL commits implicitly on MySQL, so the migration's
    transaction cannot be the lock. A crashed process's lock goes with its connection."""
    from sqlalchemy import text

    from keyconnector.storage.sql.migrate import LOCK_NAME, LOCK_TIMEOUT_SECONDS

    got = connection.execute(
        text("SELECT GET_LOCK(:name, :timeout)"), {"name": LOCK_NAME, "timeout": LOCK_TIMEOUT_SECONDS}
    ).scalar()
    if got != 1:
        raise UnavailableError(
            "database", f"another process held the schema migration lock for over {LOCK_TIMEOUT_SECONDS}s"
        )
    try:
        yield
    finally:
        connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": LOCK_NAME})


SCHEMA = ServerSchema(parse_target, migration_engine, classify)
migrate = SCHEMA.migrate
inspect = SCHEMA.inspect


# -- the repository ------------------------------------------------------------------------------------------


def _guid(user_id: UUID) -> str:
    """Lower-case text, as upstream's MySQL provider writes it."""
    return str(user_id)


class NoWritableServer(ConnectionError):
    """No listed server answered as writable at the last search: transient (a failover in progress),
    so requests retry, then answer 503 with ``Retry-After``, and each failure starts a new search."""


class WritableServer:
    """Which of several servers (``Server=db1,db2``) the pool connects to: one writable server at a time.

    MySqlConnector connects to whichever listed server answers; a replica answers too, and its
    ``read_only`` does not stop a user with ``SUPER`` or ``READ ONLY ADMIN``, so writes could land
    on it and split the data. Here a server is used only once it answered ``@@read_only`` and
    ``@@innodb_read_only`` with 0, and all of a process's connections go to that one server: the data
    key's ``GET_LOCK`` is per server, and a read right after a write must see it.

    The choice is sticky: it is searched again only when the server in use failed (a lost
    connection, a refused connect, "read-only" from the server, a timeout, none writable last time);
    a deadlock, a lock wait timeout or "too many connections" never moves the service. The servers
    are then tried in the order :class:`~keyconnector.storage.sql.hosts.HostOrder` gives (shared
    with PostgreSQL): the listed one, or shuffled with ``Load Balance=Random``, a server that failed
    (the one in use among them) last for a while. One search runs at a time, in the background;
    requests meanwhile retry and then answer 503 with ``Retry-After``.

    The pool is asyncmy's, which connects with the arguments it was created with: the choice is
    made by changing its host and port there (``Pool._conn_kwargs``), and connections made to the
    previous server are closed as they come back (:meth:`retired`).
    """

    def __init__(self, asyncmy_module: Any, target: ServerTarget, arguments: Mapping[str, Any]) -> None:
        self._asyncmy = asyncmy_module
        self._target = target
        self._arguments = dict(arguments)
        self._order = HostOrder(target.hosts, shuffle=load_balance(target) == "random")
        self.current: tuple[str, int] | None = target.hosts[0]
        """The writable server, or None when the last search found none (requests then answer 503:
        serving reads from a server that may be a lagging replica is what this class prevents)."""
        self._connected_to = target.hosts[0]
        """The server the pool's connect arguments name."""
        self._pool: Any = None
        self._retired: set[Any] = set()
        self._search: asyncio.Future[None] | None = None

    def attach(self, pool: Any) -> None:
        self._pool = pool
        pool._conn_kwargs.update(host=self._connected_to[0], port=self._connected_to[1])

    async def find(self) -> tuple[str, int] | None:
        """The first server, in :class:`HostOrder`'s order, that answers and is writable; None if none is."""
        for host in self._order.order():
            try:
                if await self._writable(host):
                    self._order.succeeded(host)
                    return host
            except Exception as exc:
                log.debug("%s:%s: %s", host[0], host[1], self._target.scrub(str(exc)))
            self._order.failed(host)
        return None

    async def _writable(self, host: tuple[str, int]) -> bool:
        async with asyncio.timeout(self._target.connect_timeout + self._target.command_timeout or None):
            connection = await self._asyncmy.connect(**{**self._arguments, "host": host[0], "port": host[1]})
            try:
                async with connection.cursor() as cursor:
                    await cursor.execute(_SELECT_WRITABLE)
                    row = await cursor.fetchone()
            finally:
                connection.close()
        return row is not None and not any(row)

    def use(self, host: tuple[str, int], *, moved: bool = True) -> None:
        """Send new connections to ``host``; ``moved`` is False at start-up (nothing to warn about)."""
        self.current = host
        if host == self._connected_to:
            return
        if moved:
            log.warning(
                "%s: %s:%s is the writable server now; new connections go there",
                self._target.description,
                host[0],
                host[1],
            )
        self._connected_to = host
        if self._pool is not None:
            self._pool._conn_kwargs.update(host=host[0], port=host[1])
            self._retired.update(self._pool._used)
            for connection in list(self._pool._free):
                connection.close()

    def retired(self, connection: Any) -> bool:
        """Whether ``connection`` goes to a server that is no longer the one in use (then forgotten)."""
        if self._retired and connection in self._retired:
            self._retired.discard(connection)
            return True
        return False

    def forget(self, connection: Any) -> None:
        self._retired.discard(connection)

    def search(self) -> None:
        """The server in use failed: look for the writable one in the background (one search at a time).

        The failed server is asked last: when it went silent, asking it first would spend a whole
        connect timeout before the promoted replica is even tried. When it failed only for a moment
        and the others are read-only, it is found again."""
        if self._search is None or self._search.done():
            if self.current is not None:
                self._order.failed(self.current)
            self._search = asyncio.ensure_future(self._search_once())

    async def _search_once(self) -> None:
        try:
            found = await self.find()
        except Exception as exc:  # never let a background task die with an unretrieved error
            log.debug("looking for the writable server: %s", self._target.scrub(str(exc)))
            found = None
        if found is not None:
            self.use(found)
        else:
            self.current = None
            await asyncio.sleep(SEARCH_PAUSE_SECONDS)

    async def aclose(self) -> None:
        if self._search is not None and not self._search.done():
            self._search.cancel()
            with contextlib.suppress(BaseException):
                await self._search


class MySqlRepository:
    """The :class:`~keyconnector.storage.base.Repository` over an asyncmy pool."""

    def __init__(self, target: ServerTarget, pool: Any, servers: WritableServer | None = None) -> None:
        self._target = target
        self._pool = pool
        self._servers = servers
        """With several servers: which one is writable (None with one server: it is used as given)."""
        # Bounds every operation, pool wait included: asyncmy has no per-query timeout of its own
        # that does not slow every read down.
        self._deadline = target.connect_timeout + target.command_timeout

    @property
    def description(self) -> str:
        return self._target.description

    async def _with_connection(self, work: Callable[[Any], Awaitable[T]]) -> T:
        pool = self._pool
        servers = self._servers
        async with asyncio.timeout(self._deadline):
            if servers is not None and servers.current is None:
                raise NoWritableServer("none of the listed servers is writable (a failover in progress?)")
            connection = await pool.acquire()
            while servers is not None and servers.retired(connection):
                # Made before a failover, to the server that was writable then: never use it again.
                connection.close()
                pool.release(connection)
                connection = await pool.acquire()
            try:
                return await work(connection)
            except BaseException:
                # Its state is unknown (half a result read, a lock held, a cancelled query): never hand
                # it back to the pool.
                connection.close()
                if servers is not None:
                    servers.forget(connection)
                raise
            finally:
                pool.release(connection)

    def _every_attempt(self, work: Callable[[Any], Awaitable[T]]) -> Callable[[int], Awaitable[T]]:
        """``work`` on a pooled connection, the same on every try."""
        return lambda _attempt: self._with_connection(work)

    def _stale(self, exc: BaseException) -> None:
        # A restarted server has closed every idle connection; asyncmy notices a broken one only when
        # it is taken. Dropping them all now spares each a failed request.
        for connection in list(self._pool._free):
            connection.close()
        if self._servers is not None and _error_number(exc) not in _SERVER_BUSY:
            # Lost, refused or "read-only": maybe a failover. Find out which server is writable now.
            # (A deadlock or a full server is an answer from a working primary: no reason to move.)
            self._servers.search()

    async def _run(self, action: str, operation: Callable[[int], Awaitable[T]]) -> T:
        try:
            return await with_retries(operation, classify, self._target, action, on_transient=self._stale)
        except UnavailableError:
            # A timeout too: the server may have gone silent.
            if self._servers is not None:
                self._servers.search()
            raise

    # -- the request path -------------------------------------------------------------------------------

    async def get_key(self, user_id: UUID) -> str | None:
        guid = _guid(user_id)

        async def read(connection: Any) -> str | None:
            async with connection.cursor() as cursor:
                await cursor.execute(_SELECT_KEY, (guid,))
                row = await cursor.fetchone()
            return None if row is None else row[0]

        return await self._run("reading a user key", lambda _attempt: self._with_connection(read))

    # -- writes -------------------------------------------------------------------------------------------

    async def _perform(self, action: str, plan: Callable[[int], Plan[T]]) -> T:
        """Run a shared operation (:mod:`..sql.shared`) on one pooled connection, with the retries."""

        async def work(connection: Any, number: int) -> T:
            async with connection.cursor() as cursor:
                return await drive(plan(number), lambda step: _step(cursor, step))

        return await self._run(action, lambda number: self._with_connection(lambda c: work(c, number)))

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
        items = sorted((_guid(user), naive_utc(when)) for user, when in accesses.items())
        for start in range(0, len(items), ACCESS_CHUNK):
            chunk = items[start : start + ACCESS_CHUNK]
            # One statement per chunk; rows are locked in id order, so overlapping batches from two
            # workers cannot deadlock. The WHERE clause never moves a time backwards.
            values = " UNION ALL ".join(["SELECT %s AS id, CAST(%s AS DATETIME(6)) AS t"] * len(chunk))
            statement = (
                f"UPDATE `UserKeys` AS u JOIN ({values}) AS v ON u.`Id` = v.id "  # noqa: S608
                "SET u.`LastAccessDate` = v.t WHERE u.`LastAccessDate` IS NULL OR u.`LastAccessDate` < v.t"
            )
            parameters = tuple(value for pair in chunk for value in pair)

            async def work(
                connection: Any, statement: str = statement, parameters: tuple[Any, ...] = parameters
            ) -> None:
                async with connection.cursor() as cursor:
                    await cursor.execute(statement, parameters)

            await self._run("recording access times", self._every_attempt(work))

    async def get_wrapped_data_key(self) -> str | None:
        async def read(connection: Any) -> str | None:
            async with connection.cursor() as cursor:
                await cursor.execute(_SELECT_DATA_KEY)
                row = await cursor.fetchone()
            return None if row is None else row[1]

        return await self._run("reading the data key", lambda _n: self._with_connection(read))

    @contextlib.asynccontextmanager
    async def _data_key_lock(self, cursor: Any) -> AsyncIterator[None]:
        """Hold the named server lock that serializes every change of ``ApplicationDatas``."""
        await cursor.execute("SELECT GET_LOCK(%s, %s)", (DATA_KEY_LOCK, DATA_KEY_LOCK_SECONDS))
        got = await cursor.fetchone()
        if got is None or got[0] != 1:
            raise UnavailableError(
                "database", f"another process held the data key lock for over {DATA_KEY_LOCK_SECONDS}s"
            )
        try:
            yield
        finally:
            await cursor.execute("SELECT RELEASE_LOCK(%s)", (DATA_KEY_LOCK,))
            await cursor.fetchall()

    async def _write_data_key(self, cursor: Any, row: Any, wrapped: str) -> None:
        if row is not None:
            await cursor.execute(
                "UPDATE `ApplicationDatas` SET `SymmetricKey` = %s WHERE `Id` = %s", (wrapped, row[0])
            )
        else:
            await cursor.execute("INSERT INTO `ApplicationDatas` (`SymmetricKey`) VALUES (%s)", (wrapped,))

    async def store_wrapped_data_key(self, wrapped: str) -> str:
        async def work(connection: Any) -> str:
            async with connection.cursor() as cursor, self._data_key_lock(cursor):
                await cursor.execute(_SELECT_DATA_KEY)
                row = await cursor.fetchone()
                if row is not None and row[1] is not None:
                    stored: str = row[1]
                    return stored
                await self._write_data_key(cursor, row, wrapped)
                return wrapped

        return await self._run("storing the data key", lambda _n: self._with_connection(work))

    async def set_wrapped_data_key(self, wrapped: str) -> None:
        async def work(connection: Any) -> None:
            async with connection.cursor() as cursor, self._data_key_lock(cursor):
                await cursor.execute(_SELECT_DATA_KEY)
                await self._write_data_key(cursor, await cursor.fetchone(), wrapped)

        await self._run("replacing the data key", lambda _n: self._with_connection(work))

    # -- operations: transfer, rotation, backup -------------------------------------------------------------

    async def _transaction(self, connection: Any, work: Callable[[Any], Awaitable[T]]) -> T:
        """``work`` in one explicit transaction on this autocommit connection.

        A failure closes the connection (see ``_with_connection``), and the server rolls back with it.
        """
        await connection.begin()
        async with connection.cursor() as cursor:
            result = await work(cursor)
        await connection.commit()
        return result

    async def count_records(self) -> int:
        async def read(connection: Any) -> int:
            async with connection.cursor() as cursor:
                await cursor.execute("SELECT COUNT(*) FROM `UserKeys`")
                row = await cursor.fetchone()
            return int(row[0])

        return await self._run("counting user keys", self._every_attempt(read))

    async def upsert_records(self, records: Sequence[UserKeyRecord]) -> None:
        if not records:
            return
        # Sorted by id: concurrent batches lock rows in one order and cannot deadlock each other.
        rows = sorted(
            (
                _guid(record.user_id),
                record.key,
                naive_utc(record.creation_date),
                _naive(record.revision_date),
                _naive(record.last_access_date),
            )
            for record in {record.user_id: record for record in records}.values()
        )

        async def work(cursor: Any) -> None:
            await cursor.executemany(_UPSERT, rows)

        await self._run("copying user keys", self._every_attempt(lambda c: self._transaction(c, work)))

    async def replace_records(self, updates: Sequence[RecordUpdate]) -> int:
        if not updates:
            return 0
        rows = sorted(
            ((update.new, _guid(update.user_id), update.expected, update.new) for update in updates),
            key=lambda row: row[1],
        )

        async def work(cursor: Any) -> int:
            return int(await cursor.executemany(_REPLACE_IF, rows) or 0)

        return await self._run(
            "re-encrypting user keys", self._every_attempt(lambda c: self._transaction(c, work))
        )

    async def get_key_ring(self) -> StoredKeyRing | None:
        return await self._perform("reading the key ring", lambda _n: shared.get_key_ring(DIALECT))

    async def put_key_ring(self, document: str, expected_revision: int) -> bool:
        return await self._perform(
            "storing the key ring",
            lambda number: shared.put_key_ring(DIALECT, document, expected_revision, number > 1),
        )

    # -- bulk and health ------------------------------------------------------------------------------------

    def iter_records(self, batch_size: int = 1000) -> AsyncIterator[list[UserKeyRecord]]:
        """Keyset pagination on the primary key: short queries, no snapshot held between batches."""

        def read_page(after: Any) -> Awaitable[list[Any]]:
            return self._perform("listing user keys", lambda _n: shared.page(DIALECT, after, batch_size))

        return shared.iter_records(DIALECT, read_page, batch_size, self._record)

    def _record(self, row: Any) -> UserKeyRecord:
        guid, key, created, revised, accessed = row
        try:
            return UserKeyRecord(UUID(str(guid)), key, created, revised, accessed)
        except ValueError:
            raise StorageError(f"{self.description}: the UserKeys row '{guid}' is not a GUID") from None

    async def ping(self) -> None:
        async def probe(connection: Any) -> None:
            async with connection.cursor() as cursor:
                await cursor.execute("SELECT 1")
                await cursor.fetchall()

        try:
            async with asyncio.timeout(PING_TIMEOUT_SECONDS):
                await self._with_connection(probe)
        except Exception as exc:
            failure = classify(exc)
            if failure is None:
                raise
            if failure is Failure.TRANSIENT:
                self._stale(exc)
                failure = Failure.UNAVAILABLE
            raise translate(exc, failure, self._target, "checking the database") from None

    async def aclose(self) -> None:
        if self._servers is not None:
            await self._servers.aclose()
        self._pool.close()
        try:
            async with asyncio.timeout(5):
                await self._pool.wait_closed()
        except (Exception, TimeoutError) as exc:
            log.debug("closing the pool: %s", self._target.scrub(str(exc)))


def _naive(value: datetime | None) -> datetime | None:
    return None if value is None else naive_utc(value)


async def _step(cursor: Any, step: shared.Step) -> Any:
    """One statement of a shared operation on an asyncmy cursor (prepared once per connection)."""
    result = await cursor.execute(step.sql, step.parameters or None)
    if isinstance(step, shared.Execute):
        return result
    if isinstance(step, shared.FetchOne):
        return await cursor.fetchone()
    return list(await cursor.fetchall())


async def open(settings: DatabaseSettings, prefix: str, trust: Trust | None = None) -> MySqlRepository:
    """Make the pool and check upstream's tables are there (a server that is down does not stop the
    worker from starting: requests answer 503 until it is back)."""
    asyncmy = require("asyncmy", extra="mysql", setting=f"{prefix}.{SPEC.setting_name}", provider="mysql")
    target = parse_target(settings, prefix, trust)
    log_pool(target, settings.pool_size)
    arguments: dict[str, Any] = {
        "host": target.host,
        "port": target.port,
        "user": target.user or "",
        "password": target.password or "",
        "database": target.database,
        "charset": "utf8mb4",
        "autocommit": True,
        "connect_timeout": target.connect_timeout,
        "client_flag": FOUND_ROWS,
        "stmt_cache_size": STATEMENT_CACHE,
        "program_name": target.application_name,
    }
    ssl_context = _ssl_argument(target)
    if ssl_context is not None and (
        target.ssl_mode != "prefer" or "ssl" in await asyncio.to_thread(_pymysql_arguments, target)
    ):
        arguments["ssl"] = ssl_context
    servers = None
    if len(target.hosts) > 1:
        servers = WritableServer(asyncmy, target, arguments)
        found = await servers.find()
        if found is not None:
            servers.use(found, moved=False)
            log.info("%s: %s:%s is the writable server", target.description, found[0], found[1])
        else:
            servers.current = None
            log.warning(
                "%s: no server is writable right now; requests answer 503 until one is", target.description
            )
    pool = await asyncmy.create_pool(
        minsize=0, maxsize=target.max_pool_size, pool_recycle=int(target.idle_lifetime) or -1, **arguments
    )
    if servers is not None:
        servers.attach(pool)
    repository = MySqlRepository(target, pool, servers)
    try:
        await repository._run("checking upstream's tables", lambda _n: repository._with_connection(_check))
    except UnavailableError as exc:
        log.warning("%s is not reachable yet; requests answer 503 until it is: %s", target.description, exc)
    except BaseException:
        await repository.aclose()
        raise
    if target.ssl_mode not in ("disable", "allow", "prefer"):
        with contextlib.suppress(UnavailableError):
            await repository._run(
                "checking TLS", lambda _n: repository._with_connection(_require_tls(target))
            )
    return repository


async def _check(connection: Any) -> None:
    async with connection.cursor() as cursor:
        for statement in _CHECK_SCHEMA:
            await cursor.execute(statement)
            await cursor.fetchall()


def _require_tls(target: ServerTarget) -> Callable[[Any], Awaitable[None]]:
    async def check(connection: Any) -> None:
        # The MySQL protocol falls back to plain text when a server offers no TLS; refuse that when the
        # connection string says TLS is required.
        async with connection.cursor() as cursor:
            await cursor.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
            row = await cursor.fetchone()
        if row is None or not row[1]:
            raise ConfigurationError(
                target.setting, f"asks for TLS (SslMode), but {target.description} does not offer it"
            )

    return check


def _sync_engine(settings: DatabaseSettings, prefix: str) -> Any:
    return migration_engine(parse_target(settings, prefix))


BACKEND = Backend(
    name="mysql",
    migrate=migrate,
    open=open,
    inspect=inspect,
    parse_target=parse_target,
    sync_engine=_sync_engine,
    schema=Schema(
        sqlalchemy_dialects=("mysql", "mariadb"),
        upstream_migration_id="20210820155954_InitialCreate",
        transactional_ddl=False,
        migration_lock=migration_lock,
    ),
)

__all__ = ["BACKEND", "MySqlRepository", "classify", "inspect", "migrate", "open", "parse_target"]
