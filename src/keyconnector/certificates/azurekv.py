"""A certificate (and its private key) kept in Azure Key Vault.

Key Vault keeps a certificate's private key as a secret of the same name and version, holding the
whole bundle: base64 of a password-less PFX (content type ``application/x-pkcs12``) or PEM text
(``application/x-pem-file``), whichever the certificate's policy chose. The certificate itself
comes from the certificate object, so that a secret with a non-exportable key (or none) still
yields the public key, which is all the ``pkcs11`` provider needs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keyconnector._azure import Vault, object_name
from keyconnector._optional import require
from keyconnector.certificates import LoadedCertificate, from_pkcs12
from keyconnector.errors import ConfigurationError
from keyconnector.runtime.settings import CertificateSettings

PKCS12 = "application/x-pkcs12"
PEM = "application/x-pem-file"
PEM_PRIVATE_KEY = re.compile(
    rb"-----BEGIN ((?:RSA |EC |ENCRYPTED )?PRIVATE KEY)-----.+?-----END \1-----",
    re.DOTALL,
)


async def load(settings: CertificateSettings, prefix: str, ca_directory: str) -> LoadedCertificate:
    for module in ("azure.keyvault.certificates", "azure.keyvault.secrets"):
        require(module, extra="azure", setting=f"{prefix}.provider", provider="azurekv")
    from azure.keyvault.certificates import CertificateClient
    from azure.keyvault.secrets import KeyVaultSecretIdentifier, SecretClient

    setting = f"{prefix}.azureKeyvaultCertificateName"
    name = object_name(settings.azure_keyvault_certificate_name, setting, "certificate")
    vault = Vault(settings, prefix, ca_directory, "certificate provider")
    certificates = CertificateClient(vault.url, vault.credential, **vault.options)
    secrets = SecretClient(vault.url, vault.credential, **vault.options)
    missing = ConfigurationError(setting, f"there is no certificate '{name}' in {vault.url}")
    try:
        found = await vault.call(
            lambda: certificates.get_certificate(name), permission="certificates/get", missing=missing
        )
        if not found.cer:
            raise ConfigurationError(
                setting, f"the certificate '{name}' in {vault.url} has no certificate yet"
            )
        version = found.properties.version if found.properties else None
        secret_name, secret_version = name, version
        if found.secret_id:
            identifier = KeyVaultSecretIdentifier(found.secret_id)
            secret_name, secret_version = identifier.name, identifier.version
        bundle = await vault.call(
            lambda: secrets.get_secret(secret_name, secret_version), permission="secrets/get", missing=missing
        )
    finally:
        await asyncio.to_thread(_close, certificates, secrets, vault)
    where = f"Azure Key Vault certificate '{name}' (version {version}) in {vault.url}"
    certificate = x509.load_der_x509_certificate(bytes(found.cer))
    public_key = certificate.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ConfigurationError(setting, f"the {where} does not hold an RSA key")
    private_key = _private_key(bundle.value or "", bundle.properties.content_type, setting, where)
    if private_key is not None and private_key.public_key().public_numbers() != public_key.public_numbers():
        raise ConfigurationError(setting, f"the private key of the {where} does not match its certificate")
    return LoadedCertificate(
        certificate=certificate,
        public_key=public_key,
        private_key=private_key,
        description=where,
        setting=setting,
    )


def _private_key(value: str, content_type: str | None, setting: str, where: str) -> rsa.RSAPrivateKey | None:
    """The private key in the certificate's secret, or None when the key is not exportable."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if not kind:  # an imported secret may lack a content type; both formats are recognisable
        kind = PEM if value.lstrip().startswith("-----BEGIN") else PKCS12
    if kind == PKCS12:
        try:
            blob = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(setting, f"the secret of the {where} is not base64 of a PFX") from None
        return from_pkcs12(blob, None, setting, where).private_key
    if kind == PEM:
        match = PEM_PRIVATE_KEY.search(value.encode())
        if match is None:
            return None
        try:
            key = serialization.load_pem_private_key(match.group(0), password=None)
        except (ValueError, TypeError):
            raise ConfigurationError(
                setting, f"the private key in the secret of the {where} cannot be read"
            ) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigurationError(
                setting, f"the secret of the {where} holds a {type(key).__name__}, not an RSA key"
            )
        return key
    raise ConfigurationError(
        setting,
        f"the secret of the {where} has the content type '{content_type}'; expected {PKCS12} or {PEM}",
    )


class _Closable(Protocol):
    def close(self) -> None: ...


def _close(*clients: _Closable) -> None:
    for client in clients:
        client.close()
