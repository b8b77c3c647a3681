"""Every endpoint of the service in one table, and everything derived from it.

A route's facts used to be written down in five places that had to agree: the route list, the bounded
metric and span labels, the drain's open paths, the rate-limited path and the OpenAPI paths. Adding an
endpoint to one and not the others went unnoticed (a new route counted as ``unmatched``, a health
check refused during a drain). Here each endpoint is one ``Endpoint``, and:

- ``routes_for(settings)`` gives the Starlette routes (``app.create_app``);
- ``ROUTED_PATHS`` the route labels of metrics and spans (handed to telemetry, which must not import
  this package, by the composition root and the access layer);
- ``LIMITED_PATHS`` the paths the rate-limit layer limits and whose refusals it audits;
- ``ANSWERS_WHILE_DRAINING`` and ``UNREADY_WHILE_DRAINING`` what the drain lets through or answers
  itself (every other path gets the drain's 503);
- ``openapi_document()`` the OpenAPI description (the path items themselves live in ``openapi``).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keyconnector.http import handlers, openapi
from keyconnector.runtime.settings import Settings
from keyconnector.telemetry import metrics

Handler = Callable[[Request], Awaitable[Response]]


class Draining(enum.Enum):
    """What an endpoint answers once this worker drains (see ``drain``)."""

    REFUSED = "refused"
    """The drain's 503 with ``Retry-After`` and ``Connection: close``: another instance answers."""
    ANSWERS = "answers"
    """Served as usual: the process is alive, and restarting it would cut the requests it finishes."""
    UNREADY = "unready"
    """The drain's own 503 readiness body, so that the instance leaves the load balancer."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One path: how it is served and what the layers around the routing need to know about it.

    ``handler`` is the request handler, or ``build`` makes it from the settings (exactly one of the
    two). ``user_keys`` marks the key endpoint: rate-limited by the rate-limit layer, which also audits
    the requests it refuses (the endpoint audits the others); the other endpoints (health, alive,
    now) have no limits, since they must answer whatever a client does. ``describe`` gives its OpenAPI
    path item; None leaves the path out of the description (not part of the API the fuzz tests check).
    """

    path: str
    methods: tuple[str, ...]
    handler: Handler | None = None
    build: Callable[[Settings], Handler] | None = None
    user_keys: bool = False
    draining: Draining = Draining.REFUSED
    describe: Callable[[], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if (self.handler is None) == (self.build is None):
            # A developer's mistake in the table, caught by the tests: TypeError, not an operator message.
            raise TypeError(f"endpoint {self.path}: give a handler or a build, not both or neither")

    def route(self, settings: Settings) -> Route:
        handler = self.handler
        if handler is None:
            if self.build is None:  # refused by __post_init__; for the type checker
                raise TypeError(f"endpoint {self.path} has no handler")
            handler = self.build(settings)
        route = Route(self.path, handler, methods=list(self.methods))
        if self.user_keys:
            # Starlette answers HEAD wherever GET is allowed, by calling the same handler: on the key
            # endpoint, which tells reads from writes by method, a HEAD with a body was a PUT. Only
            # the listed methods reach it; HEAD gets the 405 (with ``Allow``) of any other method.
            route.methods = set(self.methods)
        return route


def _serve_openapi(settings: Settings) -> Handler:
    return openapi.serve(openapi_document())


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "/user-keys", ("GET", "POST", "PUT"), handlers.user_keys, user_keys=True, describe=openapi.user_keys
    ),
    Endpoint("/alive", ("GET",), handlers.alive, draining=Draining.ANSWERS, describe=openapi.clock),
    Endpoint("/now", ("GET",), handlers.alive, draining=Draining.ANSWERS, describe=openapi.clock),
    Endpoint("/health", ("GET",), handlers.health, describe=openapi.health),
    Endpoint(
        "/health/live",
        ("GET",),
        handlers.health_live,
        draining=Draining.ANSWERS,
        describe=openapi.health_live,
    ),
    Endpoint(
        "/health/ready",
        ("GET",),
        handlers.health_ready,
        draining=Draining.UNREADY,
        describe=openapi.health_ready,
    ),
    Endpoint("/openapi.json", ("GET",), build=_serve_openapi),
    Endpoint("/metrics", ("GET",), build=metrics.endpoint),
)

ROUTED_PATHS = frozenset(endpoint.path for endpoint in ENDPOINTS)
LIMITED_PATHS = frozenset(endpoint.path for endpoint in ENDPOINTS if endpoint.user_keys)
ANSWERS_WHILE_DRAINING = frozenset(e.path for e in ENDPOINTS if e.draining is Draining.ANSWERS)
UNREADY_WHILE_DRAINING = frozenset(e.path for e in ENDPOINTS if e.draining is Draining.UNREADY)


def routes_for(settings: Settings) -> list[Route]:
    """The Starlette routes, in the table's order."""
    return [endpoint.route(settings) for endpoint in ENDPOINTS]


def openapi_document() -> dict[str, Any]:
    """The OpenAPI description of the described endpoints, built fresh (callers may change their copy)."""
    return openapi.document(
        {endpoint.path: endpoint.describe() for endpoint in ENDPOINTS if endpoint.describe is not None}
    )
