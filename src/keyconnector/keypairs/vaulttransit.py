"""The ``vaulttransit`` provider (ours): the RSA key pair lives in Vault's transit engine and never leaves it.

``wrap`` is transit ``encrypt`` and ``unwrap`` transit ``decrypt``; what the database keeps is the ASCII of
Vault's own ``vault:vN:...`` ciphertext, so Vault's key versioning and rotation apply unchanged.

The key must be RSA (``rsa-2048``, ``rsa-3072`` or ``rsa-4096``), not a symmetric transit key: its public
half can then be exported for a transfer to another provider while the private half stays in Vault.

The policy the service needs, for key NAME on mount ``transit``::

    path "transit/keys/NAME"    { capabilities = ["read"] }
    path "transit/encrypt/NAME" { capabilities = ["update"] }
    path "transit/decrypt/NAME" { capabilities = ["update"] }

Authentication is a token, or AppRole (preferred: the secret ID can be rotated without touching a long
lived token). AppRole tokens expire, so the provider renews its token when a third of its lifetime is
left, logs in again when renewal is no longer possible, and logs in again and retries once when Vault
answers 403 (the token was revoked, or outlived its maximum TTL while the service was idle).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from keyconnector.certificates import check_key_size
from keyconnector.certificates.vault import VaultApi, server_url
from keyconnector.errors import (
    ConfigurationError,
    IntegrityFailure,
    KeyConnectorError,
    UnavailableError,
    setting_name,
)
from keyconnector.runtime.settings import RsaKeySettings, SideSettings, secret

log = logging.getLogger("keyconnector.keys.vaulttransit")

RSA_KEY_TYPES = ("rsa-2048", "rsa-3072", "rsa-4096")
CIPHERTEXT_PREFIX = "vault:v"
REFRESH_FRACTION = 1 / 3
"""Renew (or log in again) when less than this part of the token's lifetime is left."""


@dataclass(frozen=True)
class _Target:
    prefix: str
    url: str
    mount: str
    key: str
    namespace: str | None
    token: str | None
    role_id: str | None
    secret_id: str | None
    approle_mount: str
    ca_directory: str

    @property
    def approle(self) -> bool:
        return self.role_id is not None

    @property
    def credential_setting(self) -> str:
        return f"{self.prefix}.vaultTransitSecretId" if self.approle else f"{self.prefix}.vaultTransitToken"

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(v for v in (self.token, self.secret_id) if v)


def _target(rsa_settings: RsaKeySettings, prefix: str, ca_directory: str) -> _Target:
    url = server_url(rsa_settings.vault_transit_server_uri, f"{prefix}.vaultTransitServerUri")
    key = (rsa_settings.vault_transit_key_name or "").strip()
    if not key:
        raise ConfigurationError(
            f"{prefix}.vaultTransitKeyName",
            "is not set; it is the name of the RSA key in Vault's transit engine",
        )
    token = secret(rsa_settings.vault_transit_token) or None
    role_id = (rsa_settings.vault_transit_role_id or "").strip() or None
    secret_id = secret(rsa_settings.vault_transit_secret_id) or None
    if token and (role_id or secret_id):
        raise ConfigurationError(
            f"{prefix}.vaultTransitToken",
            f"is set together with AppRole settings; use either a token or "
            f"{setting_name(prefix + '.vaultTransitRoleId')} and "
            f"{setting_name(prefix + '.vaultTransitSecretId')}",
        )
    if role_id and not secret_id:
        raise ConfigurationError(
            f"{prefix}.vaultTransitSecretId", "is not set; an AppRole login needs the role ID and a secret ID"
        )
    if secret_id and not role_id:
        raise ConfigurationError(
            f"{prefix}.vaultTransitRoleId", "is not set; an AppRole login needs the role ID and a secret ID"
        )
    if not token and not role_id:
        raise ConfigurationError(
            f"{prefix}.vaultTransitToken",
            f"is not set; give a Vault token, or {setting_name(prefix + '.vaultTransitRoleId')} and "
            f"{setting_name(prefix + '.vaultTransitSecretId')} to log in with AppRole",
        )
    return _Target(
        prefix=prefix,
        url=url,
        mount=rsa_settings.vault_transit_mount_point.strip().strip("/") or "transit",
        key=key,
        namespace=(rsa_settings.vault_transit_namespace or "").strip().strip("/") or None,
        token=token,
        role_id=role_id,
        secret_id=secret_id,
        approle_mount=rsa_settings.vault_transit_app_role_mount_point.strip().strip("/") or "approle",
        ca_directory=ca_directory,
    )


class VaultTransitKeyProvider:
    def __init__(self, api: VaultApi, client: Any, target: _Target) -> None:
        self._api = api
        self._client = client
        self._target = target
        self._component = (
            f"the key provider vaulttransit ({setting_name(target.prefix + '.vaultTransitServerUri')})"
        )
        self._opened = False
        self._lock = asyncio.Lock()
        self._generation = 0  # bumped at every new token, so concurrent 403s log in only once
        self._lifetime = 0.0  # seconds the current token was granted; 0: it does not expire
        self._expires_at: float | None = None
        self._renewable = False
        self._policies: list[str] = []
        self._description = ""
        self.public_key: rsa.RSAPublicKey | None = None
        """The public half of the latest key version, for transfers that wrap outside Vault."""

    @property
    def description(self) -> str:
        return self._description

    @property
    def fingerprint(self) -> str:
        # Vault keeps the key's versions itself; the key's address identifies it.
        target = self._target
        namespace = f"{target.namespace}/" if target.namespace else ""
        return f"vaulttransit:{target.url.rstrip('/')}/{namespace}{target.mount}/{target.key}"

    # -- opening ---------------------------------------------------------------------------------------

    async def _open(self) -> None:
        target = self._target
        if target.approle:
            await self._login()
        else:
            await self._lookup_token()
        key = await self._read_key()
        auth = f"AppRole at auth/{target.approle_mount}" if target.approle else "token"
        namespace = f", namespace '{target.namespace}'" if target.namespace else ""
        self._description = (
            f"Vault transit key '{target.key}' ({key['type']}, version {key['latest_version']}) on mount "
            f"'{target.mount}' at {target.url}{namespace}, {auth} authentication"
        )
        self._opened = True

    async def _lookup_token(self) -> None:
        try:
            data = (await asyncio.to_thread(self._client.auth.token.lookup_self))["data"]
        except self._api.errors as exc:
            if self._api.status(exc) in (401, 403):
                # A token without the default policy cannot look itself up; reading the key tells.
                return
            raise self._failure(exc, "look up the token") from None
        self._policies = list(data.get("policies") or [])
        ttl = float(data.get("ttl") or 0)
        self._lifetime = float(data.get("creation_ttl") or ttl)
        self._set_expiry(ttl, bool(data.get("renewable")))

    async def _login(self) -> None:
        target = self._target
        try:
            response = await asyncio.to_thread(
                self._client.auth.approle.login,
                role_id=target.role_id,
                secret_id=target.secret_id,
                mount_point=target.approle_mount,
            )
        except self._api.errors as exc:
            status = self._api.status(exc)
            if status == 400:
                raise self._config_error(
                    f"{target.prefix}.vaultTransitSecretId",
                    f"Vault refused the AppRole login ({self._api.message(exc, target.secrets)}); check "
                    f"{setting_name(target.prefix + '.vaultTransitRoleId')} and this secret ID (it may have "
                    "expired or used up its allowed logins)",
                ) from None
            if status in (401, 403, 404):
                raise self._config_error(
                    f"{target.prefix}.vaultTransitAppRoleMountPoint",
                    f"the AppRole login at auth/{target.approle_mount}/login was refused ({status}); "
                    "is AppRole enabled at that path?",
                ) from None
            raise self._failure(exc, "log in with AppRole") from None
        auth = response["auth"]
        self._policies = list(auth.get("policies") or [])
        self._lifetime = float(auth.get("lease_duration") or 0)
        self._set_expiry(self._lifetime, bool(auth.get("renewable")))
        self._generation += 1

    def _set_expiry(self, ttl: float, renewable: bool) -> None:
        self._expires_at = time.monotonic() + ttl if ttl > 0 else None
        self._renewable = renewable

    async def _read_key(self) -> dict[str, Any]:
        target = self._target
        key_setting = f"{target.prefix}.vaultTransitKeyName"
        try:
            data: dict[str, Any] = (
                await asyncio.to_thread(
                    self._client.secrets.transit.read_key, name=target.key, mount_point=target.mount
                )
            )["data"]
        except self._api.errors as exc:
            status = self._api.status(exc)
            if status in (401, 403):
                problem = await asyncio.to_thread(
                    self._api.token_problem, self._client, f"{target.mount}/keys/{target.key}", "read"
                )
                raise self._config_error(target.credential_setting, problem) from None
            if status == 404:
                if self._api.not_vault(exc):
                    raise self._config_error(
                        f"{target.prefix}.vaultTransitServerUri",
                        f"{target.url} answered 404 without a Vault error: is it a Vault server?",
                    ) from None
                if "no handler for route" in self._api.message(exc, target.secrets):
                    raise self._config_error(
                        f"{target.prefix}.vaultTransitMountPoint",
                        f"no secrets engine is mounted at '{target.mount}' on {target.url}",
                    ) from None
                raise self._config_error(
                    key_setting,
                    f"no key '{target.key}' in the transit engine mounted at '{target.mount}' "
                    f"on {target.url}; "
                    f"create one with: vault write -f {target.mount}/keys/{target.key} type=rsa-4096",
                ) from None
            raise self._failure(exc, f"read the transit key '{target.key}'") from None
        key_type = str(data.get("type"))
        if key_type not in RSA_KEY_TYPES:
            raise self._config_error(
                key_setting,
                f"the transit key '{target.key}' is of type {key_type}; the vaulttransit provider needs "
                f"an RSA key ({', '.join(RSA_KEY_TYPES)}) so that its public key can be exported for "
                "transfers to another provider while the private key stays in Vault",
            )
        if not (data.get("supports_encryption") and data.get("supports_decryption")):
            raise self._config_error(
                key_setting, f"the transit key '{target.key}' does not support both encryption and decryption"
            )
        latest = str(data.get("latest_version"))
        pem = ((data.get("keys") or {}).get(latest) or {}).get("public_key")
        if pem:
            public = load_pem_public_key(pem.encode())
            if isinstance(public, rsa.RSAPublicKey):
                check_key_size(public, key_setting)
                self.public_key = public
        return data

    # -- errors ----------------------------------------------------------------------------------------

    def _config_error(self, setting: str, problem: str) -> KeyConnectorError:
        """A configuration problem: fatal while opening; once running, an outage until someone fixes it."""
        if not self._opened:
            return ConfigurationError(setting, problem)
        return UnavailableError(self._component, f"{setting_name(setting)}: {problem}")

    def _failure(self, exc: Exception, doing: str) -> KeyConnectorError:
        """The error for a failure that is not a refusal specific to the operation."""
        target, api = self._target, self._api
        untrusted = api.untrusted(exc)
        if untrusted is not None:
            if "TLS certificate" in untrusted:
                return self._config_error(
                    f"{target.prefix}.vaultTransitCaBundle",
                    f"cannot connect to {target.url}: {untrusted}; give the CA certificate that signed it in "
                    f"this setting or as a .crt file in {target.ca_directory}",
                )
            return self._config_error(
                f"{target.prefix}.vaultTransitServerUri", f"cannot connect to {target.url}: {untrusted}"
            )
        outage = api.outage(exc, target.url, target.secrets)
        if outage is not None:
            return UnavailableError(self._component, outage)
        status = api.status(exc)
        if status in (401, 403):
            return self._config_error(
                target.credential_setting,
                f"Vault refused to {doing} (403 permission denied): the token was revoked or expired, or its "
                f"policies ({', '.join(self._policies) or 'unknown'}) do not allow it",
            )
        return UnavailableError(
            self._component, f"Vault refused to {doing} ({status}): {api.message(exc, target.secrets)}"
        )

    # -- tokens ----------------------------------------------------------------------------------------

    async def _refresh_if_due(self) -> None:
        expires_at = self._expires_at
        if expires_at is None or expires_at - time.monotonic() > self._lifetime * REFRESH_FRACTION:
            return
        async with self._lock:
            expires_at = self._expires_at
            if expires_at is None or expires_at - time.monotonic() > self._lifetime * REFRESH_FRACTION:
                return
            if self._renewable and await self._renew():
                return
            if self._target.approle:
                await self._login()
            else:
                log.warning(
                    "the Vault token of %s cannot be renewed any further; it expires in %.0f s: set a new %s",
                    self._component,
                    max(0.0, expires_at - time.monotonic()),
                    setting_name(self._target.prefix + ".vaultTransitToken"),
                )
                self._expires_at = None  # warn once; a 403 will say the rest

    async def _renew(self) -> bool:
        """Renew the token; False when the renewal did not buy a useful lifetime (max TTL reached)."""
        try:
            auth = (await asyncio.to_thread(self._client.auth.token.renew_self))["auth"]
        except self._api.errors:
            return False
        granted = float(auth.get("lease_duration") or 0)
        self._set_expiry(granted, bool(auth.get("renewable")))
        return granted > self._lifetime * REFRESH_FRACTION

    async def _login_again(self, generation: int) -> None:
        async with self._lock:
            if self._generation == generation:
                await self._login()

    # -- operations ------------------------------------------------------------------------------------

    async def _call(self, operation: str, request: Callable[[], Any]) -> Any:
        await self._refresh_if_due()
        generation = self._generation
        try:
            return await asyncio.to_thread(request)
        except self._api.errors as exc:
            if not (self._target.approle and self._api.status(exc) in (401, 403)):
                raise self._operation_error(operation, exc) from None
        await self._login_again(generation)
        try:
            return await asyncio.to_thread(request)
        except self._api.errors as exc:
            raise self._operation_error(operation, exc) from None

    def _operation_error(self, operation: str, exc: Exception) -> KeyConnectorError:
        status = self._api.status(exc)
        message = self._api.message(exc, self._target.secrets) if status is not None else ""
        # Vault answers 400 to a ciphertext it cannot parse or from another key, and 500 when RSA-OAEP
        # decryption fails (a ciphertext of another RSA key): both mean the stored value is not ours.
        refused = (status == 400 and "not found" not in message) or (status == 500 and "decrypt" in message)
        if operation == "decrypt" and refused:
            return IntegrityFailure(
                f"Vault transit key '{self._target.key}' does not decrypt the stored data key ({message}): "
                "it was wrapped by another key"
            )
        return self._failure(exc, f"{operation} with the transit key '{self._target.key}'")

    async def wrap(self, data_key: bytes) -> bytes:
        target = self._target
        response = await self._call(
            "encrypt",
            lambda: self._client.secrets.transit.encrypt_data(
                name=target.key,
                plaintext=base64.b64encode(data_key).decode("ascii"),
                mount_point=target.mount,
            ),
        )
        ciphertext: str = response["data"]["ciphertext"]
        return ciphertext.encode("ascii")

    async def unwrap(self, wrapped: bytes) -> bytes:
        target = self._target
        try:
            ciphertext = wrapped.decode("ascii")
        except UnicodeDecodeError:
            ciphertext = ""
        if not ciphertext.startswith(CIPHERTEXT_PREFIX):
            raise IntegrityFailure(
                "the stored data key is not a Vault transit ciphertext (vault:vN:...): "
                "it was wrapped by another key provider"
            )
        response = await self._call(
            "decrypt",
            lambda: self._client.secrets.transit.decrypt_data(
                name=target.key, ciphertext=ciphertext, mount_point=target.mount
            ),
        )
        try:
            return base64.b64decode(response["data"]["plaintext"], validate=True)
        except (binascii.Error, KeyError, TypeError):
            raise IntegrityFailure("Vault's transit decrypt answered without a base64 plaintext") from None

    async def check(self) -> None:
        probe = secrets.token_bytes(32)
        if await self.unwrap(await self.wrap(probe)) != probe:
            raise IntegrityFailure(
                f"Vault transit key '{self._target.key}' does not round-trip a wrapped key"
            )

    async def aclose(self) -> None:
        """Revoke an AppRole token (each start logs in anew; this keeps Vault's token store small)."""
        if self._target.approle and self._opened:
            # Short timeouts: a Vault that is down must not hold up the shutdown.
            with contextlib.suppress(*self._api.errors):
                await asyncio.to_thread(
                    self._client.adapter.post, "/v1/auth/token/revoke-self", timeout=(2.0, 2.0)
                )
        self._client.adapter.close()


def verify_argument(side: SideSettings, rsa_settings: RsaKeySettings) -> str:
    """hvac's ``verify``: the deployment's trust as one file, or ``vaultTransitCaBundle`` when set
    (requests alone would trust certifi only)."""
    return side.trust().bundle_file(
        rsa_settings.vault_transit_ca_bundle, f"{side.rsa_key_prefix}.vaultTransitCaBundle"
    )


async def open(side: SideSettings) -> VaultTransitKeyProvider:
    rsa_settings = side.require_rsa_key()
    prefix = side.rsa_key_prefix
    target = _target(rsa_settings, prefix, side.ca_certificates_directory)
    api = VaultApi(f"{prefix}.provider", "vaulttransit")
    verify = verify_argument(side, rsa_settings)
    provider = VaultTransitKeyProvider(
        api, api.client(target.url, target.token, verify, target.namespace), target
    )
    try:
        await provider._open()
    except BaseException:
        provider._client.adapter.close()
        raise
    return provider
