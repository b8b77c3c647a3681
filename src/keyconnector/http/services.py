"""What a worker process holds: its settings and the parts built from them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from keyconnector.audit import AuditTrail
from keyconnector.auth import TokenValidator
from keyconnector.core.service import KeyService
from keyconnector.errors import KeyConnectorError
from keyconnector.keypairs.base import KeyProvider
from keyconnector.runtime.settings import Settings
from keyconnector.storage.base import Repository


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
        # Reported, not required: an identity outage is the identity server's, and user-key
        # requests already answer 503 with Retry-After while it lasts.
        checks["identity"] = "ok" if services.validator.ready else services.validator.status()
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
