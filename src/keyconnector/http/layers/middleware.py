"""The outermost ASGI layer: request ids, path tolerance, rate limits, a last-resort 500, one log line
per request."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keyconnector.http.context import ATTRIBUTE, RequestContext, context_of
from keyconnector.http.context import record as record_audit
from keyconnector.http.endpoints import LIMITED_PATHS, ROUTED_PATHS
from keyconnector.http.layers.ratelimit import RateLimiter, Refusal, client_address
from keyconnector.runtime import logs
from keyconnector.runtime.logs import access_log
from keyconnector.runtime.settings import RateLimitSettings
from keyconnector.telemetry.metrics import RequestMetrics

error_log = logging.getLogger("keyconnector.http")
_SAFE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,64}$")
_SLASHES = re.compile(r"/{2,}")
_JSON = b"application/json; charset=utf-8"


def _find_services(app: Any) -> Any | None:
    """The ``Services`` the app's lifespan built, found through the wrapped layers (CORS sits
    between): a few ``.app`` attributes down, in ``state.services``. Requests only arrive after the
    lifespan start-up, so it is there by the time anyone asks."""
    for _ in range(8):
        state = getattr(app, "state", None)
        services = getattr(state, "services", None) if state is not None else None
        if services is not None:
            return services
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


async def _send_refusal(send: Send, refusal: Refusal, request_id: bytes) -> None:
    body = json.dumps({"message": refusal.message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", _JSON),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(refusal.retry_after).encode()),
                (b"x-request-id", request_id),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestMiddleware:
    def __init__(self, app: ASGIApp, rate_limits: RateLimitSettings, *, metrics: bool = True) -> None:
        self.app = app
        self._metrics = RequestMetrics(ROUTED_PATHS) if metrics else None
        limiter = RateLimiter(rate_limits)
        self._limiter = limiter if limiter.enabled or limiter.trusted is not None else None
        self._services: Any | None = None

    def _audit_refusal(self, scope: Scope) -> None:
        """A 429 sent before the endpoint ran is an attempt the audit trail must show too."""
        if self._services is None:
            self._services = _find_services(self.app)
        audit = getattr(self._services, "audit", None)
        if audit is not None:
            record_audit(audit, scope, "rate_limited", 429)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        if "//" in path or (len(path) > 1 and path.endswith("/")):
            # Clients build URLs by concatenation: a configured URL ending in '/' gives '//user-keys'.
            path = _SLASHES.sub("/", path)
            if len(path) > 1:
                path = path.rstrip("/")
            scope = dict(scope, path=path)
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value if _SAFE_REQUEST_ID.match(value) else None
                break
        if request_id is None:
            request_id = os.urandom(8).hex().encode()
        limiter = self._limiter
        address = client_address(scope, limiter.trusted if limiter is not None else None)
        context = RequestContext(request_id.decode(), address, path, started)
        state = scope.get("state")
        if state is None:
            scope["state"] = state = {}
        state[ATTRIBUTE] = context
        request_id_token = logs.request_id.set(context.request_id)
        status = 500
        started_response = False
        if limiter is not None and path in LIMITED_PATHS and scope["method"] != "OPTIONS":
            refusal = limiter.before_auth(address)
            if refusal is not None:
                status = 429
                self._audit_refusal(scope)
                await _send_refusal(send, refusal, request_id)
                self._log(scope, path, 429, started, request_id, address)
                logs.request_id.reset(request_id_token)
                return
        else:
            limiter = None
        if limiter is not None:
            # The per-user limit needs the user id, which only the endpoint learns (from the token):
            # it asks right after the token check, before reading or writing anything, and answers
            # (and audits) the 429 itself.
            context.limiter = limiter

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status = message["status"]
                if limiter is not None and status in (401, 403):
                    limiter.authentication_failed(address)
                started_response = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            error_log.exception("unhandled error in %s %s", scope["method"], path)
            if not started_response:
                body = json.dumps({"message": "internal error; the incident was logged"}).encode()
                await send_wrapper(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", _JSON)],
                    }
                )
                await send({"type": "http.response.body", "body": body})
        finally:
            self._log(scope, path, status, started, request_id, address)
            logs.request_id.reset(request_id_token)

    def _log(
        self, scope: Scope, path: str, status: int, started: float, request_id: bytes, address: str
    ) -> None:
        seconds = time.perf_counter() - started
        if self._metrics is not None:
            self._metrics.record(path, scope["method"], status, seconds)
        access = access_log()
        if access.enabled:
            access.record(
                scope["method"],
                path,
                status,
                seconds * 1000,
                context_of(scope).user,
                request_id.decode(),
                address or None,
            )
