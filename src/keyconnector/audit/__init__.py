"""The audit trail of every user-key request: who asked, from where, and what they got.

Every read, create, replace and refused attempt becomes one entry (see :meth:`AuditTrail.record`)
with the user id (when the token gave one), UTC time, client address, client name
(``Bitwarden-Client-Name``), method, outcome, HTTP status and request id; never a key or a token.
Entries go to any combination of sinks (``audit.file``, ``audit.stdout``, ``audit.database``), each
hash-chained per worker process (:mod:`keyconnector.audit.chain`), and ``keyconnector audit verify``
checks the chains.

Recording happens on the request path, so it is built to cost microseconds: one dict, one canonical
JSON encoding and one SHA-256 per sink, then one ``os.write`` (file, stdout) or a list append
(database, flushed in the background).

With ``audit.failClosed`` the routes refuse to serve or store a key when no sink can record the
access; without it an audit failure is logged and counted and never fails a request.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID

from starlette.types import Scope

from keyconnector.audit.chain import new_chain_id
from keyconnector.errors import ConfigurationError
from keyconnector.settings import Settings

log = logging.getLogger("keyconnector.audit")

MAX_CLIENT_NAME = 100
"""A client name is the client's to choose: capped, so an entry stays one small atomic write."""


class Sink(Protocol):
    name: str
    failures: int

    def write(self, fields: dict[str, Any]) -> bool: ...

    def can_record(self) -> bool: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


_second: list[Any] = [-1, ""]


def _utc_now() -> str:
    """ISO 8601 UTC with microseconds; the part up to the second is formatted once per second
    (strftime on every entry was a third of the cost of recording)."""
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second[0], _second[1] = whole, f"{datetime.fromtimestamp(whole, UTC):%Y-%m-%dT%H:%M:%S}"
    return f"{_second[1]}.{int((now - whole) * 1e6):06d}Z"


def client_address(scope: Scope) -> str | None:
    """The client's address: the one the request middleware resolved (trusted proxies and
    ``X-Forwarded-For``, see ``keyconnector.http.ratelimit``), else the connection's peer."""
    resolved = scope.get("keyconnector.client_address")
    if resolved:
        return str(resolved)
    client = scope.get("client")
    return str(client[0]) if client else None


class AuditTrail:
    """The sinks of one worker process, and whether a key may be served without them."""

    def __init__(self, sinks: list[Sink], *, fail_closed: bool = False, chain_id: str = "") -> None:
        self.sinks = sinks
        self.fail_closed = fail_closed
        self.chain_id = chain_id
        self.failures = 0
        """Entries no sink recorded (with sinks configured)."""

    @property
    def enabled(self) -> bool:
        return bool(self.sinks)

    def can_record(self) -> bool:
        """Whether some sink is known to be working: checked before a key is stored under failClosed."""
        return not self.sinks or any(sink.can_record() for sink in self.sinks)

    def record(
        self,
        *,
        user: UUID | None,
        client: str | None,
        client_name: str | None,
        method: str,
        outcome: str,
        status: int,
        request_id: str | None,
    ) -> bool:
        """Write one entry to every sink; True when at least one recorded it (or there is no sink)."""
        if not self.sinks:
            return True
        fields = {
            "time": _utc_now(),
            "user": str(user) if user is not None else None,
            "client": client,
            "clientName": client_name[:MAX_CLIENT_NAME] if client_name is not None else None,
            "method": method,
            "outcome": outcome,
            "status": status,
            "requestId": request_id,
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

    def record_scope(self, scope: Scope, outcome: str, status: int) -> bool:
        """Record a request from its ASGI scope: what the routes and the request middleware know."""
        if not self.sinks:
            return True
        client_name = None
        for name, value in scope["headers"]:
            if name == b"bitwarden-client-name":
                client_name = value.decode("latin-1")
                break
        request_id = scope.get("keyconnector.request_id")
        return self.record(
            user=scope.get("keyconnector.user"),
            client=client_address(scope),
            client_name=client_name,
            method=scope["method"],
            outcome=outcome,
            status=status,
            request_id=request_id.decode() if isinstance(request_id, bytes) else request_id,
        )

    async def start(self) -> None:
        for sink in self.sinks:
            await sink.start()

    async def aclose(self) -> None:
        for sink in self.sinks:
            try:
                await sink.aclose()
            except Exception:
                log.exception("error while closing the audit %s sink", sink.name)
            chain = getattr(sink, "chain", None)
            if chain is not None and chain.seq > 1:
                # An anchor outside the trail: removing a chain's newest entries is visible against it.
                log.info(
                    "audit %s chain %s ends at seq %d, hash %s",
                    sink.name,
                    chain.id,
                    chain.seq - 1,
                    chain.prev,
                )


def open_audit(settings: Settings) -> AuditTrail:
    """The sinks ``settings.audit`` asks for (not started); configuration errors name the setting."""
    config = settings.audit
    chain_id = new_chain_id()
    sinks: list[Sink] = []
    if config.file:
        from keyconnector.audit.filesink import LineSink

        sinks.append(LineSink("file", chain_id, path=config.file))
    if config.stdout:
        from keyconnector.audit.filesink import LineSink

        sinks.append(LineSink("stdout", chain_id, fd=1))
    if config.database:
        from keyconnector.audit.dbsink import DatabaseSink, audit_engine

        audit_engine(settings.database).dispose()  # configuration errors now, not in the background
        database = settings.database
        sinks.append(DatabaseSink(lambda: audit_engine(database), chain_id))
    if config.fail_closed and not sinks:
        raise ConfigurationError(
            "audit.failClosed",
            "is true but no audit sink is set (audit.file, audit.stdout or audit.database)",
        )
    return AuditTrail(sinks, fail_closed=config.fail_closed, chain_id=chain_id)
