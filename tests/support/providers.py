"""What a provider's test fixture hands to the service-level tests (tests/test_providers_service.py).

Each support module that starts a key-provider server (SoftHSM2, OpenBao, moto, Azurite, the Azure
Key Vault and Google Cloud KMS stand-ins) offers function-scoped fixtures returning a
``ProviderEnv``: a fresh key on a session-wide server, and the settings that make a
``keyconnector serve`` process use it.

Certificate sources also check what the ``certificate`` key provider does with what they load
(:func:`assert_certificate_unwraps`).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from keyconnector.keypairs import KeyProvider
from keyconnector.keypairs import certificate as certificate_provider
from keyconnector.keypairs.base import OAEP_SHA1
from keyconnector.runtime.settings import Settings, side_of


@dataclass(frozen=True)
class ProviderEnv:
    env: dict[str, str]
    """Every ``keyConnectorSettings__rsaKey__*`` and ``keyConnectorSettings__certificate__*`` setting the
    provider needs, plus any environment its client library reads (``AWS_*``,
    ``GOOGLE_APPLICATION_CREDENTIALS``, ...)."""

    endpoint: tuple[str, int] | None
    """The TCP address the service connects to (``127.0.0.1``, port), written as ``127.0.0.1:<port>``
    in the settings so that a test can route it through a proxy; None for local providers."""

    secrets: tuple[str, ...] = field(default=())
    """Values that must never appear in a log: PINs, tokens, client secrets, passwords."""

    def through(self, port: int) -> dict[str, str]:
        """The same settings, pointed at ``127.0.0.1:port`` instead of the real endpoint."""
        if self.endpoint is None:
            raise ValueError("a local provider has no endpoint to redirect")
        host, real = self.endpoint
        return {k: v.replace(f"{host}:{real}", f"{host}:{port}") for k, v in self.env.items()}


T = TypeVar("T")


def run_and_close(provider: KeyProvider, operation: Callable[[], Awaitable[T]]) -> T:
    """Run one operation of ``provider`` in a fresh event loop, then close the provider."""

    async def main() -> T:
        try:
            return await operation()
        finally:
            await provider.aclose()

    return asyncio.run(main())


def assert_certificate_unwraps(settings: Settings, certificate: x509.Certificate) -> None:
    """The ``certificate`` key provider on ``settings`` passes its check and unwraps a data key that
    was wrapped the way upstream does it, with nothing but the certificate's public key."""
    public_key = certificate.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    data_key = secrets.token_bytes(32)
    wrapped = public_key.encrypt(data_key, OAEP_SHA1)

    async def unwrap() -> bytes:
        provider = await certificate_provider.open(side_of(settings))
        try:
            await provider.check()
            return await provider.unwrap(wrapped)
        finally:
            await provider.aclose()

    assert asyncio.run(unwrap()) == data_key
