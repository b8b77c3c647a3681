"""The outermost layer: it makes the request's context, and every answer carries the request's id.

Outermost so that everything below, the other layers, the endpoint and each log line written while
the request runs, has the id, the client's address and the normalised path (without the
``pathBase`` prefix, so that routes, limits, logs and metrics see one spelling of each path). The
id is the client's ``X-Request-Id`` when it is safe to echo into a header and a log line, else a
fresh one; it comes back in the response's ``X-Request-Id``, so that a user's report leads to the
log lines and the audit entry of that request.
"""

from __future__ import annotations

import os
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keyconnector.http.context import ATTRIBUTE, RequestContext
from keyconnector.http.layers.ratelimit import TrustedProxies, client_address
from keyconnector.runtime import logs

# \A...\Z, not ^...$: '$' also matches before a final newline, which would then reach the log line.
_SAFE_REQUEST_ID = re.compile(rb"\A[A-Za-z0-9._:-]{1,64}\Z")
_SLASHES = re.compile(r"/{2,}")


class RequestIdLayer:
    """Makes the ``RequestContext``, sets the log lines' request id, adds ``X-Request-Id`` to the answer."""

    def __init__(self, app: ASGIApp, trusted: TrustedProxies | None, path_base: str | None = None) -> None:
        """``trusted``: the proxies whose ``X-Forwarded-For`` names the client
        (``rateLimit.trustedProxies``); ``path_base``: the prefix a proxy forwards unstripped
        (``pathBase``, already in its one form: ``/key-connector``), removed before routing."""
        self.app = app
        self._trusted = trusted
        self._path_base = path_base

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
        if self._path_base is not None:
            unprefixed = strip_path_base(path, self._path_base)
            if unprefixed is not path:
                path = unprefixed
                scope = dict(scope, path=path)
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value if _SAFE_REQUEST_ID.match(value) else None
                break
        if request_id is None:
            request_id = os.urandom(8).hex().encode()
        context = RequestContext(request_id.decode(), client_address(scope, self._trusted), path, started)
        state = scope.get("state")
        if state is None:  # servers with lifespan state give each request a copy of it; others none
            scope["state"] = state = {}
        state[ATTRIBUTE] = context
        token = logs.request_id.set(context.request_id)

        async def send_with_id(message: Message) -> None:
            # The one wrapper of send for every request: it also notes the status for the layers below
            # (access log, last-resort 500, failed-authentication limit), which then need none.
            if message["type"] == "http.response.start":
                context.status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logs.request_id.reset(token)


def strip_path_base(path: str, base: str) -> str:
    """``path`` without the ``pathBase`` prefix when it starts with that whole segment (``/kc/x`` for
    ``/kc``, not ``/kcx``); else ``path`` itself, unchanged: unprefixed paths keep answering, as with
    ASP.NET Core's ``UsePathBase``, so the orchestrator's health probes need no prefix."""
    if path == base:
        return "/"
    if path.startswith(base) and path[len(base)] == "/":
        return path[len(base) :]
    return path
