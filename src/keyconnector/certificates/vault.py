"""A PFX kept in HashiCorp Vault (or OpenBao), as upstream's ``vault`` certificate source reads it.

Upstream stores the PFX base64-encoded under one key of a KV version 2 secret and reads its latest
version with a token. ``vaultSecretMountPoint`` defaults to ``secret``: the KV version 2 mount that
Vault's dev server and most installations create, and the default of upstream's Vault client library,
so operators who never set it keep working.

This module also holds the Vault plumbing that the ``vaulttransit`` key provider shares (one client
library, one way of reading its failures): ``VaultApi``. Vault answers 403 to a bad token and to a
token whose policy is too narrow alike, so after a 403 the token is looked up to tell the two apart
for the operator.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from typing import Any
from urllib.parse import urlsplit

from keyconnector._optional import require
from keyconnector.certificates import LoadedCertificate, read_certificate
from keyconnector.errors import ConfigurationError, KeyConnectorError, UnavailableError, setting_name
from keyconnector.runtime.settings import CertificateSettings, secret
from keyconnector.runtime.trust import Trust

DEFAULT_KV_MOUNT = "secret"
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0

_STATUS_BY_EXCEPTION = {
    "InvalidRequest": 400,
    "Unauthorized": 401,
    "Forbidden": 403,
    "InvalidPath": 404,
    "UnsupportedOperation": 405,
    "PreconditionFailed": 412,
    "RateLimitExceeded": 429,
    "InternalServerError": 500,
    "VaultNotInitialized": 501,
    "BadGateway": 502,
    "VaultDown": 503,
}


def server_url(value: str | None, setting: str) -> str:
    """The Vault address from the settings, checked before any connection is attempted."""
    if not value or not value.strip():
        raise ConfigurationError(
            setting, "is not set; it is the Vault address, e.g. https://vault.example.com:8200"
        )
    url = value.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(setting, f"'{url}' is not an http:// or https:// URL of a Vault server")
    return url


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """Vault does not echo credentials in its errors; this makes sure of it."""
    for value in secrets:
        if value:
            text = text.replace(value, "***")
    return text


class VaultApi:
    """hvac and requests, imported on first use, and the meaning of what they raise.

    Both are untyped here (hvac ships no annotations), hence ``Any`` for clients and responses.
    """

    def __init__(self, setting: str, provider: str) -> None:
        self.hvac = require("hvac", extra="vault", setting=setting, provider=provider)
        self.exceptions = require("hvac.exceptions", extra="vault", setting=setting, provider=provider)
        self.requests = require("requests", extra="vault", setting=setting, provider=provider)
        self.errors: tuple[type[Exception], ...] = (
            self.exceptions.VaultError,
            self.requests.RequestException,
        )

    def client(self, url: str, token: str | None, verify: str | bool, namespace: str | None = None) -> Any:
        # token "" rather than None: with None, hvac falls back to VAULT_TOKEN and ~/.vault-token, and the
        # settings alone must decide which identity the service uses. No retries (requests' default):
        # an outage must surface within seconds, and the caller's own retry loop takes over.
        return self.hvac.Client(
            url=url,
            token=token or "",
            verify=verify,
            timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
            namespace=namespace or None,
        )

    def status(self, exc: Exception) -> int | None:
        """The HTTP status behind an hvac exception; None for a transport failure."""
        if isinstance(exc, self.exceptions.VaultError):
            return _STATUS_BY_EXCEPTION.get(type(exc).__name__, 599)
        return None

    def message(self, exc: Exception, secrets: tuple[str, ...]) -> str:
        """Vault's own words for a refusal, shortened."""
        errors = getattr(exc, "errors", None)
        if errors:
            text = ", ".join(str(e) for e in errors)
        else:
            text = str(exc.args[0]) if exc.args and exc.args[0] else "no details"
        return scrub(" ".join(text.split()), secrets)[:300]

    def not_vault(self, exc: Exception) -> bool:
        """An HTTP error without Vault's JSON body: the address points at some other server."""
        return self.status(exc) is not None and getattr(exc, "json", None) is None

    def untrusted(self, exc: Exception) -> str | None:
        """Why a TLS handshake failed for a reason only configuration can fix, else None."""
        if not isinstance(exc, self.requests.exceptions.SSLError):
            return None
        text = str(exc)
        if "WRONG_VERSION_NUMBER" in text:
            return "the server does not speak TLS: use an http:// address, or enable TLS on Vault"
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            return f"its TLS certificate is not trusted ({_ssl_reason(text)})"
        return None

    def outage(self, exc: Exception, url: str, secrets: tuple[str, ...]) -> str | None:
        """What went wrong when the network or Vault itself is at fault (a retry may succeed), else None."""
        requests = self.requests
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            return f"cannot connect to {url}: no answer within {CONNECT_TIMEOUT:.0f} s"
        if isinstance(exc, requests.exceptions.Timeout):
            return f"{url} did not answer within {READ_TIMEOUT:.0f} s"
        if isinstance(exc, requests.exceptions.ConnectionError):
            return f"cannot connect to {url}: {_connection_reason(exc)}"
        if isinstance(exc, requests.RequestException):
            return f"unexpected answer from {url} ({type(exc).__name__}); is it a Vault server?"
        status = self.status(exc)
        if status == 503:
            return f"Vault at {url} is sealed or not ready (503: {self.message(exc, secrets)})"
        if status == 429:
            return f"Vault at {url} is throttling requests (429)"
        if status is not None and (status == 412 or status >= 500):
            return f"Vault at {url} answered {status}: {self.message(exc, secrets)}"
        return None

    def token_problem(self, client: Any, path: str, capability: str) -> str:
        """Why Vault answered 403: a dead token, or a live one whose policy does not reach ``path``."""
        try:
            policies = client.auth.token.lookup_self()["data"].get("policies") or []
        except self.errors:
            return (
                "Vault refused the token (403 permission denied): it is invalid, expired or revoked "
                f"(or it lacks '{capability}' on '{path}')"
            )
        return (
            f"Vault refused the request (403 permission denied): the token's policies "
            f"({', '.join(policies) or 'none'}) do not grant '{capability}' on '{path}'"
        )


def _ssl_reason(text: str) -> str:
    match = re.search(r"certificate verify failed: ([^()'\"]+)", text)
    return match.group(1).strip() if match else "certificate verify failed"


def _connection_reason(exc: Exception) -> str:
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\] ([^)'\"]+)", text)
    if match:
        return match.group(1).strip().lower()
    if "RemoteDisconnected" in text or "Connection aborted" in text:
        return "the connection was closed before Vault answered"
    return text[:200]


async def load(settings: CertificateSettings, prefix: str, ca_directory: str) -> LoadedCertificate:
    url_setting = f"{prefix}.vaultServerUri"
    url = server_url(settings.vault_server_uri, url_setting)
    token = secret(settings.vault_token)
    if not token:
        raise ConfigurationError(
            f"{prefix}.vaultToken", "is not set; it is the Vault token that reads the PFX"
        )
    path = (settings.vault_secret_path or "").strip().strip("/")
    if not path:
        raise ConfigurationError(
            f"{prefix}.vaultSecretPath", "is not set; it is the path of the KV secret holding the PFX"
        )
    data_key = (settings.vault_secret_data_key or "").strip()
    if not data_key:
        raise ConfigurationError(
            f"{prefix}.vaultSecretDataKey",
            "is not set; it is the key, inside the secret's data, whose value is the base64 PFX",
        )
    mount = (settings.vault_secret_mount_point or "").strip().strip("/") or DEFAULT_KV_MOUNT
    password = secret(settings.vault_secret_file_password)
    secrets = (token, password or "")

    api = VaultApi(f"{prefix}.provider", "vault")
    ca_setting = f"{prefix}.vaultCaBundle"
    verify = Trust.from_directory(ca_directory).bundle_file(settings.vault_ca_bundle, ca_setting)
    client = api.client(url, token, verify)
    try:
        response = await asyncio.to_thread(
            client.secrets.kv.v2.read_secret_version,
            path=path,
            mount_point=mount,
            raise_on_deleted_version=True,
        )
    except api.errors as exc:
        raise await asyncio.to_thread(
            _read_error, api, client, exc, prefix, url, mount, path, ca_directory, secrets
        ) from None
    finally:
        client.adapter.close()

    where = f"Vault {url}, secret '{mount}/{path}', key '{data_key}'"
    data = (response.get("data") or {}).get("data") if isinstance(response, dict) else None
    if not isinstance(data, dict):
        raise ConfigurationError(
            f"{prefix}.vaultSecretMountPoint",
            f"'{mount}/{path}' on {url} did not answer as a KV version 2 secret; "
            "the mount must be KV version 2",
        )
    if data_key not in data:
        present = ", ".join(sorted(f"'{k}'" for k in data)) or "none"
        raise ConfigurationError(
            f"{prefix}.vaultSecretDataKey",
            f"the secret '{mount}/{path}' on {url} has no key '{data_key}'; its keys are: {present}",
        )
    value = data[data_key]
    if not isinstance(value, str):
        raise ConfigurationError(
            f"{prefix}.vaultSecretDataKey",
            f"the value of '{data_key}' in '{mount}/{path}' is a {type(value).__name__}, not a base64 string",
        )
    try:
        blob = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        blob = b""
    if not blob:
        raise ConfigurationError(
            f"{prefix}.vaultSecretDataKey",
            f"the value of '{data_key}' in '{mount}/{path}' is not a base64-encoded PFX "
            f'(store it with: vault kv put -mount={mount} {path} {data_key}="$(base64 -w0 key.pfx)")',
        )
    return read_certificate(
        blob,
        password,
        where=where,
        file_setting=f"{prefix}.vaultSecretDataKey",
        password_setting=f"{prefix}.vaultSecretFilePassword",
    )


def _read_error(
    api: VaultApi,
    client: Any,
    exc: Exception,
    prefix: str,
    url: str,
    mount: str,
    path: str,
    ca_directory: str,
    secrets: tuple[str, ...],
) -> KeyConnectorError:
    """The project error for a failed KV read (runs in a thread: it may ask Vault about the token)."""
    untrusted = api.untrusted(exc)
    if untrusted is not None:
        if "TLS certificate" in untrusted:
            return ConfigurationError(
                f"{prefix}.vaultCaBundle",
                f"cannot connect to {url}: {untrusted}; give the CA certificate that signed it in "
                f"{setting_name(prefix + '.vaultCaBundle')} or as a .crt file in {ca_directory}",
            )
        return ConfigurationError(f"{prefix}.vaultServerUri", f"cannot connect to {url}: {untrusted}")
    outage = api.outage(exc, url, secrets)
    if outage is not None:
        return UnavailableError(
            f"the certificate source vault ({setting_name(prefix + '.vaultServerUri')})", outage
        )
    status = api.status(exc)
    api_path = f"{mount}/data/{path}"
    if status in (401, 403):
        return ConfigurationError(f"{prefix}.vaultToken", api.token_problem(client, api_path, "read"))
    if status == 404:
        if api.not_vault(exc):
            return ConfigurationError(
                f"{prefix}.vaultServerUri", f"{url} answered 404 without a Vault error: is it a Vault server?"
            )
        if "no handler for route" in api.message(exc, secrets):
            return ConfigurationError(
                f"{prefix}.vaultSecretMountPoint", f"no secrets engine is mounted at '{mount}' on {url}"
            )
        return ConfigurationError(
            f"{prefix}.vaultSecretPath",
            f"no secret '{path}' in the KV engine mounted at '{mount}' on {url}, or its latest version is "
            f"deleted (check {setting_name(prefix + '.vaultSecretPath')} and "
            f"{setting_name(prefix + '.vaultSecretMountPoint')}; the mount must be KV version 2)",
        )
    return ConfigurationError(
        f"{prefix}.vaultServerUri",
        f"Vault at {url} refused to read '{api_path}': {api.message(exc, secrets)}",
    )
