"""What the PostgreSQL, MySQL/MariaDB and SQL Server backends share.

- :func:`load_target` turns the operator's connection string (the ADO.NET one they gave upstream, or
  a SQLAlchemy-style URL) into a :class:`ServerTarget`: one validated description of where to connect,
  how long to wait, how big a pool to keep and how to do TLS, whatever spelling the operator used.
- :func:`with_retries` is the one retry policy: transient failures (a reset connection, a server
  restarting or failing over, a deadlock, a serialization failure, a lock wait timeout) are retried a
  bounded number of times with jittered exponential backoff inside a small time budget, then surface as
  ``UnavailableError`` (503 with ``Retry-After``). Nothing is retried forever and nothing hangs.
- Migrations and ``inspect`` run through SQLAlchemy with a synchronous driver; the request path never
  does (docs/performance.md section 4: its async layer costs several times the query).

Pool size: ``database__poolSize`` (default 10) is the size of each worker process's pool. When the
connection string itself says ``Maximum Pool Size``, that wins: it is the more specific setting, the
operator wrote it for this very database, and it already meant "per process" for upstream. Either way
the database sees at most workers x size connections, and the effective size is logged at start-up.

Passwords: :class:`ServerTarget` keeps the password out of its ``repr``, errors from this module name
keys and never values, and :func:`scrub` removes the password from any driver message we pass on.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from keyconnector.errors import (
    ConfigurationError,
    KeyConnectorError,
    StorageError,
    UnavailableError,
    setting_name,
)
from keyconnector.runtime.settings import DatabaseSettings
from keyconnector.runtime.trust import Trust
from keyconnector.storage.base import DatabaseState
from keyconnector.storage.connstr import normalize_key, parse_connection_string, resolve

if TYPE_CHECKING:
    from sqlalchemy import Engine

log = logging.getLogger("keyconnector.storage")

T = TypeVar("T")

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
"""libpq's names, used for every provider: each connection string spelling is mapped onto one of them."""

RETRY_ATTEMPTS = 4
"""Tries of one operation in all (1 + 3 retries)."""
RETRY_FIRST_DELAY = 0.05
RETRY_FACTOR = 4.0
RETRY_BUDGET_SECONDS = 3.0
"""No retry is started once this long has passed since the first try: a request must answer (maybe
503) in a few seconds rather than wait out a long outage."""
RETRY_AFTER_SECONDS = 5
"""``Retry-After`` of the 503 answered while the database is unreachable."""

PING_TIMEOUT_SECONDS = 2.0


# -- connection strings -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerTarget:
    """Where and how to connect; built by :func:`load_target`, never holding a password in its repr."""

    provider: str
    setting: str
    hosts: tuple[tuple[str, int], ...]
    database: str
    user: str | None
    password: str | None = field(repr=False)
    ssl_mode: str
    ssl_root_cert: str | None
    ssl_cert: str | None
    ssl_key: str | None
    ssl_key_password: str | None = field(repr=False)
    connect_timeout: float
    command_timeout: float
    min_pool_size: int
    max_pool_size: int
    idle_lifetime: float
    application_name: str
    extra: Mapping[str, str]
    url_form: bool = False
    """Written as a URL (``postgresql://...``) rather than ``Key=value;...``: advice is given in the
    spelling the operator used."""
    trusts_server_certificate: bool = False
    """``Trust Server Certificate=true`` was given: TLS without the certificate check, whatever the mode
    said (``ssl_mode`` is then at most ``require``)."""
    verified_tls: str = "a verify-full SSL mode"
    """What to write in this connection string for verified TLS (:attr:`ConnectionStringSpec.verified_tls`
    in the form the operator used)."""
    verified_tls_refuses_trust: bool = False
    trust: Trust = field(default_factory=Trust.from_directory, repr=False, compare=False)
    """The deployment's trust store (``caCertificatesDirectory``), for the verify modes: the same one
    every other outgoing connection uses. The backends' callers pass it in from the settings; the
    default (the default folder) is for tools and tests that have none."""

    @property
    def host(self) -> str:
        return self.hosts[0][0]

    @property
    def port(self) -> int:
        return self.hosts[0][1]

    @property
    def description(self) -> str:
        """``postgresql kc@db:5432``: what to show in logs and ``keyconnector check``."""
        where = ",".join(f"{host}:{port}" for host, port in self.hosts)
        return f"{self.provider} {self.database}@{where}"

    def scrub(self, message: str) -> str:
        return scrub(message, self.password, self.ssl_key_password)


def scrub(message: str, *secrets: str | None) -> str:
    """``message`` with every secret replaced: driver messages are passed on, and some echo input."""
    for secret in secrets:
        if secret and len(secret) >= 3:
            message = message.replace(secret, "***")
    return message


@dataclass(frozen=True, slots=True)
class ConnectionStringSpec:
    """How one provider's ADO.NET driver spells things, and what its URL form looks like."""

    provider: str
    setting_name: str
    example: str
    default_port: int
    synonyms: Mapping[str, str]
    ignored: Sequence[str]
    unsupported: Mapping[str, str]
    url_schemes: Sequence[str]
    url_query: Mapping[str, str]
    """URL query parameter (lower-case) -> canonical name."""
    ssl_modes: Mapping[str, str]
    """The provider's SSL mode words (normalized) -> one of :data:`SSL_MODES`."""
    default_ssl_mode: str
    default_connect_timeout: float
    default_command_timeout: float
    default_idle_lifetime: float
    split_host: Callable[[str, str], list[tuple[str, int | None]]] | None = None
    """Provider-specific reading of the host value (SQL Server's ``tcp:host,port``)."""
    verified_tls: tuple[str, str] = ("a verify-full SSL mode", "a verify-full SSL mode")
    """What to write for verified TLS, in the ``Key=value`` form and in the URL form (the transport
    warning's advice, in the spelling the operator used)."""
    verified_tls_refuses_trust: bool = False
    """The advice above already turns ``Trust Server Certificate`` off (SQL Server's does), so the
    warning need not add "remove Trust Server Certificate"."""


def _parse_url(text: str, setting: str, spec: ConnectionStringSpec) -> dict[str, str]:
    """``scheme://user:password@host:port/database?param=value`` onto canonical names.

    libpq's multi-host form (``postgresql://u:p@db1:5432,db2:5432/kc``) is kept whole as the host
    list for :func:`_split_hosts`: ``urlsplit`` alone cannot read a port out of it."""
    host_list: str | None = None
    try:
        parts = urlsplit(text)
        hosts_part = parts.netloc.rpartition("@")[2]
        if "," in hosts_part:
            host_list = unquote(hosts_part)
            userinfo = parts.netloc[: len(parts.netloc) - len(hosts_part)]
            parts = parts._replace(netloc=userinfo + "placeholder")
        port = parts.port
    except ValueError:
        raise ConfigurationError(setting, "is not a valid URL (check the host and port)") from None
    scheme = parts.scheme.lower()
    if scheme not in spec.url_schemes:
        raise ConfigurationError(
            setting,
            f"a URL connection string must start with one of {', '.join(s + '://' for s in spec.url_schemes)}"
            f" (it starts with {scheme}://)",
        )
    values: dict[str, str] = {}
    if host_list is not None:
        values["host"] = host_list
    elif parts.hostname:
        values["host"] = parts.hostname
        if port is not None:
            values["port"] = str(port)
    if parts.username:
        values["user"] = unquote(parts.username)
    if parts.password is not None:
        values["password"] = unquote(parts.password)
    database = unquote(parts.path.lstrip("/"))
    if database:
        values["database"] = database
    unknown = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        canonical = spec.url_query.get(name.lower())
        if canonical is None:
            unknown.append(name)
        else:
            values[canonical] = value
    if unknown:
        raise ConfigurationError(
            setting,
            f"unknown URL parameter{'s' if len(unknown) > 1 else ''} "
            + ", ".join(f"'{name}'" for name in unknown)
            + f"; accepted: {', '.join(sorted(spec.url_query))}",
        )
    return values


def _number(values: Mapping[str, str], key: str, setting: str, spelled: str, default: float) -> float:
    if key not in values or not values[key].strip():
        return default
    try:
        number = float(values[key])
    except ValueError:
        raise ConfigurationError(setting, f"{spelled} must be a number of seconds") from None
    if number < 0:
        raise ConfigurationError(setting, f"{spelled} must not be negative")
    return number


def _count(values: Mapping[str, str], key: str, setting: str, spelled: str) -> int | None:
    if key not in values or not values[key].strip():
        return None
    try:
        number = int(values[key])
    except ValueError:
        raise ConfigurationError(setting, f"{spelled} must be a whole number") from None
    if number < 0 or number > 10_000:
        raise ConfigurationError(setting, f"{spelled} must be between 0 and 10000")
    return number


def parse_bool(value: str, setting: str, spelled: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise ConfigurationError(setting, f"{spelled} must be true or false")


def _split_hosts(value: str, setting: str) -> list[tuple[str, int | None]]:
    """``db1,db2:5433`` or ``[::1]:5432``: Npgsql and MySqlConnector accept several hosts for failover."""
    hosts: list[tuple[str, int | None]] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        port: int | None = None
        if item.startswith("["):
            end = item.find("]")
            if end < 0:
                raise ConfigurationError(setting, "the host has an unclosed '[' (IPv6 address)")
            host, rest = item[1:end], item[end + 1 :]
            if rest.startswith(":"):
                port = _port(rest[1:], setting)
        elif item.count(":") == 1:
            host, text = item.split(":")
            port = _port(text, setting)
        else:
            host = item
        hosts.append((host, port))
    return hosts


def _port(text: str, setting: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigurationError(setting, "the port must be a number") from None
    if not 0 < port < 65536:
        raise ConfigurationError(setting, "the port must be between 1 and 65535")
    return port


def load_target(
    text: str | None, setting: str, spec: ConnectionStringSpec, pool_size: int, trust: Trust | None = None
) -> ServerTarget:
    """Read and validate the connection string; every error names ``setting`` and never a value.

    ``trust`` is the deployment's (:meth:`Trust.from_settings`); None means the default folder's."""
    text = (text or "").strip()
    if not text:
        raise ConfigurationError(setting, f"is not set; for example: {spec.example}")
    url_form = "://" in text.split(";", 1)[0] and "=" not in text.split("://", 1)[0]
    if url_form:
        values = _parse_url(text, setting, spec)
    else:
        values = resolve(
            parse_connection_string(text, setting),
            setting,
            synonyms=spec.synonyms,
            ignored=spec.ignored,
            unsupported=spec.unsupported,
        )
    host_text = values.get("host", "").strip()
    if not host_text:
        raise ConfigurationError(setting, f"names no server (Host or Server); for example: {spec.example}")
    split = spec.split_host or (lambda value, name: _split_hosts(value, name))
    default_port = _port(values["port"], setting) if values.get("port", "").strip() else spec.default_port
    hosts = tuple((host, port or default_port) for host, port in split(host_text, setting))
    if not hosts:
        raise ConfigurationError(setting, "names no server (Host or Server)")
    database = values.get("database", "").strip()
    if not database:
        raise ConfigurationError(setting, f"names no database (Database); for example: {spec.example}")

    mode_word = normalize_key(values.get("ssl mode", "")).replace(" ", "")
    if mode_word:
        ssl_mode = spec.ssl_modes.get(mode_word)
        if ssl_mode is None:
            raise ConfigurationError(
                setting,
                f"the SSL mode is not one of: {', '.join(sorted(set(spec.ssl_modes)))}",
            )
    else:
        ssl_mode = spec.default_ssl_mode
    trusting = "trust server certificate" in values and parse_bool(
        values["trust server certificate"], setting, "Trust Server Certificate"
    )
    if trusting and ssl_mode in ("verify-ca", "verify-full"):
        # Encrypt, but do not check the certificate: what the operator asked upstream's driver for.
        ssl_mode = "require"

    connect_timeout = _number(
        values, "connect timeout", setting, "the connect timeout", spec.default_connect_timeout
    )
    command_timeout = _number(
        values, "command timeout", setting, "the command timeout", spec.default_command_timeout
    )
    # 0 means "wait forever" to the .NET drivers; a service must not, so it means "the default" here.
    connect_timeout = connect_timeout or spec.default_connect_timeout
    command_timeout = command_timeout or spec.default_command_timeout
    idle = _number(
        values, "idle lifetime", setting, "the connection idle lifetime", spec.default_idle_lifetime
    )

    maximum = _count(values, "max pool size", setting, "Maximum Pool Size")
    minimum = _count(values, "min pool size", setting, "Minimum Pool Size") or 0
    max_pool_size = maximum if maximum else pool_size
    if minimum > max_pool_size:
        raise ConfigurationError(
            setting, f"Minimum Pool Size ({minimum}) is larger than the pool size ({max_pool_size})"
        )
    known = {
        "host",
        "port",
        "database",
        "user",
        "password",
        "ssl mode",
        "trust server certificate",
        "ssl root cert",
        "ssl cert",
        "ssl key",
        "ssl password",
        "connect timeout",
        "command timeout",
        "idle lifetime",
        "max pool size",
        "min pool size",
        "application name",
    }
    return ServerTarget(
        provider=spec.provider,
        setting=setting,
        hosts=hosts,
        database=database,
        user=values.get("user") or None,
        password=values.get("password"),
        ssl_mode=ssl_mode,
        ssl_root_cert=values.get("ssl root cert") or None,
        ssl_cert=values.get("ssl cert") or None,
        ssl_key=values.get("ssl key") or None,
        ssl_key_password=values.get("ssl password") or None,
        connect_timeout=connect_timeout,
        command_timeout=command_timeout,
        min_pool_size=minimum,
        max_pool_size=max_pool_size,
        idle_lifetime=idle,
        application_name=values.get("application name") or "keyconnector",
        extra={key: value for key, value in values.items() if key not in known},
        url_form=url_form,
        trusts_server_certificate=trusting,
        verified_tls=spec.verified_tls[1 if url_form else 0],
        verified_tls_refuses_trust=spec.verified_tls_refuses_trust,
        trust=trust or Trust.from_directory(),
    )


# -- TLS ------------------------------------------------------------------------------------------------


def client_ssl_context(target: ServerTarget) -> ssl.SSLContext | None:
    """The TLS context for ``target``'s SSL mode, or None for "no TLS".

    ``prefer`` and ``require`` encrypt without checking the certificate (libpq's meaning); the
    ``verify`` modes trust ``target.trust`` (the system store, certifi and ``caCertificatesDirectory``),
    as every other outgoing connection does, or the root certificate the connection string names.
    """
    if target.ssl_mode in ("disable", "allow"):
        return None
    if target.ssl_mode in ("verify-ca", "verify-full"):
        if target.ssl_root_cert:
            context = ssl.create_default_context(cafile=target.ssl_root_cert)
        else:
            context = target.trust.ssl_context()
        context.check_hostname = target.ssl_mode == "verify-full"
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if target.ssl_cert:
        context.load_cert_chain(target.ssl_cert, target.ssl_key, target.ssl_key_password)
    return context


# -- transport security -------------------------------------------------------------------------------------


LOCAL_HOST_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
"""Names that mean this machine without asking DNS (``/etc/hosts``, or built into the resolver)."""

VERIFIED_SSL_MODES = ("verify-ca", "verify-full")
"""The modes in which the client checks the server's certificate against trusted CAs."""

_UNVERIFIED: dict[str, str] = {
    "disable": "does not use TLS",
    "allow": "uses TLS only if the server insists, without checking its certificate",
    "prefer": "uses TLS only if the server offers it, without checking its certificate",
    "require": "is encrypted but does not check the server's certificate",
    "trusted": "is encrypted, but TrustServerCertificate=True turns off the server certificate check",
}
"""What each unverified mode leaves open, for the warning."""


def is_local_host(host: str) -> bool:
    """True when connecting to ``host`` cannot leave this machine: a Unix socket path, a loopback
    address (127.0.0.0/8, ::1) or a name that means loopback.

    Decided from the text alone, never by resolving it: a DNS answer is exactly what a network
    attacker may forge, so a name that merely resolves to 127.0.0.1 today does not count.
    """
    text = host.strip()
    if text.startswith("/"):
        return True  # a Unix socket (libpq and Npgsql read a host starting with '/' as its folder)
    text = text.split("\\", 1)[0]  # SQL Server's host\instance: the instance is no part of the address
    text = text.removeprefix("[").removesuffix("]").rstrip(".").lower()
    if text in LOCAL_HOST_NAMES:
        return True
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _where(hosts: Sequence[tuple[str, int]]) -> str:
    return ", ".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in hosts)


def transport_warning(target: ServerTarget) -> str | None:
    """None when a network attacker cannot stand in for ``target``'s database, else the warning.

    Whoever can answer in the database's place can write it: plant a data key of their own (every
    new user key is then wrapped under it) or swap users' records. So the connection must either
    stay on this machine or check the server's certificate. ``Trust Server Certificate=true`` counts
    as not checking, whatever the SSL mode says (:func:`load_target` turned the mode down to
    ``require`` already). The message names the setting and what to add in the operator's own
    spelling; it never contains the password (only hosts, ports and the mode).
    """
    remote = [(host, port) for host, port in target.hosts if not is_local_host(host)]
    if not remote or target.ssl_mode in VERIFIED_SSL_MODES:
        return None
    mode = "trusted" if target.trusts_server_certificate else target.ssl_mode
    how = _UNVERIFIED.get(mode, "does not check the server's certificate")
    advice = [target.verified_tls]
    if target.trusts_server_certificate and not target.verified_tls_refuses_trust:
        advice.append("remove Trust Server Certificate")
    fix = " and ".join(advice)
    where = _where(remote)
    return (
        f"{setting_name(target.setting)}: the database server {where} is not on this machine and the "
        f"connection {how} (SSL mode {target.ssl_mode}): anyone on the network path can pose as the "
        "database and rewrite it, planting a data key of their own or swapping users' records. "
        f"In the connection string, set {fix}, and have the server's certificate trusted (the "
        f"system store, or a .crt file in {target.trust.folder})"
    )


def transport_summary(target: ServerTarget) -> str:
    """Why ``target``'s transport is safe, for ``check``'s ``ok`` line (call when there is no warning)."""
    if target.ssl_mode in VERIFIED_SSL_MODES:
        return f"verified TLS (SSL mode {target.ssl_mode}) to {_where(target.hosts)}"
    return f"{_where(target.hosts)} is on this machine"


def log_transport_warning(target: ServerTarget) -> str | None:
    """Log :func:`transport_warning` at WARNING, once: ``serve`` calls this in the parent process
    before any worker starts, so the warning is not repeated per worker. Returns the message."""
    message = transport_warning(target)
    if message is not None:
        # No arguments: the text is logged as is (a '%' in an IPv6 zone cannot upset formatting).
        log.warning(message)
    return message


# -- errors and retries -------------------------------------------------------------------------------------


class Failure(enum.Enum):
    """What a driver error means for the caller."""

    TRANSIENT = "transient"
    """Try again shortly: a dropped connection, a restart, a deadlock, a serialization failure."""
    UNAVAILABLE = "unavailable"
    """The database cannot serve now, and retrying at once would not help (a timeout)."""
    CONFIGURATION = "configuration"
    """The settings are wrong: bad credentials, no such database, no permission."""
    FATAL = "fatal"
    """The database answered, but not as expected: a missing table, a constraint we did not expect."""


Classifier = Callable[[BaseException], Failure | None]
"""Maps an exception to its :class:`Failure`, or None for "not a database error, let it propagate"."""


_MISSING_DATABASE = (
    re.compile(r'database "(?P<name>[^"]+)" does not exist', re.IGNORECASE),  # PostgreSQL (3D000)
    re.compile(r"unknown database '(?P<name>[^']+)'", re.IGNORECASE),  # MySQL and MariaDB (1049)
    re.compile(r'cannot open database "(?P<name>[^"]+)"', re.IGNORECASE),  # SQL Server (4060)
)


def _says_database_missing(message: str, database: str) -> bool:
    """Whether a driver's refusal says that the connection string's database does not exist."""
    return any(
        (found := pattern.search(message)) is not None and found["name"].lower() == database.lower()
        for pattern in _MISSING_DATABASE
    )


def missing_database_advice(target: ServerTarget) -> str:
    """What to do about a database that does not exist, in the server's own SQL: keyconnector never
    creates a database (that takes the server's admin, and a typo would become a new empty one)."""
    name, user = target.database, target.user or "<the connection string's user>"
    if target.provider == "postgresql":
        create = f'CREATE DATABASE "{name}" OWNER "{user}";'
    elif target.provider == "mysql":
        create = (
            f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4; "
            f"GRANT ALL PRIVILEGES ON `{name}`.* TO '{user}'@'%';"
        )
    else:
        create = (
            f"CREATE DATABASE [{name}]; then in it: CREATE USER [{user}] FOR LOGIN [{user}]; "
            f"ALTER ROLE db_owner ADD MEMBER [{user}];"
        )
    hosts = ",".join(f"{host}:{port}" for host, port in target.hosts)
    return (
        f"the database '{name}' does not exist on {target.provider} {hosts}. Either create it as the "
        f"server's admin ({create}), then start again; or, if it has another name, fix the database name in "
        f"{setting_name(target.setting)}"
    )


def translate(exc: BaseException, failure: Failure, target: ServerTarget, action: str) -> KeyConnectorError:
    """The operator-facing exception for a classified driver error; the message is scrubbed."""
    detail = target.scrub(f"{type(exc).__name__}: {exc}".strip().rstrip(":"))
    where = target.description
    if failure is Failure.CONFIGURATION and _says_database_missing(str(exc), target.database):
        return ConfigurationError(target.setting, missing_database_advice(target))
    if failure is Failure.CONFIGURATION:
        return ConfigurationError(target.setting, f"{where} refused us while {action}: {detail}")
    if failure is Failure.FATAL:
        return StorageError(f"{where} while {action}: {detail}")
    return UnavailableError("database", f"{where} while {action}: {detail}", retry_after=RETRY_AFTER_SECONDS)


async def with_retries(
    operation: Callable[[int], Awaitable[T]],
    classify: Classifier,
    target: ServerTarget,
    action: str,
    *,
    on_transient: Callable[[BaseException], None] | None = None,
    attempts: int = RETRY_ATTEMPTS,
) -> T:
    """Run ``operation(attempt)`` (attempt counts from 1), retrying transient failures.

    The attempt number lets a write tell "my earlier try may have committed before the connection
    dropped" from a first try, so that a retried write is idempotent (see ``create_key``).
    ``on_transient`` runs after each transient failure (to drop a pool's stale connections).
    """
    started = time.monotonic()
    delay = RETRY_FIRST_DELAY
    attempt = 1
    while True:
        try:
            return await operation(attempt)
        except KeyConnectorError:
            raise
        except Exception as exc:
            failure = classify(exc)
            if failure is None:
                raise
            if failure is Failure.TRANSIENT and on_transient is not None:
                on_transient(exc)
            elapsed = time.monotonic() - started
            if (
                failure is not Failure.TRANSIENT
                or attempt >= attempts
                or elapsed + delay > RETRY_BUDGET_SECONDS
            ):
                raise translate(exc, failure, target, action) from None
            log.info(
                "%s while %s (try %d of %d), retrying: %s",
                target.description,
                action,
                attempt,
                attempts,
                target.scrub(str(exc) or type(exc).__name__),
            )
        # Full jitter: many workers hit by the same restart do not come back in lockstep.
        await asyncio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 - not cryptographic
        delay *= RETRY_FACTOR
        attempt += 1


# -- migrations and inspection (SQLAlchemy, synchronous) ------------------------------------------------------  # noqa: E501


@dataclass(frozen=True)
class ServerSchema:
    """``migrate`` and ``inspect`` for a server database, written once over the three parts a backend
    has of its own: how it reads its connection string, the synchronous SQLAlchemy engine Alembic
    uses, and how it classifies its driver's errors.

    A server that cannot be reached raises ``UnavailableError`` (start-up retries); bad credentials
    or an unknown database raise ``ConfigurationError`` naming the setting. A foreign database is
    taken only with ``database.createSchema`` (:mod:`.migrate` checks, under the migration lock)."""

    parse_target: Callable[[DatabaseSettings, str, Trust | None], ServerTarget]
    migration_engine: Callable[[ServerTarget], object]
    classify: Classifier

    def migrate(self, settings: DatabaseSettings, prefix: str, trust: Trust | None = None) -> None:
        """Create upstream's schema on an empty database, or adopt upstream's in place."""
        from keyconnector.storage.sql.migrate import upgrade

        def work(engine: Engine) -> None:
            upgrade(engine, create_schema=settings.create_schema, setting=f"{prefix}.createSchema")

        self._with_engine(settings, prefix, trust, "migrating the schema", work)

    def inspect(self, settings: DatabaseSettings, prefix: str, trust: Trust | None = None) -> DatabaseState:
        """What the database holds, read only: never creates anything."""
        from keyconnector.storage.sql.migrate import describe_schema

        def work(engine: Engine) -> tuple[str, bool]:
            with engine.connect() as connection:
                return describe_schema(
                    connection, create_schema=settings.create_schema, setting=f"{prefix}.createSchema"
                )

        target, (description, has_schema) = self._with_engine(
            settings, prefix, trust, "inspecting the schema", work
        )
        return DatabaseState(f"{target.description}: {description}", has_schema)

    def _with_engine(
        self,
        settings: DatabaseSettings,
        prefix: str,
        trust: Trust | None,
        action: str,
        work: Callable[[Engine], T],
    ) -> tuple[ServerTarget, T]:
        """``work`` over a short-lived engine, the driver's errors translated for people."""
        from sqlalchemy import Engine
        from sqlalchemy.exc import DBAPIError

        target = self.parse_target(settings, prefix, trust)
        engine = self.migration_engine(target)
        assert isinstance(engine, Engine)
        try:
            return target, work(engine)
        except DBAPIError as exc:
            original: BaseException = exc.orig if exc.orig is not None else exc
            failure = self.classify(original) or Failure.FATAL
            raise translate(original, failure, target, action) from None
        finally:
            engine.dispose()


def log_pool(target: ServerTarget, pool_size_setting: int) -> None:
    source = (
        "the connection string's Maximum Pool Size"
        if target.max_pool_size != pool_size_setting
        else ("database.poolSize")
    )
    log.info(
        "%s: up to %d connections per worker process (from %s)",
        target.description,
        target.max_pool_size,
        source,
    )
