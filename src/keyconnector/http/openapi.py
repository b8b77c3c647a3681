"""An OpenAPI 3 description of the API as upstream defines it (docs/compatibility.md section 1),
plus our additions.

Why it exists: the fuzzing tests (``tests/test_fuzz.py``, ``make fuzz``) generate requests from it and
check every answer against it, so it lists every status a client can see and nothing else: a status
or a body shape the service sends but this document does not name is a failure, and a 500 is never
documented. Operators can also fetch it (``GET /openapi.json``) for API tooling; it holds nothing
deployment-specific. Which paths it describes is the endpoint table's business (``endpoints.py``):
this module holds what each path item says.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from keyconnector.http.responses import JSON

MAX_KEY_BYTES = 1024
"""The longest key the service accepts (``routes.MAX_KEY_BYTES``), in raw bytes."""

_BASE64 = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{4})$"
_ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ERROR}},
    }
    if headers:
        response["headers"] = headers
    return response


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}

_USER_KEY_ERRORS: dict[str, Any] = {
    "401": _error(
        "no bearer token, or it is malformed, badly signed, foreign, expired or early", _WWW_AUTHENTICATE
    ),
    "403": _error("the token is valid but fails the policy (amr, scope, sub)"),
    "429": _error("too many requests from this user or address", _RETRY_AFTER),
    "503": _error("a dependency (database, key pair, identity server, audit) is down", _RETRY_AFTER),
}

_KEY_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["key"],
                "properties": {
                    "key": {
                        "type": "string",
                        "description": "standard, padded base64 (32 raw bytes from real clients)",
                        "minLength": 4,
                        "maxLength": (MAX_KEY_BYTES // 3 + 1) * 4,
                        "pattern": _BASE64,
                    }
                },
            }
        }
    },
}

_WRITE_ERRORS: dict[str, Any] = {
    "400": _error("the body is not a JSON object with one base64 'key' (or, for POST, the user has a key)"),
    "413": _error("the body is larger than the service accepts"),
    "415": _error("the body is not JSON"),
    **_USER_KEY_ERRORS,
}


# -- the path items, one function per path: the endpoint table (``endpoints.ENDPOINTS``) names them --


def clock() -> dict[str, Any]:
    """``/alive`` and ``/now``."""
    return {
        "get": {
            "summary": "the current UTC time (liveness, the admin console's test button)",
            "responses": {
                "200": {
                    "description": "ISO 8601 UTC with seven fractional digits",
                    "content": {"application/json": {"schema": {"type": "string"}}},
                }
            },
        }
    }


def health() -> dict[str, Any]:
    return {
        "get": {
            "summary": "whether the key pair works",
            "responses": {
                "200": {
                    "description": "Healthy",
                    "content": {"text/plain": {"schema": {"type": "string", "enum": ["Healthy"]}}},
                },
                "503": {
                    "description": "Unhealthy",
                    "content": {"text/plain": {"schema": {"type": "string", "enum": ["Unhealthy"]}}},
                },
            },
        }
    }


def health_live() -> dict[str, Any]:
    return {
        "get": {
            "summary": "the process answers (ours)",
            "responses": {"200": _status_body("alive")},
        }
    }


def health_ready() -> dict[str, Any]:
    return {
        "get": {
            "summary": "every part works (ours)",
            "responses": {"200": _readiness("ready or degraded"), "503": _readiness("unready")},
        }
    }


def user_keys() -> dict[str, Any]:
    return {
        "get": {
            "summary": "the caller's key",
            "security": [{"bearer": []}],
            "responses": {
                "200": {
                    "description": "the key",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["key"],
                                "properties": {"key": {"type": "string", "format": "byte"}},
                                "additionalProperties": False,
                            }
                        }
                    },
                },
                "404": _error("this user has no key"),
                **_USER_KEY_ERRORS,
            },
        },
        "post": {
            "summary": "create the caller's key",
            "security": [{"bearer": []}],
            "requestBody": _KEY_BODY,
            "responses": {"200": {"description": "created (empty body)"}, **_WRITE_ERRORS},
        },
        "put": {
            "summary": "create or replace the caller's key",
            "security": [{"bearer": []}],
            "requestBody": _KEY_BODY,
            "responses": {"200": {"description": "stored (empty body)"}, **_WRITE_ERRORS},
        },
    }


def document(paths: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The document around ``paths`` (path to path item), built fresh (callers may change their copy).

    The paths come from the endpoint table (``endpoints.openapi_document``): a route without a path
    item there (``/openapi.json``, ``/metrics``) is not part of the described API.
    """
    return {
        "openapi": "3.0.3",
        "info": {"title": "Key Connector", "version": "1", "description": "Bitwarden Key Connector API"},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["message"],
                    "properties": {"message": {"type": "string", "minLength": 1}},
                }
            },
        },
    }


def _status_body(status: str) -> dict[str, Any]:
    return {
        "description": status,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"type": "string", "enum": [status]}},
                }
            }
        },
    }


def _readiness(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["status", "checks"],
                    "properties": {
                        "status": {"type": "string", "enum": ["ready", "degraded", "unready"]},
                        "checks": {"type": "object", "additionalProperties": {"type": "string"}},
                        "version": {"type": "string"},
                        "dataKey": {
                            "type": "object",
                            "nullable": True,
                            "description": "current seals, active are loaded; null before they load",
                            "properties": {
                                "current": {"type": "integer"},
                                "active": {"type": "array", "items": {"type": "integer"}},
                            },
                        },
                        "workers": {
                            "type": "integer",
                            "nullable": True,
                            "description": "worker processes; null when not started by serve",
                        },
                    },
                }
            }
        },
    }


def serve(described: dict[str, Any]) -> Callable[[Request], Awaitable[Response]]:
    """The ``GET /openapi.json`` handler answering with ``described``, serialised once."""
    body = json.dumps(described, separators=(",", ":")).encode()

    async def openapi_endpoint(request: Request) -> Response:
        return Response(body, media_type=JSON)

    return openapi_endpoint
