"""What every key-pair provider is: the protocol the core wraps its data keys through, and the
fingerprint that finds a wrap again whichever provider made it.

It lives apart from the registry (``keyconnector.keypairs``) so that the core can depend on the
protocol alone, without the settings and the provider modules the registry reaches.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps the data key. Implementations raise ``UnavailableError`` when their backend is down."""

    @property
    def description(self) -> str:
        """Where the key lives, for logs and `keyconnector check`; never a secret."""
        ...

    @property
    def fingerprint(self) -> str:
        """Identifies the key pair and the wrapping scheme, so a wrap made by one provider is found
        again by any provider that can unwrap it (see ``keyconnector.core.keyring``). Not a secret."""
        ...

    async def wrap(self, data_key: bytes) -> bytes: ...

    async def unwrap(self, wrapped: bytes) -> bytes: ...

    async def check(self) -> None:
        """A real round trip through the backend; raises on failure. Used by health checks."""
        ...

    async def aclose(self) -> None: ...


def rsa_fingerprint(public_key: rsa.RSAPublicKey, scheme: str) -> str:
    """``<scheme>:<SHA-256 of the public key>``: the same for every provider holding this key pair
    with this padding (a PFX, the HSM with its certificate, a cloud key's public half)."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"{scheme}:{hashlib.sha256(der).hexdigest()}"
