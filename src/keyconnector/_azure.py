"""One Azure Key Vault, as both ``azurekv`` modules reach it: settings, credential, client options, errors.

The key provider and the certificate source read the same five upstream settings (plus our authority
host and CA bundle), sign in the same way and fail in the same ways, so the rules live here once:

- Sign-in: a client secret means an app registration (``ClientSecretCredential``); no secret means
  the machine's managed identity (``ManagedIdentityCredential``: App Service, Container Apps, Arc,
  AKS workload identity, or a VM's IMDS), with ``azureKeyvaultAdAppId``, when set, choosing a
  user-assigned identity. Not ``DefaultAzureCredential``: on a server, silently falling through to
  the Azure CLI or a developer's cached login would hide a broken deployment behind a success.
- Every client and the credential share the CA bundle, short timeouts and few retries, so an
  outage is reported in seconds rather than after the SDK's default five minutes.
- Errors: the SDK's exceptions carry request details and Entra ID's descriptions; none of that is
  passed on. Each failure is turned into our own message naming the setting to fix, and raised
  ``from None``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from keyconnector._optional import require
from keyconnector.errors import (
    ConfigurationError,
    IntegrityFailure,
    KeyConnectorError,
    UnavailableError,
    setting_name,
)
from keyconnector.runtime.settings import CertificateSettings, RsaKeySettings, secret
from keyconnector.runtime.trust import Trust

if TYPE_CHECKING:
    from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
    from azure.identity import ClientSecretCredential, ManagedIdentityCredential

T = TypeVar("T")

# The SDK's HTTP logging policy writes every request and response at INFO; that is noise in a service
# log (and request URLs are nobody's business there).
logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)

CLIENT_OPTIONS: dict[str, Any] = {
    "connection_timeout": 5,
    "read_timeout": 10,
    "retry_total": 2,
    "retry_backoff_factor": 0.5,
    "retry_backoff_max": 4,
}
NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")
RBAC_ROLES = {
    "keys": "Key Vault Crypto User",
    "certificates": "Key Vault Certificate User",
    "secrets": "Key Vault Secrets User",
}
# Entra ID error codes that mean "this setting is wrong" (https://login.microsoftonline.com/error).
SECRET_CODES = {7000215, 7000222, 7000216}  # invalid, expired, missing client secret
APP_CODES = {700016, 7000112, 700024}  # app not found in the tenant, app disabled
TENANT_CODES = {90002, 90023, 900023, 90072}  # tenant not found, invalid tenant


def vault_url(value: str | None, setting: str) -> str:
    """``https://host[:port]``: the vault's base URL, which is all the SDK accepts."""
    if not value or not value.strip():
        raise ConfigurationError(
            setting, "is not set; it is the vault's URL, e.g. https://my-vault.vault.azure.net/"
        )
    parts = urlsplit(value.strip())
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise ConfigurationError(
            setting,
            f"'{value}' is not an https:// URL; it is the vault's URL, "
            "e.g. https://my-vault.vault.azure.net/ (Key Vault only speaks HTTPS)",
        )
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ConfigurationError(
            setting,
            f"'{value}' carries a path; give only the vault's URL, e.g. https://my-vault.vault.azure.net/",
        )
    return f"https://{parts.netloc}"


def object_name(value: str | None, setting: str, what: str) -> str:
    if not value or not value.strip():
        raise ConfigurationError(setting, f"is not set; it is the name of the {what} in the vault")
    name = value.strip()
    if not NAME.match(name):
        raise ConfigurationError(
            setting, f"'{name}' is not a Key Vault {what} name (1 to 127 letters, digits and dashes)"
        )
    return name


def _authority(value: str | None, setting: str) -> str | None:
    if not value or not value.strip():
        return None
    text = value.strip()
    parts = urlsplit(text if "://" in text else "https://" + text)
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise ConfigurationError(
            setting, f"'{value}' is not an https:// URL (e.g. https://login.microsoftonline.us)"
        )
    return f"https://{parts.netloc}"


def _network_cause(exc: BaseException) -> BaseException | None:
    """The connection failure behind ``exc``: the SDK often wraps it in an authentication error."""
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ServiceRequestError | ServiceResponseError | ConnectionError | TimeoutError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _reason(exc: BaseException) -> str:
    """A short, secret-free reason for a connection failure, from the library's text."""
    text = str(exc).lower()
    for needle, reason in (
        ("refused", "connection refused"),
        ("timed out", "timed out"),
        ("timeout", "timed out"),
        ("name or service not known", "the host name does not resolve"),
        ("nodename nor servname", "the host name does not resolve"),
        ("temporary failure in name resolution", "the host name does not resolve"),
        ("getaddrinfo", "the host name does not resolve"),
        ("reset", "the connection was reset"),
        ("aborted", "the connection was reset"),
        ("disconnected", "the connection was closed"),
        ("unreachable", "the network is unreachable"),
    ):
        if needle in text:
            return reason
    return "the connection failed"


def _tls_untrusted(exc: BaseException) -> bool:
    return "certificate_verify_failed" in str(exc).lower()


class Vault:
    """A vault to call through the Azure SDK, with the credential and options every client needs."""

    def __init__(
        self, section: RsaKeySettings | CertificateSettings, prefix: str, ca_directory: str, role: str
    ) -> None:
        self.prefix = prefix
        self.role = role  # "key provider" or "certificate provider", for messages
        require("azure.identity", extra="azure", setting=f"{prefix}.provider", provider="azurekv")
        self.url = vault_url(section.azure_keyvault_uri, f"{prefix}.azureKeyvaultUri")
        bundle = Trust.from_directory(ca_directory).bundle_file(
            section.azure_keyvault_ca_bundle, f"{prefix}.azureKeyvaultCaBundle"
        )
        self.options: dict[str, Any] = {**CLIENT_OPTIONS, "connection_verify": bundle}
        self.app_id = (section.azure_keyvault_ad_app_id or "").strip() or None
        client_secret = secret(section.azure_keyvault_ad_secret)
        self.uses_secret = bool(client_secret)
        authority_setting = f"{prefix}.azureKeyvaultAuthorityHost"
        authority = _authority(section.azure_keyvault_authority_host, authority_setting)
        inner: ClientSecretCredential | ManagedIdentityCredential
        if client_secret:
            from azure.identity import ClientSecretCredential

            tenant = (section.azure_keyvault_ad_tenant_id or "").strip()
            if not tenant:
                raise ConfigurationError(
                    f"{prefix}.azureKeyvaultAdTenantId",
                    "is not set; a client secret needs the directory (tenant) ID of its app registration",
                )
            if not self.app_id:
                raise ConfigurationError(
                    f"{prefix}.azureKeyvaultAdAppId",
                    "is not set; a client secret needs the application (client) ID of its app registration",
                )
            self.tenant: str | None = tenant
            self.who = f"application {self.app_id}"
            self.sign_in = authority or "https://login.microsoftonline.com"
            self.sign_in_component = f"the {role} azurekv ({setting_name(authority_setting)})"
            try:
                inner = ClientSecretCredential(
                    tenant,
                    self.app_id,
                    client_secret,
                    # A configured authority is the operator's own (sovereign cloud, Azure Stack, tests):
                    # MSAL's instance discovery would ask the public cloud about it and fail.
                    **({"authority": authority, "disable_instance_discovery": True} if authority else {}),
                    **self.options,
                )
            except ValueError:
                raise ConfigurationError(
                    f"{prefix}.azureKeyvaultAdTenantId", f"'{tenant}' is not a directory (tenant) ID"
                ) from None
        else:
            from azure.identity import ManagedIdentityCredential

            self.tenant = None
            self.who = (
                f"the managed identity with client ID {self.app_id}"
                if self.app_id
                else "this machine's system-assigned managed identity"
            )
            self.sign_in = "the managed identity endpoint (no client secret is set)"
            self.sign_in_component = f"the {role} azurekv (managed identity endpoint)"
            inner = ManagedIdentityCredential(client_id=self.app_id, **self.options)
        self.credential = _Credential(inner, self)

    @property
    def component(self) -> str:
        return f"the {self.role} azurekv ({setting_name(self.prefix + '.azureKeyvaultUri')})"

    async def call(
        self,
        action: Callable[[], T],
        *,
        permission: str,
        missing: ConfigurationError | None = None,
        refused: str | None = None,
    ) -> T:
        """Run one blocking SDK call in a thread; translate its failure (see ``vault_error``)."""
        try:
            return await asyncio.to_thread(action)
        except KeyConnectorError:
            raise
        except Exception as exc:
            raise self.vault_error(exc, permission=permission, missing=missing, refused=refused) from None

    def vault_error(
        self,
        exc: Exception,
        *,
        permission: str,
        missing: ConfigurationError | None = None,
        refused: str | None = None,
    ) -> KeyConnectorError:
        """What a failed vault call means. ``permission`` is what it needed, e.g. ``keys/decrypt``;
        ``missing`` is raised on 404; ``refused`` (an IntegrityFailure message) on 400."""
        from azure.core.exceptions import HttpResponseError

        network = _network_cause(exc)
        if network is not None:
            if _tls_untrusted(network):
                return self._untrusted(self.url)
            return UnavailableError(self.component, f"cannot connect to {self.url}: {_reason(network)}")
        if isinstance(exc, HttpResponseError) and exc.status_code is not None:
            status = exc.status_code
            code = getattr(exc.error, "code", None) if exc.error is not None else None
            if status == 404 and missing is not None:
                return missing
            if status == 400 and refused is not None:
                return IntegrityFailure(refused)
            if status == 403:
                area, operation = permission.split("/")
                return ConfigurationError(
                    f"{self.prefix}.azureKeyvaultAdAppId",
                    f"{self.who} lacks the '{operation}' permission on {area} in {self.url} "
                    f"(Key Vault answered {code or 'Forbidden'}): add it to the vault's access policy, "
                    f"or assign the role '{RBAC_ROLES[area]}' when the vault uses Azure RBAC",
                )
            if status == 401:
                return ConfigurationError(
                    f"{self.prefix}.azureKeyvaultAdTenantId",
                    f"{self.url} refused the access token of {self.who} (HTTP 401): the vault belongs to "
                    "another directory (tenant), or the token was issued for another cloud",
                )
            if status == 429 or status >= 500:
                return UnavailableError(self.component, f"{self.url} answered HTTP {status}")
            return ConfigurationError(
                f"{self.prefix}.azureKeyvaultUri",
                f"{self.url} answered HTTP {status} ({code or 'no error code'}) to a request that needs "
                f"'{permission}'",
            )
        if isinstance(exc, ValueError):
            # The SDK refuses a vault whose authentication challenge names another domain.
            return ConfigurationError(
                f"{self.prefix}.azureKeyvaultUri",
                f"{self.url} does not answer as the Key Vault at this address "
                "(its authentication challenge is for another domain)",
            )
        return UnavailableError(self.component, f"unexpected failure ({type(exc).__name__})")

    def sign_in_error(self, exc: Exception) -> KeyConnectorError:
        """What a failed token request means; ``exc`` comes from azure-identity or MSAL."""
        from azure.core.exceptions import ClientAuthenticationError
        from azure.identity import CredentialUnavailableError

        network = _network_cause(exc)
        if network is not None:
            if _tls_untrusted(network):
                return self._untrusted(self.sign_in)
            return UnavailableError(
                self.sign_in_component, f"cannot sign in at {self.sign_in}: {_reason(network)}"
            )
        secret_setting = f"{self.prefix}.azureKeyvaultAdSecret"
        app_setting = f"{self.prefix}.azureKeyvaultAdAppId"
        tenant_setting = f"{self.prefix}.azureKeyvaultAdTenantId"
        if isinstance(exc, CredentialUnavailableError) or not self.uses_secret:
            if self.app_id:
                return ConfigurationError(
                    app_setting,
                    f"no client secret is set, so {self.who} was asked for a token, and it gave none: "
                    "assign that user-assigned identity to this machine, or set the app registration's "
                    f"client secret in {setting_name(secret_setting)}",
                )
            return ConfigurationError(
                secret_setting,
                "is not set, so this machine's managed identity was asked for a token, and there is none "
                "(or it gave none): set the app registration's tenant ID, application ID and client secret, "
                "or enable a managed identity for this machine",
            )
        if isinstance(exc, ValueError):
            return ConfigurationError(
                tenant_setting,
                f"{self.sign_in} does not know the directory (tenant) '{self.tenant}'",
            )
        match = re.search(r"AADSTS(\d+)", str(exc)) if isinstance(exc, ClientAuthenticationError) else None
        code = int(match.group(1)) if match else None
        if code in SECRET_CODES:
            return ConfigurationError(
                secret_setting,
                f"Entra ID refused the client secret of {self.who} (AADSTS{code}): the secret is wrong or "
                "expired; give the secret's value (not its ID) from the app registration's "
                "'Certificates & secrets' page",
            )
        if code in APP_CODES:
            return ConfigurationError(
                app_setting,
                f"Entra ID does not know {self.who} in directory {self.tenant} (AADSTS{code}): check the "
                "application (client) ID and that the app registration belongs to this tenant",
            )
        if code in TENANT_CODES:
            return ConfigurationError(
                tenant_setting,
                f"Entra ID does not know the directory (tenant) '{self.tenant}' (AADSTS{code})",
            )
        if code is not None:
            return ConfigurationError(
                app_setting,
                f"Entra ID refused to sign in {self.who} (AADSTS{code}; look the code up at "
                f"https://login.microsoftonline.com/error?code={code})",
            )
        return UnavailableError(
            self.sign_in_component, f"cannot sign in at {self.sign_in}: unexpected answer"
        )

    def _untrusted(self, where: str) -> ConfigurationError:
        return ConfigurationError(
            f"{self.prefix}.azureKeyvaultCaBundle",
            f"the TLS certificate of {where} is not trusted: set this to the CA bundle that signed it, "
            "or put the CA certificate in caCertificatesDirectory",
        )

    def close(self) -> None:
        self.credential.close()


class _Credential:
    """The SDK's credential, with its failures turned into ours where they happen.

    Key Vault clients call the credential from inside their pipeline, after their own 401 challenge;
    translating here is the only place where a token failure is still known to be a token failure
    (and which endpoint it was), rather than one more ``ClientAuthenticationError``.
    """

    def __init__(self, inner: ClientSecretCredential | ManagedIdentityCredential, vault: Vault) -> None:
        self._inner = inner
        self._vault = vault

    def _tenant(self, requested: str | None) -> str | None:
        # The vault's challenge names its tenant; a credential for another one cannot get a token for it.
        configured = self._vault.tenant
        if requested is None or configured is None:
            return requested
        if requested.lower() != configured.lower():
            raise ConfigurationError(
                f"{self._vault.prefix}.azureKeyvaultAdTenantId",
                f"is '{configured}', but the vault {self._vault.url} belongs to the directory (tenant) "
                f"'{requested}'",
            )
        return configured

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        tenant = self._tenant(tenant_id)
        try:
            return self._inner.get_token(
                *scopes, claims=claims, tenant_id=tenant, enable_cae=enable_cae, **kwargs
            )
        except Exception as exc:
            raise self._vault.sign_in_error(exc) from None

    def get_token_info(self, *scopes: str, options: TokenRequestOptions | None = None) -> AccessTokenInfo:
        if options and "tenant_id" in options:
            options = {**options, "tenant_id": self._tenant(options["tenant_id"]) or ""}
        try:
            return self._inner.get_token_info(*scopes, options=options)
        except Exception as exc:
            raise self._vault.sign_in_error(exc) from None

    def close(self) -> None:
        self._inner.close()
