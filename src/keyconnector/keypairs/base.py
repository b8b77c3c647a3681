"""What every key-pair provider is: the protocol the core wraps its data keys through, the
fingerprint that finds a wrap again whichever provider made it, and the RSA-OAEP variants
(``WrapAlgorithm``: upstream's SHA-1, and SHA-256) that the certificate, pkcs11 and azurekv
providers wrap with.

It lives apart from the registry (``keyconnector.keypairs``) so that the core can depend on the
protocol alone, without the settings and the provider modules the registry reaches.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from keyconnector.errors import ConfigurationError

#: Upstream's wrapping for the certificate, PKCS#11 and Azure providers (kept for stored data).
OAEP_SHA1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303
#: Upstream's wrapping for Google Cloud KMS (and AWS KMS ``RSAES_OAEP_SHA_256``); ``RSA-OAEP-256``.
OAEP_SHA256 = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


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


@dataclass(frozen=True)
class WrapAlgorithm:
    """One RSA-OAEP variant a key pair wraps the data key with: the one place that says what it is.

    ``name`` is what the operator writes (``rsaKey.wrapAlgorithm``): the JOSE (RFC 7518) name, which
    Azure Key Vault uses too. ``scheme`` starts the fingerprint, so that two wraps of one key pair
    with different algorithms are two entries of the key ring, and the ring's MAC (which covers the
    fingerprints) covers the algorithm: a database writer cannot relabel one wrap as the other."""

    name: str
    hash_name: str
    """``SHA-1`` or ``SHA-256``: the OAEP hash and its MGF1 hash (always the same here, as upstream)."""
    scheme: str
    padding: padding.OAEP

    def fingerprint(self, public_key: rsa.RSAPublicKey) -> str:
        return rsa_fingerprint(public_key, self.scheme)

    def wrap(self, public_key: rsa.RSAPublicKey, data_key: bytes) -> bytes:
        return public_key.encrypt(data_key, self.padding)


RSA_OAEP = WrapAlgorithm("RSA-OAEP", "SHA-1", "rsa-oaep-sha1", OAEP_SHA1)
"""Upstream's (certificate, pkcs11, azurekv): what ``ApplicationDatas`` always holds for them."""
RSA_OAEP_256 = WrapAlgorithm("RSA-OAEP-256", "SHA-256", "rsa-oaep-sha256", OAEP_SHA256)
WRAP_ALGORITHMS: dict[str, WrapAlgorithm] = {a.name: a for a in (RSA_OAEP, RSA_OAEP_256)}
"""Values of ``rsaKey.wrapAlgorithm`` (the configuration reference lists them from here)."""

_SCHEME_LABELS = {
    RSA_OAEP.scheme: f"{RSA_OAEP.name} (SHA-1)",
    RSA_OAEP_256.scheme: f"{RSA_OAEP_256.name} (SHA-256)",
    "rsa-oaep-sha512": "RSA-OAEP (SHA-512)",
}


def wrap_algorithm(value: str, setting: str) -> WrapAlgorithm:
    """The algorithm ``value`` names (case-insensitively), or a ``ConfigurationError`` naming
    ``setting`` and the closest value."""
    text = value.strip().upper()
    found = WRAP_ALGORITHMS.get(text)
    if found is not None:
        return found
    close = difflib.get_close_matches(text, list(WRAP_ALGORITHMS), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigurationError(
        setting,
        f"unknown wrap algorithm '{value}': choose {RSA_OAEP.name} (OAEP with SHA-1, upstream's, the "
        f"default) or {RSA_OAEP_256.name} (OAEP with SHA-256){hint}",
    )


def algorithm_label(fingerprint: str) -> str:
    """How a wrap filed under ``fingerprint`` was made, for ``stats`` and ``check``: the JOSE name
    for the RSA-OAEP schemes, else the fingerprint's scheme as written."""
    scheme = fingerprint.partition(":")[0]
    return _SCHEME_LABELS.get(scheme, scheme)


def upstream_view(provider: KeyProvider) -> KeyProvider:
    """``provider`` as upstream wraps with it: what ``ApplicationDatas`` holds (upstream reads it, so
    it never changes algorithm). The provider itself unless it offers ``upstream_view()`` (an RSA key
    pair configured for another algorithm), which shares its backend and is not to be closed."""
    view = getattr(provider, "upstream_view", None)
    if callable(view):
        result: KeyProvider = view()
        return result
    return provider


def readers(provider: KeyProvider) -> list[KeyProvider]:
    """The wraps ``provider``'s key pair can open, preferred first: its own algorithm's, then
    upstream's of the same key pair (so that turning on SHA-256 never breaks a deployment whose
    wraps are all still SHA-1: it reads them until ``rotate-key-pair`` adds its own)."""
    upstream = upstream_view(provider)
    return [provider] if upstream.fingerprint == provider.fingerprint else [provider, upstream]
