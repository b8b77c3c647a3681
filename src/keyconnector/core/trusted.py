"""The data keys this process trusts: loaded once through the authenticated key ring, then cached.

Unwrapping a data key costs a call to the key provider (an HSM, a KMS), so it happens once per
process, not per request; the keys are loaded again only when the stored key ring changes (a
data-key rotation started, moved on or ended). Everything that decides *which* keys are trusted
lives here, apart from the user-key operations that use them (``keyconnector.core.service``):

- a ring that does not authenticate is refused, and the keys trusted before keep serving
  (``ring_problem`` for /health/ready, ``ring_refusals`` for /metrics);
- a new current version that cannot be loaded blocks sealing (``sealing``), because records sealed
  with the old version could be lost when the rotation retires it;
- whoever keys itself from the ring (the audit trail) hears of each trusted ring (``on_trusted``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from uuid import UUID

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

# The service's logger, as before the split: operators filter on it.
log = logging.getLogger("keyconnector.service")


def _named_current(document: str) -> int | None:
    """The current version a stored ring names (unauthenticated: only to decide whether to block writes)."""
    try:
        return int(json.loads(document)["current"])
    except (ValueError, KeyError, TypeError):
        return None


class TrustedDataKeys:
    """The data keys of the last key ring that authenticated, and the bookkeeping of refused ones."""

    def __init__(
        self,
        repository: Repository,
        provider: KeyProvider,
        *,
        retry_interval: float = 5.0,
        refresh_interval: float = 10.0,
        write_legacy_format: bool = False,
        ring_anchor: str | None = None,
    ) -> None:
        self.repository = repository
        self.provider = provider
        self.loaded: DataKeys | None = None
        """The trusted keys, None until they first load. Read directly on the request path."""
        self.ring_anchor = ""
        """The authentication key's fingerprint of the ring this process trusts (for logs and health)."""
        self.ring_problem: str | None = None
        """Why the stored key ring was last refused, while it still is: shown by /health/ready."""
        self.ring_refusals = 0
        """How many times a stored ring was refused (mirrored into /metrics)."""
        self.retry_interval = retry_interval
        self.refresh_interval = refresh_interval
        self._pinned_anchor = ring_anchor
        self._auth_key: bytes | None = None
        self._on_trusted: list[Callable[[KeyRing], None]] = []
        self._write_legacy_format = write_legacy_format
        self._warned_legacy_version: int | None = None
        self._ring_revision = -1
        self._ring_seen: str | None = None
        """``datakeys.stored_digest`` of the row last trusted or refused: an unchanged row is not
        unwrapped and authenticated again at every refresh."""
        self._last_refresh = 0.0
        self._refresh_lock = asyncio.Lock()
        self._sealing_blocked: str | None = None
        self._last_attempt = 0.0
        self._last_error: str | None = None
        self._bootstrap_lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self.loaded is not None

    def status(self) -> str:
        if self.loaded is not None:
            versions = ", ".join(str(v) for v in sorted(self.loaded.keys))
            return (
                f"data key loaded (version {self.loaded.current} seals; can open {versions}), "
                f"wrapped by {self.provider.description}"
            )
        return f"data key not loaded: {self._last_error or 'not tried yet'}"

    def on_trusted(self, listener: Callable[[KeyRing], None]) -> None:
        """Call ``listener`` with every ring this process trusts (the first at start, then after each
        change): other parts key themselves from it (``KeyRing.derive``), such as the audit trail."""
        self._on_trusted.append(listener)

    # -- loading --------------------------------------------------------------------------------

    async def load(self, *, reload: bool = False) -> DataKeys:
        async with self._bootstrap_lock:
            if self.loaded is not None and not reload:
                return self.loaded
            self._last_attempt = time.monotonic()
            trust = RingTrust(self._auth_key, max(self._ring_revision, 0), self._pinned_anchor)
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
                if self.loaded is None:
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
            if self.loaded is not None and keys.current != self.loaded.current:
                log.info("data key version %d now seals new records", keys.current)
            if self._auth_key is None:
                log.info("key ring revision %d authenticated (anchor %s)", ring.revision, ring.anchor)
            self._auth_key, self.ring_anchor = ring.auth_key, ring.anchor
            for listener in self._on_trusted:
                listener(ring)
            keys = keys.with_legacy_format(self._write_legacy_format)
            self._warn_about_legacy_format(keys.current)
            self.loaded, self._ring_revision, self._ring_seen = keys, ring.revision, ring.digest
            self._last_refresh = time.monotonic()
            self._last_error = None
            return keys

    def _ring_refused(self, problem: str) -> None:
        """Keep serving with what was trusted before; say loudly, once per distinct problem, why not more."""
        self.ring_refusals += 1
        if problem != self.ring_problem:
            log.error(
                "REFUSED the stored key ring: %s. %s",
                problem,
                "Records still open with the data keys trusted before, and new records are sealed with "
                "the last trusted current version"
                if self.loaded is not None
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

    async def refresh(self) -> None:
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
                await self.load(reload=True)
            except RingRefused:
                self._ring_seen = seen  # refused once is enough until the row changes again
                raise  # the last trusted keys keep serving, and sealing (see _ring_refused)
            except KeyConnectorError as exc:
                keys = self.loaded
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

    # -- use ------------------------------------------------------------------------------------

    async def data_keys(self) -> DataKeys:
        """The trusted keys, loading them if they are not yet (at most once per retry interval)."""
        key = self.loaded
        if key is not None:
            return key
        if time.monotonic() - self._last_attempt < self.retry_interval and self._last_error:
            raise UnavailableError(
                "the data key", self._last_error, retry_after=int(self.retry_interval) or 1
            )
        try:
            return await self.load()
        except IntegrityFailure as exc:
            raise UnavailableError("the data key", str(exc), retry_after=30) from None

    async def open(self, keys: DataKeys, record: str, user_id: UUID) -> bytes:
        """Open ``record`` with ``keys``, looking at the ring again when they are too old for it."""
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
                await self.refresh()
            assert self.loaded is not None
            return self.loaded.open(record, user_id)

    def sealing(self, keys: DataKeys) -> DataKeys:
        """``keys``, unless a new current version is named but could not be loaded (see ``refresh``)."""
        if self._sealing_blocked is not None:
            raise UnavailableError("the data key", self._sealing_blocked, retry_after=5)
        return keys

    # -- upkeep ---------------------------------------------------------------------------------

    async def upkeep(self) -> None:
        """One round of background care, whatever is due: retry loading keys that are not loaded
        yet, or look for a changed ring. A ``KeyConnectorError`` is logged and tried again next
        round: the caller's loop must outlive a key-provider or database outage."""
        if self.loaded is None and time.monotonic() - self._last_attempt >= self.retry_interval:
            try:
                await self.load()
                log.info("the data key is loaded; serving user keys")
            except KeyConnectorError as exc:
                log.warning("the data key is still not available: %s", exc)
        elif self.loaded is not None and time.monotonic() - self._last_refresh >= self.refresh_interval:
            try:
                await self.refresh()
            except KeyConnectorError as exc:
                log.warning("could not check the key ring for changes: %s", exc)
