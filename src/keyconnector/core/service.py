"""The key service: what the HTTP layer asks for, independent of HTTP.

``KeyService`` does the user-key operations (get, create, put) and composes the two parts they
need, each with one job: the trusted data keys (``keyconnector.core.trusted``: loaded once through
the authenticated key ring, reloaded when it changes) and the access-time batch
(``keyconnector.core.access``: reading a key never writes to the database). It owns the one
background task of a worker's key handling, because it is what starts and stops with the worker:
each round flushes the batch and lets the trusted keys do their upkeep, each on its own interval.

New records are bound to their user (format 2, see ``keyconnector.core.envelope``) unless
``compat.writeLegacyFormat`` asks for upstream's format. A stored record that does not open for the
user asking (altered, or copied from another user's row) raises ``RecordIntegrityFailure``: the key is
never returned, and the HTTP layer and the audit trail can tell it from other failures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from uuid import UUID

from keyconnector.core.access import AccessTimes
from keyconnector.core.keyring import KeyRing
from keyconnector.core.trusted import TrustedDataKeys
from keyconnector.errors import IntegrityFailure, KeyConnectorError
from keyconnector.keypairs.base import KeyProvider
from keyconnector.storage.base import Repository

log = logging.getLogger("keyconnector.service")


class RecordIntegrityFailure(IntegrityFailure):
    """A user's stored record does not open for that user: altered, copied from another user's row,
    or sealed by a data key this deployment does not have. Never carries the record itself."""

    def __init__(self, user_id: UUID, reason: str) -> None:
        self.user_id = user_id
        self.reason = reason
        super().__init__(f"the stored record of user {user_id} failed its integrity check: {reason}")


def utcnow() -> datetime:
    """Naive UTC, as upstream stores times."""
    return datetime.now(UTC).replace(tzinfo=None)


class KeyService:
    """Seal, store, load and open user keys."""

    def __init__(
        self,
        repository: Repository,
        provider: KeyProvider,
        *,
        flush_interval: float = 10.0,
        retry_interval: float = 5.0,
        ring_refresh_interval: float = 10.0,
        write_legacy_format: bool = False,
        ring_anchor: str | None = None,
    ) -> None:
        self.repository = repository
        self.provider = provider
        self.trusted = TrustedDataKeys(
            repository,
            provider,
            retry_interval=retry_interval,
            refresh_interval=ring_refresh_interval,
            write_legacy_format=write_legacy_format,
            ring_anchor=ring_anchor,
        )
        self.access = AccessTimes(repository)
        self._flush_interval = flush_interval
        self._background: asyncio.Task[None] | None = None

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the data key if possible; a failure leaves the service up, answering 503 until it works."""
        try:
            await self.trusted.load()
        except KeyConnectorError as exc:
            log.error("the data key is not available yet: %s", exc)
        self._background = asyncio.create_task(self._periodic(), name="keyconnector-key-service")

    async def aclose(self) -> None:
        if self._background is not None:
            self._background.cancel()
            await asyncio.gather(self._background, return_exceptions=True)
        await self.access.flush()

    # -- what health, metrics and the audit trail read: the trusted keys' own ---------------------

    @property
    def ready(self) -> bool:
        return self.trusted.loaded is not None

    def status(self) -> str:
        return self.trusted.status()

    @property
    def ring_problem(self) -> str | None:
        return self.trusted.ring_problem

    @property
    def data_key_versions(self) -> tuple[int, list[int]] | None:
        """The version that seals new records and every version loaded (ascending), or None before
        the keys first load. Read by ``/health/ready`` from memory, so a probe costs no database
        query; version numbers hold no key material."""
        keys = self.trusted.loaded
        if keys is None:
            return None
        return keys.current, sorted(keys.keys)

    @property
    def ring_refusals(self) -> int:
        return self.trusted.ring_refusals

    def on_trusted(self, listener: Callable[[KeyRing], None]) -> None:
        """See ``TrustedDataKeys.on_trusted``: the audit trail keys itself from each trusted ring."""
        self.trusted.on_trusted(listener)

    # -- user keys ----------------------------------------------------------------------------

    async def get(self, user_id: UUID) -> bytes | None:
        """The user's key, or None. Records the access time for the next batch.

        Raises ``RecordIntegrityFailure`` when the stored record does not open for this user.
        """
        trusted = self.trusted
        data_key = trusted.loaded or await trusted.data_keys()
        record = await self.repository.get_key(user_id)
        if record is None:
            return None
        try:
            plaintext = await trusted.open(data_key, record, user_id)
        except IntegrityFailure as exc:
            raise RecordIntegrityFailure(user_id, str(exc)) from None
        self.access.note(user_id)
        return plaintext

    async def create(self, user_id: UUID, key: bytes) -> bool:
        """Store a new key; False when the user already has one."""
        trusted = self.trusted
        data_key = trusted.sealing(trusted.loaded or await trusted.data_keys())
        return await self.repository.create_key(user_id, data_key.seal(key, user_id), utcnow())

    async def put(self, user_id: UUID, key: bytes) -> bool:
        """Create or replace; True when created."""
        trusted = self.trusted
        data_key = trusted.sealing(trusted.loaded or await trusted.data_keys())
        return await self.repository.put_key(user_id, data_key.seal(key, user_id), utcnow())

    # -- the periodic work --------------------------------------------------------------------

    @property
    def access_write_failures(self) -> int:
        return self.access.failures

    async def flush_access(self) -> None:
        await self.access.flush()

    async def _periodic(self) -> None:
        """Flush access times and let the trusted keys do their upkeep, each on its own interval."""
        trusted = self.trusted
        tick = min(self._flush_interval, trusted.refresh_interval, trusted.retry_interval)
        last_flush = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            if time.monotonic() - last_flush >= self._flush_interval:
                last_flush = time.monotonic()
                await self.flush_access()
            await trusted.upkeep()
