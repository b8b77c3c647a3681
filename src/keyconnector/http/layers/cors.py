"""CORS as upstream does it: one allowed origin (the web vault), any method and header, credentials.

Written as a few lines of ASGI rather than a general middleware: requests without an ``Origin``
header (every non-browser client, and the login-storm hot path) pass straight through.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def allowed_origin(web_vault_uri: str | None) -> bytes | None:
    if not web_vault_uri:
        return None
    return web_vault_uri.strip().rstrip("/").encode("latin-1")


class CORSMiddleware:
    def __init__(self, app: ASGIApp, origin: bytes | None) -> None:
        self.app = app
        self.origin = origin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = None
        request_method = None
        request_headers = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value
            elif name == b"access-control-request-method":
                request_method = value
            elif name == b"access-control-request-headers":
                request_headers = value
        if origin is None:
            await self.app(scope, receive, send)
            return
        allowed = self.origin is not None and origin == self.origin
        if scope["method"] == "OPTIONS" and request_method is not None:
            # A preflight. ASP.NET answers 204 either way and omits the CORS headers for a foreign
            # origin, which makes the browser refuse: we do the same.
            headers = [(b"vary", b"Origin"), (b"content-length", b"0")]
            if allowed:
                headers += [
                    (b"access-control-allow-origin", origin),
                    (b"access-control-allow-credentials", b"true"),
                    (b"access-control-allow-methods", request_method),
                    (b"access-control-max-age", b"600"),
                ]
                if request_headers:
                    headers.append((b"access-control-allow-headers", request_headers))
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        if not allowed:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"access-control-allow-origin", origin),
                    (b"access-control-allow-credentials", b"true"),
                    (b"vary", b"Origin"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_cors)
