"""One access-log line and one request metric per request, whatever answered it.

Outside every layer that may answer by itself (the last-resort 500, the rate limits' 429, CORS
preflights, the drain's 503), so that each of those answers is logged and counted like the
endpoints' own.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Receive, Scope, Send

from keyconnector.http.context import context_of
from keyconnector.http.endpoints import ROUTED_PATHS
from keyconnector.runtime.logs import access_log
from keyconnector.telemetry.metrics import RequestMetrics


class AccessLayer:
    """Writes the access-log line (``logging.accessLog``) and records the request metrics
    (``metrics.enabled``)."""

    def __init__(self, app: ASGIApp, *, metrics: bool) -> None:
        self.app = app
        self._metrics = RequestMetrics(ROUTED_PATHS) if metrics else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self._log(scope)

    def _log(self, scope: Scope) -> None:
        context = context_of(scope)
        status = 500 if context.status is None else context.status  # no answer at all: the server's fault
        seconds = time.perf_counter() - context.started
        if self._metrics is not None:
            self._metrics.record(context.path, scope["method"], status, seconds)
        access = access_log()
        if access.enabled:
            access.record(
                scope["method"],
                context.path,
                status,
                seconds * 1000,
                context.user,
                context.request_id,
                context.address or None,
            )
