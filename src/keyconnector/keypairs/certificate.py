"""The ``certificate`` provider: an RSA key pair held in a PFX or a PEM file (from any certificate source).

A certificate alone (a certificate-only PFX, a PEM or DER certificate, as an HSM deployment keeps) is
refused with a message saying the key is missing: it can wrap but never unwrap.

Wrapping is upstream's RSA-OAEP with SHA-1 (kept so that data keys wrapped by upstream unwrap
here), or RSA-OAEP-256 with ``rsaKey.wrapAlgorithm`` (``keyconnector.keypairs.base.WrapAlgorithm``).
RSA private-key operations are a few milliseconds, and the data key is unwrapped once per
process, so running them on the event loop is fine.
"""

from __future__ import annotations

import secrets

from cryptography.hazmat.primitives.asymmetric import rsa

from keyconnector.certificates import load_certificate
from keyconnector.errors import ConfigurationError, IntegrityFailure
from keyconnector.keypairs.base import RSA_OAEP, WrapAlgorithm, wrap_algorithm
from keyconnector.runtime.settings import SideSettings


class CertificateKeyProvider:
    def __init__(
        self, private_key: rsa.RSAPrivateKey, description: str, algorithm: WrapAlgorithm = RSA_OAEP
    ) -> None:
        self._private_key = private_key
        self._public_key = private_key.public_key()
        self._description = description
        self.algorithm = algorithm

    def upstream_view(self) -> CertificateKeyProvider:
        """The same key pair wrapping as upstream does (``keyconnector.keypairs.base.upstream_view``)."""
        if self.algorithm is RSA_OAEP:
            return self
        return CertificateKeyProvider(self._private_key, self._description, RSA_OAEP)

    @property
    def description(self) -> str:
        return self._description

    @property
    def fingerprint(self) -> str:
        return self.algorithm.fingerprint(self._public_key)

    async def wrap(self, data_key: bytes) -> bytes:
        return self.algorithm.wrap(self._public_key, data_key)

    async def unwrap(self, wrapped: bytes) -> bytes:
        try:
            return self._private_key.decrypt(wrapped, self.algorithm.padding)
        except ValueError:
            raise IntegrityFailure(
                "the stored data key does not unwrap with this key pair: it was wrapped by another one"
            ) from None

    async def check(self) -> None:
        probe = secrets.token_bytes(32)
        if await self.unwrap(await self.wrap(probe)) != probe:
            raise IntegrityFailure("the key pair does not round-trip a wrapped key")

    async def aclose(self) -> None:
        return None


async def open(side: SideSettings) -> CertificateKeyProvider:
    loaded = await load_certificate(side)
    if loaded.private_key is None:
        raise ConfigurationError(
            loaded.setting or f"{side.certificate_prefix}.provider",
            f"the certificate from {loaded.description} carries no private key; the 'certificate' RSA key "
            "provider needs the private key too: a PFX holding it, or a PEM file with the certificate and "
            "its private key (to keep the key on an HSM, use the pkcs11 RSA key provider)",
        )
    algorithm = wrap_algorithm(side.require_rsa_key().wrap_algorithm, f"{side.rsa_key_prefix}.wrapAlgorithm")
    return CertificateKeyProvider(loaded.private_key, f"certificate ({loaded.description})", algorithm)
