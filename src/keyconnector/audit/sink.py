"""What every audit sink shares: entries held until the audit key is known, the adoption of the
unkeyed entries a sink already holds, and the head a checkpoint reports.

Why hold entries
    The audit key comes from the key ring, which loads with the data key, possibly late (the key
    provider may be down at start). An entry written unkeyed could be forged by anyone, and one
    dropped would be a hole; so entries wait, in order, in memory (up to ``HOLD`` per sink, then they
    count as failures as any unrecorded entry does) and are written once the key arrives.
    ``can_record`` says False meanwhile, which only matters to ``failClosed``, and no user key can be
    served without the data key anyway.

Why adopt
    A trail written before entries were keyed (format 1, hash-chained) must stay verifiable, but an
    unkeyed entry is exactly what someone without the key can write. So when a sink is keyed for the
    first time (it holds no keyed entry yet), the first entry of its chain is an ``adopted`` record,
    MACed like any other, naming the head (chain, last seq, last hash) of every unkeyed chain found.
    ``audit verify`` accepts unkeyed entries up to those heads and no other. Several workers starting
    at once may each write one (with the same heads): the verifier takes all of them. The window:
    entries from before the adoption are only as trustworthy as a hash chain, that is, an edit of
    them made before the first keyed start (or an unkeyed entry added before it) is adopted with them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from keyconnector.audit.chain import ADOPTED, GENESIS, Chain, Mac, utc_now

log = logging.getLogger("keyconnector.audit")

HOLD = 10_000
"""Entries a sink keeps in memory while it waits for the audit key."""
RETRY_SECONDS = 5.0
_LOG_EVERY = 10.0


@dataclass
class Survey:
    """What a sink holds from before it was keyed."""

    keyed: bool
    """It already holds a keyed entry: it was adopted (or started keyed) before, nothing to adopt."""
    heads: list[tuple[str, int, str]] = field(default_factory=list)
    """(chain, seq, hash) of the newest entry of each unkeyed chain, in the order found."""
    entries: int = 0
    """Unkeyed entries found."""


def adoption_fields(survey: Survey, now: str) -> dict[str, Any]:
    return {
        "time": now,
        "outcome": ADOPTED,
        "status": 0,
        "adopted": {
            "chains": [{"chain": chain, "seq": seq, "hash": digest} for chain, seq, digest in survey.heads],
            "unkeyedChains": len(survey.heads),
            "unkeyedEntries": survey.entries,
        },
    }


class KeyedSink:
    """The base of the file, stdout and database sinks: subclasses write sealed entries (``_write``)
    and read back what they hold (``survey``)."""

    name = "sink"

    def __init__(self, chain_id: str) -> None:
        self.chain_id = chain_id
        self.chain: Chain | None = None
        """None until the audit key is known (entries are held meanwhile)."""
        self.failures = 0
        self.recorded_seq = 0
        """The newest entry known to be recorded (in the file, or inserted): what a checkpoint names."""
        self.recorded_mac = GENESIS
        self.content_seq = 0
        """The newest recorded entry that is not itself a checkpoint: a checkpoint is due when it moves."""
        self.checkpointed_seq = 0
        self._held: list[dict[str, Any]] = []
        self._logged_at = -1e9

    # -- what subclasses provide ---------------------------------------------------------------

    def _write(self, chain: Chain, fields: dict[str, Any]) -> bool:
        raise NotImplementedError

    def _can_record(self) -> bool:
        raise NotImplementedError

    def survey(self) -> Survey | None:
        """What the sink holds (run in a thread); None when it cannot be read back (stdout, a pipe)."""
        return None

    async def start(self) -> None:
        return None

    async def settle(self) -> None:
        """Make what was written so far recorded (the database sink flushes its queue)."""
        return None

    async def aclose(self) -> None:
        return None

    # -- shared --------------------------------------------------------------------------------

    def write(self, fields: dict[str, Any]) -> bool:
        """Write one entry (or hold it until the key is known); False when it will not be recorded."""
        chain = self.chain
        if chain is None:
            if len(self._held) >= HOLD:
                self._failed(f"{len(self._held)} entries wait for the audit key (the data key is not loaded)")
                return False
            self._held.append(fields)
            return True
        return self._write(chain, fields)

    def can_record(self) -> bool:
        return self.chain is not None and self._can_record()

    def head(self) -> tuple[int, str] | None:
        """(seq, MAC) of the newest recorded entry of this process's chain, if any."""
        return (self.recorded_seq, self.recorded_mac) if self.recorded_seq else None

    def _recorded(self, seq: int, mac: str, content_seq: int | None) -> None:
        """Entries up to ``seq`` are recorded; ``content_seq``: the newest of them not a checkpoint."""
        self.recorded_seq, self.recorded_mac = seq, mac
        if content_seq is not None:
            self.content_seq = content_seq

    def _failed(self, problem: str) -> None:
        self.failures += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY:
            self._logged_at = now
            log.error("audit %s sink: %s (%d failures so far)", self.name, problem, self.failures)

    async def activate(self, mac: Mac) -> None:
        """Key the sink: adopt the unkeyed entries it holds (once), then write the held entries in order.

        Retries until it works (a database that is down at start, a full disk): entries stay held
        meanwhile. Everything after the survey runs without yielding, so no new entry slips between
        the adoption record and the held ones.
        """
        while True:
            try:
                survey = await asyncio.to_thread(self.survey)
            except Exception as exc:
                self._failed(f"cannot read it back to adopt its unkeyed entries, will retry: {exc}")
                await asyncio.sleep(RETRY_SECONDS)
                continue
            chain = Chain(self.chain_id, mac)
            if survey is not None and not survey.keyed and survey.heads:
                if not self._write(chain, adoption_fields(survey, utc_now())):
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                log.warning(
                    "audit %s sink: adopted %d unkeyed entries in %d chain(s), written before audit entries "
                    "were keyed; they stay only hash-chained, and `audit verify` accepts no unkeyed entry "
                    "beyond them",
                    self.name,
                    survey.entries,
                    len(survey.heads),
                )
            self.chain = chain
            held, self._held = self._held, []
            for fields in held:
                self._write(chain, fields)
            return

    def drop_held(self) -> None:
        """At shutdown: entries that never got their key are lost; say how many."""
        if self._held:
            log.error(
                "audit %s sink: %d entries recorded before the audit key was known were never written "
                "(the data key never loaded)",
                self.name,
                len(self._held),
            )
            self.failures += len(self._held)
            self._held = []
