"""Small response helpers: every error a client sees is JSON ``{"message": ...}``."""

from __future__ import annotations

import json

from starlette.responses import Response

JSON = "application/json; charset=utf-8"


def message(status: int, text: str, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps({"message": text}).encode()
    return Response(body, status_code=status, media_type=JSON, headers=headers)


def unavailable(text: str, retry_after: int) -> Response:
    return message(503, text, {"Retry-After": str(max(1, retry_after))})


def unauthorized(text: str) -> Response:
    return message(401, text, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
