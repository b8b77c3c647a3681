"""The audit trail of every user-key request: who asked, from where, and what they got.

Every read, create, replace and refused attempt becomes one entry (see :meth:`AuditTrail.record`)
with the user id (when the token gave one), UTC time, client address, client name
(``Bitwarden-Client-Name``), method, outcome, HTTP status and request id; never a key or a token.
Entries go to any combination of sinks (``audit.file``, ``audit.stdout``, ``audit.database``), each
chained per worker process with a MAC under the audit key (:mod:`keyconnector.audit.chain`), which
comes from the key ring (``set_key``; entries wait for it, see :mod:`keyconnector.audit.sink`).
Every ``audit.checkpointSeconds`` and at a clean stop, each sink's chain head is sealed as a
checkpoint, written into the other sinks and logged as an anchor token; ``keyconnector audit verify``
checks the MACs and the chains against the checkpoints it can see.

Recording happens on the request path, so it is built to cost microseconds: one dict, one canonical
JSON encoding and one HMAC-SHA256 per sink, then one ``os.write`` (file, stdout) or a list append
(database, flushed in the background).

With ``audit.failClosed`` the routes refuse to serve or store a key when no sink can record the
access; without it an audit failure is logged and counted and never fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
from dataclasses import dataclass
from uuid import UUID

from keyconnector.audit.chain import CHECKPOINT, Checkpoint, Mac, new_chain_id, utc_now
from keyconnector.audit.sink import KeyedSink
from keyconnector.errors import ConfigurationError
from keyconnector.runtime.settings import Settings

log = logging.getLogger("keyconnector.audit")

MAX_CLIENT_NAME = 100
"""A client name is the client's to choose: capped, so an entry stays one small atomic write."""


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One user-key request as the trail records it, whoever saw it (the endpoint, or the rate-limit
    layer that refused it first).

    Plain values rather than a request: the trail is an edge and knows no HTTP. The HTTP layer makes
    the entry from what it learnt about the request (``keyconnector.http.context.audit_entry``), so
    the one place that reads headers and the request context is there, next to what sets them.
    """

    user: UUID | None
    """The user the token named; None when the request was refused before a token was accepted."""
    client: str | None
    """The client's address, resolved through the trusted proxies (``rateLimit.trustedProxies``)."""
    client_name: str | None
    """The ``Bitwarden-Client-Name`` header as sent (capped at ``MAX_CLIENT_NAME`` when recorded)."""
    method: str
    outcome: str
    status: int
    request_id: str | None


class AuditTrail:
    """The sinks of one worker process, and whether a key may be served without them."""

    def __init__(
        self,
        sinks: list[KeyedSink],
        *,
        fail_closed: bool = False,
        chain_id: str = "",
        checkpoint_seconds: float = 60.0,
    ) -> None:
        self.sinks = sinks
        self.fail_closed = fail_closed
        self.chain_id = chain_id
        self.checkpoint_seconds = checkpoint_seconds
        self.host = socket.gethostname()
        self.failures = 0
        """Entries no sink recorded (with sinks configured)."""
        self._key: bytes | None = None
        self._mac: Mac | None = None
        self._started = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def enabled(self) -> bool:
        return bool(self.sinks)

    def can_record(self) -> bool:
        """Whether some sink is known to be working: checked before a key is stored under failClosed."""
        return not self.sinks or any(sink.can_record() for sink in self.sinks)

    def record(self, entry: AuditEntry) -> bool:
        """Write one entry to every sink; True when at least one recorded it (or there is no sink)."""
        if not self.sinks:
            return True
        client_name = entry.client_name
        fields = {
            "time": utc_now(),
            "user": str(entry.user) if entry.user is not None else None,
            "client": entry.client,
            "clientName": client_name[:MAX_CLIENT_NAME] if client_name is not None else None,
            "method": entry.method,
            "outcome": entry.outcome,
            "status": entry.status,
            "requestId": entry.request_id,
        }
        recorded = False
        for sink in self.sinks:
            try:
                if sink.write(fields):
                    recorded = True
            except Exception:
                log.exception("audit %s sink failed", sink.name)
        if not recorded:
            self.failures += 1
        return recorded

    def set_key(self, key: bytes) -> None:
        """The audit key (``KeyRing.derive(KEY_PURPOSE)``), given with every ring the process trusts.

        The first one keys the sinks; the key is the same for the life of a deployment, so a later
        ring brings nothing new, and one that brings another key cannot re-key chains already
        written (their entries would no longer verify): it is refused, loudly.
        """
        if self._key is not None:
            if not hmac.compare_digest(key, self._key):
                log.error(
                    "the key ring now gives another audit key; the audit trail keeps the one it started "
                    "with (restart the service if the key ring was restored from another deployment)"
                )
            return
        self._key, self._mac = key, Mac(key)
        if self._started:
            self._activate()

    def _activate(self) -> None:
        assert self._mac is not None
        for sink in self.sinks:  # each on its own: a database that is down does not hold up the file
            self._tasks.append(asyncio.create_task(sink.activate(self._mac), name=f"audit-{sink.name}-key"))

    async def start(self) -> None:
        for sink in self.sinks:
            await sink.start()
        self._started = True
        if self._mac is not None:
            self._activate()
        if self.sinks:
            self._tasks.append(asyncio.create_task(self._checkpoint_loop(), name="audit-checkpoints"))

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_seconds)
            try:
                for checkpoint in self.checkpoint():
                    log.info(
                        "audit %s chain %s at seq %d: %s",
                        checkpoint.sink,
                        checkpoint.chain,
                        checkpoint.seq,
                        checkpoint.token,
                    )
            except Exception:
                log.exception("audit checkpoint failed")

    def checkpoint(self, *, final: bool = False) -> list[Checkpoint]:
        """Seal the head of every sink that recorded entries since its last checkpoint (every sink
        with entries when ``final``) and write it into each other sink.

        Checkpoint entries do not make a checkpoint due by themselves: otherwise two sinks would
        checkpoint each other forever on an idle service. The last ones are covered at the stop.
        """
        mac = self._mac
        if mac is None:
            return []
        made: list[tuple[KeyedSink, Checkpoint]] = []
        for sink in self.sinks:
            head = sink.head()
            if head is None or sink.chain is None:
                continue
            if not final and sink.content_seq <= sink.checkpointed_seq:
                continue
            seq, entry_mac = head
            checkpoint = Checkpoint.make(mac, sink.name, sink.chain.id, seq, entry_mac, utc_now(), self.host)
            sink.checkpointed_seq = seq
            made.append((sink, checkpoint))
        for source, checkpoint in made:
            fields = {
                "time": checkpoint.time,
                "outcome": CHECKPOINT,
                "status": 0,
                "checkpoint": checkpoint.fields(),
            }
            for sink in self.sinks:
                if sink is not source:
                    sink.write(fields)
        return [checkpoint for _, checkpoint in made]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._mac is not None:
            for sink in self.sinks:
                await sink.settle()
            try:
                self.checkpoint(final=True)
            except Exception:
                log.exception("audit checkpoint failed")
        for sink in self.sinks:
            sink.drop_held()
            try:
                await sink.aclose()
            except Exception:
                log.exception("error while closing the audit %s sink", sink.name)
        mac = self._mac
        for sink in self.sinks:
            head = sink.head()
            if mac is None or head is None or sink.chain is None:
                continue
            # An anchor outside the trail: removing a chain's newest entries is visible against it.
            token = Checkpoint.make(mac, sink.name, sink.chain.id, head[0], head[1], utc_now(), self.host)
            log.info("audit %s chain %s ends at seq %d: %s", sink.name, sink.chain.id, head[0], token.token)


def open_audit(settings: Settings) -> AuditTrail:
    """The sinks ``settings.audit`` asks for (not started); configuration errors name the setting."""
    config = settings.audit
    chain_id = new_chain_id()
    sinks: list[KeyedSink] = []
    if config.file:
        from keyconnector.audit.sinks.file import LineSink

        sinks.append(LineSink("file", chain_id, path=config.file))
    if config.stdout:
        from keyconnector.audit.sinks.file import LineSink

        sinks.append(LineSink("stdout", chain_id, fd=1))
    if config.database:
        from keyconnector.audit.sinks.database import DatabaseSink, audit_engine

        audit_engine(settings.database).dispose()  # configuration errors now, not in the background
        database = settings.database
        sinks.append(DatabaseSink(lambda: audit_engine(database), chain_id))
    if config.fail_closed and not sinks:
        raise ConfigurationError(
            "audit.failClosed",
            "is true but no audit sink is set (audit.file, audit.stdout or audit.database)",
        )
    return AuditTrail(
        sinks,
        fail_closed=config.fail_closed,
        chain_id=chain_id,
        checkpoint_seconds=config.checkpoint_seconds,
    )
