"""Token buckets per client address, per user and for failed authentication; who the client is; the
layer that applies them.

Why in memory, per worker process: a shared store (a database row, Redis) would cost a network round
trip or a write per request on the login-storm path, which is exactly what the service must not do.
The price is that with N worker processes the effective limit of a client is up to N times the
setting (the kernel spreads connections over workers). That is acceptable because these limits are
brakes against abuse (a flood of bad tokens, a runaway client, a stolen token used in a loop), not
quotas: a brake a few times looser still tells such a client to back off (429 with ``Retry-After``).
What they never do is refuse a token that verifies because others at its address sent bad ones
(see ``RateLimiter``): only the per-user limit applies to a verified token.

Every operation is O(1): a dictionary look-up, a few float operations and an ``OrderedDict`` move.
Memory is bounded: each store keeps at most ``max_entries`` buckets and forgets the least recently
used one when full, so an attacker cycling through addresses cannot grow it without bound. Forgetting
a bucket only ever makes a limit more lenient for that key (it comes back full), never stricter.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from keyconnector.errors import ConfigurationError, setting_name
from keyconnector.http.context import context_of
from keyconnector.http.endpoints import LIMITED_PATHS
from keyconnector.http.services import ProxyNotice, ServiceHolder
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


def bucket_key(address: str) -> str:
    """The bucket an address counts against: itself for IPv4, its /64 for IPv6.

    Why /64: one IPv6 host (a laptop with privacy addresses, a VM, an attacker) is given a whole
    /64 and can send from any of its 2^64 addresses; a bucket per address would be no limit at all.
    The address itself is kept for logs and the audit trail: only the limits group it.
    """
    if ":" not in address:
        return address
    key = _PREFIXES.get(address)
    if key is None:
        try:
            key = str(ipaddress.IPv6Network((address, 64), strict=False))
        except ValueError:
            key = address
        if len(_PREFIXES) >= CACHE_ENTRIES:
            _PREFIXES.clear()
        _PREFIXES[address] = key
    return key


_PREFIXES: dict[str, str] = {}


class RateLimiter:
    """The three limits of the ``rateLimit`` settings, for one worker process (a limit of 0 is off).

    The rule they follow: **a token that verifies is never refused by a per-address limit**. Only the
    per-user limit applies to it. The per-address buckets count what arrives from an address
    (``arrived``) and what fails there (``authentication_failed``), and refuse only requests whose
    token did not verify: those get 429 instead of 401 or 403 once a budget is spent.

    Why not refuse before the token is looked at, as the first version did: the address is shared
    (a NAT, and behind a reverse proxy not in ``trustedProxies`` every client), so a few garbage
    tokens a second from anyone there locked out every valid user there. Refusing unverified work
    early would save one signature check per bad token, but a fresh valid token is unverified work
    too, and in a login storm every token is fresh. A bad token costs at most what a good one does
    (one RSA verification, a few for a token without ``kid``, and no database access), so a flood
    of them is bounded by the same capacity that carries a login storm; a cached valid token costs
    a hash and a look-up and is answered before any bucket is consulted.
    """

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

    def arrived(self, address: str, now: float | None = None) -> float:
        """A request from ``address`` reached a limited endpoint: it takes a token from the address's
        request bucket. The seconds until there was one (0.0: there was) are kept for
        ``authentication_failed``; they are never a reason to refuse the request by themselves."""
        if self.per_address is None:
            return 0.0
        return self.per_address.take(bucket_key(address), time.monotonic() if now is None else now)

    def for_user(self, user: Hashable, now: float | None = None) -> Refusal | None:
        """Checked once the token is valid, with its user id."""
        if self.per_user is None:
            return None
        wait = self.per_user.take(user, time.monotonic() if now is None else now)
        return _refusal(wait, "for this user", "perUserPerMinute") if wait else None

    def authentication_failed(
        self, address: str, address_wait: float = 0.0, now: float | None = None, *, signed: bool = False
    ) -> Refusal | None:
        """A token from ``address`` was refused: count it, and say whether the answer is a 429 (a
        budget of the address is spent) rather than the 401.

        ``address_wait``: what ``arrived`` said for this request. ``signed``: the token verified but
        broke the policy (a 403): it counts, but is never turned into a 429, since it verified and a
        403 is final where a 429 invites the client to send it again."""
        wait = 0.0
        if self.failed_auth is not None:  # counted even when the request bucket refuses
            wait = self.failed_auth.take(bucket_key(address), time.monotonic() if now is None else now)
        if signed:
            return None
        if address_wait:
            return _refusal(address_wait, "from this address", "perAddressPerMinute")
        if wait:
            return _refusal(
                wait, "with failed authentication from this address", "failedAuthPerAddressPerMinute"
            )
        return None


class RateLimitLayer:
    """Applies the limits on the endpoint table's limited paths (``endpoints.LIMITED_PATHS``).

    Nothing is refused here (see ``RateLimiter`` for why): the request takes its token from the
    address's request bucket, and the limiter goes in the request's context with what that bucket
    said. The endpoint asks right after the token check: the per-user limit for a token that
    verified, ``authentication_failed`` for one that did not, and answers (and audits) any 429 itself.

    It also notices a reverse proxy nobody listed: a request with ``X-Forwarded-For`` from a peer not
    in ``trustedProxies`` is reported once (a WARNING, and ``/health/ready``), since every client
    behind that proxy then shares its address and its buckets.
    """

    def __init__(self, app: ASGIApp, limiter: RateLimiter, services: ServiceHolder) -> None:
        """``services``: where the lifespan puts the worker's services, which hold the proxy notice."""
        self.app = app
        self._limiter = limiter
        self._services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in LIMITED_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        limiter = self._limiter
        context = context_of(scope)
        services = self._services.services
        if services is not None and services.proxy_notice.peer is None:
            _notice_untrusted_proxy(scope, limiter.trusted, services.proxy_notice)
        context.address_wait = limiter.arrived(context.address)
        context.limiter = limiter
        await self.app(scope, receive, send)


def _notice_untrusted_proxy(scope: Scope, trusted: TrustedProxies | None, notice: ProxyNotice) -> None:
    """Report the peer if it forwards for others without being trusted to (only until the first time:
    after that, the layer no longer looks)."""
    client = scope.get("client")
    if not client or (trusted is not None and client[0] in trusted):
        return
    for name, _ in scope["headers"]:
        if name == b"x-forwarded-for":
            notice.saw(client[0])
            return
