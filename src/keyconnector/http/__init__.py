"""The HTTP layer: routes, CORS and request handling on top of the key service."""

from keyconnector.http.app import create_app, create_app_from_environment

__all__ = ["create_app", "create_app_from_environment"]
