"""Bounded labels for a request, shared by metrics and span names.

A scanner's made-up paths and methods must not become new time series or span names, so anything
outside these fixed sets is folded into one label. The set of routes is not written here: it is the
endpoint table's (``keyconnector.http.endpoints``), which telemetry must not import; the composition
root hands it to ``RequestMetrics`` and ``TracingLayer``, which pass it here.
"""

from __future__ import annotations

from collections.abc import Set

UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
OTHER_METHOD = "other"


def route_and_method(path: str, method: str, routes: Set[str]) -> tuple[str, str]:
    """The route and method labels of a request: its own when known (a path in ``routes``, a usual
    method), else the catch-all ones."""
    return (path if path in routes else UNMATCHED, method if method in METHODS else OTHER_METHOD)
