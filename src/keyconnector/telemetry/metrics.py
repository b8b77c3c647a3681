"""Prometheus metrics: what the service did, for dashboards and alerts, at ``/metrics``.

The server runs several worker processes (spawned, see ``keyconnector.runtime.server``), and a scrape lands
on one of them; its figures alone would be meaningless. So the parent process sets up
prometheus_client's multiprocess mode before any worker starts (:func:`start_parent_side`): every
worker writes its values to memory-mapped files in a private directory, and whoever answers a
scrape adds up all of them (``MultiProcessCollector``). Counters of a worker that died stay in the
sum, so a restart does not make a counter go backwards. Without that directory (an app built inside a
test process) the default registry of this process is exposed instead.

Labels have bounded values only: a route is one of the service's paths or ``unmatched`` (a scanner
must not create a time series per made-up URL), a method one of the HTTP methods or ``other``. No
user id, address, token or key ever becomes a label: a metrics backend is usually far less guarded
than this service.

Cost on the request path: in multiprocess mode every update of a Prometheus value is a write to a
memory-mapped file under a lock, and a histogram observation is two of them plus a bucket search:
some 10 µs a request for the request and database figures, a tenth of a login's budget. So the
request and database figures are gathered in plain numbers (:class:`DeferredHistogram`,
:class:`DeferredCounter`: a dict hit, a ``bisect`` and a few additions, well under a microsecond)
and handed to Prometheus once a second by :class:`Mirror`, and right before a scrape by the worker
answering it. Plain counters that other parts of the service already kept (token cache hits,
access-time write failures, audit sink failures, dropped access-log lines) are copied the same way.
Rare events (refusals, errors) update Prometheus directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence, Set
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from uuid import UUID

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from keyconnector.errors import ConfigurationError, setting_name
from keyconnector.runtime import logs
from keyconnector.runtime.settings import Settings
from keyconnector.storage.base import KeyRingStore, UserKeyStore
from keyconnector.telemetry import tracing
from keyconnector.telemetry.labels import route_and_method

if TYPE_CHECKING:
    from keyconnector.keypairs.base import KeyProvider
    from keyconnector.storage.base import RecordUpdate, Repository, StoredKeyRing, UserKeyRecord

log = logging.getLogger("keyconnector.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""A request takes 1-50 ms when all is well; the upper buckets show a struggling database or KMS."""
_BOUNDS = (*LATENCY_BUCKETS, float("inf"))
MIRROR_INTERVAL = 1.0


HTTP_REQUESTS = Counter(
    "keyconnector_http_requests_total",
    "HTTP requests answered, by route (path, or 'unmatched'), method and status.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "keyconnector_http_request_duration_seconds",
    "Time from the request's arrival to its answer, by route and method.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
KEY_PROVIDER_DURATION = Histogram(
    "keyconnector_key_provider_operation_duration_seconds",
    "Key provider (HSM, KMS, PFX) operations: wrap, unwrap, check.",
    ["provider", "operation"],
    buckets=LATENCY_BUCKETS,
)
KEY_PROVIDER_ERRORS = Counter(
    "keyconnector_key_provider_errors_total",
    "Key provider operations that failed.",
    ["provider", "operation"],
)
DATABASE_DURATION = Histogram(
    "keyconnector_database_operation_duration_seconds",
    "Database operations of the service, by backend and operation.",
    ["backend", "operation"],
    buckets=LATENCY_BUCKETS,
)
DATABASE_ERRORS = Counter(
    "keyconnector_database_errors_total",
    "Database operations that failed.",
    ["backend", "operation"],
)
RATE_LIMIT_REJECTIONS = Counter(
    "keyconnector_rate_limit_rejections_total",
    "Requests refused with 429, by the rateLimit setting that refused them.",
    ["limit"],
)
AUDIT_FAILURES = Counter(
    "keyconnector_audit_failures_total",
    "Failures of an audit sink (file, stdout, database): an entry not written, a file that would not "
    "open, a database flush that failed.",
    ["sink"],
)
AUDIT_UNRECORDED = Counter(
    "keyconnector_audit_unrecorded_entries_total",
    "Audit entries that no sink recorded.",
)
TOKEN_CACHE = Counter(
    "keyconnector_token_cache_lookups_total",
    "Access tokens looked up in the validation cache: hit (checked before) or miss (full verification).",
    ["result"],
)
TOKEN_FAILURES = Counter(
    "keyconnector_token_validation_failures_total",
    "Access tokens refused (401/403), by reason.",
    ["reason"],
)
ACCESS_TIME_WRITE_FAILURES = Counter(
    "keyconnector_access_time_write_failures_total",
    "Batches of last-access times the database did not take (kept and retried).",
)
KEY_RING_REFUSALS = Counter(
    "keyconnector_key_ring_refusals_total",
    "Times a stored key ring was refused: it did not authenticate, went backwards or contradicts the "
    "records (someone without the data key changed it).",
)
ACCESS_LOG_DROPPED = Counter(
    "keyconnector_access_log_dropped_writes_total",
    "Access-log batches that could not be written to stderr.",
)
BUILD_INFO = Gauge(
    "keyconnector_build_info",
    "Always 1; the version label says which keyconnector runs.",
    ["version"],
    multiprocess_mode="max",
)


def _version() -> str:
    try:
        return version("keyconnector")
    except PackageNotFoundError:
        return "unknown"


BUILD_INFO.labels(_version()).set(1)


# -- deferred updates -------------------------------------------------------------------------------

_deferred: list[DeferredCounter | DeferredHistogram] = []


class DeferredCounter:
    """Increments of one counter child, kept as an int until :func:`flush`."""

    __slots__ = ("child", "count")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.count = 0
        _deferred.append(self)

    def flush(self) -> None:
        if self.count:
            count, self.count = self.count, 0
            self.child.inc(count)


class DeferredHistogram:
    """Observations of one histogram child (buckets ``LATENCY_BUCKETS``), kept as plain numbers until
    :func:`flush` adds them to the child's sum and buckets as ``observe`` would have, one by one.

    prometheus_client has no call to add many observations at once, so this writes to the child's
    ``_sum`` and ``_buckets`` (per-bucket, not cumulative, counts); the constructor checks they are
    there, and tests/test_metrics.py compares the result with ``observe``."""

    __slots__ = ("child", "counts", "total")

    def __init__(self, child: Any) -> None:
        if list(getattr(child, "_upper_bounds", ())) != list(_BOUNDS) or len(child._buckets) != len(_BOUNDS):
            raise RuntimeError("prometheus_client's Histogram changed: keyconnector.metrics must follow")
        self.child = child
        self.counts = [0] * len(_BOUNDS)
        self.total = 0.0
        _deferred.append(self)

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(_BOUNDS, seconds)] += 1
        self.total += seconds

    def flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        total = self.total
        self.counts, self.total = [0] * len(_BOUNDS), 0.0
        self.child._sum.inc(total)
        for bucket, count in zip(self.child._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


def flush() -> None:
    """Hand what this process gathered to Prometheus (its memory-mapped file in multiprocess mode)."""
    for deferred in _deferred:
        deferred.flush()


# -- HTTP requests -----------------------------------------------------------------------------------


class RequestMetrics:
    """Counts and times requests for the HTTP access layer, deferred (see the module's notes).

    The accumulators are cached per (route, method, status): ``.labels()`` costs a lock and a few
    lookups, a dict hit one. Keys are label values, never the raw path, so the cache cannot grow
    with made-up URLs.
    """

    __slots__ = ("_children", "_durations", "_routes")

    def __init__(self, routes: Set[str]) -> None:
        """``routes``: the paths that are their own label (the endpoint table's); others are unmatched."""
        self._routes = routes
        self._children: dict[tuple[str, str, int], tuple[DeferredCounter, DeferredHistogram]] = {}
        self._durations: dict[tuple[str, str], DeferredHistogram] = {}

    def record(self, path: str, method: str, status: int, seconds: float) -> None:
        path, method = route_and_method(path, method, self._routes)
        key = (path, method, status)
        children = self._children.get(key)
        if children is None:
            duration = self._durations.get((path, method))
            if duration is None:
                duration = self._durations[path, method] = DeferredHistogram(
                    HTTP_DURATION.labels(path, method)
                )
            children = self._children[key] = (
                DeferredCounter(HTTP_REQUESTS.labels(path, method, str(status))),
                duration,
            )
        children[0].count += 1
        histogram = children[1]
        histogram.counts[bisect_left(_BOUNDS, seconds)] += 1
        histogram.total += seconds


# -- rate limits and tokens ---------------------------------------------------------------------------

_rejections: dict[str, Any] = {}


def count_rejection(limit: str) -> None:
    """A 429 by the ``rateLimit.<limit>`` setting (a name from a fixed set, never a client's value)."""
    child = _rejections.get(limit)
    if child is None:
        child = _rejections[limit] = RATE_LIMIT_REJECTIONS.labels(limit)
    child.inc()


# -- key provider and database --------------------------------------------------------------------------

T = TypeVar("T")


class _Operation:
    """The duration histogram (deferred) and error counter (direct: errors are rare) of one operation,
    and the name and attributes of its span when tracing is on."""

    __slots__ = ("duration", "errors", "span_attributes", "span_name")

    def __init__(self, duration: Any, errors: Any, span_name: str, span_attributes: dict[str, str]) -> None:
        self.duration = DeferredHistogram(duration)
        self.errors = errors
        self.span_name = span_name
        self.span_attributes = span_attributes


async def _measured(operation: _Operation, call: Awaitable[T]) -> T:
    tracer = tracing.tracer()
    if tracer is None:
        return await _timed(operation, call)
    # A failure is recorded on the span by the SDK (exception event, error status).
    with tracer.start_as_current_span(operation.span_name, attributes=operation.span_attributes):
        return await _timed(operation, call)


async def _timed(operation: _Operation, call: Awaitable[T]) -> T:
    started = time.perf_counter()
    try:
        return await call
    except Exception:
        operation.errors.inc()
        raise
    finally:
        operation.duration.observe(time.perf_counter() - started)


class InstrumentedKeyProvider:
    """A key provider whose wrap, unwrap and check are timed and their failures counted."""

    def __init__(self, inner: KeyProvider, name: str) -> None:
        self.inner = inner
        self._name = name
        ops = {
            op: _Operation(
                KEY_PROVIDER_DURATION.labels(name, op),
                KEY_PROVIDER_ERRORS.labels(name, op),
                f"key provider {op}",
                {"keyconnector.key_provider": name},
            )
            for op in ("wrap", "unwrap", "check")
        }
        self._wrap, self._unwrap, self._check = ops["wrap"], ops["unwrap"], ops["check"]

    @property
    def description(self) -> str:
        return self.inner.description

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    def upstream_view(self) -> KeyProvider:
        """The inner provider's upstream view (``keyconnector.keypairs.base.upstream_view``, spelled out
        here: telemetry imports no core), timed too."""
        make = getattr(self.inner, "upstream_view", None)
        view: KeyProvider = make() if callable(make) else self.inner
        return self if view is self.inner else InstrumentedKeyProvider(view, self._name)

    async def wrap(self, data_key: bytes) -> bytes:
        return await _measured(self._wrap, self.inner.wrap(data_key))

    async def unwrap(self, wrapped: bytes) -> bytes:
        return await _measured(self._unwrap, self.inner.unwrap(wrapped))

    async def check(self) -> None:
        await _measured(self._check, self.inner.check())

    async def aclose(self) -> None:
        await self.inner.aclose()


def _operations(*protocols: type) -> tuple[str, ...]:
    """The coroutine methods the protocols declare: the operations a server worker performs."""
    return tuple(
        name
        for protocol in protocols
        for name, member in vars(protocol).items()
        if inspect.iscoroutinefunction(member)
    )


TIMED_OPERATIONS = _operations(UserKeyStore, KeyRingStore)
"""What is timed: the request path and the data-key and key-ring loads (their protocols are the one
source of truth). The bulk :class:`~keyconnector.storage.base.RecordStore` is not: it serves transfer,
rotation and backup, which do not run in a server worker."""


class InstrumentedRepository:
    """A repository whose serving-path operations (:data:`TIMED_OPERATIONS`) are timed and their
    failures counted; the bulk :class:`~keyconnector.storage.base.RecordStore` passes through.

    Operation labels are the method names (``get_key`` is the read of every login, ``record_access``
    the batched access-time write, ``ping`` the health check, ``*key_ring*`` and ``*data_key`` the
    data-key loads).
    """

    def __init__(self, inner: Repository, backend: str) -> None:
        self.inner = inner
        self._ops = {
            name: _Operation(
                DATABASE_DURATION.labels(backend, name),
                DATABASE_ERRORS.labels(backend, name),
                f"database {name}",
                {"db.system": backend, "db.operation.name": name},
            )
            for name in TIMED_OPERATIONS
        }
        self._get_key = self._ops["get_key"]

    @property
    def description(self) -> str:
        return self.inner.description

    async def get_key(self, user_id: UUID) -> str | None:
        return await _measured(self._get_key, self.inner.get_key(user_id))

    async def create_key(self, user_id: UUID, record: str, now: datetime) -> bool:
        return await _measured(self._ops["create_key"], self.inner.create_key(user_id, record, now))

    async def put_key(self, user_id: UUID, record: str, now: datetime) -> bool:
        return await _measured(self._ops["put_key"], self.inner.put_key(user_id, record, now))

    async def record_access(self, accesses: Mapping[UUID, datetime]) -> None:
        await _measured(self._ops["record_access"], self.inner.record_access(accesses))

    async def get_wrapped_data_key(self) -> str | None:
        return await _measured(self._ops["get_wrapped_data_key"], self.inner.get_wrapped_data_key())

    async def store_wrapped_data_key(self, wrapped: str) -> str:
        return await _measured(
            self._ops["store_wrapped_data_key"], self.inner.store_wrapped_data_key(wrapped)
        )

    async def set_wrapped_data_key(self, wrapped: str) -> None:
        await _measured(self._ops["set_wrapped_data_key"], self.inner.set_wrapped_data_key(wrapped))

    async def get_key_ring(self) -> StoredKeyRing | None:
        return await _measured(self._ops["get_key_ring"], self.inner.get_key_ring())

    async def put_key_ring(self, document: str, expected_revision: int) -> bool:
        return await _measured(
            self._ops["put_key_ring"], self.inner.put_key_ring(document, expected_revision)
        )

    async def ping(self) -> None:
        await _measured(self._ops["ping"], self.inner.ping())

    def iter_records(self, batch_size: int = 1000) -> AsyncIterator[list[UserKeyRecord]]:
        return self.inner.iter_records(batch_size)

    async def count_records(self) -> int:
        return await self.inner.count_records()

    async def upsert_records(self, records: Sequence[UserKeyRecord]) -> None:
        await self.inner.upsert_records(records)

    async def replace_records(self, updates: Sequence[RecordUpdate]) -> int:
        return await self.inner.replace_records(updates)

    async def aclose(self) -> None:
        await self.inner.aclose()


# -- counters kept elsewhere ------------------------------------------------------------------------------


class _TokenCounts(Protocol):
    cache_hits: int
    cache_misses: int
    failures: dict[str, int]


class _KeyCounts(Protocol):
    @property
    def access_write_failures(self) -> int: ...

    @property
    def ring_refusals(self) -> int: ...


class _SinkCounts(Protocol):
    name: str
    failures: int


class _AuditCounts(Protocol):
    failures: int

    @property
    def sinks(self) -> Sequence[_SinkCounts]: ...


class MirrorSources(Protocol):
    """What the mirror reads: the token validator, the key service and the audit trail of a worker
    (``keyconnector.http.services.Services`` fits), described by their counters alone so that telemetry
    needs none of those parts."""

    @property
    def validator(self) -> _TokenCounts: ...

    @property
    def keys(self) -> _KeyCounts: ...

    @property
    def audit(self) -> _AuditCounts: ...


class Mirror:
    """Copies the growth of plain counters that other parts keep into Prometheus counters.

    Those counters are read by tests and logs and cost an integer add where they are kept; copying
    them here once a second keeps Prometheus off those paths (a cache hit is every reused token).
    """

    def __init__(self, services: MirrorSources) -> None:
        self._services = services
        self._seen: dict[str, int] = {}
        self._access_log: object | None = None
        self._task: asyncio.Task[None] | None = None

    def _add(self, name: str, current: int, counter: Any) -> None:
        grown = current - self._seen.get(name, 0)
        if grown > 0:
            counter.inc(grown)
        self._seen[name] = current

    def sync(self) -> None:
        flush()
        services = self._services
        self._add("cache_hits", services.validator.cache_hits, TOKEN_CACHE.labels("hit"))
        self._add("cache_misses", services.validator.cache_misses, TOKEN_CACHE.labels("miss"))
        for reason, count in list(services.validator.failures.items()):
            self._add(f"token:{reason}", count, TOKEN_FAILURES.labels(reason))
        self._add("access_write", services.keys.access_write_failures, ACCESS_TIME_WRITE_FAILURES)
        self._add("ring_refusals", services.keys.ring_refusals, KEY_RING_REFUSALS)
        self._add("audit", services.audit.failures, AUDIT_UNRECORDED)
        for sink in services.audit.sinks:
            self._add(f"sink:{sink.name}", sink.failures, AUDIT_FAILURES.labels(sink.name))
        access = logs.access_log()
        if access is not self._access_log:  # logs.configure replaced it: the new one counts from 0
            self._access_log = access
            self._seen["dropped"] = 0
        self._add("dropped", access.dropped, ACCESS_LOG_DROPPED)

    def start(self, interval: float = MIRROR_INTERVAL) -> None:
        self._task = asyncio.create_task(self._loop(interval), name="keyconnector-metrics-mirror")

    async def _loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.sync()
            except Exception:
                log.exception("could not update the mirrored metrics")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.sync()


# -- exposition -------------------------------------------------------------------------------------------


def exposition() -> bytes:
    """The text format of every worker's values (multiprocess mode), or this process's."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def endpoint(settings: Settings) -> Any:
    """The ``/metrics`` route of the service port: the metrics, or a 404 saying where they are."""
    config = settings.metrics
    if not config.enabled:
        text = f"metrics are turned off ({setting_name('metrics.enabled')}=false)"
    elif config.port is not None:
        text = f"metrics are served on port {config.port} ({setting_name('metrics.port')}), not on this one"
    else:
        text = ""

    async def metrics_endpoint(request: Request) -> Response:
        if text:
            return Response(json.dumps({"message": text}), 404, media_type="application/json; charset=utf-8")
        mirror = getattr(request.app.state, "metrics_mirror", None)
        if mirror is not None:
            mirror.sync()
        else:
            flush()
        body = await run_in_threadpool(exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return metrics_endpoint


# -- the parent process -------------------------------------------------------------------------------


class ParentSide:
    """What the server's parent process does for metrics: the shared directory, the separate port."""

    def __init__(self, folder: Path | None, owned: bool, server: Any | None) -> None:
        self.folder = folder
        self._owned = owned
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.shutdown()
                self._server.server_close()
            self._server = None
        if self._owned and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            if os.environ.get(MULTIPROC_ENV) == str(self.folder):
                del os.environ[MULTIPROC_ENV]
            self._owned = False


def start_parent_side(settings: Settings, service_host: str) -> ParentSide:
    """Before the workers spawn: multiprocess mode for them, and the separate metrics port if set.

    The directory is private (mkdtemp makes it 0700) and removed by :meth:`ParentSide.stop`; an
    operator's own ``PROMETHEUS_MULTIPROC_DIR`` is used as it is and left alone. Workers are spawned
    interpreters that inherit the environment, so they import prometheus_client in multiprocess mode.
    No gauge uses a ``live*`` mode, so a dead worker leaves nothing to mark: its counters and
    histograms rightly stay in the sums.
    """
    config = settings.metrics
    if not config.enabled:
        return ParentSide(None, False, None)
    existing = os.environ.get(MULTIPROC_ENV)
    if existing:
        folder, owned = Path(existing), False
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder, owned = Path(tempfile.mkdtemp(prefix="keyconnector-metrics-")), True
        os.environ[MULTIPROC_ENV] = str(folder)
    parent = ParentSide(folder, owned, None)
    if config.port is not None:
        host = config.host or service_host
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(folder))  # type: ignore[no-untyped-call]
        try:
            server, _thread = start_http_server(config.port, addr=host, registry=registry)
        except OSError as exc:
            parent.stop()
            raise ConfigurationError(
                "metrics.port", f"cannot listen on {host}:{config.port} for metrics: {exc.strerror or exc}"
            ) from None
        parent._server = server
        log.info("metrics on http://%s:%d/metrics", host, config.port)
    return parent
