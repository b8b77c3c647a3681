"""The ASGI application: Starlette routing inside thin single-purpose layers of our own (``_layers``).

Each server worker process calls ``create_app_from_environment`` (a factory, because settings are
read in the worker) and builds its own database connections, key provider and token cache in
the lifespan start-up.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from keyconnector.audit import open_audit
from keyconnector.audit.chain import KEY_PURPOSE
from keyconnector.auth import TokenValidator
from keyconnector.core.service import KeyService
from keyconnector.http import endpoints
from keyconnector.http.context import request_id_of
from keyconnector.http.layers.access import AccessLayer
from keyconnector.http.layers.cors import CORSMiddleware, allowed_origin
from keyconnector.http.layers.drain import DrainLayer
from keyconnector.http.layers.errors import ErrorLayer
from keyconnector.http.layers.hold import HoldLayer
from keyconnector.http.layers.ratelimit import RateLimiter, RateLimitLayer
from keyconnector.http.layers.request_id import RequestIdLayer
from keyconnector.http.responses import message
from keyconnector.http.services import ServiceHolder, Services, workers_from_environment
from keyconnector.keypairs.base import KeyProvider
from keyconnector.runtime import logs
from keyconnector.runtime.assemble import open_core
from keyconnector.runtime.notices import is_development_identity
from keyconnector.runtime.settings import Settings, identity_server_uri, load_settings, side_of
from keyconnector.runtime.trust import Trust
from keyconnector.storage.base import Repository
from keyconnector.telemetry import metrics, tracing

log = logging.getLogger("keyconnector")


async def build_services(settings: Settings) -> Services:
    uri = identity_server_uri(settings)
    audit = open_audit(settings)
    try:
        # The assembly every command uses, with what a worker differs in: the schema was migrated by
        # the pre-flight (no ``create``); a key provider outage must not stop the worker
        # (``tolerate_outage``), so the data keys are not loaded here but by KeyService, lazily and
        # again until the provider is back, answering 503 meanwhile.
        core = await open_core(side_of(settings), tolerate_outage=True)
    except BaseException:
        await audit.aclose()
        raise
    repository: Repository = core.repository
    provider: KeyProvider = core.provider
    # The same wrappers time the calls for metrics and open the child spans of a trace.
    if settings.metrics.enabled or settings.tracing.enabled:
        repository = metrics.InstrumentedRepository(repository, settings.database.provider)
        provider = metrics.InstrumentedKeyProvider(
            provider, settings.rsa_key.provider if settings.rsa_key else "unknown"
        )
    validator = TokenValidator(
        uri, verify=Trust.from_settings(settings), outage_expected=is_development_identity(uri)
    )
    keys = KeyService(
        repository,
        provider,
        flush_interval=settings.last_access_flush_seconds,
        ring_refresh_interval=settings.key_ring_refresh_seconds,
        write_legacy_format=settings.compat.write_legacy_format,
        ring_anchor=settings.key_ring_anchor,
    )
    # The audit key comes with the data key: entries recorded before it loads wait for it.
    keys.on_trusted(lambda ring: audit.set_key(ring.derive(KEY_PURPOSE)))
    await validator.start()
    await keys.start()
    await audit.start()
    return Services(
        settings=settings,
        repository=repository,
        provider=provider,
        validator=validator,
        keys=keys,
        audit=audit,
        workers=workers_from_environment(),
    )


async def close_services(services: Services) -> None:
    for close in (
        services.keys.aclose,
        services.audit.aclose,
        services.validator.aclose,
        services.provider.aclose,
        services.repository.aclose,
    ):
        try:
            await close()
        except Exception:
            log.exception("error while shutting down")
    logs.access_log().flush()


async def _not_found(request: Request, exc: Exception) -> Response:
    return message(404, f"there is no endpoint at {request.url.path}")


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    allow = exc.headers.get("Allow", "") if isinstance(exc, HTTPException) and exc.headers else ""
    return message(405, f"{request.method} is not allowed on {request.url.path}", {"Allow": allow})


def create_app(settings: Settings) -> ASGIApp:
    holder = ServiceHolder()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        services = await build_services(settings)
        app.state.services = holder.services = services
        # Everything built so far (modules, settings, connections) lives as long as the worker: move
        # it out of the collector's sight, so a full collection walks only request-time objects and
        # stays short. Without this, full collections stalled a worker for 50-120 ms under load.
        gc.freeze()
        log.info(
            "serving: database %s; key pair %s; identity server %s",
            services.repository.description,
            services.provider.description,
            settings.identity_server_uri,
        )
        mirror = metrics.Mirror(services) if settings.metrics.enabled else None
        if mirror is not None:
            mirror.start()
            app.state.metrics_mirror = mirror
        try:
            yield
        finally:
            await close_services(services)
            if mirror is not None:
                await mirror.aclose()  # after the close, so failures of the last flushes count too

    app = Starlette(
        routes=endpoints.routes_for(settings),
        exception_handlers={404: _not_found, 405: _method_not_allowed},
        lifespan=lifespan,
    )
    return _layers(app, settings, holder)


def _layers(app: ASGIApp, settings: Settings, services: ServiceHolder) -> ASGIApp:
    """The layers around the routing, composed here and only here. From the outside in:

    1. ``RequestIdLayer`` makes the request's context (id, client address, normalised path without the
       ``pathBase`` prefix) and adds ``X-Request-Id`` to every answer: outermost, so that every layer
       and log line below has them.
    2. ``AccessLayer`` writes the access-log line and the request metrics: outside every layer that
       answers by itself (500, 429, preflights, the drain's 503), so those are logged and counted too.
    3. ``ErrorLayer`` turns an unhandled exception into a logged 500.
    4. ``RateLimitLayer`` (when a limit is set) counts the request against its address and hands the
       limiter to the endpoint, which answers any 429 once it knows whether the token verified (a
       verified token is never refused by a per-address limit); it also notices an untrusted proxy.
    5. ``TracingLayer`` (when tracing is on) opens the request's span.
    6. ``CORSMiddleware``, then ``DrainLayer`` inside it, so that a browser can read the drain's 503.
    7. ``HoldLayer``, innermost: the body deadline and the per-user cap on requests in flight, which
       the endpoint applies once the token names the user. Inside the drain, so that a request the
       drain refuses takes no place; a place is given back when the endpoint returns.
    """
    limiter = RateLimiter(settings.rate_limit)
    held = HoldLayer(app, settings.http, endpoints.LIMITED_PATHS)
    inner: ASGIApp = CORSMiddleware(DrainLayer(held), allowed_origin(settings.web_vault_uri))
    if settings.tracing.enabled:
        inner = tracing.TracingLayer(inner, endpoints.ROUTED_PATHS, request_id_of)
    if limiter.enabled:
        inner = RateLimitLayer(inner, limiter, services)
    inner = ErrorLayer(inner)
    inner = AccessLayer(inner, metrics=settings.metrics.enabled)
    return RequestIdLayer(inner, limiter.trusted, settings.path_base)


def create_app_from_environment() -> ASGIApp:
    """The server's factory: settings from the environment (and ``KEYCONNECTOR_CONFIG``)."""
    settings = load_settings().settings
    logs.configure(settings.logging)
    tracing.configure(settings)
    return create_app(settings)
