"""The ``azurekv`` provider: an RSA key in Azure Key Vault, whose private half never leaves the vault.

Upstream wraps the data key with Key Vault's ``encrypt`` (RSA-OAEP, SHA-1) and unwraps it with
``decrypt``; ``rsaKey.wrapAlgorithm`` = ``RSA-OAEP-256`` uses Key Vault's algorithm of that name
(the setting's values are Key Vault's names). Wrapping here is done with the key's public half,
fetched at open: it is the same operation producing the same kind of bytes, minus a round trip.
Unwrapping always goes to the vault.

Key Vault rotation (manual or by rotation policy) makes a new version of the key, and a data key
wrapped under an older version does not decrypt under the new one; upstream, which uses the latest
version, stops working then. Here a refused unwrap is retried with the key's other enabled versions
before it is called an integrity failure.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import rsa

from keyconnector._azure import Vault, object_name
from keyconnector._optional import require
from keyconnector.certificates import check_key_size
from keyconnector.errors import ConfigurationError, IntegrityFailure, KeyConnectorError
from keyconnector.keypairs.base import RSA_OAEP, WrapAlgorithm, wrap_algorithm
from keyconnector.runtime.settings import SideSettings

if TYPE_CHECKING:
    from azure.keyvault.keys import KeyClient, KeyVaultKey
    from azure.keyvault.keys.crypto import CryptographyClient

log = logging.getLogger("keyconnector.keys.azurekv")

RSA_TYPES = {"RSA", "RSA-HSM"}
NEEDED_OPERATIONS = ("encrypt", "decrypt")


class AzureKeyVaultKeyProvider:
    def __init__(
        self,
        vault: Vault,
        client: KeyClient,
        name: str,
        version: str,
        public_key: rsa.RSAPublicKey,
        algorithm: WrapAlgorithm = RSA_OAEP,
    ) -> None:
        self.algorithm = algorithm
        self._vault = vault
        self._client = client
        self._name = name
        self._version = version
        self._public_key = public_key
        self._crypto = client.get_cryptography_client(name, key_version=version)
        self._refused = (
            f"Key Vault refused to decrypt the stored data key with the key '{name}' of {vault.url}: "
            "it was wrapped by another key"
        )

    def upstream_view(self) -> AzureKeyVaultKeyProvider:
        """The same key wrapping as upstream does (``keyconnector.keypairs.base.upstream_view``); it
        shares this provider's clients, so only this provider is closed."""
        if self.algorithm is RSA_OAEP:
            return self
        return AzureKeyVaultKeyProvider(
            self._vault, self._client, self._name, self._version, self._public_key, RSA_OAEP
        )

    @property
    def description(self) -> str:
        return f"Azure Key Vault key '{self._name}' (version {self._version}) in {self._vault.url}"

    @property
    def fingerprint(self) -> str:
        return self.algorithm.fingerprint(self._public_key)

    async def wrap(self, data_key: bytes) -> bytes:
        return self.algorithm.wrap(self._public_key, data_key)

    async def unwrap(self, wrapped: bytes) -> bytes:
        try:
            return await self._decrypt(self._crypto, wrapped)
        except IntegrityFailure:
            for version in await self._other_versions():
                try:
                    data_key = await self._decrypt(
                        self._client.get_cryptography_client(self._name, key_version=version), wrapped
                    )
                except IntegrityFailure:
                    continue
                log.warning(
                    "the data key is wrapped with version %s of the Key Vault key '%s', not the current "
                    "version %s; keep that version enabled until the data key is wrapped again",
                    version,
                    self._name,
                    self._version,
                )
                return data_key
            raise

    async def _decrypt(self, crypto: CryptographyClient, wrapped: bytes) -> bytes:
        from azure.keyvault.keys.crypto import EncryptionAlgorithm

        result = await self._vault.call(
            lambda: crypto.decrypt(EncryptionAlgorithm(self.algorithm.name), wrapped),
            permission="keys/decrypt",
            missing=ConfigurationError(
                f"{self._vault.prefix}.azureKeyvaultKeyName",
                f"the key '{self._name}' is no longer in {self._vault.url}",
            ),
            refused=self._refused,
        )
        return result.plaintext

    async def _other_versions(self) -> list[str]:
        """The key's other enabled versions, newest first; none when they cannot be listed."""
        try:
            versions = await self._vault.call(
                lambda: list(self._client.list_properties_of_key_versions(self._name)),
                permission="keys/list",
            )
        except KeyConnectorError as exc:
            log.info("cannot list the versions of the Key Vault key '%s': %s", self._name, exc)
            return []
        candidates = [
            v for v in versions if v.enabled is not False and v.version and v.version != self._version
        ]
        candidates.sort(key=lambda v: v.created_on.timestamp() if v.created_on else 0.0, reverse=True)
        return [v.version for v in candidates if v.version]

    async def check(self) -> None:
        probe = secrets.token_bytes(32)
        if await self._decrypt(self._crypto, await self.wrap(probe)) != probe:
            raise IntegrityFailure(f"the Key Vault key '{self._name}' does not round-trip a wrapped key")

    async def aclose(self) -> None:
        await asyncio.to_thread(_close, self._client, self._vault)


def _close(client: KeyClient, vault: Vault) -> None:
    client.close()
    vault.close()


def _public_key(key: KeyVaultKey, name: str, setting: str) -> rsa.RSAPublicKey:
    """The key's public half, after checking that it can do what upstream asked of it."""
    kty = str(key.key_type.value if hasattr(key.key_type, "value") else key.key_type)
    if kty not in RSA_TYPES:
        raise ConfigurationError(
            setting,
            f"the key '{name}' is an {kty} key; the azurekv provider needs an RSA key (RSA or RSA-HSM)",
        )
    if key.properties.enabled is False:
        raise ConfigurationError(setting, f"the key '{name}' is disabled; enable it in the vault")
    allowed = {str(getattr(op, "value", op)) for op in key.key_operations or ()}
    missing = [op for op in NEEDED_OPERATIONS if op not in allowed]
    if missing:
        raise ConfigurationError(
            setting,
            f"the key '{name}' does not permit {' and '.join(missing)} (it permits: "
            f"{', '.join(sorted(allowed)) or 'nothing'}); add them to its permitted operations",
        )
    # JsonWebKey sets its fields from the JSON at run time, so they are not declared.
    n: bytes | None = getattr(key.key, "n", None)
    e: bytes | None = getattr(key.key, "e", None)
    if not n or not e:
        raise ConfigurationError(setting, f"Key Vault returned the key '{name}' without its public key")
    public = rsa.RSAPublicNumbers(int.from_bytes(e, "big"), int.from_bytes(n, "big")).public_key()
    check_key_size(public, setting)
    return public


async def open(side: SideSettings) -> AzureKeyVaultKeyProvider:
    section = side.require_rsa_key()
    prefix = side.rsa_key_prefix
    require("azure.keyvault.keys", extra="azure", setting=f"{prefix}.provider", provider="azurekv")
    from azure.keyvault.keys import KeyClient

    algorithm = wrap_algorithm(section.wrap_algorithm, f"{prefix}.wrapAlgorithm")
    setting = f"{prefix}.azureKeyvaultKeyName"
    name = object_name(section.azure_keyvault_key_name, setting, "key")
    vault = Vault(section, prefix, side.ca_certificates_directory, "key provider")
    client = KeyClient(vault.url, vault.credential, **vault.options)
    try:
        key = await vault.call(
            lambda: client.get_key(name),
            permission="keys/get",
            missing=ConfigurationError(setting, f"there is no key '{name}' in {vault.url}"),
        )
        public_key = _public_key(key, name, setting)
    except BaseException:
        await asyncio.to_thread(_close, client, vault)
        raise
    return AzureKeyVaultKeyProvider(vault, client, name, key.properties.version or "", public_key, algorithm)
