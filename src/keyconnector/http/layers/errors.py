"""The last resort: an exception no endpoint handled becomes a logged 500, not a dropped connection.

The log line has the full traceback and the request id; the client gets the id (``X-Request-Id``) and
a message without detail, since an exception's text may name internals.
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from keyconnector.http.context import context_of

error_log = logging.getLogger("keyconnector.http")
_JSON = b"application/json; charset=utf-8"
_BODY = json.dumps({"message": "internal error; the incident was logged"}).encode()


class ErrorLayer:
    """Logs an unhandled exception and answers 500 when no answer has started yet."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except Exception:
            error_log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if context_of(scope).status is None:
                await send(
                    {"type": "http.response.start", "status": 500, "headers": [(b"content-type", _JSON)]}
                )
                await send({"type": "http.response.body", "body": _BODY})
