"""Token buckets per client address, per user and for failed authentication; who the client is; the
layer that applies them.

Why in memory, per worker process: a shared store (a database row, Redis) would cost a network round
trip or a write per request on the login-storm path, which is exactly what the service must not do.
The price is that with N worker processes the effective limit of a client is up to N times the
setting (the kernel spreads connections over workers). That is acceptable because these limits are
brakes against abuse (a flood of bad tokens, a runaway client, a stolen token used in a loop), not
quotas: a brake a few times looser still turns a flood of thousands per second into a trickle.

Every operation is O(1): a dictionary look-up, a few float operations and an ``OrderedDict`` move.
Memory is bounded: each store keeps at most ``max_entries`` buckets and forgets the least recently
used one when full, so an attacker cycling through addresses cannot grow it without bound. Forgetting
a bucket only ever makes a limit more lenient for that key (it comes back full), never stricter.
"""

from __future__ import annotations

import ipaddress
import json
import math
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from keyconnector.errors import ConfigurationError, setting_name
from keyconnector.http.context import context_of, record
from keyconnector.http.endpoints import LIMITED_PATHS
from keyconnector.http.services import ServiceHolder
from keyconnector.runtime.settings import RateLimitSettings
from keyconnector.telemetry import metrics

MAX_ENTRIES = 100_000
"""Buckets kept per store: about 150 bytes each, so some 15 MB per store and worker at worst."""

CACHE_ENTRIES = 4096
"""Parsed forwarded addresses kept per worker."""

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class BucketStore:
    """Token buckets of one kind (``per_minute`` refill, ``burst`` capacity), keyed by anything hashable.

    A bucket is a two-element list ``[tokens, last_update]``: cheaper than an object, and updated in
    place. A key not seen yet has a full bucket, which is why nothing is stored until it is used.
    """

    __slots__ = ("_buckets", "_burst", "_max", "_rate")

    def __init__(self, per_minute: float, burst: int, max_entries: int = MAX_ENTRIES) -> None:
        if per_minute <= 0 or burst < 1 or max_entries < 1:
            raise ValueError("a bucket store needs a positive rate, burst and size")
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._max = max_entries
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _refill(self, key: Hashable, now: float) -> list[float]:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = [self._burst, now]
            return bucket
        self._buckets.move_to_end(key)
        elapsed = now - bucket[1]
        if elapsed > 0:
            bucket[0] = min(self._burst, bucket[0] + elapsed * self._rate)
            bucket[1] = now
        return bucket

    def take(self, key: Hashable, now: float) -> float:
        """Take one token: 0.0 when there was one, else the seconds until there will be one."""
        bucket = self._refill(key, now)
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self._rate

    def peek(self, key: Hashable, now: float) -> float:
        """Like ``take`` without taking: 0.0 when a token is available. Stores nothing for a new key."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        tokens = min(self._burst, bucket[0] + max(0.0, now - bucket[1]) * self._rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._rate

    def drain(self, key: Hashable, now: float) -> None:
        """Take a token if there is one (an event that counts against the key, never refused itself)."""
        bucket = self._refill(key, now)
        bucket[0] = max(0.0, bucket[0] - 1.0)


class TrustedProxies:
    """The ``trustedProxies`` setting: addresses and CIDR ranges whose ``X-Forwarded-For`` is believed."""

    __slots__ = ("_cache", "_networks")

    def __init__(self, networks: list[IPNetwork]) -> None:
        self._networks = networks
        self._cache: dict[str, tuple[str | None, bool]] = {}

    @classmethod
    def parse(cls, text: str) -> TrustedProxies | None:
        """None when the setting is empty; ConfigurationError naming a bad entry."""
        networks: list[IPNetwork] = []
        for raw in text.split(","):
            entry = raw.strip()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ConfigurationError(
                    "rateLimit.trustedProxies",
                    f"'{entry[:60]}' is not an IP address or CIDR range (e.g. 10.0.0.0/8, 192.0.2.7, ::1)",
                ) from None
        return cls(networks) if networks else None

    def classify(self, entry: str) -> tuple[str | None, bool]:
        """(normalised address or None when it is not one, whether it is a trusted proxy).

        Cached (bounded, cleared when full): parsing an address costs some 4 µs, a look-up 0.1 µs,
        and the same few proxies and busy client addresses come back request after request.
        """
        verdict = self._cache.get(entry)
        if verdict is None:
            address = _parse_address(entry)
            verdict = (
                (str(address), any(address in network for network in self._networks))
                if address is not None
                else (None, False)
            )
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[entry] = verdict
        return verdict

    def __contains__(self, host: str) -> bool:
        return self.classify(host)[1]


def _parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as proxies write it: ``192.0.2.1``, ``192.0.2.1:443``, ``2001:db8::1``,
    ``[2001:db8::1]:443``; None for anything else."""
    text = text.strip()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        if text.startswith("["):
            inner = text[1 : text.find("]")] if "]" in text else ""
        elif text.count(":") == 1:
            inner = text.split(":", 1)[0]
        else:
            return None
        try:
            address = ipaddress.ip_address(inner)
        except ValueError:
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(scope: Scope, trusted: TrustedProxies | None) -> str:
    """The address of the client that sent this request, for limits, logs and the audit trail.

    The TCP peer, unless it is a trusted proxy: then ``X-Forwarded-For`` is read from the right,
    skipping entries that are themselves trusted proxies, and the first one that is not is the client.

    Why the right-most and not the left-most entry: each proxy appends the address it received the
    connection from, so only the entries added by our own proxies are facts. Everything to their left
    was sent by the client, who can write anything there (``X-Forwarded-For: 1.2.3.4`` is one header
    line away). Taking the left-most entry would let any client choose its address: a fresh bucket
    per request (no per-address limit at all), or someone else's address (throttling a victim,
    and a forged address in the audit trail).
    """
    client = scope.get("client")
    peer = client[0] if client else ""
    if trusted is None or peer not in trusted:
        return peer
    entries: list[str] = []
    for name, value in scope["headers"]:
        if name == b"x-forwarded-for":
            entries.extend(value.decode("latin-1").split(","))
    current = peer
    for entry in reversed(entries):
        address, is_trusted = trusted.classify(entry)
        if address is None:
            # A trusted proxy passed on something that is not an address: stay with the last hop
            # we can vouch for (conservative: its clients share one bucket).
            return current
        current = address
        if not is_trusted:
            return current
    return current


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused with 429, and when to come back."""

    message: str
    retry_after: int


def _refusal(wait: float, who: str, setting: str) -> Refusal:
    metrics.count_rejection(setting)  # every refusal is made here, so it is counted once
    seconds = max(1, math.ceil(wait))
    return Refusal(
        f"too many requests {who}; try again in {seconds} second{'s' if seconds != 1 else ''} "
        f"(limit {setting_name('rateLimit.' + setting)})",
        seconds,
    )


class RateLimiter:
    """The three limits of the ``rateLimit`` settings, for one worker process (a limit of 0 is off)."""

    def __init__(self, settings: RateLimitSettings, max_entries: int = MAX_ENTRIES) -> None:
        self.trusted = TrustedProxies.parse(settings.trusted_proxies)
        self.per_address = (
            BucketStore(settings.per_address_per_minute, settings.per_address_burst, max_entries)
            if settings.per_address_per_minute > 0
            else None
        )
        self.per_user = (
            BucketStore(settings.per_user_per_minute, settings.per_user_burst, max_entries)
            if settings.per_user_per_minute > 0
            else None
        )
        self.failed_auth = (
            BucketStore(settings.failed_auth_per_address_per_minute, settings.failed_auth_burst, max_entries)
            if settings.failed_auth_per_address_per_minute > 0
            else None
        )

    @property
    def enabled(self) -> bool:
        return self.per_address is not None or self.per_user is not None or self.failed_auth is not None

    def before_auth(self, address: str, now: float | None = None) -> Refusal | None:
        """Checked before the token is looked at: the address's failed-auth bucket, then its request bucket.

        A failed-auth bucket that is empty refuses even a good token: otherwise a flood of guesses
        from that address would cost a token verification each, and be throttled only when wrong.
        """
        now = time.monotonic() if now is None else now
        if self.failed_auth is not None:
            wait = self.failed_auth.peek(address, now)
            if wait:
                return _refusal(
                    wait, "with failed authentication from this address", "failedAuthPerAddressPerMinute"
                )
        if self.per_address is not None:
            wait = self.per_address.take(address, now)
            if wait:
                return _refusal(wait, "from this address", "perAddressPerMinute")
        return None

    def for_user(self, user: Hashable, now: float | None = None) -> Refusal | None:
        """Checked once the token is valid, with its user id."""
        if self.per_user is None:
            return None
        wait = self.per_user.take(user, time.monotonic() if now is None else now)
        return _refusal(wait, "for this user", "perUserPerMinute") if wait else None

    def authentication_failed(self, address: str, now: float | None = None) -> None:
        if self.failed_auth is not None:
            self.failed_auth.drain(address, time.monotonic() if now is None else now)


_JSON = b"application/json; charset=utf-8"


class RateLimitLayer:
    """Applies the limits on the endpoint table's limited paths (``endpoints.LIMITED_PATHS``).

    Before the token is checked, the address's limits: a refusal is a 429 that costs no token check,
    no span (this layer sits outside tracing) and no database access, and is audited here, since the
    endpoint never sees it. The per-user limit needs the user id, which only the endpoint learns
    (from the token): the limiter goes in the request's context, and the endpoint asks right after
    the token check, answering (and auditing) that 429 itself. A 401 or 403 answer counts against
    the address's failed-authentication limit.
    """

    def __init__(self, app: ASGIApp, limiter: RateLimiter, services: ServiceHolder) -> None:
        """``services``: where the lifespan puts the worker's services, whose audit trail records refusals."""
        self.app = app
        self._limiter = limiter
        self._services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in LIMITED_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        limiter = self._limiter
        context = context_of(scope)
        refusal = limiter.before_auth(context.address)
        if refusal is not None:
            services = self._services.services
            if services is not None:  # requests arrive after the lifespan start-up: always there
                record(services.audit, scope, "rate_limited", 429)
            await _send_refusal(send, refusal)
            return
        context.limiter = limiter
        try:
            await self.app(scope, receive, send)
        finally:
            if context.status == 401 or context.status == 403:
                limiter.authentication_failed(context.address)


async def _send_refusal(send: Send, refusal: Refusal) -> None:
    body = json.dumps({"message": refusal.message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", _JSON),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(refusal.retry_after).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
