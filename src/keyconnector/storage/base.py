"""What the storage offers: the repository protocols and the records they exchange.

This module imports nothing of keyconnector but ``errors``: the core (key service, key ring, access
times) reaches the storage through it alone, never through the registry that reaches the drivers
(``.importlinter``, "core-imports-protocols-only"). The registry of back ends, one typed ``Backend``
entry per database (migrate, open, inspect, connection string, ...), is
:mod:`keyconnector.storage.registry`.

The request path is ``get_key``: backends keep it free of ORM layers (see docs/performance.md section 1). The
access time is not written on that path at all: the service batches it into ``record_access``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable
from uuid import UUID


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


class UserKeyStore(Protocol):
    """The request path: what every login and key upload touches. Only this and :class:`KeyRingStore`
    are timed and counted by the metrics (``telemetry.metrics.InstrumentedRepository``)."""

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

    async def ping(self) -> None:
        """A real round trip to the database; raises ``UnavailableError`` when it is down."""
        ...


class KeyRingStore(Protocol):
    """The data key and the key ring: read at start-up and on each ring refresh, written by rotation,
    restore and the first start."""

    async def get_wrapped_data_key(self) -> str | None:
        """``SymmetricKey`` of the first row of ``ApplicationDatas``, or None."""
        ...

    async def store_wrapped_data_key(self, wrapped: str) -> str:
        """Store ``wrapped`` as the data key unless one is already stored, atomically across processes,
        and return the one that is stored now (ours or the winner's)."""
        ...

    async def set_wrapped_data_key(self, wrapped: str) -> None:
        """Replace ``SymmetricKey`` of the first ``ApplicationDatas`` row (insert it if there is none).

        Only for what upstream must read afterwards: retiring an old key pair (the row then holds the
        new pair's wrap of data key version 1, so upstream pointed at the new pair reads it), restore,
        and ``downgrade-records`` (the re-made version 1 that upstream will use)."""
        ...

    async def get_key_ring(self) -> StoredKeyRing | None:
        """The key ring document, or None when none was ever stored (a deployment that never rotated)."""
        ...

    async def put_key_ring(self, document: str, expected_revision: int) -> bool:
        """Store ``document`` with revision ``expected_revision + 1`` if the stored revision is still
        ``expected_revision`` (0: nothing stored yet). Atomic across processes and hosts; False when
        another process changed the ring first (the caller reloads and decides again)."""
        ...


class RecordStore(Protocol):
    """Every record at once: transfer, rotation, backup, statistics, and the key ring's sample of
    records. Never on the request path, so never timed."""

    def iter_records(self, batch_size: int = 1000) -> AsyncIterator[list[UserKeyRecord]]:
        """Every row of ``UserKeys`` in a stable order, in batches."""
        ...

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


@runtime_checkable
class Repository(UserKeyStore, KeyRingStore, RecordStore, Protocol):
    """The whole contract, which every backend implements; consumers ask for the narrowest part."""

    async def aclose(self) -> None: ...
