"""What the HTTP layer learns about one request, in one typed object, and the audit entry made from it.

The layers and the endpoint share a few facts about a request: its id, the client's address, the
user once the token is checked, the per-user limit. They travel in one ``RequestContext``, made by
the outermost layer (``layers.request_id``) and kept in the ASGI scope's ``state`` (Starlette's
``request.state``) under one attribute, read with ``context_of``. One object rather than loose scope
keys: the type checker sees every use, and a request costs one allocation for all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from starlette.types import Scope

from keyconnector.audit import AuditEntry, AuditTrail

if TYPE_CHECKING:  # the rate-limit layer reads and writes contexts: a type, not an import cycle
    from keyconnector.http.layers.hold import UserSlots
    from keyconnector.http.layers.ratelimit import RateLimiter

ATTRIBUTE = "keyconnector"
"""The name of the context in ``scope["state"]`` (``request.state.keyconnector``)."""


@dataclass(slots=True, eq=False)
class RequestContext:
    """One request as the layers and the endpoint know it."""

    request_id: str
    """The client's ``X-Request-Id`` when it is safe to echo and log, else a fresh one."""
    address: str
    """The client's address, through the trusted proxies (``rateLimit.trustedProxies``); "" unknown."""
    path: str
    """The path with doubled and trailing slashes removed: what is routed, limited and logged."""
    started: float
    """``time.perf_counter()`` when the request arrived, for the access log and the metrics."""
    user: UUID | None = None
    """The user the token named, set by the endpoint once the token is checked."""
    limiter: RateLimiter | None = None
    """The per-user limit the endpoint applies once it knows the user; set on the limited paths only."""
    address_wait: float = 0.0
    """Seconds until the address's request bucket had a token for this request (0.0: it had one):
    a token that does not verify is then answered 429 (see ``RateLimiter``)."""
    status: int | None = None
    """The status sent, once the response has started."""
    slots: UserSlots | None = None
    """The per-user cap on requests in flight (``layers.hold``); set on the capped paths only."""
    holding: UUID | None = None
    """The user whose place in ``slots`` this request holds, given back when it ends."""


def context_of(request: Mapping[str, Any]) -> RequestContext:
    """The context of a request: its ASGI scope, or a Starlette ``Request`` (a mapping over it)."""
    context: RequestContext = request["state"][ATTRIBUTE]
    return context


def request_id_of(scope: Scope) -> str:
    """The request id, for the layers that must not import this package (tracing)."""
    return context_of(scope).request_id


def audit_entry(scope: Scope, outcome: str, status: int) -> AuditEntry:
    """The audit entry of a user-key request: what the layers and the endpoint learnt about it."""
    client_name = None
    for name, value in scope["headers"]:
        if name == b"bitwarden-client-name":
            client_name = value.decode("latin-1")
            break
    context = context_of(scope)
    address: str | None = context.address
    if not address:  # no address resolved: whatever the connection reports (None on a Unix socket)
        peer = scope.get("client")
        address = str(peer[0]) if peer else None
    return AuditEntry(
        user=context.user,
        client=address,
        client_name=client_name,
        method=scope["method"],
        outcome=outcome,
        status=status,
        request_id=context.request_id,
    )


def record(audit: AuditTrail, scope: Scope, outcome: str, status: int) -> bool:
    """Record a user-key request; True when recorded (or nothing is to record it).

    The trail is asked whether it records anything first, so that a service without an audit sink
    builds no entry on the hot path.
    """
    if not audit.enabled:
        return True
    return audit.record(audit_entry(scope, outcome, status))
