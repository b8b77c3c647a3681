"""What the HTTP layer learns about one request, and the audit entry made from it."""

from __future__ import annotations

from starlette.types import Scope

from keyconnector.audit import AuditEntry, AuditTrail


def audit_entry(scope: Scope, outcome: str, status: int) -> AuditEntry:
    """The audit entry of a user-key request: what the request layer and the endpoint learnt."""
    client_name = None
    for name, value in scope["headers"]:
        if name == b"bitwarden-client-name":
            client_name = value.decode("latin-1")
            break
    request_id = scope.get("keyconnector.request_id")
    resolved = scope.get("keyconnector.client_address")
    client = scope.get("client")
    return AuditEntry(
        user=scope.get("keyconnector.user"),
        client=str(resolved) if resolved else (str(client[0]) if client else None),
        client_name=client_name,
        method=scope["method"],
        outcome=outcome,
        status=status,
        request_id=request_id.decode() if isinstance(request_id, bytes) else request_id,
    )


def record(audit: AuditTrail, scope: Scope, outcome: str, status: int) -> bool:
    """Record a user-key request; True when recorded (or nothing is to record it).

    The trail is asked whether it records anything first, so that a service without an audit sink
    builds no entry on the hot path.
    """
    if not audit.enabled:
        return True
    return audit.record(audit_entry(scope, outcome, status))
