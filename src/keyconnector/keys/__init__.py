"""RSA key providers: what wraps and unwraps the data key.

One module per provider, each exposing ``async def open(settings, prefix) -> KeyProvider``;
``rsaKey.provider`` picks the module by name. The provider only ever sees the 32-byte data key,
never a user's key.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

from keyconnector.errors import ConfigurationError
from keyconnector.settings import Settings

PROVIDERS: dict[str, str] = {
    "certificate": "keyconnector.keys.certificate",
}


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps the data key. Implementations raise ``UnavailableError`` when their backend is down."""

    @property
    def description(self) -> str:
        """Where the key lives, for logs and `keyconnector check`; never a secret."""
        ...

    async def wrap(self, data_key: bytes) -> bytes: ...

    async def unwrap(self, wrapped: bytes) -> bytes: ...

    async def check(self) -> None:
        """A real round trip through the backend; raises on failure. Used by health checks."""
        ...

    async def aclose(self) -> None: ...


async def open_key_provider(settings: Settings, *, transfer: bool = False) -> KeyProvider:
    """The provider named by ``rsaKey.provider`` (or ``transferTo.rsaKey.provider`` when ``transfer``)."""
    prefix = "transferTo.rsaKey" if transfer else "rsaKey"
    rsa_settings = settings.transfer_to.rsa_key if transfer else settings.rsa_key
    if rsa_settings is None:
        raise ConfigurationError(f"{prefix}.provider", "is not set")
    module_name = PROVIDERS.get(rsa_settings.provider)
    if module_name is None:
        raise ConfigurationError(
            f"{prefix}.provider",
            f"unknown RSA key provider '{rsa_settings.provider}'; "
            f"choose one of: {', '.join(sorted(PROVIDERS))}",
        )
    module = importlib.import_module(module_name)
    provider: KeyProvider = await module.open(settings, transfer=transfer)
    return provider
