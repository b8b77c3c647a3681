"""RSA key providers: what wraps and unwraps the data key.

One module per provider, each exposing ``async def open(side: SideSettings) -> KeyProvider``
(the side of the settings it serves: the deployment's own or the ``transferTo`` target's);
``rsaKey.provider`` picks the module by name. The provider only ever sees the 32-byte data key,
never a user's key.

Errors follow one rule across providers: a wrong or missing setting raises ``ConfigurationError``
naming it; a backend that cannot be reached (network, HSM token gone, KMS throttling) raises
``UnavailableError``, which the HTTP layer answers with 503 and which never stops the process;
a wrapped key that the backend refuses to unwrap raises ``IntegrityFailure``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Awaitable, Callable

from keyconnector.errors import ConfigurationError, UnavailableError, did_you_mean
from keyconnector.keypairs.base import KeyProvider, rsa_fingerprint, upstream_view
from keyconnector.runtime.settings import SideSettings

__all__ = ["PROVIDERS", "KeyProvider", "ReconnectingKeyProvider", "open_key_provider", "rsa_fingerprint"]

log = logging.getLogger("keyconnector.keys")

PROVIDERS: dict[str, str] = {
    "certificate": "keyconnector.keypairs.certificate",
    "pkcs11": "keyconnector.keypairs.pkcs11",
    "awskms": "keyconnector.keypairs.awskms",
    "azurekv": "keyconnector.keypairs.azurekv",
    "gcpkms": "keyconnector.keypairs.gcpkms",
    "vaulttransit": "keyconnector.keypairs.vaulttransit",
    "kmip": "keyconnector.keypairs.kmip",
}


async def open_key_provider(side: SideSettings, *, tolerate_outage: bool = False) -> KeyProvider:
    """The provider named by the side's ``rsaKey.provider`` (``transferTo.rsaKey.provider`` for the target).

    With ``tolerate_outage``, a backend that cannot be reached yet does not fail the call: the
    result connects on first use and keeps trying (what a server worker wants, so that it starts,
    answers 503 and recovers by itself). A configuration error always fails at once.
    """
    if tolerate_outage:
        try:
            return await _open(side)
        except UnavailableError as exc:
            log.error("%s; will keep trying", exc)
            return ReconnectingKeyProvider(lambda: _open(side), exc)
    return await _open(side)


async def _open(side: SideSettings) -> KeyProvider:
    rsa_settings = side.require_rsa_key()
    module_name = PROVIDERS.get(rsa_settings.provider)
    if module_name is None:
        raise ConfigurationError(
            f"{side.rsa_key_prefix}.provider",
            f"unknown RSA key provider '{rsa_settings.provider}'; "
            f"choose one of: {', '.join(sorted(PROVIDERS))}{did_you_mean(rsa_settings.provider, PROVIDERS)}",
        )
    module = importlib.import_module(module_name)
    provider: KeyProvider = await module.open(side)
    return provider


class ReconnectingKeyProvider:
    """A provider whose backend was unreachable when the process started.

    Every call tries to open the real provider, at most once per ``retry_interval``; in between,
    calls fail fast with the last ``UnavailableError`` so that a login storm during an outage does
    not become a connection storm against the HSM or KMS.
    """

    def __init__(
        self,
        opener: Callable[[], Awaitable[KeyProvider]],
        error: UnavailableError,
        retry_interval: float = 5.0,
    ) -> None:
        self._opener = opener
        self._error = error
        self._retry_interval = retry_interval
        self._last_attempt = time.monotonic()
        self._inner: KeyProvider | None = None
        self._lock = asyncio.Lock()

    @property
    def description(self) -> str:
        if self._inner is not None:
            return self._inner.description
        return f"not connected yet ({self._error})"

    @property
    def fingerprint(self) -> str:
        if self._inner is None:
            raise self._error
        return self._inner.fingerprint

    def upstream_view(self) -> KeyProvider:
        """The connected provider's (``keyconnector.keypairs.base.upstream_view``); before that, one
        that connects through this provider on use, so that its calls fail (and are counted) as
        this provider's do."""
        if self._inner is None:
            return _UpstreamViewOfReconnecting(self)
        return upstream_view(self._inner)

    async def _provider(self) -> KeyProvider:
        if self._inner is not None:
            return self._inner
        async with self._lock:
            if self._inner is not None:
                return self._inner
            if time.monotonic() - self._last_attempt < self._retry_interval:
                raise self._error
            self._last_attempt = time.monotonic()
            try:
                self._inner = await self._opener()
            except UnavailableError as exc:
                self._error = exc
                raise
            log.info("key provider connected: %s", self._inner.description)
            return self._inner

    async def wrap(self, data_key: bytes) -> bytes:
        return await (await self._provider()).wrap(data_key)

    async def unwrap(self, wrapped: bytes) -> bytes:
        return await (await self._provider()).unwrap(wrapped)

    async def check(self) -> None:
        await (await self._provider()).check()

    async def aclose(self) -> None:
        if self._inner is not None:
            await self._inner.aclose()


class _UpstreamViewOfReconnecting:
    """``ReconnectingKeyProvider.upstream_view`` while its backend is not connected yet."""

    def __init__(self, parent: ReconnectingKeyProvider) -> None:
        self._parent = parent

    async def _view(self) -> KeyProvider:
        return upstream_view(await self._parent._provider())

    @property
    def description(self) -> str:
        return self._parent.description

    @property
    def fingerprint(self) -> str:
        inner = self._parent._inner
        if inner is None:
            raise self._parent._error
        return upstream_view(inner).fingerprint

    async def wrap(self, data_key: bytes) -> bytes:
        return await (await self._view()).wrap(data_key)

    async def unwrap(self, wrapped: bytes) -> bytes:
        return await (await self._view()).unwrap(wrapped)

    async def check(self) -> None:
        await (await self._view()).check()

    async def aclose(self) -> None:
        return None  # the parent owns the backend
