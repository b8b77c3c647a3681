"""Where user keys and the wrapped data key live.

One module per backend (``sqlite``, ``jsonfile``, ``postgresql``, ``mysql`` (MySQL and MariaDB),
``sqlserver``), each exposing:

- ``def migrate(settings: DatabaseSettings, prefix: str, trust: Trust | None) -> None``: bring the
  schema up to date, synchronously, once per start-up and before any worker serves. It creates a
  new database the way upstream would (migration history row included) and uses an existing
  upstream one in place. It must be safe when two processes run it at once on the same empty database.
- ``async def open(settings: DatabaseSettings, prefix: str, trust: Trust | None) -> Repository``.
- ``def inspect(settings: DatabaseSettings, prefix: str, trust: Trust | None) -> DatabaseState``: read-only.

``prefix`` is the settings path the backend's errors should name: ``database`` or
``transferTo.database``. ``trust`` is the deployment's trust store (``caCertificatesDirectory``,
see :mod:`keyconnector.runtime.trust`) for TLS to a database server; file backends ignore it.

The request path is ``get_key``: backends keep it free of ORM layers (see docs/performance.md section 1). The
access time is not written on that path at all: the service batches it into ``record_access``.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import ModuleType
from typing import TYPE_CHECKING, Protocol, runtime_checkable
from uuid import UUID

from keyconnector.errors import ConfigurationError
from keyconnector.runtime.settings import DatabaseSettings

if TYPE_CHECKING:
    from keyconnector.runtime.trust import Trust
    from keyconnector.storage.sql.common import ServerTarget

BACKENDS: dict[str, str] = {
    "sqlite": "keyconnector.storage.backends.sqlite",
    "json": "keyconnector.storage.backends.jsonfile",
    "postgresql": "keyconnector.storage.backends.postgresql",
    "mysql": "keyconnector.storage.backends.mysql",
    "sqlserver": "keyconnector.storage.backends.sqlserver",
}

SERVER_PROVIDERS = ("postgresql", "mysql", "sqlserver")
"""The providers reached over a connection (:mod:`.sqlcommon`); the others are files on this machine."""

REMOVED: dict[str, str] = {
    "mongo": (
        "MongoDB support was removed from Key Connector upstream and is not offered here. To leave it: "
        "mongodump upstream's database, set database__provider to the new database (sqlite, postgresql, "
        "mysql or sqlserver), then run `keyconnector transfer --from-mongo-dump <dump folder>` "
        "(docs/takeover.md, 'Leaving MongoDB')"
    ),
}


@dataclass(frozen=True, slots=True)
class UserKeyRecord:
    """One row of ``UserKeys``. Times are naive UTC, as upstream stores them."""

    user_id: UUID
    key: str | None
    creation_date: datetime
    revision_date: datetime | None
    last_access_date: datetime | None


@dataclass(frozen=True, slots=True)
class RecordUpdate:
    """Compare-and-swap of one user's record: write ``new`` only if the row still holds ``expected``."""

    user_id: UUID
    expected: str
    new: str


@dataclass(frozen=True, slots=True)
class StoredKeyRing:
    """Our own single-row table ``keyconnector_key_ring``: the data-key versions and their wraps
    (see ``keyconnector.core.keyring``), as a JSON document with a revision for compare-and-swap."""

    revision: int
    document: str


@dataclass(frozen=True, slots=True)
class DatabaseState:
    """What ``inspect`` found, without changing anything: a line for people, and whether there is data."""

    description: str
    has_schema: bool


@runtime_checkable
class Repository(Protocol):
    @property
    def description(self) -> str:
        """What this is, for logs and `keyconnector check` (no password, ever)."""
        ...

    async def get_key(self, user_id: UUID) -> str | None:
        """The stored record for the user, or None when there is no row or its key is NULL."""
        ...

    async def create_key(self, user_id: UUID, record: str, now: datetime) -> bool:
        """Insert the record with ``CreationDate = now``; False (and nothing written) when the user
        already has a key. Atomic: of concurrent calls for one user, exactly one returns True. A row whose
        key is NULL counts as absent and is filled in."""
        ...

    async def put_key(self, user_id: UUID, record: str, now: datetime) -> bool:
        """Upsert: create with ``CreationDate = now``, or replace the key and set ``RevisionDate = now``.
        Returns True when it created the row."""
        ...

    async def record_access(self, accesses: Mapping[UUID, datetime]) -> None:
        """Set ``LastAccessDate`` for many users at once (the service batches reads)."""
        ...

    async def get_wrapped_data_key(self) -> str | None:
        """``SymmetricKey`` of the first row of ``ApplicationDatas``, or None."""
        ...

    async def store_wrapped_data_key(self, wrapped: str) -> str:
        """Store ``wrapped`` as the data key unless one is already stored, atomically across processes,
        and return the one that is stored now (ours or the winner's)."""
        ...

    def iter_records(self, batch_size: int = 1000) -> AsyncIterator[list[UserKeyRecord]]:
        """Every row of ``UserKeys`` in a stable order, in batches."""
        ...

    # -- operations (transfer, rotation, backup): not on the request path ---------------------------

    async def count_records(self) -> int:
        """How many rows ``UserKeys`` has (for progress bars and statistics)."""
        ...

    async def upsert_records(self, records: Sequence[UserKeyRecord]) -> None:
        """Insert or wholly replace these rows (key and all three dates, exactly as given), in one
        transaction: a crash leaves all of them or none. Copies (transfer, restore) are re-runnable
        because of it. One user twice in a batch: the last wins."""
        ...

    async def replace_records(self, updates: Sequence[RecordUpdate]) -> int:
        """For each update, set ``Key = new`` where the row still holds ``expected``; the dates are left
        alone (re-encrypting is not a revision). One transaction. Returns how many rows changed: a row
        a client replaced meanwhile keeps the client's key, and the caller sees it was skipped. A row
        already holding ``new`` counts as changed (so a retried batch reports the same number); name
        each user at most once per call."""
        ...

    async def get_key_ring(self) -> StoredKeyRing | None:
        """The key ring document, or None when none was ever stored (a deployment that never rotated)."""
        ...

    async def put_key_ring(self, document: str, expected_revision: int) -> bool:
        """Store ``document`` with revision ``expected_revision + 1`` if the stored revision is still
        ``expected_revision`` (0: nothing stored yet). Atomic across processes and hosts; False when
        another process changed the ring first (the caller reloads and decides again)."""
        ...

    async def set_wrapped_data_key(self, wrapped: str) -> None:
        """Replace ``SymmetricKey`` of the first ``ApplicationDatas`` row (insert it if there is none).

        Only for what upstream must read afterwards: retiring an old key pair (the row then holds the
        new pair's wrap of data key version 1, so upstream pointed at the new pair reads it), restore,
        and ``downgrade-records`` (the re-made version 1 that upstream will use)."""
        ...

    async def ping(self) -> None:
        """A real round trip to the database; raises ``UnavailableError`` when it is down."""
        ...

    async def aclose(self) -> None: ...


def backend_module(settings: DatabaseSettings, prefix: str = "database") -> ModuleType:
    """The module implementing ``database.provider``, or a ConfigurationError naming the setting."""
    provider = settings.provider
    if provider in REMOVED:
        raise ConfigurationError(f"{prefix}.provider", REMOVED[provider])
    module_name = BACKENDS.get(provider)
    if module_name is None:
        raise ConfigurationError(
            f"{prefix}.provider",
            f"unknown database provider '{provider}'; choose one of: {', '.join(sorted(BACKENDS))}",
        )
    return importlib.import_module(module_name)


def inspect(
    settings: DatabaseSettings, prefix: str = "database", *, trust: Trust | None = None
) -> DatabaseState:
    """Describe the database read-only (``keyconnector check``): never creates a file or a table.

    ``trust`` (here and below) is the deployment's :class:`~keyconnector.runtime.trust.Trust`: a database
    section does not carry ``caCertificatesDirectory``, so whoever holds the whole settings passes
    it in; None means the default folder's (tools and tests without settings)."""
    state: DatabaseState = backend_module(settings, prefix).inspect(settings, prefix, trust)
    return state


def migrate(settings: DatabaseSettings, prefix: str = "database", *, trust: Trust | None = None) -> None:
    backend_module(settings, prefix).migrate(settings, prefix, trust)


async def open_repository(
    settings: DatabaseSettings, prefix: str = "database", *, trust: Trust | None = None
) -> Repository:
    repository: Repository = await backend_module(settings, prefix).open(settings, prefix, trust)
    return repository


def server_target(
    settings: DatabaseSettings, prefix: str = "database", *, trust: Trust | None = None
) -> ServerTarget | None:
    """The parsed connection string of a server database, or None for a file (SQLite, JSON).

    Parsing needs no driver and no connection, so ``check`` and ``serve`` can judge the transport
    (:func:`~keyconnector.storage.sql.common.transport_warning`) before anything is contacted. A
    connection string that does not parse raises the same ``ConfigurationError`` the backend would.
    """
    if settings.provider not in SERVER_PROVIDERS:
        return None
    target: ServerTarget = backend_module(settings, prefix).parse_target(settings, prefix, trust)
    return target


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
