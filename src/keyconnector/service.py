"""The key service: what the HTTP layer asks for, independent of HTTP.

It owns the unwrapped data keys (unwrapped once per process, then cached; reloaded when the key
ring changes, e.g. during a data-key rotation) and the access-time batch. Reading a key never
writes to the database: upstream's read-then-write made every login fail whenever the
``LastAccessDate`` write failed. Here the times are collected in memory and
written in one batch every few seconds; a failed batch is logged, counted, kept and retried.

New records are bound to their user (format 2, see ``keyconnector.crypto``) unless
``compat.writeLegacyFormat`` asks for upstream's format. A stored record that does not open for the
user asking (altered, or copied from another user's row) raises ``RecordIntegrityError``: the key is
never returned, and the HTTP layer and the audit trail can tell it from other failures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from uuid import UUID

from keyconnector.crypto import LEGACY_VERSION, KeySet, UnknownVersionError
from keyconnector.datakeys import load_key_set, load_ring
from keyconnector.errors import IntegrityError, KeyConnectorError, UnavailableError
from keyconnector.keys import KeyProvider
from keyconnector.storage import Repository

log = logging.getLogger("keyconnector.service")


class RecordIntegrityError(IntegrityError):
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
    ) -> None:
        self.repository = repository
        self._write_legacy_format = write_legacy_format
        self._warned_legacy_version: int | None = None
        self.provider = provider
        self._flush_interval = flush_interval
        self._retry_interval = retry_interval
        self._ring_refresh_interval = ring_refresh_interval
        self._ring_revision = -1
        self._last_refresh = 0.0
        self._refresh_lock = asyncio.Lock()
        self._sealing_blocked: str | None = None
        self._data_key: KeySet | None = None
        self._last_attempt = 0.0
        self._last_error: str | None = None
        self._bootstrap_lock = asyncio.Lock()
        # user id as an int -> time.time() of the last read. Plain ints and floats, not UUID and
        # datetime objects: up to a flush interval of logins sits here, and the garbage collector
        # would otherwise walk all of it in every full collection.
        self._pending: dict[int, float] = {}
        self._flusher: asyncio.Task[None] | None = None
        self.access_write_failures = 0

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the data key if possible; a failure leaves the service up, answering 503 until it works."""
        try:
            await self._load_data_key()
        except KeyConnectorError as exc:
            log.error("the data key is not available yet: %s", exc)
        self._flusher = asyncio.create_task(self._flush_loop(), name="keyconnector-access-flush")

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.flush_access()

    @property
    def ready(self) -> bool:
        return self._data_key is not None

    def status(self) -> str:
        if self._data_key is not None:
            versions = ", ".join(str(v) for v in sorted(self._data_key.keys))
            return (
                f"data key loaded (version {self._data_key.current} seals; can open {versions}), "
                f"wrapped by {self.provider.description}"
            )
        return f"data key not loaded: {self._last_error or 'not tried yet'}"

    async def _load_data_key(self, *, reload: bool = False) -> KeySet:
        async with self._bootstrap_lock:
            if self._data_key is not None and not reload:
                return self._data_key
            self._last_attempt = time.monotonic()
            try:
                # On an empty database this creates version 1, race-free (datakeys.bootstrap_data_key).
                keys, ring = await load_key_set(self.repository, self.provider)
            except KeyConnectorError as exc:
                self._last_error = str(exc)
                raise
            if self._data_key is not None and keys.current != self._data_key.current:
                log.info("data key version %d now seals new records", keys.current)
            keys = keys.with_legacy_format(self._write_legacy_format)
            self._warn_about_legacy_format(keys.current)
            self._data_key, self._ring_revision = keys, ring.revision
            self._last_refresh = time.monotonic()
            self._last_error = None
            return keys

    def _warn_about_legacy_format(self, current: int) -> None:
        """Once per version: ``writeLegacyFormat`` has no effect once version 1 no longer seals."""
        if not self._write_legacy_format or current == LEGACY_VERSION:
            return
        if self._warned_legacy_version != current:
            self._warned_legacy_version = current
            log.warning(
                "keyConnectorSettings__compat__writeLegacyFormat is set, but data key version %d seals "
                "new records: upstream cannot read records of a rotated data key, so they are written "
                "in format 2 (bound to their user); the setting only applies while version 1 is current",
                current,
            )

    async def refresh_keys(self) -> None:
        """Reload the data keys if the key ring changed (a rotation started, moved on or ended).

        If the ring names a new current version that this process cannot load (the key provider
        is down, say), writes are refused until it can: sealing with the old version now would
        make records that the rotation may already have finished with, and would lose them when
        the old version is retired.
        """
        async with self._refresh_lock:
            self._last_refresh = time.monotonic()
            ring = await load_ring(self.repository)
            if ring.revision == self._ring_revision:
                return
            try:
                await self._load_data_key(reload=True)
            except KeyConnectorError as exc:
                keys = self._data_key
                if keys is not None and ring.current != keys.current:
                    self._sealing_blocked = (
                        f"data key version {ring.current} seals new records and cannot be loaded: {exc}"
                    )
                raise
            self._sealing_blocked = None

    async def _open(self, keys: KeySet, record: str, user_id: UUID) -> bytes:
        try:
            return keys.open(record, user_id)
        except UnknownVersionError:
            # Sealed by a data-key version made after this process loaded its keys: reload, once per
            # burst of such records (the lock makes concurrent requests share one reload).
            before = self._last_refresh
            async with self._refresh_lock:
                pass
            if self._last_refresh == before:
                await self.refresh_keys()
            assert self._data_key is not None
            return self._data_key.open(record, user_id)

    def _sealing_keys(self, keys: KeySet) -> KeySet:
        if self._sealing_blocked is not None:
            raise UnavailableError("the data key", self._sealing_blocked, retry_after=5)
        return keys

    async def data_key(self) -> KeySet:
        key = self._data_key
        if key is not None:
            return key
        if time.monotonic() - self._last_attempt < self._retry_interval and self._last_error:
            raise UnavailableError(
                "the data key", self._last_error, retry_after=int(self._retry_interval) or 1
            )
        try:
            return await self._load_data_key()
        except IntegrityError as exc:
            raise UnavailableError("the data key", str(exc), retry_after=30) from None

    # -- user keys ----------------------------------------------------------------------------

    async def get(self, user_id: UUID) -> bytes | None:
        """The user's key, or None. Records the access time for the next batch.

        Raises ``RecordIntegrityError`` when the stored record does not open for this user.
        """
        data_key = self._data_key or await self.data_key()
        record = await self.repository.get_key(user_id)
        if record is None:
            return None
        try:
            plaintext = await self._open(data_key, record, user_id)
        except IntegrityError as exc:
            raise RecordIntegrityError(user_id, str(exc)) from None
        self._pending[user_id.int] = time.time()
        return plaintext

    async def create(self, user_id: UUID, key: bytes) -> bool:
        """Store a new key; False when the user already has one."""
        data_key = self._sealing_keys(self._data_key or await self.data_key())
        return await self.repository.create_key(user_id, data_key.seal(key, user_id), utcnow())

    async def put(self, user_id: UUID, key: bytes) -> bool:
        """Create or replace; True when created."""
        data_key = self._sealing_keys(self._data_key or await self.data_key())
        return await self.repository.put_key(user_id, data_key.seal(key, user_id), utcnow())

    # -- access times -------------------------------------------------------------------------

    async def flush_access(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        accesses = {
            UUID(int=user): datetime.fromtimestamp(when, UTC).replace(tzinfo=None)
            for user, when in batch.items()
        }
        try:
            await self.repository.record_access(accesses)
        except Exception as exc:
            # Keep the times for the next round; a newer access wins over the failed one.
            self.access_write_failures += 1
            for user, when in batch.items():
                self._pending.setdefault(user, when)
            log.warning("could not record %d access times, will retry: %s", len(batch), exc)

    async def _flush_loop(self) -> None:
        """Flush access times and look for key-ring changes, each on its own interval."""
        last_flush = time.monotonic()
        while True:
            await asyncio.sleep(min(self._flush_interval, self._ring_refresh_interval, self._retry_interval))
            if time.monotonic() - last_flush >= self._flush_interval:
                last_flush = time.monotonic()
                await self.flush_access()
            if self._data_key is None and time.monotonic() - self._last_attempt >= self._retry_interval:
                try:
                    await self._load_data_key()
                    log.info("the data key is loaded; serving user keys")
                except KeyConnectorError as exc:
                    log.warning("the data key is still not available: %s", exc)
            elif (
                self._data_key is not None
                and time.monotonic() - self._last_refresh >= self._ring_refresh_interval
            ):
                try:
                    await self.refresh_keys()
                except KeyConnectorError as exc:
                    log.warning("could not check the key ring for changes: %s", exc)
