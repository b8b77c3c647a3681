"""Optional OpenTelemetry traces: one server span per request, child spans for the key provider and
the database, exported over OTLP/HTTP.

Off unless ``tracing.enabled`` is set, and then the ``otel`` extra must be installed: an operator
who asked for traces and gets none would be debugging the wrong thing, so a missing package stops the
service with a message naming the extra. When off, nothing here runs on the request path (the layer
is not even installed).

The exporter is configured the standard way, by ``OTEL_EXPORTER_OTLP_*`` variables (endpoint,
headers, certificate, timeout), so collectors and their authentication need no setting of ours.
An incoming W3C ``traceparent`` header is honoured, so a span started by a reverse proxy or the
Bitwarden server continues here. Spans carry the route, the status and the request id, never a user
id, an address, a token or a key: a trace backend is usually far less guarded than this service.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Set
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keyconnector._optional import require
from keyconnector.runtime.settings import Settings
from keyconnector.telemetry.labels import route_and_method

log = logging.getLogger("keyconnector.tracing")

DEFAULT_SERVICE_NAME = "keyconnector"
_tracer: Any | None = None
_provider: Any | None = None


def _sdk(module: str) -> Any:
    return require(module, extra="otel", setting="tracing.enabled", provider="OpenTelemetry tracing")


def check(settings: Settings) -> None:
    """Fail before serving when tracing is asked for and its packages are missing."""
    if settings.tracing.enabled:
        _sdk("opentelemetry.sdk.trace")
        _sdk("opentelemetry.exporter.otlp.proto.http.trace_exporter")


def configure(settings: Settings) -> None:
    """Set up this process's tracer (each server worker calls it); no-op when tracing is off."""
    global _tracer, _provider
    if not settings.tracing.enabled or _tracer is not None:
        return
    sdk_trace = _sdk("opentelemetry.sdk.trace")
    export = _sdk("opentelemetry.sdk.trace.export")
    resources = _sdk("opentelemetry.sdk.resources")
    otlp = _sdk("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": DEFAULT_SERVICE_NAME}
    provider = sdk_trace.TracerProvider(resource=resources.Resource.create(attributes))
    provider.add_span_processor(export.BatchSpanProcessor(otlp.OTLPSpanExporter()))
    _provider = provider
    _tracer = provider.get_tracer("keyconnector")
    log.info("tracing: exporting spans over OTLP/HTTP")


def shutdown() -> None:
    """Send the spans still buffered (a worker that stops must not lose its last traces)."""
    global _tracer, _provider
    if _provider is not None:
        try:
            _provider.shutdown()
        except Exception as exc:  # an exporter failing at exit must not hide the real shutdown
            log.warning("tracing: could not send the last spans: %s", exc)
    _tracer = _provider = None


def tracer() -> Any | None:
    """The tracer when tracing is on, else None (callers skip their spans)."""
    return _tracer


class TracingLayer:
    """One SERVER span per HTTP request, continuing the caller's trace when it sent one."""

    def __init__(self, app: ASGIApp, routes: Set[str], request_id: Callable[[Scope], str]) -> None:
        """``routes``: the paths that name their spans (the endpoint table's); others are unmatched.
        ``request_id``: the id the HTTP layer gave the request (telemetry must not import it)."""
        self.app = app
        self._routes = routes
        self._request_id = request_id
        trace = _sdk("opentelemetry.trace")
        propagate = _sdk("opentelemetry.propagate")
        self._kind = trace.SpanKind.SERVER
        self._error = trace.Status(trace.StatusCode.ERROR)
        self._extract = propagate.extract

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            try:
                await self.app(scope, receive, send)
            finally:
                shutdown()
            return
        current = _tracer
        if scope["type"] != "http" or current is None:
            await self.app(scope, receive, send)
            return
        route, method = route_and_method(scope["path"], scope["method"], self._routes)
        carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        attributes = {
            "http.request.method": method,
            "http.route": route,
            "url.scheme": scope.get("scheme", "http"),
            "keyconnector.request_id": self._request_id(scope),
        }
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with current.start_as_current_span(
            f"{method} {route}",
            context=self._extract(carrier),
            kind=self._kind,
            attributes=attributes,
        ) as server_span:
            try:
                await self.app(scope, receive, send_status)
            finally:
                server_span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    server_span.set_status(self._error)
