"""The endpoints of docs/compatibility.md section 1.

``GET /user-keys`` is the hot path of a login storm: one token check, one indexed read, one
AES-GCM open, no database write. Bodies are small and read with a hard cap.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from keyconnector import __version__
from keyconnector.auth import AuthError, Principal
from keyconnector.errors import IntegrityFailure, UnavailableError, setting_name
from keyconnector.http.context import RequestContext, context_of
from keyconnector.http.context import record as record_audit
from keyconnector.http.layers import hold
from keyconnector.http.responses import JSON, message, unauthorized, unavailable
from keyconnector.http.services import Services

if TYPE_CHECKING:  # the layer imports the endpoint table, which imports this module
    from keyconnector.http.layers.ratelimit import Refusal

log = logging.getLogger("keyconnector.http")

MAX_BODY = 64 * 1024
# An oversized body up to this size is read and dropped before the 413 goes out: answering while the
# client is still sending makes the server close a socket with unread data, the kernel resets the
# connection, and the client loses the 413 and its reason. Beyond it, the connection is not worth it.
DRAIN_LIMIT = 1024 * 1024
MAX_KEY_BYTES = 1024
NO_STORE = {"Cache-Control": "no-store"}


def now_string() -> str:
    """Upstream's clock format: ISO 8601 UTC with seven fractional digits."""
    now = datetime.now(UTC)
    return f"{now:%Y-%m-%dT%H:%M:%S}.{now.microsecond:06d}0Z"


async def alive(request: Request) -> Response:
    return Response(json.dumps(now_string()), media_type=JSON)


async def health(request: Request) -> Response:
    """Upstream's words, and ASP.NET's third one: ``Degraded`` (200) when ``/health/ready`` says so."""
    services: Services = request.app.state.services
    healthy, checks = await services.health.overall()
    text = ("Degraded" if readiness(healthy, checks) == "degraded" else "Healthy") if healthy else "Unhealthy"
    return Response(text, status_code=200 if healthy else 503, media_type="text/plain")


async def health_live(request: Request) -> Response:
    return Response(b'{"status":"alive"}', media_type=JSON)


def readiness(healthy: bool, checks: dict[str, str]) -> str:
    """``unready`` (503), ``degraded`` (200: a part is down, but taking this instance out of the load
    balancer would not help, e.g. a key provider or identity outage every replica shares) or ``ready``."""
    if not healthy:
        return "unready"
    if all(checks.get(name) == "ok" for name in ("database", "keyProvider", "keyRing", "identity")):
        return "ready"
    return "degraded"


async def health_ready(request: Request) -> Response:
    """The state and each part's check, and what ``keyconnector status`` shows beside them: the
    version, the data-key versions this worker holds (``current`` seals, ``active`` are loaded; null
    before they load) and the number of workers (null when not started by ``serve``). All read from
    memory: a probe adds no database query to the cached checks."""
    services: Services = request.app.state.services
    healthy, checks = await services.health.overall()
    versions = services.keys.data_key_versions
    body = json.dumps(
        {
            "status": readiness(healthy, checks),
            "checks": checks,
            "version": __version__,
            "dataKey": None if versions is None else {"current": versions[0], "active": versions[1]},
            "workers": services.workers,
        }
    )
    return Response(body, status_code=200 if healthy else 503, media_type=JSON)


class BadRequest(Exception):
    def __init__(self, status: int, text: str) -> None:
        self.status = status
        self.text = text


async def _drain(request: Request) -> None:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_LIMIT:
            return


async def _read_key(request: Request) -> bytes:
    """The decoded ``key`` of a JSON body, or BadRequest saying exactly what is wrong."""
    content_type = request.headers.get("content-type")
    if content_type is None:
        raise BadRequest(415, "the request needs 'Content-Type: application/json'")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise BadRequest(415, f"the content type '{media[:100]}' is not supported; send application/json")
    declared = request.headers.get("content-length")
    too_large = BadRequest(413, f"the body is larger than {MAX_BODY} bytes")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        if int(declared) <= DRAIN_LIMIT:
            await _drain(request)
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_LIMIT:
            raise too_large
        if size <= MAX_BODY:
            chunks.append(chunk)
    if size > MAX_BODY:
        raise too_large
    try:
        document: Any = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        raise BadRequest(400, "the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise BadRequest(400, 'the body must be a JSON object like {"key": "<base64>"}')
    matches = [name for name in document if name.lower() == "key"]
    if not matches:
        raise BadRequest(400, 'the body has no "key" property')
    if len(matches) > 1:
        raise BadRequest(400, 'the body has more than one "key" property (names are case-insensitive)')
    value = document[matches[0]]
    if value is None:
        raise BadRequest(400, 'the "key" property is null')
    if not isinstance(value, str):
        raise BadRequest(400, 'the "key" property must be a base64 string')
    if not value:
        raise BadRequest(400, 'the "key" property is empty')
    if len(value) > (MAX_KEY_BYTES // 3 + 1) * 4:
        raise BadRequest(400, f"the key is longer than {MAX_KEY_BYTES} bytes")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(
            400, 'the "key" property is not valid base64 (standard alphabet, with padding)'
        ) from None
    if not raw:
        raise BadRequest(400, 'the "key" property is empty')
    if len(raw) > MAX_KEY_BYTES:
        raise BadRequest(400, f"the key is longer than {MAX_KEY_BYTES} bytes")
    return raw


async def _principal(request: Request, services: Services, context: RequestContext) -> Principal:
    principal = await services.validator.authenticate(request.headers.get("authorization"))
    context.user = principal.user_id
    return principal


AUDIT_UNAVAILABLE = (
    "the audit trail is unavailable, so keys are not served (audit.failClosed is on); try again later"
)


def _audit_refused(request: Request) -> Response:
    log.error("%s %s refused: no audit sink can record it (failClosed)", request.method, request.url.path)
    return unavailable(AUDIT_UNAVAILABLE, 5)


async def user_keys(request: Request) -> Response:
    """The endpoint, then one audit entry for whatever it answered.

    A key is read first and recorded before it is sent: with ``audit.failClosed`` a read that no
    sink could record becomes a 503 instead. A write is checked before it is made (a write cannot be
    taken back after the fact) and recorded after.
    """
    services: Services = request.app.state.services
    audit = services.audit
    try:
        response, outcome = await _user_keys(request, services)
    except Exception:
        record_audit(audit, request.scope, "error", 500)
        raise
    if outcome == "audit_unavailable":
        return response
    recorded = record_audit(audit, request.scope, outcome, response.status_code)
    if not recorded and audit.fail_closed and outcome == "read":
        return _audit_refused(request)
    return response


async def _user_keys(request: Request, services: Services) -> tuple[Response, str]:
    """The response and the audit outcome (see keyconnector.audit)."""
    context = context_of(request)
    try:
        principal = await _principal(request, services, context)
        refusal = await _user_rate_limit(request, context, principal.user_id)
        if refusal is None:
            refusal = await _user_in_flight(request, context, principal.user_id)
        if refusal is not None:
            return refusal, "rate_limited"
        if request.method == "GET":
            key = await services.keys.get(principal.user_id)
            if key is None:
                return message(404, "this user has no key"), "not_found"
            body = b'{"key":"' + base64.b64encode(key) + b'"}'
            return Response(body, media_type=JSON, headers=NO_STORE), "read"
        if request.method not in ("POST", "PUT"):
            # The route admits only GET, POST and PUT; this is the second lock on the write branch.
            return message(405, f"{request.method} is not allowed on {request.url.path}"), "bad_request"
        raw = await _read_key(request)
        if services.audit.fail_closed and not services.audit.can_record():
            return _audit_refused(request), "audit_unavailable"
        if request.method == "POST":
            if not await services.keys.create(principal.user_id, raw):
                return message(400, "this user already has a key; use PUT to replace it"), "already_exists"
            return Response(b"", headers=NO_STORE), "created"
        created = await services.keys.put(principal.user_id, raw)
        return Response(b"", headers=NO_STORE), "created" if created else "replaced"
    except AuthError as exc:
        throttled = await _failed_auth_limit(request, context, signed=exc.status == 403)
        if throttled is not None:
            return throttled, "rate_limited"
        if exc.status == 401:
            return unauthorized(exc.message), "unauthorized"
        return message(exc.status, exc.message), "forbidden" if exc.status == 403 else "unauthorized"
    except BadRequest as exc:
        return message(exc.status, exc.text), "bad_request"
    except ClientDisconnect:
        # Ordinary (a phone losing its network mid-PUT), and a client could cause it at will: an audit
        # entry and an access-log line, never an ERROR with a traceback. 499 as nginx logs it.
        gone = message(499, "the client closed the connection before its body arrived; nothing was written")
        return gone, "disconnected"
    except hold.BodyTimeout:
        seconds = services.settings.http.body_timeout_seconds
        return (
            message(
                408,
                f"the request body did not arrive within {seconds:g} seconds "
                f"({setting_name('http.bodyTimeoutSeconds')}); nothing was written",
                {"Connection": "close"},
            ),
            "timeout",
        )
    except UnavailableError as exc:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return unavailable(str(exc), exc.retry_after), "unavailable"
    except IntegrityFailure as exc:
        # 500, not 4xx: the stored data is damaged or was moved, which the client neither caused nor
        # can fix (a 409 would invite it to overwrite the evidence).
        log.error("%s %s: %s", request.method, request.url.path, exc)  # the request id is added to the line
        return (
            message(
                500,
                "the stored key for this user cannot be decrypted (altered, or copied from another user's "
                f"row) and was not returned; the incident was logged (request {context.request_id})",
            ),
            "integrity",
        )


async def _user_rate_limit(request: Request, context: RequestContext, user_id: UUID) -> Response | None:
    """The per-user limit (see keyconnector.http.layers.ratelimit), put in the context by the
    rate-limit layer on the limited paths.

    Asked as soon as the token names the user, before anything is read or written, so that the 429
    is this endpoint's answer and its audit entry says ``rate_limited``.
    """
    limiter = context.limiter
    refusal = limiter.for_user(user_id) if limiter is not None else None
    return None if refusal is None else await _too_many(request, refusal)


async def _failed_auth_limit(request: Request, context: RequestContext, *, signed: bool) -> Response | None:
    """A refused token counts against its address; past the address's budgets a token that did not
    verify gets 429 instead of 401 (see keyconnector.http.layers.ratelimit: a verified one never does)."""
    limiter = context.limiter
    if limiter is None:
        return None
    refusal = limiter.authentication_failed(context.address, context.address_wait, signed=signed)
    return None if refusal is None else await _too_many(request, refusal)


async def _too_many(request: Request, refusal: Refusal) -> Response:
    if request.method != "GET":
        await _drain(request)  # the 429 must not be lost to a reset over an unread body
    return message(429, refusal.message, {"Retry-After": str(refusal.retry_after)})


async def _user_in_flight(request: Request, context: RequestContext, user_id: UUID) -> Response | None:
    """The per-user cap on requests running at once (see keyconnector.http.layers.hold), asked with the
    rate limit and answered the same way: a 429 that is this endpoint's, audited as ``rate_limited``."""
    if hold.enter(context, user_id):
        return None
    if request.method != "GET":
        await _drain(request)
    return message(
        429,
        "too many requests running at once for this user; try again when they have finished "
        f"(limit {setting_name('http.maxRequestsInFlightPerUser')})",
        {"Retry-After": "1"},
    )
