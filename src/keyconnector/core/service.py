"""The key service: what the HTTP layer asks for, independent of HTTP.

It owns the unwrapped data keys (unwrapped once per process, then cached; reloaded when the key
ring changes, e.g. during a data-key rotation). Reads note their time in an ``AccessTimes`` batch
(``keyconnector.core.access``): reading a key never writes to the database. One background task runs
the periodic work: flushing that batch, retrying the data key while it is unavailable, and looking
for key-ring changes.

New records are bound to their user (format 2, see ``keyconnector.core.envelope``) unless
``compat.writeLegacyFormat`` asks for upstream's format. A stored record that does not open for the
user asking (altered, or copied from another user's row) raises ``RecordIntegrityFailure``: the key is
never returned, and the HTTP layer and the audit trail can tell it from other failures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from uuid import UUID

from keyconnector.core.access import AccessTimes
from keyconnector.core.envelope import (
    LEGACY_VERSION,
    DataKeys,
    LegacyRefusedError,
    UnknownVersionError,
)
from keyconnector.core.keyring import (
    KeyRing,
    RingRefused,
    RingTrust,
    accept_unbound_records,
    load_key_set,
    stored_digest,
)
from keyconnector.errors import IntegrityFailure, KeyConnectorError, UnavailableError
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


def _named_current(document: str) -> int | None:
    """The current version a stored ring names (unauthenticated: only to decide whether to block writes)."""
    try:
        return int(json.loads(document)["current"])
    except (ValueError, KeyError, TypeError):
        return None


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
        self._ring_anchor = ring_anchor
        self._auth_key: bytes | None = None
        self.ring_anchor = ""
        """The authentication key's fingerprint of the ring this process trusts (for logs and health)."""
        self.ring_problem: str | None = None
        """Why the stored key ring was last refused, while it still is: shown by /health/ready."""
        self.ring_refusals = 0
        """How many times a stored ring was refused (mirrored into /metrics)."""
        self._on_trusted: list[Callable[[KeyRing], None]] = []
        self._write_legacy_format = write_legacy_format
        self._warned_legacy_version: int | None = None
        self.provider = provider
        self._flush_interval = flush_interval
        self._retry_interval = retry_interval
        self._ring_refresh_interval = ring_refresh_interval
        self._ring_revision = -1
        self._ring_seen: str | None = None
        """``datakeys.stored_digest`` of the row last trusted or refused: an unchanged row is not
        unwrapped and authenticated again at every refresh."""
        self._last_refresh = 0.0
        self._refresh_lock = asyncio.Lock()
        self._sealing_blocked: str | None = None
        self._data_key: DataKeys | None = None
        self._last_attempt = 0.0
        self._last_error: str | None = None
        self._bootstrap_lock = asyncio.Lock()
        self.access = AccessTimes(repository)
        self._background: asyncio.Task[None] | None = None

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the data key if possible; a failure leaves the service up, answering 503 until it works."""
        try:
            await self._load_data_key()
        except KeyConnectorError as exc:
            log.error("the data key is not available yet: %s", exc)
        self._background = asyncio.create_task(self._periodic(), name="keyconnector-key-service")

    async def aclose(self) -> None:
        if self._background is not None:
            self._background.cancel()
            await asyncio.gather(self._background, return_exceptions=True)
        await self.access.flush()

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

    async def _load_data_key(self, *, reload: bool = False) -> DataKeys:
        async with self._bootstrap_lock:
            if self._data_key is not None and not reload:
                return self._data_key
            self._last_attempt = time.monotonic()
            trust = RingTrust(self._auth_key, max(self._ring_revision, 0), self._ring_anchor)
            try:
                # On an empty database this creates version 1 and its authenticated ring, race-free;
                # an existing deployment's data key is adopted (datakeys.open_ring).
                keys, ring = await load_key_set(
                    self.repository, self.provider, trust, accept_legacy_when_new=self._write_legacy_format
                )
                if self._write_legacy_format and not ring.accept_legacy:
                    ring = await accept_unbound_records(self.repository, self.provider, ring)
                    keys = DataKeys(keys.keys, keys.current, accept_legacy=True)
            except RingRefused as exc:
                self._ring_refused(str(exc))
                if self._data_key is None:
                    self._last_error = str(exc)
                raise
            except KeyConnectorError as exc:
                self._last_error = str(exc)
                raise
            if self.ring_problem is not None:
                log.warning(
                    "the key ring authenticates again (revision %d); the earlier refusal is over",
                    ring.revision,
                )
                self.ring_problem = None
            if self._data_key is not None and keys.current != self._data_key.current:
                log.info("data key version %d now seals new records", keys.current)
            if self._auth_key is None:
                log.info("key ring revision %d authenticated (anchor %s)", ring.revision, ring.anchor)
            self._auth_key, self.ring_anchor = ring.auth_key, ring.anchor
            for listener in self._on_trusted:
                listener(ring)
            keys = keys.with_legacy_format(self._write_legacy_format)
            self._warn_about_legacy_format(keys.current)
            self._data_key, self._ring_revision, self._ring_seen = keys, ring.revision, ring.digest
            self._last_refresh = time.monotonic()
            self._last_error = None
            return keys

    def on_trusted(self, listener: Callable[[KeyRing], None]) -> None:
        """Call ``listener`` with every ring this process trusts (the first at start, then after each
        change): other parts key themselves from it (``KeyRing.derive``), such as the audit trail."""
        self._on_trusted.append(listener)

    def _ring_refused(self, problem: str) -> None:
        """Keep serving with what was trusted before; say loudly, once per distinct problem, why not more."""
        self.ring_refusals += 1
        if problem != self.ring_problem:
            log.error(
                "REFUSED the stored key ring: %s. %s",
                problem,
                "Records still open with the data keys trusted before, and new records are sealed with "
                "the last trusted current version"
                if self._data_key is not None
                else "No user key is served until a ring that authenticates is back",
            )
        self.ring_problem = problem

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
            stored = await self.repository.get_key_ring()
            seen = stored_digest(stored)
            if seen == self._ring_seen:
                return  # unchanged since it was last trusted, or last refused
            try:
                await self._load_data_key(reload=True)
            except RingRefused:
                self._ring_seen = seen  # refused once is enough until the row changes again
                raise  # the last trusted keys keep serving, and sealing (see _ring_refused)
            except KeyConnectorError as exc:
                keys = self._data_key
                if (
                    keys is not None
                    and stored is not None
                    and _named_current(stored.document) != keys.current
                ):
                    self._sealing_blocked = (
                        f"the key ring names a new current data key that cannot be loaded: {exc}"
                    )
                raise
            self._sealing_blocked = None

    async def _open(self, keys: DataKeys, record: str, user_id: UUID) -> bytes:
        try:
            return keys.open(record, user_id)
        except (UnknownVersionError, LegacyRefusedError):
            # Sealed by a data-key version made after this process loaded its keys, or in upstream's
            # format after the ring was switched back to accepting it (``downgrade-records``): look at
            # the ring again, once per burst of such records (concurrent requests share one reload).
            before = self._last_refresh
            async with self._refresh_lock:
                pass
            if self._last_refresh == before:
                await self.refresh_keys()
            assert self._data_key is not None
            return self._data_key.open(record, user_id)

    def _sealing_keys(self, keys: DataKeys) -> DataKeys:
        if self._sealing_blocked is not None:
            raise UnavailableError("the data key", self._sealing_blocked, retry_after=5)
        return keys

    async def data_key(self) -> DataKeys:
        key = self._data_key
        if key is not None:
            return key
        if time.monotonic() - self._last_attempt < self._retry_interval and self._last_error:
            raise UnavailableError(
                "the data key", self._last_error, retry_after=int(self._retry_interval) or 1
            )
        try:
            return await self._load_data_key()
        except IntegrityFailure as exc:
            raise UnavailableError("the data key", str(exc), retry_after=30) from None

    # -- user keys ----------------------------------------------------------------------------

    async def get(self, user_id: UUID) -> bytes | None:
        """The user's key, or None. Records the access time for the next batch.

        Raises ``RecordIntegrityFailure`` when the stored record does not open for this user.
        """
        data_key = self._data_key or await self.data_key()
        record = await self.repository.get_key(user_id)
        if record is None:
            return None
        try:
            plaintext = await self._open(data_key, record, user_id)
        except IntegrityFailure as exc:
            raise RecordIntegrityFailure(user_id, str(exc)) from None
        self.access.note(user_id)
        return plaintext

    async def create(self, user_id: UUID, key: bytes) -> bool:
        """Store a new key; False when the user already has one."""
        data_key = self._sealing_keys(self._data_key or await self.data_key())
        return await self.repository.create_key(user_id, data_key.seal(key, user_id), utcnow())

    async def put(self, user_id: UUID, key: bytes) -> bool:
        """Create or replace; True when created."""
        data_key = self._sealing_keys(self._data_key or await self.data_key())
        return await self.repository.put_key(user_id, data_key.seal(key, user_id), utcnow())

    # -- the periodic work --------------------------------------------------------------------

    @property
    def access_write_failures(self) -> int:
        return self.access.failures

    async def flush_access(self) -> None:
        await self.access.flush()

    async def _periodic(self) -> None:
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
