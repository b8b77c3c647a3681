"""The outermost ASGI layer: request ids, path tolerance, a last-resort 500, one log line per request."""

from __future__ import annotations

import json
import logging
import os
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keyconnector.logs import access_log

error_log = logging.getLogger("keyconnector.http")
_SAFE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,64}$")
_SLASHES = re.compile(r"/{2,}")


class RequestMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

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
        scope["keyconnector.request_id"] = request_id
        status = 500
        started_response = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status = message["status"]
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
                        "headers": [(b"content-type", b"application/json; charset=utf-8")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
        finally:
            access = access_log()
            if access.enabled:
                client = scope.get("client")
                access.record(
                    scope["method"],
                    path,
                    status,
                    (time.perf_counter() - started) * 1000,
                    scope.get("keyconnector.user"),
                    request_id.decode(),
                    client[0] if client else None,
                )
