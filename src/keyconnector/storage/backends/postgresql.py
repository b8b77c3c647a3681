"""PostgreSQL backend: upstream's tables through an asyncpg pool.

Why it looks the way it does:

- The request path is asyncpg, raw SQL: asyncpg prepares each statement once per connection and
  caches it, so ``get_key`` is one Bind/Execute round trip on a pooled connection. SQLAlchemy's async
  layer would cost several times the query (docs/performance.md section 1); it is used only for migrations and
  ``inspect``, synchronously, with psycopg 3.
- Every write is a single statement that is atomic on its own (``INSERT ... ON CONFLICT``, an
  ``UPDATE ... FROM unnest(...)``), so concurrent writers in any number of processes need no explicit
  locking, and a deadlock or a dropped connection can simply be retried. The data key is the one
  exception: it is a read-then-write under a transaction-scoped advisory lock. The bulk operations
  pass whole batches as arrays (``INSERT ... SELECT FROM unnest(...) ON CONFLICT``): one statement and
  one round trip per batch. Measured for 100,000 rows in batches of 2,000 on the 2-core machine: 166k
  new rows/s, against 96k for ``executemany`` in a transaction and 109k for COPY into a temporary
  table followed by one ``INSERT ... SELECT``.
- Columns hold exactly upstream's types (``uuid``, ``timestamp without time zone``, ``text``), so the
  database stays usable by upstream.

The connection string is the operator's Npgsql one (``Host=db;Port=5432;Database=kc;Username=kc;
Password=...``) or a ``postgresql://`` URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from keyconnector._optional import require
from keyconnector.errors import StorageError, UnavailableError
from keyconnector.runtime.settings import DatabaseSettings
from keyconnector.runtime.trust import Trust
from keyconnector.storage.base import RecordUpdate, StoredKeyRing, UserKeyRecord
from keyconnector.storage.coalesce import ReadCoalescer
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
    import asyncpg
    from sqlalchemy import Connection

log = logging.getLogger(__name__)

T = TypeVar("T")

DATA_KEY_LOCK = 0x4B43_4441_5441  # "KCDATA": serializes data-key creation across processes and hosts
MIGRATION_LOCK = 0x4B43_4D49_4752  # "KCMIGR": serializes schema migrations across processes and hosts

_SSL_MODES = {
    "disable": "disable",
    "allow": "allow",
    "prefer": "prefer",
    "require": "require",
    "verifyca": "verify-ca",
    "verify-ca": "verify-ca",
    "verifyfull": "verify-full",
    "verify-full": "verify-full",
}

SPEC = ConnectionStringSpec(
    provider="postgresql",
    setting_name="postgreSqlConnectionString",
    example="Host=db;Port=5432;Database=keyconnector;Username=keyconnector;Password=...",
    default_port=5432,
    synonyms={
        "Host": "host",
        "Server": "host",
        "Data Source": "host",
        "Address": "host",
        "Port": "port",
        "Database": "database",
        "DB": "database",
        "Initial Catalog": "database",
        "Username": "user",
        "User Name": "user",
        "UserName": "user",
        "User Id": "user",
        "UserId": "user",
        "User": "user",
        "Uid": "user",
        "Password": "password",
        "Pwd": "password",
        "Psw": "password",
        "SSL Mode": "ssl mode",
        "SslMode": "ssl mode",
        "Trust Server Certificate": "trust server certificate",
        "TrustServerCertificate": "trust server certificate",
        "Root Certificate": "ssl root cert",
        "RootCertificate": "ssl root cert",
        "SSL Certificate": "ssl cert",
        "SslCertificate": "ssl cert",
        "SSL Key": "ssl key",
        "SslKey": "ssl key",
        "SSL Password": "ssl password",
        "SslPassword": "ssl password",
        "Timeout": "connect timeout",
        "Connect Timeout": "connect timeout",
        "Connection Timeout": "connect timeout",
        "Command Timeout": "command timeout",
        "CommandTimeout": "command timeout",
        "Minimum Pool Size": "min pool size",
        "MinPoolSize": "min pool size",
        "Min Pool Size": "min pool size",
        "Maximum Pool Size": "max pool size",
        "MaxPoolSize": "max pool size",
        "Max Pool Size": "max pool size",
        "Connection Idle Lifetime": "idle lifetime",
        "ConnectionIdleLifetime": "idle lifetime",
        "Application Name": "application name",
        "ApplicationName": "application name",
        "Search Path": "search path",
        "SearchPath": "search path",
        "Target Session Attributes": "target session attributes",
        "TargetSessionAttributes": "target session attributes",
        "Load Balance Hosts": "load balance hosts",
        "LoadBalanceHosts": "load balance hosts",
    },
    # Accepted and dropped: driver-internal tuning with no equivalent here, or nothing to do
    # (keyconnector always pools, prepares its few statements itself and speaks UTF-8).
    ignored=(
        "Pooling",
        "Enlist",
        "Keepalive",
        "Tcp Keepalive",
        "TcpKeepAlive",
        "Connection Lifetime",
        "ConnectionLifetime",
        "Connection Pruning Interval",
        "ConnectionPruningInterval",
        "Max Auto Prepare",
        "MaxAutoPrepare",
        "Auto Prepare Min Usages",
        "AutoPrepareMinUsages",
        "No Reset On Close",
        "NoResetOnClose",
        "Include Error Detail",
        "IncludeErrorDetail",
        "Log Parameters",
        "LogParameters",
        "Client Encoding",
        "ClientEncoding",
        "Encoding",
        "Timezone",
        "Read Buffer Size",
        "ReadBufferSize",
        "Write Buffer Size",
        "WriteBufferSize",
        "Socket Receive Buffer Size",
        "Socket Send Buffer Size",
        "Internal Command Timeout",
        "InternalCommandTimeout",
        "Persist Security Info",
        "PersistSecurityInfo",
        "Host Recheck Seconds",
        "HostRecheckSeconds",
        "Check Certificate Revocation",
        "CheckCertificateRevocation",
    ),
    unsupported={
        "Integrated Security": (
            "(Kerberos/GSS login) is not supported by keyconnector; give Username and Password instead"
        ),
        "Passfile": "is not supported; put the Password in the connection string (it is a secret setting)",
        "Multiplexing": "is not supported; remove it (keyconnector pools connections itself)",
        "Server Compatibility Mode": "is not supported; remove it",
    },
    url_schemes=("postgresql", "postgres", "postgresql+asyncpg", "postgresql+psycopg", "postgresql+psycopg2"),
    url_query={
        "sslmode": "ssl mode",
        "sslrootcert": "ssl root cert",
        "sslcert": "ssl cert",
        "sslkey": "ssl key",
        "sslpassword": "ssl password",
        "connect_timeout": "connect timeout",
        "command_timeout": "command timeout",
        "application_name": "application name",
        "target_session_attrs": "target session attributes",
        "load_balance_hosts": "load balance hosts",
        "search_path": "search path",
    },
    ssl_modes=_SSL_MODES,
    default_ssl_mode="prefer",
    default_connect_timeout=15.0,
    default_command_timeout=30.0,
    default_idle_lifetime=300.0,
    verified_tls=("SSL Mode=VerifyFull", "sslmode=verify-full"),
)

_TARGET_SESSION_ATTRIBUTES = {
    "any": "any",
    "primary": "primary",
    "standby": "standby",
    "preferprimary": "prefer-primary",
    "prefer-primary": "prefer-primary",
    "preferstandby": "prefer-standby",
    "prefer-standby": "prefer-standby",
    "readwrite": "read-write",
    "read-write": "read-write",
    "readonly": "read-only",
    "read-only": "read-only",
}

_STANDBY_READS = frozenset({"standby", "prefer-standby", "read-only"})
"""The attributes by which an operator asks for reads on standbys: user-key reads then use a second
pool with these attributes; writes, the key ring and the data key never do (see :func:`open`)."""

_LOAD_BALANCE = {"true": True, "random": True, "yes": True, "false": False, "disable": False, "no": False}
"""Npgsql's ``Load Balance Hosts=true|false`` and libpq's ``load_balance_hosts=random|disable``."""

RECENT_WRITE_SECONDS = 60.0
"""How long a user key written by this process is read from the primary rather than a standby."""
RECENT_WRITES_KEPT = 100_000

_SELECT_KEY = 'SELECT "Key" FROM "UserKeys" WHERE "Id" = $1'
_SELECT_KEYS = 'SELECT "Id", "Key" FROM "UserKeys" WHERE "Id" = ANY($1::uuid[])'
_CREATE = (
    'INSERT INTO "UserKeys" ("Id", "Key", "CreationDate", "RevisionDate", "LastAccessDate") '
    "VALUES ($1, $2, $3, NULL, NULL) "
    'ON CONFLICT ("Id") DO UPDATE SET "Key" = EXCLUDED."Key", "CreationDate" = EXCLUDED."CreationDate", '
    '"RevisionDate" = NULL WHERE "UserKeys"."Key" IS NULL '
    "RETURNING 1"
)
# SET expressions see the row as it was, so one statement tells all three cases apart: a new row and a
# filled NULL-key row come back with RevisionDate NULL ("created"), a replaced key with RevisionDate set.
_PUT = (
    'INSERT INTO "UserKeys" ("Id", "Key", "CreationDate", "RevisionDate", "LastAccessDate") '
    "VALUES ($1, $2, $3, NULL, NULL) "
    'ON CONFLICT ("Id") DO UPDATE SET "Key" = EXCLUDED."Key", '
    '"CreationDate" = CASE WHEN "UserKeys"."Key" IS NULL THEN EXCLUDED."CreationDate" '
    'ELSE "UserKeys"."CreationDate" END, '
    '"RevisionDate" = CASE WHEN "UserKeys"."Key" IS NULL THEN NULL ELSE EXCLUDED."CreationDate" END '
    'RETURNING "RevisionDate" IS NULL'
)
_RECORD_ACCESS = (
    'UPDATE "UserKeys" AS u SET "LastAccessDate" = v.t '
    "FROM unnest($1::uuid[], $2::timestamp[]) AS v(id, t) "
    'WHERE u."Id" = v.id AND (u."LastAccessDate" IS NULL OR u."LastAccessDate" < v.t)'
)
_SELECT_DATA_KEY = 'SELECT "Id", "SymmetricKey" FROM "ApplicationDatas" ORDER BY "Id" LIMIT 1'
# Arrays in, one statement: atomic by itself, one round trip per batch, and safe to retry.
_UPSERT = (
    'INSERT INTO "UserKeys" AS u ("Id", "Key", "CreationDate", "RevisionDate", "LastAccessDate") '
    "SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamp[], $4::timestamp[], $5::timestamp[]) "
    'ON CONFLICT ("Id") DO UPDATE SET "Key" = EXCLUDED."Key", "CreationDate" = EXCLUDED."CreationDate", '
    '"RevisionDate" = EXCLUDED."RevisionDate", "LastAccessDate" = EXCLUDED."LastAccessDate"'
)
# A row that already holds the new value counts as changed: it can only be ours (the record carries a
# random nonce), from an earlier try whose commit was acknowledged on a connection that then dropped.
_REPLACE_IF = (
    'UPDATE "UserKeys" AS u SET "Key" = v.new '
    "FROM unnest($1::uuid[], $2::text[], $3::text[]) AS v(id, expected, new) "
    'WHERE u."Id" = v.id AND (u."Key" = v.expected OR u."Key" = v.new)'
)
_SELECT_RING = "SELECT revision, document FROM keyconnector_key_ring WHERE id = 1"
_INSERT_RING = (
    "INSERT INTO keyconnector_key_ring (id, revision, document) VALUES (1, 1, $1) ON CONFLICT (id) DO NOTHING"
)
_UPDATE_RING = (
    "UPDATE keyconnector_key_ring SET document = $1, revision = revision + 1 WHERE id = 1 AND revision = $2"
)
_COLUMNS = '"Id", "Key", "CreationDate", "RevisionDate", "LastAccessDate"'
_FIRST_BATCH = f'SELECT {_COLUMNS} FROM "UserKeys" ORDER BY "Id" LIMIT $1'  # noqa: S608
_NEXT_BATCH = f'SELECT {_COLUMNS} FROM "UserKeys" WHERE "Id" > $1 ORDER BY "Id" LIMIT $2'  # noqa: S608
_CHECK_SCHEMA = (
    f'SELECT {_COLUMNS} FROM "UserKeys" LIMIT 0',  # noqa: S608
    'SELECT "Id", "SymmetricKey" FROM "ApplicationDatas" LIMIT 0',
)
ACCESS_CHUNK = 1000

DIALECT = shared.Dialect(
    guid=lambda user_id: user_id,
    select_key=_SELECT_KEY,
    writes=shared.Upserts(create=_CREATE, put=_PUT),
    select_ring=_SELECT_RING,
    insert_ring=_INSERT_RING,
    update_ring=_UPDATE_RING,
    first_page=lambda size: (_FIRST_BATCH, (size,)),
    next_page=lambda after, size: (_NEXT_BATCH, (after, size)),
    page_key=lambda row: row[0],
    is_duplicate=lambda exc: getattr(exc, "sqlstate", None) == "23505",  # unique_violation
    is_missing_table=lambda exc: getattr(exc, "sqlstate", None) == "42P01",  # undefined_table
)
"""PostgreSQL's statements for :mod:`..sql.shared`: ``create_key`` and ``put_key`` are one atomic
``INSERT ... ON CONFLICT`` each, the first ring an ``ON CONFLICT DO NOTHING``."""

# SQLSTATE classes and codes, from PostgreSQL's errcodes appendix.
_TRANSIENT_CLASSES = ("08", "53", "57")  # connection exception, insufficient resources, operator intervention
_TRANSIENT_CODES = {"40001", "40P01", "55P03", "25006"}  # serialization, deadlock, lock wait, read-only
_CONFIGURATION_CLASSES = ("28", "3D", "42501")  # authorization, unknown database, no privilege


def parse_target(settings: DatabaseSettings, prefix: str, trust: Trust | None = None) -> ServerTarget:
    raw = settings.postgresql_connection_string
    target = load_target(
        raw.get_secret_value() if raw is not None else None,
        f"{prefix}.{SPEC.setting_name}",
        SPEC,
        settings.pool_size,
        trust,
    )
    attributes = target.extra.get("target session attributes")
    if attributes is not None and attributes.strip().lower() not in _TARGET_SESSION_ATTRIBUTES:
        from keyconnector.errors import ConfigurationError

        raise ConfigurationError(
            target.setting,
            f"Target Session Attributes must be one of: {', '.join(sorted(set(_TARGET_SESSION_ATTRIBUTES.values())))}",  # noqa: E501
        )
    balance = target.extra.get("load balance hosts")
    if balance is not None and balance.strip().lower() not in _LOAD_BALANCE:
        from keyconnector.errors import ConfigurationError

        raise ConfigurationError(
            target.setting, "Load Balance Hosts must be true or false (load_balance_hosts: random or disable)"
        )
    return target


def _attributes(target: ServerTarget) -> str | None:
    """The operator's Target Session Attributes in libpq's spelling, or None."""
    attributes = target.extra.get("target session attributes")
    return _TARGET_SESSION_ATTRIBUTES[attributes.strip().lower()] if attributes else None


def write_attributes(target: ServerTarget) -> str | None:
    """What the pool for writes, the key ring and the data key asks of a server: a primary.

    With several hosts, whatever the operator wrote, a write must never land on a standby (it would
    fail as read-only until the retries run out): ``primary`` unless they asked for ``read-write``
    (also a primary, checked another way). One host is used as given: it is the only choice anyway.
    """
    attributes = _attributes(target)
    if attributes in ("primary", "read-write"):
        return attributes
    return "primary" if len(target.hosts) > 1 else attributes if attributes not in _STANDBY_READS else None


def read_attributes(target: ServerTarget) -> str | None:
    """The attributes of a second pool for user-key reads, or None for "read on the primary".

    Only when the operator asked for standbys (``standby``, ``prefer-standby``, ``read-only``) and
    named more than one host: ``any`` is Npgsql's default and asks for nothing in particular."""
    attributes = _attributes(target)
    if attributes in _STANDBY_READS and len(target.hosts) > 1:
        return attributes
    return None


def _load_balanced(target: ServerTarget) -> bool:
    balance = target.extra.get("load balance hosts")
    return balance is not None and _LOAD_BALANCE[balance.strip().lower()]


def classify(exc: BaseException) -> Failure | None:
    """What a driver error (asyncpg or psycopg) means: retry, give up for now, or fix the settings."""
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        if sqlstate in _TRANSIENT_CODES or sqlstate[:2] in _TRANSIENT_CLASSES:
            return Failure.TRANSIENT
        if sqlstate[:2] in _CONFIGURATION_CLASSES[:2] or sqlstate == "42501":
            return Failure.CONFIGURATION
        if sqlstate == "57014":  # statement timeout
            return Failure.UNAVAILABLE
        return Failure.FATAL
    if isinstance(exc, TimeoutError):
        return Failure.UNAVAILABLE
    if isinstance(exc, (OSError, ConnectionError, EOFError)):
        return Failure.TRANSIENT
    module = type(exc).__module__
    name = type(exc).__name__
    if module.startswith("asyncpg"):
        if name in ("ConnectionDoesNotExistError", "ConnectionFailureError", "InternalClientError"):
            return Failure.TRANSIENT
        if name == "TargetServerAttributeNotMatched":
            # Every host answered, none is a primary (yet): a failover in progress.
            return Failure.TRANSIENT
        if name == "InterfaceError" and "closed" in str(exc).lower():
            return Failure.TRANSIENT
        if name in ("ClientConfigurationError", "InvalidAuthorizationSpecificationError"):
            return Failure.CONFIGURATION
        return Failure.FATAL
    if module.startswith("psycopg"):
        # A failed connection attempt carries no SQLSTATE; libpq's message says why.
        text = str(exc).lower()
        if (
            "password authentication failed" in text
            or "no password supplied" in text
            or ("does not exist" in text and ("database" in text or "role" in text))
        ):
            return Failure.CONFIGURATION
        if "certificate" in text or ("ssl" in text and "not support" in text):
            return Failure.CONFIGURATION
        if name == "OperationalError":
            return Failure.TRANSIENT
        return Failure.FATAL
    return None


# -- migrations (psycopg, through SQLAlchemy) --------------------------------------------------------------


def _psycopg_arguments(target: ServerTarget) -> dict[str, Any]:
    """libpq's keywords for ``target`` (multi-host lists included)."""
    arguments: dict[str, Any] = {
        "host": ",".join(host for host, _ in target.hosts),
        "port": ",".join(str(port) for _, port in target.hosts),
        "dbname": target.database,
        "connect_timeout": max(2, int(target.connect_timeout)),
        "application_name": target.application_name,
        "sslmode": target.ssl_mode,
    }
    if target.user:
        arguments["user"] = target.user
    if target.password is not None:
        arguments["password"] = target.password
    if target.ssl_mode in ("verify-ca", "verify-full"):
        arguments["sslrootcert"] = target.ssl_root_cert or target.trust.bundle_file()
    elif target.ssl_root_cert:
        arguments["sslrootcert"] = target.ssl_root_cert
    if target.ssl_cert:
        arguments["sslcert"] = target.ssl_cert
    if target.ssl_key:
        arguments["sslkey"] = target.ssl_key
    if target.ssl_key_password:
        arguments["sslpassword"] = target.ssl_key_password
    attributes = write_attributes(target)  # migrations write
    if attributes:
        arguments["target_session_attrs"] = attributes
    if _load_balanced(target):
        arguments["load_balance_hosts"] = "random"
    search_path = target.extra.get("search path")
    if search_path:
        arguments["options"] = "-c search_path=" + search_path.replace(" ", "\\ ")
    return arguments


def migration_engine(target: ServerTarget) -> Any:
    """A short-lived SQLAlchemy engine over psycopg 3 for migrations and ``inspect``."""
    require("psycopg", extra="postgres", setting=target.setting, provider="postgresql")
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    return create_engine("postgresql+psycopg://", connect_args=_psycopg_arguments(target), poolclass=NullPool)


@contextlib.contextmanager
def migration_lock(connection: Connection) -> Iterator[None]:
    """An advisory lock owned by the migration's transaction: released with it, even by a crash."""
    from sqlalchemy import text

    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    yield


SCHEMA = ServerSchema(parse_target, migration_engine, classify)
migrate = SCHEMA.migrate
inspect = SCHEMA.inspect


# -- the repository ------------------------------------------------------------------------------------------


class PostgresRepository:
    """The :class:`~keyconnector.storage.base.Repository` over an asyncpg pool."""

    def __init__(
        self, target: ServerTarget, pool: asyncpg.Pool, read_pool: asyncpg.Pool | None = None
    ) -> None:
        self._target = target
        self._pool = pool
        """On a primary: every write, the key ring, the data key, and reads unless ``read_pool``."""
        self._read_pool = read_pool
        """On standbys when the operator asked (:func:`read_attributes`): user-key reads only."""
        self._recent: OrderedDict[UUID, float] = OrderedDict()
        """User keys this process wrote lately (monotonic time): read from the primary, never a standby."""
        self._background: set[asyncio.Future[None]] = set()
        self._reads = ReadCoalescer(self._fetch_keys)

    @property
    def description(self) -> str:
        return self._target.description

    def _stale(self, exc: BaseException) -> None:
        # After a restart or failover every idle connection is dead: replace them all rather than let
        # each one fail a request in turn.
        for pool in (self._pool, self._read_pool):
            if pool is not None:
                task = asyncio.ensure_future(pool.expire_connections())
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _run(self, action: str, operation: Any) -> Any:
        try:
            return await with_retries(operation, classify, self._target, action, on_transient=self._stale)
        except UnavailableError as exc:
            # A timeout too: the host may have gone silent, and its connections with it.
            self._stale(exc)
            raise

    # -- the request path -------------------------------------------------------------------------------

    async def get_key(self, user_id: UUID) -> str | None:
        return await self._reads.get(user_id)

    def _written(self, user_ids: Sequence[UUID]) -> None:
        """Remember writes, so that a standby's stale copy is never read in their place."""
        if self._read_pool is None:
            return
        now = time.monotonic()
        for user_id in user_ids:
            self._recent[user_id] = now
            self._recent.move_to_end(user_id)
        while len(self._recent) > RECENT_WRITES_KEPT:
            self._recent.popitem(last=False)

    def _recently_written(self, user_id: UUID, now: float) -> bool:
        written = self._recent.get(user_id)
        return written is not None and now - written < RECENT_WRITE_SECONDS

    async def _fetch_keys(self, user_ids: list[UUID]) -> dict[UUID, str | None]:
        """Read on a standby when the operator asked for that, else on the primary (see below).

        A standby may lag, so a standby's answer is only taken where it cannot be stale in a way that
        matters: a user this process wrote in the last ``RECENT_WRITE_SECONDS`` is read on the
        primary, a key the standby does not have (not yet replicated?) is asked of the primary, and a
        standby that fails sends the whole read to the primary. Across processes, the write pool's
        ``synchronous_commit=remote_apply`` makes a synchronous standby apply a write before it is
        acknowledged (asynchronous standbys can still lag: README, "Failover").
        """
        if self._read_pool is None:
            return await self._fetch_keys_from(self._pool, user_ids)
        now = time.monotonic()
        from_standby = [user for user in user_ids if not self._recently_written(user, now)]
        found: dict[UUID, str | None] = {}
        if from_standby:
            try:
                rows = await self._read_pool.fetch(_SELECT_KEYS, from_standby, timeout=PING_TIMEOUT_SECONDS)
            except Exception as exc:
                if classify(exc) is None:
                    raise
                log.info(
                    "reading user keys on a standby failed, reading on the primary: %s", type(exc).__name__
                )
            else:
                found = {row[0]: row[1] for row in rows}
        missing = [user for user in user_ids if found.get(user) is None]
        if missing:
            found.update(await self._fetch_keys_from(self._pool, missing))
        return found

    async def _fetch_keys_from(self, pool: asyncpg.Pool, user_ids: list[UUID]) -> dict[UUID, str | None]:
        """One round trip for every read that queued up behind the last one (see coalesce.py)."""
        try:
            rows = await pool.fetch(_SELECT_KEYS, user_ids)
        except Exception as exc:  # the slow path: classify, maybe retry
            if classify(exc) is None:
                raise
            rows = await self._run("reading user keys", lambda _attempt: pool.fetch(_SELECT_KEYS, user_ids))
        return {row[0]: row[1] for row in rows}

    # -- writes -------------------------------------------------------------------------------------------

    async def _perform(self, action: str, plan: Callable[[int], Plan[T]]) -> T:
        """Run a shared operation (:mod:`..sql.shared`) on one pooled connection, with the retries."""

        async def attempt(number: int) -> T:
            async with self._pool.acquire() as connection:
                return await drive(plan(number), lambda step: _step(connection, step))

        result: T = await self._run(action, attempt)
        return result

    async def create_key(self, user_id: UUID, record: str, now: datetime) -> bool:
        self._written([user_id])  # before the write: a read racing it must not go to a standby either
        return await self._perform(
            "creating a user key", lambda number: shared.create_key(DIALECT, user_id, record, now, number > 1)
        )

    async def put_key(self, user_id: UUID, record: str, now: datetime) -> bool:
        self._written([user_id])
        return await self._perform(
            "storing a user key", lambda _n: shared.put_key(DIALECT, user_id, record, now, self.description)
        )

    async def record_access(self, accesses: Mapping[UUID, datetime]) -> None:
        if not accesses:
            return
        # Sorted, so that two workers flushing overlapping batches lock rows in the same order and
        # cannot deadlock each other; the WHERE clause never moves a time backwards.
        items = sorted(accesses.items())
        for start in range(0, len(items), ACCESS_CHUNK):
            chunk = items[start : start + ACCESS_CHUNK]
            ids = [user for user, _ in chunk]
            times = [naive_utc(when) for _, when in chunk]

            async def attempt(_number: int, ids: list[UUID] = ids, times: list[datetime] = times) -> None:
                await self._pool.execute(_RECORD_ACCESS, ids, times)

            await self._run("recording access times", attempt)

    async def get_wrapped_data_key(self) -> str | None:
        async def attempt(_number: int) -> str | None:
            row = await self._pool.fetchrow(_SELECT_DATA_KEY)
            return None if row is None else row[1]

        result: str | None = await self._run("reading the data key", attempt)
        return result

    async def store_wrapped_data_key(self, wrapped: str) -> str:
        async def attempt(_number: int) -> str:
            async with self._pool.acquire() as connection, connection.transaction():
                # Held until commit: a second process waits here, then finds the first one's key.
                await connection.execute("SELECT pg_advisory_xact_lock($1)", DATA_KEY_LOCK)
                row = await connection.fetchrow(_SELECT_DATA_KEY)
                if row is not None and row[1] is not None:
                    stored: str = row[1]
                    return stored
                await _write_data_key(connection, row, wrapped)
                return wrapped

        result: str = await self._run("storing the data key", attempt)
        return result

    async def set_wrapped_data_key(self, wrapped: str) -> None:
        async def attempt(_number: int) -> None:
            async with self._pool.acquire() as connection, connection.transaction():
                # The same lock as store_wrapped_data_key: a bootstrap never sees a half-made choice.
                await connection.execute("SELECT pg_advisory_xact_lock($1)", DATA_KEY_LOCK)
                await _write_data_key(connection, await connection.fetchrow(_SELECT_DATA_KEY), wrapped)

        await self._run("replacing the data key", attempt)

    # -- operations: transfer, rotation, backup -------------------------------------------------------------

    async def count_records(self) -> int:
        async def attempt(_number: int) -> int:
            return int(await self._pool.fetchval('SELECT count(*) FROM "UserKeys"'))

        result: int = await self._run("counting user keys", attempt)
        return result

    async def upsert_records(self, records: Sequence[UserKeyRecord]) -> None:
        if not records:
            return
        # One row per user (ON CONFLICT may not touch a row twice), in key order so that concurrent
        # batches lock rows in the same order and cannot deadlock each other.
        unique = sorted({record.user_id: record for record in records}.values(), key=lambda r: r.user_id)
        columns = (
            [record.user_id for record in unique],
            [record.key for record in unique],
            [naive_utc(record.creation_date) for record in unique],
            [_naive(record.revision_date) for record in unique],
            [_naive(record.last_access_date) for record in unique],
        )

        self._written(columns[0])

        async def attempt(_number: int) -> None:
            await self._pool.execute(_UPSERT, *columns)

        await self._run("copying user keys", attempt)

    async def replace_records(self, updates: Sequence[RecordUpdate]) -> int:
        if not updates:
            return 0
        ordered = sorted(updates, key=lambda update: update.user_id)
        columns = (
            [update.user_id for update in ordered],
            [update.expected for update in ordered],
            [update.new for update in ordered],
        )

        self._written(columns[0])

        async def attempt(_number: int) -> int:
            return _row_count(await self._pool.execute(_REPLACE_IF, *columns))

        result: int = await self._run("re-encrypting user keys", attempt)
        return result

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

        return shared.iter_records(
            DIALECT, read_page, batch_size, lambda row: UserKeyRecord(row[0], row[1], row[2], row[3], row[4])
        )

    async def ping(self) -> None:
        try:
            await self._pool.fetchval("SELECT 1", timeout=PING_TIMEOUT_SECONDS)
        except Exception as exc:
            failure = classify(exc)
            if failure is None:
                raise
            if failure is Failure.TRANSIENT:
                self._stale(exc)
                failure = Failure.UNAVAILABLE
            raise translate(exc, failure, self._target, "checking the database") from None

    async def aclose(self) -> None:
        for pool in (self._read_pool, self._pool):
            if pool is None:
                continue
            try:
                await pool.close()
            except Exception as exc:  # a dead server cannot be told goodbye; do not fail shutdown for it
                log.debug("closing the pool: %s", self._target.scrub(str(exc)))
                pool.terminate()


def _naive(value: datetime | None) -> datetime | None:
    return None if value is None else naive_utc(value)


def _row_count(status: str) -> int:
    """The row count of a command tag such as ``UPDATE 12`` or ``INSERT 0 1``."""
    return int(status.rsplit(" ", 1)[-1])


async def _step(connection: asyncpg.Connection, step: shared.Step) -> Any:
    """One statement of a shared operation, on asyncpg (prepared and cached per connection)."""
    if isinstance(step, shared.Execute):
        return _row_count(await connection.execute(step.sql, *step.parameters))
    if isinstance(step, shared.FetchOne):
        return await connection.fetchrow(step.sql, *step.parameters)
    return list(await connection.fetch(step.sql, *step.parameters))


def _connect_arguments(target: ServerTarget) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "host": [host for host, _ in target.hosts],
        "port": [port for _, port in target.hosts],
        "database": target.database,
        "user": target.user,
        "password": target.password,
        "timeout": target.connect_timeout,
        "command_timeout": target.command_timeout,
        "server_settings": {"application_name": target.application_name},
    }
    if target.ssl_mode in ("disable", "allow", "prefer") and not target.ssl_cert:
        arguments["ssl"] = target.ssl_mode
    else:
        arguments["ssl"] = client_ssl_context(target)
    search_path = target.extra.get("search path")
    if search_path:
        arguments["server_settings"]["search_path"] = search_path
    attributes = write_attributes(target)
    if attributes:
        arguments["target_session_attrs"] = attributes
    return arguments


async def open(settings: DatabaseSettings, prefix: str, trust: Trust | None = None) -> PostgresRepository:
    """Make the pool and check upstream's tables are there.

    A server that is down right now does not stop a worker from starting: the pool connects on first
    use, and requests answer 503 until the database is back.
    """
    asyncpg_module = require(
        "asyncpg", extra="postgres", setting=f"{prefix}.{SPEC.setting_name}", provider="postgresql"
    )
    target = parse_target(settings, prefix, trust)
    log_pool(target, settings.pool_size)
    try:
        ssl_context = _connect_arguments(target)
    except (OSError, ValueError) as exc:
        raise translate(exc, Failure.CONFIGURATION, target, "loading TLS certificates") from None
    standby_reads = read_attributes(target)
    if standby_reads is not None:
        # A synchronous standby applies a write before it is acknowledged, so its reads are current.
        ssl_context["server_settings"]["synchronous_commit"] = "remote_apply"
    several = len(target.hosts) > 1
    connect = HostPicker(asyncpg_module, target, write_attributes(target)).connect if several else None
    # min_size=0: creating the pool must not need the server; warm-up below is best effort.
    pool = asyncpg_module.create_pool(
        min_size=0,
        max_size=target.max_pool_size,
        max_inactive_connection_lifetime=target.idle_lifetime or 300.0,
        reset=_keep_session,
        connect=connect,
        **ssl_context,
    )
    await pool
    read_pool = None
    if standby_reads is not None:
        read_arguments = {**ssl_context, "target_session_attrs": standby_reads}
        read_arguments["server_settings"] = {
            k: v for k, v in ssl_context["server_settings"].items() if k != "synchronous_commit"
        }
        read_pool = asyncpg_module.create_pool(
            min_size=0,
            max_size=target.max_pool_size,
            max_inactive_connection_lifetime=target.idle_lifetime or 300.0,
            reset=_keep_session,
            connect=HostPicker(asyncpg_module, target, standby_reads).connect,
            **read_arguments,
        )
        await read_pool
        log.info(
            "%s: user-key reads use %s servers; writes go to the primary", target.description, standby_reads
        )
    repository = PostgresRepository(target, pool, read_pool)
    try:
        await repository._run(
            "checking upstream's tables", lambda _n: _check_schema(pool, target.min_pool_size)
        )
    except UnavailableError as exc:
        log.warning("%s is not reachable yet; requests answer 503 until it is: %s", target.description, exc)
    except StorageError:
        await repository.aclose()
        raise
    except BaseException:
        await repository.aclose()
        raise
    return repository


class HostPicker:
    """Connects a pool to one of several hosts, one host at a time, each with the full connect timeout.

    asyncpg's own multi-host connect spends one timeout on the whole list: a primary whose machine
    went silent (no reset, no refusal) eats all of it, so the next host is never tried and the
    service never finds the promoted standby. Here each host gets the operator's ``Timeout`` on its
    own, in the order :class:`~keyconnector.storage.sql.hosts.HostOrder` gives (shared with the
    MySQL backend): a host that failed (silent, refused, or not the kind asked for) is tried last
    for a while, and ``Load Balance Hosts`` shuffles the healthy hosts per connection.
    """

    def __init__(self, asyncpg_module: Any, target: ServerTarget, attributes: str | None) -> None:
        self._asyncpg = asyncpg_module
        self._hosts = HostOrder(target.hosts, shuffle=_load_balanced(target))
        self._attributes = attributes

    def order(self) -> list[tuple[str, int]]:
        """Hosts believed healthy first (shuffled with Load Balance Hosts), then the rest."""
        return self._hosts.order()

    async def connect(self, *args: Any, **kwargs: Any) -> Any:
        for given in ("target_session_attrs", "host", "port"):  # ours replace the pool's
            kwargs.pop(given, None)
        passes = [self._attributes]
        if self._attributes == "prefer-standby":
            passes = ["standby", "any"]  # a standby if any is up, else whatever answers
        last: BaseException | None = None
        for attributes in passes:
            for host, port in self.order():
                try:
                    return await self._asyncpg.connect(
                        *args, host=host, port=port, target_session_attrs=attributes or "any", **kwargs
                    )
                except (OSError, TimeoutError, self._asyncpg.TargetServerAttributeNotMatched) as exc:
                    if attributes != "standby" or len(passes) == 1:
                        self._hosts.failed((host, port))
                    last = exc
        assert last is not None
        raise last


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Skip asyncpg's per-release ``RESET ALL; UNLISTEN *; ...``: a second round trip per request.

    Nothing here changes session state: no SET, LISTEN, cursors or session-level locks (the only lock,
    the data key's, is transaction-scoped). asyncpg still rolls back a transaction left open.
    """


async def _check_schema(pool: asyncpg.Pool, warm: int) -> None:
    connections = [await pool.acquire() for _ in range(max(1, warm))]
    try:
        for statement in _CHECK_SCHEMA:
            await connections[0].fetch(statement)
    finally:
        for connection in connections:
            await pool.release(connection)


async def _write_data_key(connection: Any, first_row: Any, wrapped: str) -> None:
    """Set ``SymmetricKey`` of the first ``ApplicationDatas`` row, or insert that row."""
    if first_row is not None:
        await connection.execute(
            'UPDATE "ApplicationDatas" SET "SymmetricKey" = $1 WHERE "Id" = $2', wrapped, first_row[0]
        )
    else:
        await connection.execute('INSERT INTO "ApplicationDatas" ("SymmetricKey") VALUES ($1)', wrapped)


def _sync_engine(settings: DatabaseSettings, prefix: str) -> Any:
    return migration_engine(parse_target(settings, prefix))


BACKEND = Backend(
    name="postgresql",
    migrate=migrate,
    open=open,
    inspect=inspect,
    parse_target=parse_target,
    sync_engine=_sync_engine,
    schema=Schema(
        sqlalchemy_dialects=("postgresql",),
        upstream_migration_id="20210820160016_InitialCreate",
        transactional_ddl=True,
        migration_lock=migration_lock,
    ),
)

__all__ = ["BACKEND", "PostgresRepository", "classify", "inspect", "migrate", "open", "parse_target"]
