"""Where a certificate (and, for the ``certificate`` key provider, its private key) comes from.

:func:`load_certificate` takes the side of the settings (``SideSettings``: the deployment's own or
the ``transferTo`` target's) and hands one module per source its section and context:
``async def load(settings, prefix, ca_directory) -> LoadedCertificate``; ``certificate.provider``
picks the module by name. Adding a source means adding one module and one line to ``SOURCES``.

``prefix`` is ``certificate`` or ``transferTo.certificate`` (so errors name the right setting);
``ca_directory`` is ``caCertificatesDirectory``, for sources that fetch over TLS (see
``keyconnector.runtime.trust.Trust``, built from it). A source that cannot reach its server raises
``UnavailableError``; a wrong setting raises ``ConfigurationError``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from keyconnector.errors import ConfigurationError
from keyconnector.runtime.settings import SideSettings

MIN_RSA_BITS = 2048

SOURCES: dict[str, str] = {
    "filesystem": "keyconnector.certificates.filesystem",
    "store": "keyconnector.certificates.store",
    "vault": "keyconnector.certificates.vault",
    "azurekv": "keyconnector.certificates.azurekv",
    "azurestorage": "keyconnector.certificates.azurestorage",
}


@dataclass(frozen=True, slots=True)
class LoadedCertificate:
    certificate: x509.Certificate | None
    public_key: rsa.RSAPublicKey
    private_key: rsa.RSAPrivateKey | None
    description: str  # where it came from, for logs and `keyconnector check`; never a secret


async def load_certificate(side: SideSettings) -> LoadedCertificate:
    """Load the certificate the side's ``certificate`` section names."""
    settings = side.require_certificate()
    prefix = side.certificate_prefix
    module_name = SOURCES.get(settings.provider)
    if module_name is None:
        raise ConfigurationError(
            f"{prefix}.provider",
            f"unknown certificate provider '{settings.provider}'; "
            f"choose one of: {', '.join(sorted(SOURCES))}",
        )
    module = importlib.import_module(module_name)
    loaded: LoadedCertificate = await module.load(settings, prefix, side.ca_certificates_directory)
    check_key_size(loaded.public_key, f"{prefix}.provider")
    return loaded


def check_key_size(key: rsa.RSAPublicKey, setting: str) -> None:
    if key.key_size < MIN_RSA_BITS:
        raise ConfigurationError(
            setting,
            f"the RSA key is {key.key_size} bits; at least {MIN_RSA_BITS} bits are required "
            "(make a new key pair with `keyconnector init`, then `keyconnector rotate-key-pair`)",
        )


def from_pkcs12(data: bytes, password: str | None, setting: str, where: str) -> LoadedCertificate:
    """Open a PFX/PKCS#12 blob, as every PFX-based source stores it."""
    from cryptography.hazmat.primitives.serialization import pkcs12

    attempts = [password.encode()] if password else [None, b""]
    last_error: Exception | None = None
    for attempt in attempts:
        try:
            bundle = pkcs12.load_pkcs12(data, attempt)
            break
        except ValueError as exc:
            last_error = exc
    else:
        hint = "the password is wrong" if password else "it needs a password, and none is set"
        raise ConfigurationError(setting, f"cannot open the PFX at {where}: {hint}") from last_error
    cert = bundle.cert.certificate if bundle.cert else None
    key = bundle.key
    if cert is None and key is None and len(bundle.additional_certs) == 1:
        # A certificate exported without its key (what the pkcs11 provider needs: the key stays
        # on the token) comes back as an "additional" certificate, with no key to pair it with.
        cert = bundle.additional_certs[0].certificate
    if key is not None and not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigurationError(setting, f"the PFX at {where} holds a {type(key).__name__}, not an RSA key")
    if cert is None and key is None:
        raise ConfigurationError(setting, f"the PFX at {where} holds neither a certificate nor a key")
    public = key.public_key() if key is not None else cert.public_key()  # type: ignore[union-attr]
    if not isinstance(public, rsa.RSAPublicKey):
        raise ConfigurationError(setting, f"the certificate at {where} does not hold an RSA key")
    return LoadedCertificate(certificate=cert, public_key=public, private_key=key, description=where)
