"""What a provider's test fixture hands to the service-level tests (tests/test_providers_service.py).

Each support module that starts a key-provider server (SoftHSM2, OpenBao, moto, Azurite, the Azure
Key Vault and Google Cloud KMS stand-ins) offers function-scoped fixtures returning a
``ProviderEnv``: a fresh key on a session-wide server, and the settings that make a
``keyconnector serve`` process use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
