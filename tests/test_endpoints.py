"""The endpoint table (``keyconnector.http.endpoints``) is the only list of routes: the app routes
exactly its entries, and the metric labels, the drain, the rate limits and the OpenAPI description
follow it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from starlette.routing import Route

from keyconnector.http import endpoints
from keyconnector.http.app import create_app
from keyconnector.http.endpoints import ENDPOINTS, Draining, Endpoint, openapi_document
from keyconnector.http.layers.access import AccessLayer
from keyconnector.runtime.settings import Settings, load_settings
from keyconnector.telemetry.labels import UNMATCHED, route_and_method


def _settings(tmp_path: Path) -> Settings:
    return load_settings(
        environ={
            "keyConnectorSettings__identityServerUri": "https://identity.example",
            "keyConnectorSettings__database__provider": "json",
            "keyConnectorSettings__database__jsonFilePath": str(tmp_path / "keys.json"),
        }
    ).settings


def _routes(app: Any) -> list[Route]:
    """The Starlette routes under the layers of our own (request, CORS, drain)."""
    while not hasattr(app, "routes"):
        app = app.app
    routes = list(app.routes)
    assert all(isinstance(route, Route) for route in routes)
    return routes


def test_every_endpoint_is_routed_and_every_route_is_an_endpoint(tmp_path: Path) -> None:
    routes = _routes(create_app(_settings(tmp_path)))
    routed = {route.path: route.methods for route in routes}
    assert len(routed) == len(routes), "a path routed twice"
    assert set(routed) == {endpoint.path for endpoint in ENDPOINTS}
    for endpoint in ENDPOINTS:
        # Starlette adds HEAD to GET routes; the key endpoint, which tells writes by method, refuses it.
        extra = set() if endpoint.user_keys else {"HEAD"}
        assert routed[endpoint.path] == {*endpoint.methods, *extra}, endpoint.path
    assert len({endpoint.path for endpoint in ENDPOINTS}) == len(ENDPOINTS), "a path in the table twice"


def test_metric_and_span_labels_are_the_table_paths(tmp_path: Path) -> None:
    assert {endpoint.path for endpoint in ENDPOINTS} == endpoints.ROUTED_PATHS
    app = create_app(_settings(tmp_path))
    while not isinstance(app, AccessLayer):
        app = app.app
    assert app._metrics is not None
    assert app._metrics._routes == endpoints.ROUTED_PATHS
    for endpoint in ENDPOINTS:
        assert route_and_method(endpoint.path, "GET", endpoints.ROUTED_PATHS) == (endpoint.path, "GET")
    assert route_and_method("/wp-admin.php", "BREW", endpoints.ROUTED_PATHS) == (UNMATCHED, "other")


def test_drain_and_rate_limit_sets_come_from_the_table() -> None:
    # What the drain and the rate-limit layer did before the table, now facts of its entries.
    assert {"/user-keys"} == endpoints.LIMITED_PATHS
    assert {"/health/live", "/alive", "/now"} == endpoints.ANSWERS_WHILE_DRAINING
    assert {"/health/ready"} == endpoints.UNREADY_WHILE_DRAINING
    by_path = {endpoint.path: endpoint for endpoint in ENDPOINTS}
    for path in ("/health", "/metrics", "/openapi.json", "/user-keys"):
        assert by_path[path].draining is Draining.REFUSED


def test_the_openapi_document_describes_the_described_endpoints_and_their_methods() -> None:
    paths = openapi_document()["paths"]
    described = [endpoint for endpoint in ENDPOINTS if endpoint.describe is not None]
    assert set(paths) == {endpoint.path for endpoint in described}
    for endpoint in described:
        assert set(paths[endpoint.path]) == {method.lower() for method in endpoint.methods}, endpoint.path
    assert "/metrics" not in paths and "/openapi.json" not in paths


def test_an_endpoint_has_a_handler_or_a_build() -> None:
    async def handler(request: Any) -> Any:
        raise AssertionError

    with pytest.raises(TypeError, match="/x"):
        Endpoint("/x", ("GET",))
    with pytest.raises(TypeError, match="/x"):
        Endpoint("/x", ("GET",), handler, build=lambda settings: handler)
