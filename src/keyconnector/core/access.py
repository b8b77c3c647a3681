"""Last-access times, batched: reading a key never writes to the database.

Upstream wrote ``LastAccessDate`` on every read, so every login failed whenever that write failed.
Here a read only notes the time in memory; the times are written in one batch every few seconds
(``lastAccessFlushSeconds``); a failed batch is logged, counted, kept and retried with the next.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from uuid import UUID

from keyconnector.storage.base import UserKeyStore

log = logging.getLogger("keyconnector.service")


class AccessTimes:
    """The reads not yet written, and how many batches the database refused."""

    def __init__(self, repository: UserKeyStore) -> None:
        self._repository = repository
        # user id as an int -> time.time() of the last read. Plain ints and floats, not UUID and
        # datetime objects: up to a flush interval of logins sits here, and the garbage collector
        # would otherwise walk all of it in every full collection.
        self.pending: dict[int, float] = {}
        self.failures = 0
        """Batches the database did not take (mirrored into /metrics)."""

    def note(self, user_id: UUID) -> None:
        """A read happened now: microseconds, no I/O (this runs on every login)."""
        self.pending[user_id.int] = time.time()

    async def flush(self) -> None:
        """Write every noted time in one batch; on failure keep them for the next round."""
        if not self.pending:
            return
        batch, self.pending = self.pending, {}
        accesses = {
            UUID(int=user): datetime.fromtimestamp(when, UTC).replace(tzinfo=None)
            for user, when in batch.items()
        }
        try:
            await self._repository.record_access(accesses)
        except Exception as exc:
            # A newer access noted meanwhile wins over the failed one.
            self.failures += 1
            for user, when in batch.items():
                self.pending.setdefault(user, when)
            log.warning("could not record %d access times, will retry: %s", len(batch), exc)
