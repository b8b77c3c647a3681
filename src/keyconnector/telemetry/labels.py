"""Bounded labels for a request, shared by metrics and span names.

A scanner's made-up paths and methods must not become new time series or span names, so anything
outside these fixed sets is folded into one label.
"""

from __future__ import annotations

ROUTES = frozenset(
    {"/user-keys", "/alive", "/now", "/health", "/health/live", "/health/ready", "/openapi.json", "/metrics"}
)
UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
OTHER_METHOD = "other"


def route_and_method(path: str, method: str) -> tuple[str, str]:
    """The route and method labels of a request: its own when known, else the catch-all ones."""
    return (path if path in ROUTES else UNMATCHED, method if method in METHODS else OTHER_METHOD)
