"""The key service: what the HTTP layer asks for, independent of HTTP.

It owns the unwrapped data key (unwrapped once per process, then cached) and the access-time
batch. Reading a key never writes to the database: upstream's read-then-write made every login
fail whenever the ``LastAccessDate`` write failed. Here the times are collected in memory and
written in one batch every few seconds; a failed batch is logged, counted, kept and retried.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from datetime import UTC, datetime
from uuid import UUID

from keyconnector.crypto import DataKey, generate_data_key
from keyconnector.errors import IntegrityError, KeyConnectorError, UnavailableError
from keyconnector.keys import KeyProvider
from keyconnector.storage import Repository

log = logging.getLogger("keyconnector.service")


def utcnow() -> datetime:
    """Naive UTC, as upstream stores times."""
    return datetime.now(UTC).replace(tzinfo=None)


async def bootstrap_data_key(repository: Repository, provider: KeyProvider) -> DataKey:
    """Return the data key, creating it if the database has none.

    Race-free across processes and hosts: every instance proposes a key, the repository keeps the
    first one stored, and an instance whose proposal lost unwraps the winner's. So two instances
    starting together on an empty database end up with the same data key.
    """
    wrapped = await repository.get_wrapped_data_key()
    if wrapped is None:
        candidate = generate_data_key()
        proposal = base64.b64encode(await provider.wrap(candidate)).decode("ascii")
        wrapped = await repository.store_wrapped_data_key(proposal)
        if wrapped == proposal:
            log.info("created a new data key, wrapped by %s", provider.description)
            return DataKey(candidate)
    try:
        blob = base64.b64decode(wrapped, validate=True)
    except (binascii.Error, ValueError):
        raise IntegrityError(
            "the stored data key (ApplicationDatas.SymmetricKey) is not valid base64"
        ) from None
    return DataKey(await provider.unwrap(blob))


class KeyService:
    """Seal, store, load and open user keys."""

    def __init__(
        self,
        repository: Repository,
        provider: KeyProvider,
        *,
        flush_interval: float = 10.0,
        retry_interval: float = 5.0,
    ) -> None:
        self.repository = repository
        self.provider = provider
        self._flush_interval = flush_interval
        self._retry_interval = retry_interval
        self._data_key: DataKey | None = None
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
            return f"data key loaded, wrapped by {self.provider.description}"
        return f"data key not loaded: {self._last_error or 'not tried yet'}"

    async def _load_data_key(self) -> DataKey:
        async with self._bootstrap_lock:
            if self._data_key is not None:
                return self._data_key
            self._last_attempt = time.monotonic()
            try:
                self._data_key = await bootstrap_data_key(self.repository, self.provider)
            except KeyConnectorError as exc:
                self._last_error = str(exc)
                raise
            self._last_error = None
            return self._data_key

    async def data_key(self) -> DataKey:
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
        """The user's key, or None. Records the access time for the next batch."""
        data_key = self._data_key or await self.data_key()
        record = await self.repository.get_key(user_id)
        if record is None:
            return None
        plaintext = data_key.open(record)
        self._pending[user_id.int] = time.time()
        return plaintext

    async def create(self, user_id: UUID, key: bytes) -> bool:
        """Store a new key; False when the user already has one."""
        data_key = self._data_key or await self.data_key()
        return await self.repository.create_key(user_id, data_key.seal_legacy(key), utcnow())

    async def put(self, user_id: UUID, key: bytes) -> bool:
        """Create or replace; True when created."""
        data_key = self._data_key or await self.data_key()
        return await self.repository.put_key(user_id, data_key.seal_legacy(key), utcnow())

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
        while True:
            await asyncio.sleep(self._flush_interval)
            await self.flush_access()
            if self._data_key is None and time.monotonic() - self._last_attempt >= self._retry_interval:
                try:
                    await self._load_data_key()
                    log.info("the data key is loaded; serving user keys")
                except KeyConnectorError as exc:
                    log.warning("the data key is still not available: %s", exc)
