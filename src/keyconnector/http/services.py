"""What a worker process holds: its settings and the parts built from them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

from keyconnector.audit import AuditTrail
from keyconnector.auth import TokenValidator
from keyconnector.core.service import KeyService
from keyconnector.errors import KeyConnectorError, setting_name
from keyconnector.keypairs.base import KeyProvider
from keyconnector.runtime.settings import Settings
from keyconnector.storage.base import Repository

log = logging.getLogger("keyconnector.http")

WORKERS_ENV = "KEYCONNECTOR_WORKERS"
"""How many worker processes ``serve`` started (``--workers``): set by the parent for its workers, as
only the parent knows it, and shown by ``/health/ready`` (``keyconnector status``)."""


def workers_from_environment() -> int | None:
    """``WORKERS_ENV`` as a number, or None when this app was not started by ``serve`` (another ASGI
    server, a test harness): unknown rather than a guess."""
    value = os.environ.get(WORKERS_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


IDENTITY_DEGRADED = "degraded: every login gets 503 until it answers"
"""What readiness, ``/health`` and ``check`` say of an identity server whose keys cannot be had."""


class ProxyNotice:
    """Whether requests arrived with ``X-Forwarded-For`` from a peer not in ``trustedProxies``.

    Why it matters: that peer is a reverse proxy (Bitwarden's installer always puts nginx in front),
    and without the setting every client behind it has the proxy's address, in the logs, the audit
    trail and the per-address rate limits. Said once per worker in the log (the first such request)
    and for as long as the worker runs in ``/health/ready``. Only the peer's address is shown: the
    forwarded value is whatever the client wrote.
    """

    __slots__ = ("peer",)

    def __init__(self) -> None:
        self.peer: str | None = None

    def saw(self, peer: str) -> None:
        if self.peer is None:
            self.peer = peer
            log.warning(
                "requests from %s carry X-Forwarded-For, but %s is not in "
                "keyConnectorSettings__rateLimit__trustedProxies: every client behind it shares its "
                "address (in the logs, the audit trail and one per-address rate-limit bucket); if it is "
                "your reverse proxy, set keyConnectorSettings__rateLimit__trustedProxies=%s",
                peer,
                peer,
                peer,
            )

    def describe(self) -> str:
        """What ``/health/ready`` shows under ``clientAddresses``: "ok", or the logged warning's text."""
        if self.peer is None:
            return "ok"
        setting = setting_name("rateLimit.trustedProxies")
        return (
            f"requests from {self.peer} carry X-Forwarded-For, but {self.peer} is not in {setting}: "
            "every client behind it shares its address (in the logs, the audit trail and one per-address "
            f"rate-limit bucket); if it is your reverse proxy, set {setting}={self.peer}"
        )


class HealthChecker:
    """Real checks of the key provider and the database, cached briefly so that a probe storm
    (every replica's orchestrator, a monitoring system, a curious user) cannot hammer an HSM or KMS."""

    def __init__(self, services: Services, ttl: float = 2.0) -> None:
        self._services = services
        self._ttl = ttl
        self._at = -1e9
        self._result: tuple[bool, dict[str, str]] = (False, {})
        self._lock = asyncio.Lock()

    async def overall(self) -> tuple[bool, dict[str, str]]:
        """Whether the instance can serve, and each check's "ok" or what is wrong.

        The proxy notice is read fresh (it costs nothing): it must show from the first forwarded
        request, not a cache period later."""
        healthy, checks = await self._cached()
        return healthy, checks | {"clientAddresses": self._services.proxy_notice.describe()}

    async def _cached(self) -> tuple[bool, dict[str, str]]:
        if time.monotonic() - self._at < self._ttl:
            return self._result
        async with self._lock:
            if time.monotonic() - self._at < self._ttl:
                return self._result
            self._result = await self._run()
            self._at = time.monotonic()
            return self._result

    async def _run(self) -> tuple[bool, dict[str, str]]:
        services = self._services
        checks: dict[str, str] = {}
        healthy = True
        for name, probe in (("database", services.repository.ping), ("keyProvider", services.provider.check)):
            try:
                await asyncio.wait_for(probe(), timeout=5)
                checks[name] = "ok"
            except (KeyConnectorError, TimeoutError, OSError) as exc:
                checks[name] = str(exc) or type(exc).__name__
                # The key provider is needed once per process, to unwrap the data key. With the data
                # key in memory this instance still serves every user, so a KMS or HSM outage is
                # reported ("degraded") but does not take the instance out of the load balancer:
                # failing readiness here would turn a provider blip into a full outage of every replica.
                if name == "database" or not services.keys.ready:
                    healthy = False
        # A refused key ring is reported but keeps the instance in the load balancer when it still
        # holds trusted keys: it serves every record those open, and seals with the last trusted one.
        problem = services.keys.ring_problem
        checks["keyRing"] = "ok" if problem is None else f"refused: {problem}"
        if services.keys.ready:
            checks["dataKey"] = "ok"
        else:
            healthy = False
            checks["dataKey"] = services.keys.status()
        # Reported as "degraded", not as unready: an identity outage is the identity server's, shared
        # by every replica, and failing readiness would empty the load balancer for no gain (user-key
        # requests already answer 503 with Retry-After while it lasts, and recover by themselves).
        validator = services.validator
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(validator.settle(), timeout=5)
        checks["identity"] = (
            "ok"
            if validator.ready
            else f"{IDENTITY_DEGRADED}: {validator.status().removeprefix('not ready: ')}"
        )
        return healthy, checks


@dataclass(eq=False)
class Services:
    settings: Settings
    repository: Repository
    provider: KeyProvider
    validator: TokenValidator
    keys: KeyService
    audit: AuditTrail = field(default_factory=lambda: AuditTrail([]))
    """Every user-key request is recorded here (no sink configured: records nothing)."""
    proxy_notice: ProxyNotice = field(default_factory=ProxyNotice)
    """Set by the rate-limit layer when an untrusted peer forwards for others."""
    workers: int | None = None
    """How many worker processes serve this instance (``workers_from_environment``), None if unknown."""
    health: HealthChecker = field(init=False)

    def __post_init__(self) -> None:
        self.health = HealthChecker(self)


class ServiceHolder:
    """Where the lifespan start-up puts the worker's ``Services``, for the layers around the routing.

    Those layers are made with the app, before the services exist (they are built in the worker's
    lifespan, see ``app.create_app``): ``app.create_app`` gives them this holder, and the lifespan
    fills it. Requests only arrive after the start-up, so a layer finds it filled.
    """

    __slots__ = ("services",)

    def __init__(self) -> None:
        self.services: Services | None = None
